"""The "armor" quantization method for transformers ≥ 5: pruned checkpoints load with `from_pretrained`.

    import armor_kernels.integrations.hf                       # registers "armor" (importing it again is harmless)
    model = AutoModelForCausalLM.from_pretrained(CKPT, dtype=torch.bfloat16, device_map="cuda")
    model.save_pretrained(OUT)                    # loads back to the same logits; sharding works too

transformers builds the model skeleton on the meta device and calls the quantizer before loading the
weights: each pruned `nn.Linear` named in config.json's quantization_config["modules"] is swapped for an
empty ArmorLinear / Sparse24Linear whose tensor names and shapes are those stored, and transformers fills
them (floating tensors in the requested dtype, the uint8 ones as they are). After loading, each pruned
layer stays packed and `armor_kernels.prepare(model)` puts it on the fastest path of its device (nn.py:
the fused Hopper kernels, torch's semi-structured 2:4 on other CUDA GPUs, the packed CPU kernels): no
dense weight is built, so the load's peak is the packed model plus one layer's working set. After a
`.to(device)` call `prepare(model)` again; `armor_kernels.paths(model)` says what each layer runs.
Before any weight loads, every shard is checked against the sha256 digests the index records (each file
read once more); a damaged shard stops the load with an error naming it and the tensor. The format:
pipeline/checkpoint.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import InputError
from ..nn import ArmorLinear, Sparse24Linear, prepare
from ..pipeline.checkpoint import (
    FORMAT_VERSION,
    INDEX_FILE,
    QUANT_METHOD,
    RUN_FILE,
    check_complete,
    read_run,
    tensor_sha256,
)
from ..pipeline.model import replace_module
from ..pipeline.verify import MODEL_SHA256_KEY, verify_checkpoint

KINDS = ("armor", "sparse24")


class ArmorConfig(QuantizationConfigMixin):
    """config.json's quantization_config of a pruned checkpoint (checkpoint.quantization_config writes it)."""

    def __init__(self, modules: dict | None = None, format_version: int = FORMAT_VERSION, method: str = "armor",
                 storage_dtype: str = "bfloat16", **kwargs):
        if format_version != FORMAT_VERSION:
            raise InputError(f"quantization_config: format_version {format_version!r}, this package reads "
                             f"{FORMAT_VERSION}")
        self.quant_method = QUANT_METHOD
        self.format_version, self.method, self.storage_dtype = format_version, method, storage_dtype
        self.modules = dict(modules or {})
        for name, spec in self.modules.items():
            if spec.get("kind") not in KINDS or (spec["kind"] == "armor" and len(spec.get("block", ())) != 2):
                raise InputError(f"quantization_config.modules[{name!r}]: expected {{'kind': 'armor', 'block': "
                                 f"[bA, bB]}} or {{'kind': 'sparse24'}}, got {spec!r}")
        for k, v in kwargs.items():  # keep unknown keys of newer writers, so save_pretrained round-trips them
            setattr(self, k, v)


class ArmorQuantizer(HfQuantizer):
    """Loads (never creates) pruned checkpoints: pruning needs calibration, `python -m armor_kernels prune`."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        self._stored_shapes, self._directory = {}, None  # for _check_shapes
        if checkpoint_files:  # local shard paths, those transformers is about to read
            files = [Path(f) for f in checkpoint_files]
            verify_checkpoint(files[0].parent, files)
            self._directory = files[0].parent
        for name, spec in self.quantization_config.modules.items():
            try:
                lin = model.get_submodule(name)
            except AttributeError:
                raise InputError(f"quantization_config names module {name!r}, which {type(model).__name__} "
                                 "does not have") from None
            if not hasattr(lin, "in_features") or not hasattr(lin, "weight"):
                raise InputError(f"quantization_config names {name!r}, a {type(lin).__name__}, not a linear layer")
            shape, dtype, device = (lin.out_features, lin.in_features), lin.weight.dtype, lin.weight.device
            bias = lin.bias is not None
            if spec["kind"] == "armor":
                new = ArmorLinear.empty(*shape, tuple(spec["block"]), bias, dtype, device)
            else:
                new = Sparse24Linear.empty(*shape, bias, dtype, device)
            replace_module(model, name, new)
            self._stored_shapes[name] = {k: tuple(v.shape) for k, v in new.state_dict().items()}
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        self._check_shapes(model)
        prepare(model)
        return model

    def _check_shapes(self, model) -> None:
        """Refuse a stored tensor of the wrong shape, naming its shard: transformers <= 5.17 puts one in place
        even under ignore_mismatched_sizes (5.24 keeps the module's own and lists it as mismatched)."""
        index = self._directory / INDEX_FILE if self._directory is not None else None
        shard_of = json.loads(index.read_text())["weight_map"] if index is not None and index.is_file() else {}
        for name, shapes in self._stored_shapes.items():
            for k, v in model.get_submodule(name).state_dict().items():
                if k in shapes and tuple(v.shape) != shapes[k]:
                    key = f"{name}.{k}"
                    raise InputError(f"{shard_of.get(key, 'checkpoint')}: tensor {key!r} has shape {tuple(v.shape)}, "
                                     f"the model needs {shapes[k]}")

    def get_state_dict_and_metadata(self, model):
        """save_pretrained's metadata, in every shard it writes: the sha256 of each tensor of the state dict
        it saves (verify.MODEL_SHA256_KEY), so that a reload checks the bytes as a pruning run's do."""
        digests = {k: tensor_sha256(v.cpu()) for k, v in model.state_dict().items()}
        return None, {MODEL_SHA256_KEY: json.dumps(digests, sort_keys=True)}

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self):
        return False


def register() -> None:
    """Register "armor" with transformers (once per process; later calls do nothing)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(ArmorConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(ArmorQuantizer)


register()


def load_pruned_model(out: str | Path, dtype: torch.dtype | None = None, device_map=None):
    """(model, tokenizer) of a checkpoint directory: `from_pretrained` after a check that names what is
    missing or corrupt. dtype: the pruning run's model dtype by default (else config.json's)."""
    out = Path(out)
    check_complete(out)
    if dtype is None and (out / RUN_FILE).is_file():
        dtype = getattr(torch, read_run(out)["run"]["model_dtype"])
    # mismatches are collected rather than raised, to be reported with the shard that holds them
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=dtype or "auto", device_map=device_map,
                                                       ignore_mismatched_sizes=True, output_loading_info=True)
    shard_of = json.loads((out / INDEX_FILE).read_text())["weight_map"] if (out / INDEX_FILE).is_file() else {}
    problems = [f"{shard_of.get(k, 'checkpoint')}: tensor {k!r} has shape {tuple(got)}, the model needs {tuple(want)}"
                for k, got, want in sorted(info["mismatched_keys"])]
    problems += [f"tensor {k!r} is missing" for k in sorted(info["missing_keys"])]
    problems += [f"{shard_of.get(k, 'checkpoint')}: tensor {k!r} is not part of the model"
                 for k in sorted(info["unexpected_keys"])]
    if problems:
        raise InputError(f"checkpoint {str(out)!r} does not fit its config: " + "; ".join(problems[:5]))
    return model.eval(), AutoTokenizer.from_pretrained(out)


def export_dense(src: str | Path, dst: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write checkpoint `src` as a plain Hugging Face checkpoint in `dst`: each pruned layer becomes an
    nn.Linear holding its dense weight (A'·S·B', or the 2:4 weight), so that stock transformers, vLLM,
    llama.cpp's converter, PEFT, … load it; its logits equal the pruned model's in the same dtype."""
    model, tok = load_pruned_model(src, dtype=dtype)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, (ArmorLinear, Sparse24Linear)):
            W = mod.to_dense()
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                  device=W.device, dtype=W.dtype)
            lin.weight.data.copy_(W)
            if mod.bias is not None:
                lin.bias.data.copy_(mod.bias)
            replace_module(model, name, lin.requires_grad_(False))
    model.hf_quantizer.remove_quantization_config(model)  # config.json without quantization_config
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
