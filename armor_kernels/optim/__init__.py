"""ARMOR's optimizer as a library: `armor(W, stats)` → factors, pruned weight and loss history."""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..factors import ActivationStats, ArmorFactors
from .common import History, Problem
from .fast import optimize_fast
from .reference import optimize_reference

OPTIMIZERS = {"fast": optimize_fast, "reference": optimize_reference}


class ArmorResult(NamedTuple):
    factors: ArmorFactors
    history: History  # relative proxy loss; history.loss[0] is NoWag-P's
    weight: torch.Tensor  # dense reconstruction diag(r) A S B diag(c), in W's dtype
    mask: torch.Tensor  # 2:4 mask of S

    @property
    def loss(self) -> float:
        return self.history.loss[-1]


def armor(W: torch.Tensor, stats, *, method: str = "fast", block_size: int = 128, device=None,
          seed: int = 0, progress=None, **options) -> ArmorResult:
    """Prune W (d_out, d_in) to diag(r)·A·S·B·diag(c) with S 2:4, starting from NoWag-P.

    stats: an ActivationStats of the layer's inputs, or the diagonal statistic h itself.
    method: "fast" (closed-form block steps + tile sweeps + extrapolation; options iters=80, passes=1,
            tol=1e-4, extrapolation=True)
            or "reference" (the published Adam + sampled-group loop; options iters=20000, lr=1e-4,
            tol=1e-6, patience=100). Both take time_budget (seconds).
    progress: optional callable(step, total, loss).
    The loss never rises and ends ≤ NoWag-P's (history.loss[0]).
    """
    if method not in OPTIMIZERS:
        raise ValueError(f"method: expected one of {sorted(OPTIMIZERS)}, got {method!r}")
    h = stats.h() if isinstance(stats, ActivationStats) else stats
    torch.manual_seed(seed)
    p = Problem.from_weight(W, h, block_size, device)
    if method == "reference":
        options.setdefault("seed", seed)
    factors, history = OPTIMIZERS[method](p, p.nowag_p(), progress=progress, **options)
    return ArmorResult(factors, history, factors.weight().to(W.device, W.dtype), factors.mask.to(W.device))
