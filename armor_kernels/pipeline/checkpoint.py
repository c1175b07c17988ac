"""The packed checkpoint: a self-contained directory, safetensors only.

    config.json           run configuration (method, block size, options, format version, model config)
    tokenizer files       so the checkpoint evaluates without its source model
    rest.safetensors      everything that is not pruned (embeddings, norms, lm_head), dense
    layers/block_NNN.safetensors   one file per decoder block, written atomically when the block is done

Per pruned linear `<name>` of a block: ARMOR stores `<name>.A`, `<name>.B` (block-diagonal blocks,
r and c folded in), `<name>.S_values`, `<name>.S_idx` (2:4 kept values + 2-bit positions) and
`<name>.bias` if any; a baseline stores `<name>.S_values`, `<name>.S_idx` (its pruned weight, packed
the same way) and `<name>.bias`. Each layer file carries the run's config hash in its metadata, so a
resumed run never mixes layers of different configurations.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_write, save_json
from ..nn import ArmorLinear
from ..sparse24 import pack_24, unpack_24
from .model import adopt, block_linears, decoder_layers

FORMAT_VERSION = 1
STORAGE_DTYPE = torch.bfloat16  # what a checkpoint stores; the pruned model in memory uses the same values


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def layer_path(out: Path, i: int) -> Path:
    return Path(out) / "layers" / f"block_{i:03d}.safetensors"


def linear_tensors(name: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """The stored form of one pruned linear (ArmorLinear, or nn.Linear holding a 2:4 weight)."""
    if isinstance(module, ArmorLinear):
        out = {f"{name}.A": module.A, f"{name}.B": module.B}
        values, idx = (module.S_values, module.S_idx) if module.packed else pack_24(module.S)
    else:  # its weight holds STORAGE_DTYPE values in the model's dtype: the cast back is exact
        out = {}
        values, idx = pack_24(module.weight.detach().to(STORAGE_DTYPE))
    out[f"{name}.S_values"], out[f"{name}.S_idx"] = values, idx
    if module.bias is not None:
        out[f"{name}.bias"] = module.bias.detach().to(out[f"{name}.S_values"].dtype)
    return {k: v.contiguous().cpu() for k, v in out.items()}


def save_block(out: Path, i: int, linears: dict[str, nn.Module], chash: str, report: dict) -> None:
    """One block's pruned linears, with the run's config hash and the block's report (ARMOR's losses)
    in the metadata, so a resumed run loses nothing."""
    tensors = {}
    for name, mod in linears.items():
        tensors.update(linear_tensors(name, mod))
    meta = {"config_hash": chash, "block": str(i), "report": json.dumps(report)}
    atomic_write(layer_path(out, i), lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_block(out: Path, i: int, chash: str) -> tuple[dict[str, nn.Module], dict]:
    """(name -> module (ArmorLinear, or nn.Linear with the unpacked 2:4 weight), report) of one saved block."""
    path = layer_path(out, i)
    try:
        tensors = load_file(path)
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"checkpoint layer {str(path)!r} is corrupt or truncated: {e}") from e
    meta = header.get("__metadata__", {})
    if meta.get("config_hash") != chash:
        raise ValueError(f"checkpoint layer {str(path)!r} was written by a different configuration "
                         f"(hash {meta.get('config_hash')!r}, this run {chash!r}); use a new output directory")
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    modules = {}
    for name in names:
        get = lambda key: tensors.get(f"{name}.{key}")  # noqa: E731
        S = unpack_24(get("S_values"), get("S_idx"))
        if get("A") is not None:
            modules[name] = ArmorLinear(get("A"), S, get("B"), get("bias")).pack()
        else:
            lin = nn.Linear(S.shape[1], S.shape[0], bias=get("bias") is not None, dtype=S.dtype)
            lin.weight.data.copy_(S)
            if lin.bias is not None:
                lin.bias.data.copy_(get("bias"))
            modules[name] = lin.requires_grad_(False)
    return modules, json.loads(meta.get("report", "{}"))


def pruned_names(model: nn.Module) -> set[str]:
    """State-dict keys that live in the per-block layer files (the decoder blocks' linears)."""
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    return {f"{prefix}.{i}.{name}.{p}" for i, block in enumerate(layers)
            for name, lin in block_linears(block).items() for p, _ in lin.named_parameters()}


def save_rest(model: nn.Module, out: Path, dense: bool = False) -> None:
    """Everything not pruned (embeddings, norms, lm_head; all of it for a dense checkpoint),
    deduplicating tied weights."""
    skip, seen, rest = (set() if dense else pruned_names(model)), set(), {}
    for k, v in model.state_dict().items():
        if k in skip or v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        rest[k] = v.detach().contiguous().cpu()
    atomic_write(Path(out) / "rest.safetensors", lambda tmp: save_file(rest, tmp))


def load_pruned_model(out: str | Path):
    """(model, tokenizer) rebuilt from a checkpoint directory: ArmorLinear / pruned linears in place."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    cfg_path = out / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"checkpoint {str(out)!r} has no config.json")
    try:
        meta = json.loads(cfg_path.read_text())
        run, chash = meta["run"], meta["config_hash"]
    except (ValueError, KeyError) as e:
        raise ValueError(f"checkpoint config {str(cfg_path)!r} is unreadable: {e}") from e
    if run.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {str(out)!r} has format version {run.get('format_version')!r}, "
                         f"this package reads {FORMAT_VERSION}")
    mc = dict(run["model_config"])
    config = AutoConfig.for_model(mc.pop("model_type"), **mc)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, run["model_dtype"]))
    try:
        rest = load_file(out / "rest.safetensors")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"checkpoint file {str(out / 'rest.safetensors')!r} is missing or corrupt: {e}") from e
    missing, _ = model.load_state_dict(rest, strict=False)
    missing = set(missing) - (pruned_names(model) if run["method"] != "dense" else set())
    if model.config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise ValueError(f"checkpoint {str(out)!r} lacks tensors {sorted(missing)[:5]}")
    if model.config.tie_word_embeddings:
        model.tie_weights()
    dtype = next(model.parameters()).dtype
    if run["method"] != "dense":
        for i, block in enumerate(decoder_layers(model)):
            if not layer_path(out, i).exists():
                raise ValueError(f"checkpoint {str(out)!r} is incomplete: block {i} was never written "
                                 "(resume the prune run to finish it)")
            adopt(block, load_block(out, i, chash)[0], dtype, "cpu")
    return model.eval(), AutoTokenizer.from_pretrained(out)


def block_dense_bf16_bytes(block: nn.Module) -> int:
    """What the block's linears (pruned or not) take as dense bf16 weights and biases."""
    return sum(2 * m.out_features * (m.in_features + (m.bias is not None)) for m in block.modules()
               if isinstance(m, (nn.Linear, ArmorLinear)))


def dense_bf16_linear_bytes(model: nn.Module) -> int:
    return sum(block_dense_bf16_bytes(block) for block in decoder_layers(model))


def checkpoint_sizes(out: Path, model: nn.Module) -> dict:
    """Bytes on disk against the dense bf16 model: per block (its layer file), all pruned linears,
    and the whole checkpoint directory."""
    per_block = [{"block": i, "bytes": layer_path(out, i).stat().st_size, "dense_bf16_bytes": block_dense_bf16_bytes(b)}
                 for i, b in enumerate(decoder_layers(model))]
    total = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    return {"linear_bytes": sum(b["bytes"] for b in per_block), "checkpoint_bytes": total, "per_block": per_block}
