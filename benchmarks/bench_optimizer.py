"""Fast optimizer vs the published (reference) loop on the same layers, in one run.

For each layer: the reference runs `--ref-iters` iterations (20 000 as published), the fast one
`--fast-iters` outer iterations, with and without its extrapolation step, and once more with the
library defaults (what the pipeline runs); all start from NoWag-P. Reported: final losses, wall-clock times, and the
time the fast optimizer needs to reach the loss the reference reaches after 2 000 iterations and
after all of its iterations, with the speed-up ratios. Writes
    benchmarks/results/optimizer_<device>.csv         one row per layer
    benchmarks/results/optimizer_<device>_trace.csv   loss against time, every run, thinned (`thin_trace`)
    benchmarks/results/optimizer_<device>.png         the thinned trace as a plot
(`--out PATH.csv` replaces the first; the other two go beside it). The trace keeps, per layer and run,
at most TRACE_ROWS / (number of runs) points, log-spaced in time (the first and the last included),
so it stays under 1 MB; the per-layer row is computed from the full histories.
`--thin TRACE.csv ...` thins existing trace files in place with the same rule and redraws their plots.

Layers are real layers of the bundled SmolLM2-135M with statistics from real text (Austen). With
--synthetic 4096x4096 (GPU sizes no bundled real model has), the weight is Gaussian and h is a real
layer's statistic tiled to the width: say so wherever the numbers are quoted.

    python benchmarks/bench_optimizer.py --layers 0.self_attn.q_proj 5.mlp.down_proj
    python benchmarks/bench_optimizer.py --device cuda --synthetic 4096x4096 11008x4096
    python benchmarks/bench_optimizer.py --thin benchmarks/results/optimizer_cpu_trace.csv
"""
from __future__ import annotations

import argparse
import bisect
import csv
import math
import time
from pathlib import Path

import torch
from harness import RESULTS, bench_args, write_csv

from armor_kernels import ActivationStats, armor
from armor_kernels.atomic import atomic_write

TRACE_ROWS = 10_000  # rows of a trace file (≈ 70-90 bytes each: under 1 MB)


def real_layers(names: list[str], n_samples: int, seq_len: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (weight, h) for `block.linear` names, statistics from the dense model on real text."""
    from armor_kernels.pipeline.data import token_splits
    from armor_kernels.pipeline.model import block_linears, decoder_layers, load_model
    model, tok = load_model()
    calib = token_splits(tok, n_samples=n_samples, seq_len=seq_len).calibration
    layers, stats, hooks = decoder_layers(model), {}, []
    for name in names:
        i, lin_name = name.split(".", 1)
        lin = block_linears(layers[int(i)])[lin_name]
        stats[name] = (lin, ActivationStats(lin.in_features))
        hooks.append(lin.register_forward_pre_hook(lambda m, a, s=stats[name][1]: s.update(a[0])))
    with torch.no_grad():
        for batch in calib.split(4):
            model(batch, use_cache=False)
    for h in hooks:
        h.remove()
    return {n: (lin.weight.detach().clone(), st.h()) for n, (lin, st) in stats.items()}


def synthetic_layers(shapes: list[str], h_real: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for s in shapes:
        d_out, d_in = map(int, s.lower().split("x"))
        g = torch.Generator().manual_seed(0)
        h = h_real.repeat(math.ceil(d_in / len(h_real)))[:d_in]
        out[f"synthetic_{s}"] = (torch.randn(d_out, d_in, generator=g) * 0.02, h)
    return out


def time_to_reach(hist, target: float) -> float:
    """Seconds until the history first reaches a loss ≤ target (inf if never)."""
    return next((t for t, loss in zip(hist.seconds, hist.loss) if loss <= target), math.inf)


def log_spaced(seconds: list[float], k: int) -> list[int]:
    """At most k indices into the non-decreasing `seconds`: the first sample at or after each of k
    log-spaced times from the first to the last, so the first and the last index are always in."""
    n = len(seconds)
    if n <= k:
        return list(range(n))
    lo, hi = max(seconds[0], 1e-9), max(seconds[-1], 1e-9)
    targets = (lo * (hi / lo) ** (j / (k - 1)) for j in range(k))
    picked = {min(bisect.bisect_left(seconds, t), n - 1) for t in targets}
    return sorted(picked | {0, n - 1})


def thin_trace(trace: list[dict], max_rows: int = TRACE_ROWS) -> list[dict]:
    """The trace with at most max_rows rows: per (layer, optimizer) run an equal share of points,
    log-spaced in time (`log_spaced`); rows keep their order and their values untouched."""
    runs: dict[tuple, list[dict]] = {}
    for r in trace:
        runs.setdefault((r["layer"], r["optimizer"]), []).append(r)
    k = max(2, max_rows // max(1, len(runs)))
    out = []
    for rows in runs.values():
        out += [rows[i] for i in log_spaced([float(r["seconds"]) for r in rows], k)]
    return out


def thin_files(paths: list[Path]) -> None:
    """Thin trace CSVs in place (`thin_trace`) and redraw the plot beside each (X_trace.csv -> X.png)."""
    for path in paths:
        with open(path, newline="") as fh:
            trace = list(csv.DictReader(fh))
        thin = thin_trace(trace)
        write_csv(thin, path)
        print(f"{path}: {len(trace)} -> {len(thin)} rows, {path.stat().st_size / 1e6:.2f} MB")
        if path.name.endswith("_trace.csv"):
            plot(thin, path.with_name(path.name[:-len("_trace.csv")] + ".png"))


def main() -> None:
    ap = bench_args(__doc__, "optimizer_<device>")
    ap.formatter_class = argparse.RawDescriptionHelpFormatter
    ap.set_defaults(out=None)
    ap.add_argument("--layers", nargs="*", default=["0.self_attn.q_proj", "15.mlp.down_proj"])
    ap.add_argument("--synthetic", nargs="*", default=[], help="d_outxd_in shapes with Gaussian weights")
    ap.add_argument("--ref-iters", type=int, default=20_000)
    ap.add_argument("--fast-iters", type=int, default=300,
                    help="outer iterations of the fast optimizer, run in full (tol=0; the library default is 30)")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--thin", nargs="+", type=Path, metavar="TRACE_CSV",
                    help="only thin these trace files in place (and redraw their plots); runs nothing")
    args = ap.parse_args()
    if args.thin:
        return thin_files(args.thin)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available on this machine")

    names = args.layers or ["0.self_attn.q_proj"]
    layers = real_layers(names, args.n_samples, args.seq_len)
    if args.synthetic:
        h_real = next(iter(layers.values()))[1]
        layers = {**(layers if args.layers else {}), **synthetic_layers(args.synthetic, h_real)}

    rows, trace = [], []
    for name, (W, h) in layers.items():
        W, h = W.to(args.device), h.to(args.device)
        runs = {}
        for label, optimizer, opts in (("reference", "reference", {"iters": args.ref_iters, "patience": 10 ** 9}),
                                       ("fast", "fast", {"iters": args.fast_iters, "tol": 0.0}),
                                       ("fast_no_extrapolation", "fast",
                                        {"iters": args.fast_iters, "tol": 0.0, "extrapolation": False}),
                                       ("fast_defaults", "fast", {})):
            t0 = time.perf_counter()
            res = armor(W, h, optimizer=optimizer, block_size=args.block_size, device=args.device, **opts)
            runs[label] = (res.history, time.perf_counter() - t0)
            trace += [{"layer": name, "optimizer": label, "seconds": t, "loss": loss}
                      for t, loss in zip(res.history.seconds, res.history.loss)]
            print(f"{name} {label}: loss {res.history.loss[0]:.5f} -> {res.loss:.5f} in {runs[label][1]:.1f} s")
        ref, fast, plain = runs["reference"][0], runs["fast"][0], runs["fast_no_extrapolation"][0]
        at2k = min(2000, len(ref.loss) - 1)
        row = {"layer": name, "shape": "x".join(map(str, W.shape)), "device": args.device,
               "nowag_p_loss": ref.loss[0], "ref_iters": len(ref.loss) - 1, "ref_final_loss": ref.loss[-1],
               "ref_seconds": ref.seconds[-1], "fast_final_loss": fast.loss[-1], "fast_seconds": fast.seconds[-1],
               "ref_loss_at_2000": ref.loss[at2k], "ref_seconds_at_2000": ref.seconds[at2k]}
        row["fast_no_extrapolation_final_loss"] = plain.loss[-1]
        row["fast_defaults_loss"] = runs["fast_defaults"][0].loss[-1]
        row["fast_defaults_seconds"] = runs["fast_defaults"][1]
        for tag, target, t_ref in (("2000", ref.loss[at2k], ref.seconds[at2k]),
                                   ("final", ref.loss[-1], ref.seconds[-1])):
            for label, hist in (("fast", fast), ("fast_no_extrapolation", plain)):
                t_fast = time_to_reach(hist, target)
                row[f"{label}_seconds_to_ref_{tag}"] = t_fast
                row[f"{label}_speedup_{tag}"] = t_ref / t_fast if t_fast > 0 else math.inf
        rows.append(row)
        print({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})

    out = args.out or RESULTS / f"optimizer_{args.device.split(':')[0]}.csv"
    trace = thin_trace(trace)
    write_csv(rows, out)
    write_csv(trace, out.with_name(f"{out.stem}_trace.csv"))
    plot(trace, out.with_suffix(".png"))


def plot(trace: list[dict], path: Path) -> None:
    """Loss against time, log-log: one colour per layer, one line style per optimizer (one panel, so
    harness.plot_lines, one panel per key and one style for all lines, does not draw this figure)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    styles = {"reference": "--", "fast": "-", "fast_no_extrapolation": ":"}
    fig, ax = plt.subplots(figsize=(8, 5))
    layers = list(dict.fromkeys(r["layer"] for r in trace))
    for k, layer in enumerate(layers):
        for label, style in styles.items():
            pts = [(float(r["seconds"]), float(r["loss"])) for r in trace
                   if r["layer"] == layer and r["optimizer"] == label]
            ax.plot([max(t, 1e-3) for t, _ in pts], [loss for _, loss in pts], style, color=f"C{k % 10}")
    handles = [Line2D([], [], color=f"C{k % 10}", label=layer) for k, layer in enumerate(layers)]
    handles += [Line2D([], [], color="k", linestyle=st, label=label) for label, st in styles.items()]
    ax.legend(handles=handles, fontsize=7, loc="lower left")
    ax.set(xscale="log", yscale="log", xlabel="wall-clock seconds", ylabel="relative proxy loss",
           title="ARMOR: loss against time")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
