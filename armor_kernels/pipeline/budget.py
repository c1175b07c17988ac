"""A model-wide byte budget for ARMOR's A and B: the same total bytes as a uniform `--overhead`, spent where
they lower the loss most.

`--overhead F` gives every layer the largest block size whose A and B add at most F of its own parameters.
Layers do not gain alike from wider blocks, so with a budget F the run first measures, for every linear,
its loss against block size (the probe pass), then allocates one block size per linear so that

    Σ_layers (d_out·bA + d_in·bB)  ≤  F · Σ_layers d_out·d_in

and the sum of the layers' relative losses is as low as a greedy marginal-gain allocation gets it: from
the cheapest block size everywhere, repeatedly take the upgrade with the largest loss decrease per added
parameter that still fits (along each layer's lower convex hull, so its upgrades come in decreasing
order of gain). The relative loss is the run's objective divided by the layer's own scale (optim), so a
layer counts by how much of its output it loses, not by its width.

Candidates: nominal block sizes 4 … 128 whose blocks (factors.block_sizes) divide 128 on both sides, so
every allocated layer runs in the fused kernels' native layout (layout.py: no packing, no padding of the
blocks), up to the run's --block-size.

Probe pass: the dense model's statistics (the probe needs each layer's statistics before any is pruned,
so it runs the "dense" protocol whatever the run's), one decoder block at a time, each linear pruned at
every candidate with `probe_iters` iterations of the paper's ARMOR (proxy objective from NoWag-P, the
run's other options: `probe_options`) whatever the run's objective: the output objective costs ~4× as
much per iteration, and what the probe needs is how a layer's loss falls with block size, not its value.
Each block's curves are saved to `budget_curves.json` in the run's directory as they finish, so an
interrupted probe resumes (the curves depend on the probe's options, not on the fraction: a file copied
from a run at another budget is reused); under torchrun each rank probes the linears it owns and the curves are
exchanged, every rank allocating the same blocks. The allocation goes into the run's report and its
quantization_config (each module's blocks), the budget's options into the hashed run configuration.
"""
from __future__ import annotations

import functools
import heapq
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from torch import nn
from tqdm.auto import tqdm

from ..atomic import save_json
from ..errors import InputError
from ..factors import block_sizes
from ..optim import ArmorOptions, armor
from .distributed import Dist
from .model import block_linears
from .scheduling import assign, on_cores

log = logging.getLogger("armor_kernels")

CANDIDATES = (4, 8, 16, 32, 64, 128)
CURVES_FILE = "budget_curves.json"


@dataclass(frozen=True)
class BudgetOptions:
    """fraction     A and B's parameters over the pruned linears' parameters, model-wide (--overhead's unit)
    probe_iters  iterations of each probe run (the run's own ARMOR options otherwise)"""

    fraction: float
    probe_iters: int = 8

    def __post_init__(self):
        if not (isinstance(self.fraction, (int, float)) and not isinstance(self.fraction, bool) and self.fraction > 0):
            raise InputError(f"budget fraction: expected a positive fraction of the linears' parameters, "
                             f"got {self.fraction!r}")
        if not isinstance(self.probe_iters, int) or isinstance(self.probe_iters, bool) or self.probe_iters < 1:
            raise InputError(f"budget probe_iters: expected an int ≥ 1, got {self.probe_iters!r}")

    def to_config(self) -> dict:
        return asdict(self)


def candidates(shape: tuple[int, int], max_block: int) -> list[int]:
    """The nominal block sizes a layer of this shape may get: distinct blocks, each dividing 128."""
    seen, out = set(), []
    for b in CANDIDATES:
        if b > max_block:
            break
        blocks = block_sizes(shape, b)
        if blocks not in seen and all(128 % x == 0 for x in blocks):
            seen.add(blocks)
            out.append(b)
    if not out:
        raise InputError(f"budget: no block size ≤ {max_block} divides both {shape} into blocks that divide 128")
    return out


def ab_params(shape: tuple[int, int], b: int) -> int:
    (d_out, d_in), (bA, bB) = shape, block_sizes(shape, b)
    return d_out * bA + d_in * bB


def allocate(curves: dict[str, dict[int, float]], shapes: dict[str, tuple[int, int]], fraction: float
             ) -> dict[str, int]:
    """layer -> block size: the greedy marginal-gain allocation (module docstring). curves: layer ->
    {block size: relative loss}. Never spends more than `fraction` of the layers' parameters; refuses a
    budget below the cheapest choice everywhere."""
    budget = fraction * sum(d_out * d_in for d_out, d_in in shapes.values())
    hulls = {}
    for key, curve in curves.items():
        points = sorted((ab_params(shapes[key], b), loss, b) for b, loss in curve.items())
        hull = [points[0]]
        for p in points[1:]:
            if p[1] >= hull[-1][1]:
                continue  # costs more, loses no less
            while len(hull) >= 2 and _slope(hull[-2], hull[-1]) <= _slope(hull[-2], p):
                hull.pop()  # hull[-1] lies above the chord: never the best use of its bytes
            hull.append(p)
        hulls[key] = hull
    at = {key: 0 for key in hulls}
    used = sum(h[0][0] for h in hulls.values())
    if used > budget:
        raise InputError(f"budget: {fraction} of the linears' parameters ({budget:.0f}) is below the smallest "
                         f"blocks' {used} ({used / budget * fraction:.4f}); raise --budget")
    heap = [(-_slope(h[0], h[1]), key) for key, h in hulls.items() if len(h) > 1]
    heapq.heapify(heap)
    while heap:
        _, key = heapq.heappop(heap)
        hull, j = hulls[key], at[key]
        step = hull[j + 1][0] - hull[j][0]
        if used + step > budget:
            continue  # its later upgrades only cost more: this layer is done
        used += step
        at[key] = j + 1
        if j + 2 < len(hull):
            heapq.heappush(heap, (-_slope(hull[j + 1], hull[j + 2]), key))
    return {key: hulls[key][at[key]][2] for key in curves}


def _slope(p, q) -> float:
    """Loss decrease per added parameter from p to q."""
    return (p[1] - q[1]) / (q[0] - p[0])


def probe_options(options: ArmorOptions, budget: BudgetOptions) -> ArmorOptions:
    """The options a probe runs with (module docstring), its block size set per candidate."""
    return replace(options, overhead=None, iters=budget.probe_iters, objective="proxy", start="nowag_p", shrink=0.0)


def probe_block(linears: dict[str, nn.Linear], stats: dict, options: ArmorOptions, budget: BudgetOptions
                ) -> dict[str, dict[int, float]]:
    """name -> {block size: relative loss of the probe}, for the linears in `stats` (one probe per core,
    scheduling.on_cores)."""
    def loss(name, b):
        opts = replace(probe_options(options, budget), block_size=b)
        return float(armor(linears[name].weight.detach(), stats[name], opts).loss)

    keys = [(n, b) for n in stats for b in candidates(tuple(linears[n].weight.shape), options.block_size)]
    done = on_cores({f"{n}/{b}": functools.partial(loss, n, b) for n, b in keys},
                    {f"{n}/{b}": linears[n].weight.numel() * b for n, b in keys})
    curves: dict[str, dict[int, float]] = {n: {} for n in stats}
    for n, b in keys:
        curves[n][b] = done[f"{n}/{b}"]
    return curves


def probe(n_blocks: int, load: Callable[[int], nn.Module], free: Callable[[int], None],
          stats_of: Callable[[int, nn.Module, dict[str, int]], dict], advance: Callable[[int, nn.Module], None],
          options: ArmorOptions, budget: BudgetOptions, dist: Dist, out: Path | None) -> dict[str, dict[int, float]]:
    """"i.name" -> curve for every linear of the model (module docstring), resumed from out/CURVES_FILE (out
    None: a run in memory, nothing saved).
    load(i) / free(i): block i on the device and off it; stats_of(i, block, owners): this rank's linears'
    statistics on the dense stream; advance(i, block): the dense stream past the block."""
    path = None if out is None else out / CURVES_FILE
    saved = json.loads(path.read_text()) if dist.is_writer and path is not None and path.exists() else {}
    saved = dist.agree(saved, "reading the budget's saved curves")
    curves = {k: {int(b): loss for b, loss in c.items()} for k, c in saved.get("curves", {}).items()}
    probed_with = probe_options(options, budget).to_config()  # not the fraction
    if saved and saved.get("probed_with") != probed_with:
        curves = {}  # probed with other options: probe again
    for i in tqdm(range(n_blocks), desc="budget probe", unit="block", disable=not dist.is_writer):
        block = load(i)
        linears = block_linears(block)
        if not all(f"{i}.{n}" in curves for n in linears):
            owners = assign({n: lin.weight.numel() for n, lin in linears.items()}, dist.world_size)
            own = probe_block(linears, stats_of(i, block, owners), options, budget)
            for src in range(dist.world_size):
                part = dist.broadcast_object(own if src == dist.rank else None, src,
                                             f"receiving block {i}'s budget curves from rank {src}")
                curves.update({f"{i}.{n}": c for n, c in part.items()})
            if dist.is_writer and path is not None:
                save_json(path, {"probed_with": probed_with, "curves": curves})
        advance(i, block)
        free(i)
    return curves


def layer_options(options: ArmorOptions, blocks: dict[str, int]) -> Callable[[str], ArmorOptions]:
    """key -> that layer's ArmorOptions: the allocated block size, no per-layer overhead rule."""
    return lambda key: replace(options, block_size=blocks[key], overhead=None)


def log_allocation(blocks: dict[str, int], shapes: dict[str, tuple[int, int]]) -> float:
    """Log the allocation per linear kind; returns the parameter fraction it spends."""
    spent = sum(ab_params(shapes[k], b) for k, b in blocks.items())
    total = sum(d_out * d_in for d_out, d_in in shapes.values())
    kinds: dict[str, list[int]] = {}
    for key, b in blocks.items():
        kinds.setdefault(key.split(".", 1)[1], []).append(b)
    log.info("budget: %.4f of the linears' parameters in A and B; blocks per kind: %s", spent / total,
             {k: sorted(set(v)) for k, v in kinds.items()})
    return spent / total

