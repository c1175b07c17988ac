"""What a checkpoint holds and how an sm_90 GPU would run it, read from its files alone (no tensor data).

    python -m armor_kernels inspect CKPT [--json] [--dtype bfloat16]

Per pruned (or kept-dense) linear: kind, shape, blocks, stored bytes against its dense bf16 bytes, the
path it takes after `prepare` on an sm_90 GPU with the extension built, in the dtype it is loaded in:
the fused kernels (decode up to ops.DECODE_MAX_TOKENS tokens, the sparse GEMM above), in the kernels' own
layout or padded into it (layout.py: how, and the sparse GEMM's extra FLOPs), or the reference with the
reason; and the path `prepare` picks on this machine (`here`: its GPU when it has one, else the CPU;
nn.path_for). Also the run's options and the package version that wrote it.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import InputError
from ..layout import identity_block, layer_layout
from ..nn import path_for
from ..ops import layer_unavailable_reason
from .checkpoint import INDEX_FILE, RUN_FILE, check_complete
from .verify import dtype_itemsize


def _tensor_bytes(out: Path) -> dict[str, tuple[tuple[int, ...], int, str]]:
    """Every stored tensor's (shape, bytes, shard), from the shards' headers."""
    shards = sorted(set(json.loads((out / INDEX_FILE).read_text())["weight_map"].values()))
    found = {}
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                shape = tuple(sl.get_shape())
                found[k] = shape, math.prod(shape) * dtype_itemsize(sl.get_dtype()), shard
    return found


def _path(kind: str, d_out: int, d_in: int, blocks: tuple[int, int] | None, dtype: torch.dtype) -> tuple[str, str]:
    """(path, detail) on an sm_90 GPU after prepare_fused."""
    if kind == "dense":
        return "dense", "nn.Linear (kept dense): cuBLAS"
    why = layer_unavailable_reason(dtype, d_out, d_in, *blocks)
    if why is not None:
        return "reference", why
    layout = layer_layout(d_out, d_in, *blocks)
    return "fused", f"decode (T <= 16) / sparse GEMM (T > 16); layout {layout.describe()}"


def inspect_checkpoint(out: str | Path, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The report `inspect` prints (module docstring) as a dict: run, layers, totals."""
    out = Path(out)
    check_complete(out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = json.loads((out / "config.json").read_text())
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") != "armor":
        raise InputError(f"inspect: {str(out)!r} is not a pruned checkpoint (no 'armor' quantization_config)")
    run = json.loads((out / RUN_FILE).read_text())["run"] if (out / RUN_FILE).is_file() else {}
    tensors = _tensor_bytes(out)
    # the pruned linears, and those a conversion kept dense: a 2-D weight in a block shard
    kept = {k.rsplit(".", 1)[0] for k, (shape, _, shard) in tensors.items()
            if shard.startswith("model-block-") and k.endswith(".weight") and len(shape) == 2}
    layers = []
    for name in sorted(set(quant["modules"]) | kept, key=_natural):
        spec = quant["modules"].get(name, {"kind": "dense"})
        own = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
        if spec["kind"] == "dense":
            (d_out, d_in), blocks = own["weight"][0], None
        else:
            d_out, d_in = own["S_values"][0][0], 2 * own["S_values"][0][1]
            blocks = (tuple(spec["block"]) if spec["kind"] == "armor" else
                      (identity_block(d_out), identity_block(d_in)))
        has_bias = "bias" in own
        stored = sum(b for _, b, _ in own.values())
        path, detail = _path(spec["kind"], d_out, d_in, blocks, dtype)
        here = "dense" if spec["kind"] == "dense" else path_for(device, dtype, d_out, d_in, blocks)
        layers.append({"name": name, "kind": spec["kind"], "d_out": d_out, "d_in": d_in,
                       "blocks": list(blocks) if spec["kind"] == "armor" else None, "stored_bytes": stored,
                       "dense_bf16_bytes": 2 * d_out * (d_in + has_bias), "path": path, "detail": detail,
                       "here": here})
    totals = {"stored_bytes": sum(r["stored_bytes"] for r in layers),
              "dense_bf16_bytes": sum(r["dense_bf16_bytes"] for r in layers),
              "paths": dict(Counter(r["path"] for r in layers)), "paths_here": dict(Counter(r["here"] for r in layers))}
    totals["ratio"] = round(totals["stored_bytes"] / totals["dense_bf16_bytes"], 4) if layers else None
    return {"checkpoint": str(out), "dtype": str(dtype).removeprefix("torch."), "device": str(device),
            "method": quant.get("method"),
            "format_version": quant.get("format_version"), "package_version": run.get("package_version"),
            "options": run.get("options"), "protocol": run.get("protocol"), "calibration": run.get("calibration"),
            "model_source": run.get("model_source"), "layers": layers, "totals": totals}


def _natural(name: str) -> list:
    """model.layers.10.x after model.layers.9.x."""
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def format_report(report: dict) -> str:
    """The human form: a header with the run, one table row per layer, the totals."""
    head = [f"checkpoint {report['checkpoint']}: method {report['method']}, format v{report['format_version']}, "
            f"written by armor-kernels {report['package_version']}",
            f"options: {json.dumps(report['options'], sort_keys=True)}" if report["options"] is not None else "",
            f"paths after prepare, loaded in {report['dtype']}: on an sm_90 GPU (extension built), and here "
            f"({report['device']}):", ""]
    rows = [["layer", "kind", "shape", "blocks", "stored bytes", "/ dense bf16", "here", "sm_90 path", "detail"]]
    for r in report["layers"]:
        rows.append([r["name"], r["kind"], f"{r['d_out']}x{r['d_in']}",
                     "" if r["blocks"] is None else "x".join(map(str, r["blocks"])), str(r["stored_bytes"]),
                     f"{r['stored_bytes'] / r['dense_bf16_bytes']:.4f}", r["here"], r["path"], r["detail"]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
    t = report["totals"]
    tail = ["", f"total: {len(report['layers'])} linears, {t['stored_bytes']} bytes stored, {t['ratio']} of their "
                f"dense bf16 bytes; paths on sm_90: {t['paths']}, here: {t['paths_here']}"]
    return "\n".join([h for h in head if h != ""][:3] + [""] + lines + tail)
