"""PROJECTION (not a measurement) of ARMOR pruning time for Llama-3-8B and a 70B Llama on 1 and 8 GPUs,
built from per-linear costs of the fast optimizer MEASURED here on CPU.

What is measured (CPU, one thread per linear, as the pipeline prunes on a multi-core CPU):
  1. real layers of the bundled SmolLM2-135M (blocks 0 and 15, all 7 linears), statistics from a short
     Austen calibration, the fast optimizer at the library's defaults: seconds and outer iterations per
     layer (the iteration count is what random weights cannot tell);
  2. random weights with a realistic spread (log-normal row and column scales, log-normal h) at the
     block size 128 that every 8B/70B shape gets, a few outer iterations each: seconds per outer
     iteration (the mean of those after the first, which all include the extrapolation step), split
     into the S-sweep (the C++ kernel, timed inside the real loop) and the rest (A-/B-steps' normal
     equations and products, cores, losses), plus the set-up (normalisation, NoWag-P, reconstruction),
     at Llama-3-8B's own four shapes and at smaller ones (which show how the cost per element varies
     with size on this CPU).
The cost model, per linear of role n (q, k, v, o, gate, up, down) and shape d_out × d_in, blocks bA × bB:
    setup = γ_n·d_out·d_in,  sweep = α_n·tiles,  rest = β_n·d_out·d_in·(bA + bB)
    time  = setup + iterations × (sweep + rest)
(the fast optimizer's operation count: a fixed cost per 128 × 128 tile for the sweep, d_out·d_in·b for
the rest), its coefficients measured per role at the role's Llama-3-8B shape, iterations as measured in
(1). So the 8B CPU rows rest on costs measured at the 8B shapes themselves; the 70B rows scale each
role's measured costs to its 70B shape (2× the elements for k/v, 4× for the others).

What is ASSUMED (no GPU has run this code): the GPU rows take one fast outer iteration on one H100 to
run its 16·b·d_out·d_in multiply-adds at the effective rate the published ARMOR loop reached on an H100
(docs/DESIGN.md §6.2: ~5.9 ms per iteration at 4096², which does ≈ 6·b·d_out·d_in multiply-adds: one
forward and backward of A·S·B). With N GPUs each block's linears are spread over the ranks by size
(`armor_kernels.pipeline.scheduling.assign`, longest first) and the block's time is the most loaded
rank's (protocol `sequential`); with protocol `dense` every linear of the model is spread at once.
Calibration forwards, statistics, I/O and communication are not included (seconds against hours).
Only a pruning run on the GPU (`python -m armor_kernels prune`) measures what these rows estimate.

    python benchmarks/bench_projection.py              # -> results/projection.csv and projection.md
    python benchmarks/bench_projection.py --no-scaling   # skip the small shapes of the scaling check
"""
from __future__ import annotations

import os
import statistics
import time

import torch
from harness import bench_args, write_csv

from armor_kernels import ActivationStats, ArmorOptions, armor
from armor_kernels.atomic import write_text
from armor_kernels.factors import block_sizes
from armor_kernels.optim import fast
from armor_kernels.optim.common import Problem
from armor_kernels.pipeline.scheduling import assign

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
REAL_BLOCKS = (0, 15)
SCALING_SHAPES = [(512, 512), (1024, 1024), (2048, 1024), (1024, 2048), (2048, 2048)]
SCALING_ITERS, FIT_ITERS = 4, 3  # iterations 2… are timed: the first with the extrapolation step, as all later
MAX_ITERS = ArmorOptions().optimizer_kwargs()["iters"]  # 80: the default cap
# The anchor of the GPU assumption (docs/DESIGN.md §6.2; measured elsewhere, not by this project).
ANCHOR_S_PER_ITER, ANCHOR_D, ANCHOR_B, ANCHOR_MACS_PER_BDD = 5.9e-3, 4096, 128, 6
FAST_MACS_PER_BDD = 16  # one fast outer iteration: A-step 4, B-step 4, sweep 4, two cores 2 + 2 (× b·d_out·d_in)


def model_shapes(hidden: int, inter: int, kv: int) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of a Llama block's linears."""
    return {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
            "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}


MODELS = {
    "Llama-3-8B": dict(layers=32, shapes=model_shapes(4096, 14336, 8 * 128)),
    "Llama-70B (Llama-3-70B shapes)": dict(layers=80, shapes=model_shapes(8192, 28672, 8 * 128)),
}


# ---------------------------------------------------------------- measurements


def real_layers() -> list[dict]:
    """The fast optimizer at its defaults on the bundled model's real layers: seconds, outer iterations."""
    from armor_kernels.pipeline.data import token_splits
    from armor_kernels.pipeline.model import load_model

    model, tok = load_model()
    calib = token_splits(tok, n_samples=8, seq_len=256, eval_tokens=256).calibration
    mods = {f"{b}.{n}": model.get_submodule(f"model.layers.{b}.{n}") for b in REAL_BLOCKS for n in LINEARS}
    stats = {k: ActivationStats(m.in_features) for k, m in mods.items()}
    hooks = [m.register_forward_pre_hook(lambda mod, args, k=k: stats[k].update(args[0])) for k, m in mods.items()]
    with torch.no_grad():
        for batch in calib.split(4):
            model(batch, use_cache=False)
    for h in hooks:
        h.remove()
    rows = []
    for k, m in mods.items():
        W = m.weight.detach().clone()
        iters = []
        t0 = time.perf_counter()
        res = armor(W, stats[k], progress=lambda it, total, loss: iters.append(it))
        sec = time.perf_counter() - t0
        bA, bB = block_sizes(tuple(W.shape), 128)
        rows.append(dict(layer=k, d_out=W.shape[0], d_in=W.shape[1], bA=bA, bB=bB, iterations=iters[-1],
                         seconds=sec, nowag_p_loss=res.history.loss[0], loss=res.loss))
        print(f"real {k:22s} {W.shape[0]:5d}x{W.shape[1]:<5d} b={bA}/{bB}: {iters[-1]:2d} iterations, {sec:6.2f} s, "
              f"loss {res.history.loss[0]:.3g} -> {res.loss:.3g}", flush=True)
    return rows


def synthetic(d_out: int, d_in: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight with log-normal row and column scales (outlier channels) and a log-normal h."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g)
    W *= torch.exp(0.3 * torch.randn(d_out, 1, generator=g)) * torch.exp(0.5 * torch.randn(1, d_in, generator=g))
    h = torch.exp(1.5 * torch.randn(d_in, generator=g))
    return W.mul_(0.02), h


def per_iteration(d_out: int, d_in: int, iters: int) -> dict:
    """Seconds of the set-up and of one outer iteration (the mean of iterations 2…`iters`, which include the
    extrapolation), the sweep's share timed inside the real loop (`optimize_fast`, tol 0: all iterations run)."""
    W, h = synthetic(d_out, d_in)
    sweep_times, marks = [], []
    real_sweep = fast.sweep_tiles

    def timed_sweep(*a, **kw):
        t = time.perf_counter()
        out = real_sweep(*a, **kw)
        sweep_times.append(time.perf_counter() - t)
        return out

    t0 = time.perf_counter()
    p = Problem.from_weight(W, h, 128, "cpu")
    f = p.nowag_p()
    p.loss(f)
    setup = time.perf_counter() - t0
    fast.sweep_tiles = timed_sweep
    try:
        t1 = time.perf_counter()
        f, _ = fast.optimize_fast(p, f, iters=iters, passes=1, tol=0.0, extrapolation=True,
                                  progress=lambda it, total, loss: marks.append(time.perf_counter()))
    finally:
        fast.sweep_tiles = real_sweep
    t2 = time.perf_counter()
    f.weight()
    setup += time.perf_counter() - t2  # the final reconstruction belongs to every run once
    it_s = statistics.fmean(b - a for a, b in zip(marks, marks[1:]))
    sweep_s = statistics.fmean(sweep_times[1:])
    bA, bB = p.bA, p.bB
    del p, f, W, h
    return dict(d_out=d_out, d_in=d_in, bA=bA, bB=bB, tiles=(d_out // bA) * (d_in // bB), iters_run=iters,
                setup_s=setup, iteration_s=it_s, sweep_s=sweep_s, rest_s=it_s - sweep_s,
                first_iteration_s=marks[0] - t1, ns_per_element_iteration=it_s / (d_out * d_in) * 1e9)


# ---------------------------------------------------------------- the cost model


class CostModel:
    """Per-role coefficients, measured at Llama-3-8B's shapes (`fit`: shape -> measurement)."""

    def __init__(self, fit: dict[tuple[int, int], dict]):
        self.coef = {}
        for role, shape in MODELS["Llama-3-8B"]["shapes"].items():
            r = fit[shape]
            dd, b2 = r["d_out"] * r["d_in"], r["bA"] + r["bB"]
            self.coef[role] = (r["setup_s"] / dd, r["sweep_s"] / r["tiles"], r["rest_s"] / (dd * b2))

    def iteration(self, role: str, d_out: int, d_in: int) -> float:
        _, alpha, beta = self.coef[role]
        bA, bB = block_sizes((d_out, d_in), 128)
        return alpha * (d_out // bA) * (d_in // bB) + beta * d_out * d_in * (bA + bB)

    def linear(self, role: str, d_out: int, d_in: int, iterations: float) -> float:
        return self.coef[role][0] * d_out * d_in + iterations * self.iteration(role, d_out, d_in)


def gpu_iteration(d_out: int, d_in: int) -> float:
    """ASSUMED seconds of one fast outer iteration on one H100: its multiply-adds at the anchor's rate."""
    rate = ANCHOR_MACS_PER_BDD * ANCHOR_B * ANCHOR_D**2 / ANCHOR_S_PER_ITER  # multiply-adds per second
    bA, bB = block_sizes((d_out, d_in), 128)
    return FAST_MACS_PER_BDD * (bA + bB) / 2 * d_out * d_in / rate


def makespan(times: dict[str, float], sizes: dict[str, int], ranks: int) -> float:
    """The most loaded rank's time when `assign` spreads the linears over `ranks` by size."""
    owner = assign(sizes, ranks)
    load = [0.0] * ranks
    for n, r in owner.items():
        load[r] += times[n]
    return max(load)


def project(per_linear, name: str, spec: dict, ranks: int) -> dict:
    """Hours to prune the model: protocol sequential (block by block) and dense (every linear at once)."""
    shapes, layers = spec["shapes"], spec["layers"]
    times = {n: per_linear(n, *s) for n, s in shapes.items()}
    sizes = {n: s[0] * s[1] for n, s in shapes.items()}
    seq = layers * makespan(times, sizes, ranks)
    all_t = {f"{i}.{n}": t for i in range(layers) for n, t in times.items()}
    all_s = {f"{i}.{n}": sizes[n] for i in range(layers) for n in shapes}
    dense = makespan(all_t, all_s, ranks)
    return dict(total_linear_hours=sum(all_t.values()) / 3600, sequential_hours=seq / 3600, dense_hours=dense / 3600)


# ---------------------------------------------------------------- main


def md_table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                     + ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows])


def main() -> None:
    p = bench_args(__doc__.splitlines()[0], "projection")
    p.add_argument("--no-scaling", action="store_true", help="do not measure the small shapes (the scaling check)")
    args = p.parse_args()
    torch.set_num_threads(1)  # one thread per linear, as the pipeline runs linears on a multi-core CPU
    t_start, load0 = time.perf_counter(), os.getloadavg()[0]

    real = real_layers()
    fit = {}
    for d_out, d_in in sorted(set(MODELS["Llama-3-8B"]["shapes"].values())):
        r = fit[d_out, d_in] = per_iteration(d_out, d_in, FIT_ITERS)
        print(f"8B    {d_out:5d}x{d_in:<5d}: setup {r['setup_s']:.2f} s, iteration {r['iteration_s']:.2f} s "
              f"(sweep {r['sweep_s']:.2f})", flush=True)
    cm = CostModel(fit)
    scaling = []
    for d_out, d_in in ([] if args.no_scaling else SCALING_SHAPES):
        scaling.append(per_iteration(d_out, d_in, SCALING_ITERS))
        r = scaling[-1]
        print(f"small {d_out:5d}x{d_in:<5d}: setup {r['setup_s']:.3f} s, iteration {r['iteration_s']:.3f} s "
              f"(sweep {r['sweep_s']:.3f})", flush=True)
    for r in real:
        r["seconds_per_iteration"] = r["seconds"] / r["iterations"]
    per_role = []
    for name, spec in MODELS.items():
        for role, (d_out, d_in) in spec["shapes"].items():
            per_role.append(dict(model=name, linear=role, d_out=d_out, d_in=d_in,
                                 cpu_setup_s=cm.coef[role][0] * d_out * d_in,
                                 cpu_iteration_s=cm.iteration(role, d_out, d_in),
                                 gpu_iteration_ms_assumed=gpu_iteration(d_out, d_in) * 1e3,
                                 basis="measured at this shape" if name == "Llama-3-8B" else
                                 "scaled from the 8B shape of this role"))
    mean_iters = statistics.fmean(r["iterations"] for r in real)
    iteration_cases = [("as measured on SmolLM2's real layers", mean_iters)]
    if mean_iters < MAX_ITERS:
        iteration_cases.append(("default cap (upper bound)", MAX_ITERS))
    load1 = os.getloadavg()[0]

    rows = []
    scenarios = [
        ("cpu", 1, "PROJECTION from measured CPU costs: one CPU core per rank (this machine's cores)"),
        ("cpu", 2, "PROJECTION from measured CPU costs: one CPU core per rank (this machine's cores)"),
        ("gpu", 1, "PROJECTION, ASSUMED GPU speed: H100 at the published loop's effective rate"),
        ("gpu", 8, "PROJECTION, ASSUMED GPU speed: H100 at the published loop's effective rate"),
    ]
    for name, spec in MODELS.items():
        for dev, ranks, basis in scenarios:
            for label, iters in iteration_cases:
                if dev == "cpu":
                    per_linear = lambda role, d_out, d_in, it=iters: cm.linear(role, d_out, d_in, it)  # noqa: E731
                else:
                    per_linear = lambda role, d_out, d_in, it=iters: it * gpu_iteration(d_out, d_in)  # noqa: E731
                proj = project(per_linear, name, spec, ranks)
                rows.append(dict(status="PROJECTION", model=name, device=dev, ranks=ranks,
                                 outer_iterations=round(iters, 1), iterations_basis=label,
                                 **{f"projected_{k}": round(v, 3) for k, v in proj.items()},
                                 basis=basis + (" (assumption, not a measurement)" if dev == "gpu" else ""),
                                 load_avg_start=round(load0, 1), load_avg_end=round(load1, 1)))
    write_csv(rows, args.out)

    anchor_rate = ANCHOR_MACS_PER_BDD * ANCHOR_B * ANCHOR_D**2 / ANCHOR_S_PER_ITER
    cpu_4096 = fit[4096, 4096]["iteration_s"]
    gpu_4096 = gpu_iteration(4096, 4096)
    ns_small = fit[4096, 4096]["ns_per_element_iteration"]
    ns_big = statistics.fmean(fit[k]["ns_per_element_iteration"] for k in ((14336, 4096), (4096, 14336)))
    trend = ("about flat (within 10 %), which supports scaling linearly in the element count to the 70B shapes"
             if abs(ns_big / ns_small - 1) <= 0.1 else
             f"{'rising' if ns_big > ns_small else 'falling'} with size ({ns_big / ns_small - 1:+.0%}), so the 70B "
             f"CPU rows are more likely {'low' if ns_big > ns_small else 'high'} than exact")
    capped = (" — every layer ran to the cap: its loss was still falling by more than 1e-4 relative per "
              "iteration" if mean_iters == MAX_ITERS else "")
    md = f"""# PROJECTION of ARMOR pruning time: Llama-3-8B and a 70B Llama on 1 and 8 GPUs

**This is a projection, not a measurement.** The per-linear CPU costs below were measured here
(`python benchmarks/bench_projection.py`, torch {torch.__version__}, one thread per linear; the run's load
averages are the CSV's `load_avg_start` / `load_avg_end`: above the core count, other work inflated the CPU
times); the CPU rows scale them with a cost model per linear role (the 8B rows
use the costs measured at their own shapes); **the GPU rows rest on an assumption** (no GPU has run this
project's code). Only a pruning run on the GPU (`python -m armor_kernels prune`) measures
what these rows estimate.

## Measured: the fast optimizer at its defaults on real layers (SmolLM2-135M, blocks {REAL_BLOCKS})

Statistics from 8 × 256 tokens of Austen; one thread per layer; the iteration count is the number of
outer iterations run before the default stopping rule (relative improvement per iteration < 1e-4) or
the default cap ({MAX_ITERS}).

{md_table(real, ["layer", "d_out", "d_in", "bA", "bB", "iterations", "seconds", "seconds_per_iteration",
                 "nowag_p_loss", "loss"])}

Mean outer iterations: **{mean_iters:.1f}** (min {min(r['iterations'] for r in real)}, max
{max(r['iterations'] for r in real)}){capped}.
The projection assumes 8B/70B layers run the same number of iterations.

## Measured: seconds per outer iteration at block size 128 (random weights, realistic spread)

"8B": Llama-3-8B's own shapes ({FIT_ITERS} iterations each, iterations 2…{FIT_ITERS} timed), the data of the cost
model. "small": smaller shapes ({SCALING_ITERS} iterations), not used: they show how the cost per element varies
with size on this CPU (caches; and the noise of a shared machine), which is why the costs are taken at the
target shapes rather than fitted on small ones.

{md_table([{**r, "set": "8B"} for r in fit.values()] + [{**r, "set": "small"} for r in scaling],
          ["set", "d_out", "d_in", "tiles", "setup_s", "iteration_s", "sweep_s", "rest_s",
           "ns_per_element_iteration"])}

Cost model per role n: setup = γ_n·d_out·d_in, sweep = α_n·tiles, rest (A-/B-steps, cores, losses) =
β_n·(bA+bB)·d_out·d_in, with γ_n, α_n, β_n from the "8B" row of the role's shape. Per linear, one CPU core:

{md_table(per_role, ["model", "linear", "d_out", "d_in", "cpu_setup_s", "cpu_iteration_s",
                     "gpu_iteration_ms_assumed", "basis"])}

The 70B shapes have 2–4× the elements of the measured 8B ones, and each role keeps its 8B cost per element.
Per element, one iteration took {ns_small:.0f} ns at 4096² and {ns_big:.0f} ns (mean) at the two 14336-wide shapes:
{trend}.

## Assumed: GPU speed (not measured)

Anchor (docs/DESIGN.md §6.2, measured elsewhere): the published ARMOR loop ran at ~{ANCHOR_S_PER_ITER * 1e3:.1f} ms
per iteration at 4096² on an H100 (20 000 iterations: ~{20_000 * ANCHOR_S_PER_ITER / 60:.0f} min per layer). Its
iteration is one Adam step, ≈ one forward and backward of A·S·B, ≈ {ANCHOR_MACS_PER_BDD}·b·d_out·d_in multiply-adds
(b = {ANCHOR_B} assumed), plus one group solve per tile: an effective {anchor_rate * 2 / 1e12:.1f} TFLOP/s.
**Assumption:** one fast outer iteration ({FAST_MACS_PER_BDD}·b·d_out·d_in multiply-adds: A-step 4, B-step 4,
sweep 4, two A·S·B products 4) runs on one H100 at that same effective rate: {gpu_4096 * 1e3:.1f} ms at 4096²
({MAX_ITERS} iterations: {MAX_ITERS * gpu_4096:.1f} s per layer), {cpu_4096 / gpu_4096:.0f}× one CPU core here; the
set-up (elementwise) is left out. Unknowns that could move it either way: the Triton kernels have never run on a
GPU; the S-sweep is a sequential chain of 128 rows × 32 groups per tile (one warp per tile), which may set a
floor of milliseconds per iteration whatever the layer's size; Triton's fp32 normal equations versus cuBLAS.
With N ranks, each block's 7 linears go to the ranks by `assign` (largest first) and the block takes its
most loaded rank's time (protocol `sequential`: gate/up/down bound it, so 8 ranks gain at most the block's
total over its largest linear); protocol `dense` spreads all of the model's linears at once. Not included:
calibration forwards and statistics, reading and writing, communication (seconds to minutes against the
optimizer's time on CPU; on GPUs they may matter for the 8-rank rows).

## Projection (hours)

{md_table(rows, ["model", "device", "ranks", "outer_iterations", "iterations_basis", "projected_total_linear_hours",
                 "projected_sequential_hours", "projected_dense_hours", "basis"])}

`projected_total_linear_hours`: the sum over all linears (one rank's work); `projected_sequential_hours`:
block by block, each block's linears spread over the ranks; `projected_dense_hours`: all linears spread at
once. Benchmark run time: {time.perf_counter() - t_start:.0f} s.
"""
    md_path = args.out.with_suffix(".md")
    write_text(md_path, md)
    print(f"wrote {md_path}")
    print(md_table(rows, ["model", "device", "ranks", "outer_iterations", "projected_total_linear_hours",
                          "projected_sequential_hours", "projected_dense_hours"]))


if __name__ == "__main__":
    main()
