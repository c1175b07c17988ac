"""A dense Hugging Face checkpoint whose linears are 2:4 (zeros stored) as a packed format-v2 directory.

    python -m armor_kernels convert SRC DST [--strict]

Tools that prune to 2:4 but can no longer store it sparse (llm-compressor's SparseGPT and Wanda
modifiers save dense tensors with zeros since compressed-tensors dropped its sparse compressors) leave
a model of the full dense size that no kernel runs sparse. This reads such a directory one decoder block
at a time (ModelSource), packs every block linear that is exactly 2:4 along d_in as a Sparse24Linear
(kept values + 2-bit positions: 0.5625 of its dense bf16 bytes) and writes the same format a pruning run
writes: `from_pretrained` with the plugin gives the same logits, `prepare` runs it on the sparse
GEMM. A linear that is not exactly 2:4 (any group of 4 with more than two non-zeros) is named in the
report and kept dense in its block's shard, or, with strict=True, refused before anything is written
for it. Values are stored in bf16, as in every checkpoint of the format: a bf16 source converts bit for
bit; a float32 or float16 source's values are rounded, and the report counts the linears that changed.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from .. import __version__
from ..atomic import save_json
from ..errors import InputError
from ..nn import Sparse24Linear
from ..sparse24 import violations_24
from .checkpoint import (
    FORMAT_VERSION,
    QUANT_METHOD,
    RUN_FILE,
    STORAGE_DTYPE,
    config_hash,
    finish_run,
    save_block,
    save_rest,
    write_config,
)
from .model import block_linears, check_supported, decoder_layers, layers_prefix
from .source import ModelSource

METHOD = "from_dense_24"  # quantization_config["method"] of a converted directory


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _source_dtype(src: ModelSource, model: nn.Module) -> torch.dtype:
    """The dtype the source stores its block linears in (the first one's), so nothing is cast on reading."""
    name = f"{layers_prefix(model)}.0.{next(iter(block_linears(decoder_layers(model)[0])))}.weight"
    with safe_open(src.files[name], "pt") as f:
        stored = f.get_slice(name).get_dtype()
    if stored not in _DTYPES:
        raise InputError(f"convert: {name} is stored as {stored}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[stored]


def _refuse_quantized(src: ModelSource) -> None:
    """Only dense tensors convert: a quantized source (compressed-tensors groups, GPTQ, …, or a pruning run
    of this package) is refused by name."""
    q = getattr(src.config, "quantization_config", None)
    if q is None:
        return
    q = q if isinstance(q, dict) else q.to_dict()
    if q.get("quant_method") == QUANT_METHOD:
        raise InputError(f"convert: {str(src.path)!r} is already a pruned checkpoint of this package")
    if q.get("quant_method") != "compressed-tensors" or q.get("config_groups"):
        raise InputError(f"convert: {str(src.path)!r} holds quantized weights (quantization_config "
                         f"{q.get('quant_method')!r}); only dense tensors with 2:4 zeros convert")


def from_dense_24(src: str | Path, dst: str | Path, *, strict: bool = False) -> dict:
    """Convert `src` into `dst` (new or empty); returns the report (also in dst's armor_run.json): which
    linears were packed, which kept dense and why, and what was rounded to bf16."""
    src, dst = ModelSource(src), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise InputError(f"convert: output directory {str(dst)!r} is not empty")
    _refuse_quantized(src)
    model = src.skeleton()
    check_supported(model)
    dtype = _source_dtype(src, model)
    model = src.skeleton(dtype)
    src.load_rest(model, "cpu", dtype)
    created = not dst.exists()
    dst.mkdir(parents=True, exist_ok=True)
    try:
        return _convert(src, model, dtype, dst, strict)
    except BaseException:
        if created:  # nothing half-written is left behind (a partial directory never loads anyway: no index)
            shutil.rmtree(dst, ignore_errors=True)
        raise


def _convert(src: ModelSource, model: nn.Module, dtype: torch.dtype, dst: Path, strict: bool) -> dict:
    t0 = time.perf_counter()
    layers, prefix = decoder_layers(model), layers_prefix(model)
    packed, dense, rounded, modules = [], {}, [], {}
    # The run file first (finish_run completes it), the rest shard and tokenizer: what a pruning run writes.
    run = {"package_version": __version__, "format_version": FORMAT_VERSION, "method": METHOD,
           "model_source": str(src.path), "model_dtype": str(dtype).removeprefix("torch."),
           "storage_dtype": str(STORAGE_DTYPE).removeprefix("torch."), "strict": strict}
    save_json(dst / RUN_FILE, {"run": run, "config_hash": config_hash(run)})
    src.tokenizer().save_pretrained(dst)
    save_rest(model, dst)
    for i in tqdm(range(len(layers)), desc="convert", unit="block"):
        block = src.load_block(model, i, "cpu", dtype)
        out = {}
        for name, lin in block_linears(block).items():
            full = f"{prefix}.{i}.{name}"
            W = lin.weight.detach()
            bad = violations_24(W) if W.shape[1] % 8 == 0 else None
            if bad == 0:
                out[name] = Sparse24Linear.from_weight(W, None if lin.bias is None else lin.bias.detach())
                packed.append(full)
                modules[full] = {"kind": "sparse24"}
                if dtype != STORAGE_DTYPE and not torch.equal(W.to(STORAGE_DTYPE).to(dtype), W):
                    rounded.append(full)
                continue
            why = (f"d_in={W.shape[1]} is not a multiple of 8 (the packed form's unit)" if bad is None else
                   f"{bad} of {W.numel() // 4} groups of 4 hold more than two non-zeros")
            if strict:
                raise InputError(f"convert --strict: {full} is not exactly 2:4 ({why}); nothing written")
            dense[full] = why
            out[name] = lin
        save_block(dst, i, f"{prefix}.{i}", out, config_hash(run), {})
        src.free_block(model, i)
    write_config(dst, model, METHOD, modules)
    report = {"packed": len(packed), "kept_dense": dense, "rounded_to_bf16": rounded,
              "seconds": round(time.perf_counter() - t0, 1)}
    finish_run(dst, len(layers), {"conversion": report})
    return report


def report_lines(report: dict, dst: Path) -> list[str]:
    """What the CLI prints: one line per linear kept dense, then a summary."""
    lines = [f"kept dense: {name}: {why}" for name, why in report["kept_dense"].items()]
    if report["rounded_to_bf16"]:
        lines.append(f"{len(report['rounded_to_bf16'])} packed linears had values that bf16 storage rounds "
                     f"(e.g. {report['rounded_to_bf16'][0]})")
    lines.append(f"wrote {dst} (format v2): {report['packed']} linears packed 2:4, {len(report['kept_dense'])} kept "
                 f"dense, {report['seconds']} s")
    return lines
