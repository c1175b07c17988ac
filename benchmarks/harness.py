"""What every benchmark shares: timing (CPU wall clock; CUDA events and CUDA-graph replay), one atomic
CSV writer, one plot helper and the `--out` convention (a CSV path; the plot goes beside it as .png).

    from harness import bench_args, cpu_time_s, cuda_time_us, graphed, write_csv, plot_lines
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from armor_kernels.atomic import atomic_write, save_csv  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def bench_args(description: str, default_name: str) -> argparse.ArgumentParser:
    """An argument parser with the shared `--out` (CSV path, default benchmarks/results/<name>.csv)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, default=RESULTS / f"{default_name}.csv",
                   help=f"CSV to write; the plot goes beside it (default results/{default_name}.csv)")
    return p


def cpu_time_s(fn, reps: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of `fn()` over `reps` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cuda_time_us(fn, reps: int = 50, warmup: int = 5) -> float:
    """Median microseconds of single `fn()` calls, timed by CUDA events on the current stream."""
    import torch
    for _ in range(warmup):
        fn()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(start, end):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(start, end)) * 1e3


def graphed(fn):
    """`fn` captured once in a CUDA graph (after a warm-up outside the capture); returns the replay."""
    import torch
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # lazy inits and plan creation happen outside the capture
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def cuda_vs_reference(label: str, case: dict, reference, kernel, reps: int) -> dict:
    """The CUDA row of a kernel benchmark: `reference()` and `kernel()` timed by CUDA events, printed."""
    r, k = cuda_time_us(reference, reps=reps), cuda_time_us(kernel, reps=reps)
    print(f"cuda {label}: reference {r:9.1f} us, Triton {k:9.1f} us, speed-up {r / k:6.1f}x")
    return dict(device="cuda", **case, reference_us=round(r, 2), triton_us=round(k, 2), speedup=round(r / k, 2))


def read_csv(path: Path) -> list[dict]:
    """The rows write_csv wrote, numbers as numbers, True/False as bools, empty cells as ""."""
    def value(v: str):
        if v in ("True", "False"):
            return v == "True"
        try:
            return int(v) if v.lstrip("-").isdigit() else float(v)
        except ValueError:
            return v
    with open(path, newline="") as f:
        return [{k: value(v) for k, v in r.items()} for r in csv.DictReader(f)]


def write_csv(rows: list[dict], path: Path) -> None:
    """All rows (the union of their keys, in first-seen order) to `path`, atomically."""
    if not rows:
        raise ValueError(f"write_csv: no rows to write to {path}")
    save_csv(path, rows, list(dict.fromkeys(k for r in rows for k in r)))
    print(f"wrote {path}")


def plot_lines(panels: dict[str, dict[str, list[tuple[float, float]]]], path: Path, *, xlabel: str,
               ylabel: str, xscale: str = "linear", yscale: str = "linear", hline: float | None = None,
               dashed: str | None = None, legend_outside: bool = False) -> None:
    """One panel per key of `panels`, one line per label: {panel: {label: [(x, y), ...]}} -> PNG.
    The line labelled `dashed` (an envelope, say) is drawn dashed in black, without markers.
    legend_outside: one legend, right of the last panel (many lines), instead of one per panel."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n + (3.0 if legend_outside else 0.6), 3.4), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels.items()):
        if len(lines) > 10:  # more lines than the default colour cycle has colours
            ax.set_prop_cycle(color=plt.cm.tab20.colors)
        for label, pts in lines.items():
            if pts and label == dashed:
                ax.plot(*zip(*sorted(pts)), ls="--", color="black", lw=0.8, label=label)
            elif pts:
                ax.plot(*zip(*sorted(pts)), marker="o", ms=3, label=label)
        ax.set(xscale=xscale, yscale=yscale, title=title, xlabel=xlabel)
        if hline is not None:
            ax.axhline(hline, color="gray", lw=0.5)
        if not legend_outside:
            ax.legend(fontsize=6)
    if legend_outside:
        axes[0][-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    axes[0][0].set_ylabel(ylabel)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    print(f"wrote {path}")
