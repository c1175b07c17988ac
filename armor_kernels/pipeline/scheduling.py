"""Which process, and which core of a process, prunes which linear: deterministic, balanced by size."""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ..errors import InputError


def on_cores(jobs: dict[str, Callable[[], Any]], sizes: dict[str, int]) -> dict[str, Any]:
    """Each job's result, the jobs run one per CPU core, each single-threaded, largest `sizes` first.

    Why: the optimizer's small matmuls and per-tile sweeps scale poorly across threads within one layer,
    so whole layers in parallel finish a block sooner (SmolLM2 on 2 cores: docs/DESIGN.md §9). Results are
    returned in `jobs`' order; with one thread the jobs simply run in turn."""
    workers = min(torch.get_num_threads(), len(jobs))
    if workers < 2:
        return {k: job() for k, job in jobs.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            futures = {k: pool.submit(jobs[k]) for k in sorted(jobs, key=lambda k: -sizes[k])}
            return {k: futures[k].result() for k in jobs}
    finally:
        torch.set_num_threads(threads)


def assign(sizes: dict[str, int], world_size: int) -> dict[str, int]:
    """name -> rank by longest processing time first: the largest job goes to the least loaded rank
    (ties: lower rank), jobs of equal size in name order. Deterministic and independent of the dict's
    order; the result follows `sizes`' order. The most loaded rank carries at most the least loaded's
    load plus one job (and at most 4/3 of the optimum)."""
    if world_size < 1:
        raise InputError(f"assign: world_size must be ≥ 1, got {world_size}")
    bad = {n: s for n, s in sizes.items() if not isinstance(s, int) or s < 0}
    if bad:
        raise InputError(f"assign: sizes must be non-negative integers, got {bad}")
    load, owner = [0] * world_size, {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = min(range(world_size), key=lambda k: (load[k], k))
        owner[name] = r
        load[r] += sizes[name]
    return {n: owner[n] for n in sizes}
