"""The demo's table: quality, size and speed of the recommended configuration beside dense and SparseGPT.

Each run is pruned and evaluated by the CLI's `run_method` (perplexity streamed in float32 from what was
written); then each is loaded as a user loads it, in bf16 (the checkpoint's storage dtype) on the run's
device, pruned layers packed and `prepare`d, for the bytes the model holds and its greedy decode tokens/s.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..atomic import save_csv, write_text
from ..nn import prepare
from .runtime import cpu_name, decode_tokens_per_s, held_bytes, path_counts

DEMO_RUNS = ("dense", "quality", "sparsegpt")  # each a preset's or a method's name (config.prune_config)
COLUMNS = ["run", "linear_bytes_ratio", "perplexity", "perplexity_vs_dense", "memory_mib", "memory_vs_dense",
           "decode_tok_s", "decode_vs_dense", "paths", "prune_s", "device", "cpu", "threads", "torch"]


def _loaded(run: str, out: Path, model: str | None, device: str):
    if run == "dense":
        from .model import load_model
        return load_model(model, dtype=torch.bfloat16)[0].to(device)
    from ..integrations.hf import load_pruned_model
    m = load_pruned_model(out / run, dtype=torch.bfloat16)[0].to(device)
    prepare(m)  # again after the move: the path this device has
    return m


def demo_table(results: list[dict], out: Path, model: str | None, device: str, seconds: float) -> str:
    """The runs' results (run_method's, in DEMO_RUNS' order) with their loaded memory and decode speed, as
    out/demo.csv and out/demo.md; returns the Markdown."""
    machine = dict(device=torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu",
                   cpu=cpu_name(), threads=torch.get_num_threads(), torch=torch.__version__)
    rows = []
    for res in results:
        m = _loaded(res["method"], out, model, device)
        rows.append({"run": res["method"], "linear_bytes_ratio": res["linear_bytes_ratio"],
                     "perplexity": res["perplexity"], "memory_mib": round(held_bytes(m) / 2 ** 20, 3),
                     "decode_tok_s": round(decode_tokens_per_s(m), 2),
                     "paths": path_counts(m),
                     "prune_s": res["calibration_s"], **machine})
        del m
    base = rows[0]
    for r in rows:
        for key, ratio in (("perplexity", "perplexity_vs_dense"), ("memory_mib", "memory_vs_dense"),
                           ("decode_tok_s", "decode_vs_dense")):
            r[ratio] = round(r[key] / base[key], 3) if r[key] and base[key] else ""
    save_csv(out / "demo.csv", rows, COLUMNS)
    head = ["run", "stored bytes / dense bf16 (linears)", "perplexity", "memory loaded in bf16",
            "decode tokens/s (batch 1)", "paths", "prune time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], f"{r['linear_bytes_ratio']:.4f}", _num(r["perplexity"], r["perplexity_vs_dense"]),
                 _num(r["memory_mib"], r["memory_vs_dense"], " MiB"), _num(r["decode_tok_s"], r["decode_vs_dense"]),
                 r["paths"], f"{r['prune_s']:.0f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    md = ("\n".join(lines) + f"\n\nOn {machine['device']} ({machine['cpu']}, {machine['threads']} threads, torch "
          f"{machine['torch']}); perplexity in float32 on the evaluation text; ratios against dense. Total "
          f"{seconds:.0f} s (runs resumed from earlier ones count as 0).\n")
    write_text(out / "demo.md", md)
    return md


def _num(value, ratio, unit: str = "") -> str:
    if value is None or value == "":
        return "not evaluated"
    return f"{value}{unit} ({ratio}×)" if ratio != "" else f"{value}{unit}"
