"""ARMOR's optimizer as a library: `armor(W, stats)` → factors, pruned weight and loss history."""
from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch

from ..factors import ActivationStats, ArmorFactors
from .common import History, Problem
from .fast import optimize_fast
from .options import ArmorOptions

__all__ = ["ArmorOptions", "ArmorResult", "armor"]
from .reference import optimize_reference

OPTIMIZE = {"fast": optimize_fast, "reference": optimize_reference}


class ArmorResult(NamedTuple):
    factors: ArmorFactors
    history: History  # relative proxy loss; history.loss[0] is NoWag-P's
    weight: torch.Tensor  # dense reconstruction diag(r) A S B diag(c), in W's dtype
    mask: torch.Tensor  # 2:4 mask of S

    @property
    def loss(self) -> float:
        return self.history.loss[-1]


def armor(W: torch.Tensor, stats, options: ArmorOptions | None = None, *, device=None, progress=None,
          **overrides) -> ArmorResult:
    """Prune W (d_out, d_in) to diag(r)·A·S·B·diag(c) with S 2:4, starting from NoWag-P.

    stats: an ActivationStats of the layer's inputs, or the diagonal statistic h itself.
    options: an ArmorOptions (default: the library's defaults); keyword overrides name its fields,
             e.g. armor(W, stats, optimizer="reference", block_size=64, iters=2000).
    progress: optional callable(step, total, loss).
    The loss never rises and ends ≤ NoWag-P's (history.loss[0]).
    """
    if options is None:
        options = ArmorOptions.from_kwargs(**overrides)
    elif overrides:
        options = replace(options, **overrides)
    h = stats.h() if isinstance(stats, ActivationStats) else stats
    torch.manual_seed(options.seed)
    p = Problem.from_weight(W, h, options.layer_block_size(tuple(W.shape)), device)
    kwargs = options.optimizer_kwargs()
    if options.optimizer == "reference":
        kwargs["seed"] = options.seed
    factors, history = OPTIMIZE[options.optimizer](p, p.nowag_p(), progress=progress, **kwargs)
    return ArmorResult(factors, history, factors.weight().to(W.device, W.dtype), factors.mask.to(W.device))
