"""ARMOR's optimizer as a library: `armor(W, stats)` → factors, pruned weight and loss history."""
from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch

from ..baselines import sparsegpt
from ..errors import InputError
from ..factors import ArmorFactors
from ..stats import ActivationStats
from .common import History, Problem, descend
from .fast import optimize_fast
from .options import ArmorOptions
from .output import OutputProblem, output_steps
from .reference import optimize_reference

__all__ = ["ArmorOptions", "ArmorResult", "armor"]

OPTIMIZE = {"fast": optimize_fast, "reference": optimize_reference}


class ArmorResult(NamedTuple):
    factors: ArmorFactors
    history: History  # relative loss in the options' objective; history.loss[0] is the start's
    weight: torch.Tensor  # dense reconstruction diag(r) A S B diag(c), in W's dtype
    mask: torch.Tensor  # 2:4 mask of S
    start: str = "nowag_p"  # the start used (options.start, or the one "best" chose)

    @property
    def loss(self) -> float:
        return self.history.loss[-1]


def starts(p: Problem, W: torch.Tensor, stats, which: str) -> dict[str, ArmorFactors]:
    """The candidate starts `which` (ArmorOptions.start) names, A = B = I: NoWag-P's S = W̄ ⊙ top-2(W̄² h),
    SparseGPT's S = its pruned and updated weight, normalised."""
    out = {}
    if which in ("nowag_p", "best"):
        out["nowag_p"] = p.nowag_p()
    if which in ("sparsegpt", "best"):
        Ws = sparsegpt(W.float(), stats).weight.to(p.Wbar.device)
        out["sparsegpt"] = ArmorFactors.identity(p.Wbar, p.r, p.c, Ws / (p.r[:, None] * p.c), (p.bA, p.bB))
    return out


def armor(W: torch.Tensor, stats, options: ArmorOptions | None = None, *, device=None, progress=None,
          **overrides) -> ArmorResult:
    """Prune W (d_out, d_in) to diag(r)·A·S·B·diag(c) with S 2:4.

    stats: an ActivationStats of the layer's inputs, or the diagonal statistic h itself (objective
           "proxy" from start "nowag_p" only; the others need ActivationStats(full=True)).
    options: an ArmorOptions (default: the library's defaults, the paper's ARMOR from NoWag-P); keyword
             overrides name its fields, e.g. armor(W, stats, optimizer="reference", block_size=64).
    progress: optional callable(step, total, loss).
    The loss (the options' objective) never rises and ends ≤ the start's (history.loss[0]).
    """
    if options is None:
        options = ArmorOptions.from_kwargs(**overrides)
    elif overrides:
        options = replace(options, **overrides)
    if options.needs_full_stats and not (isinstance(stats, ActivationStats) and stats.xx is not None):
        raise InputError(f"stats: objective {options.objective!r} from start {options.start!r} needs the full H, "
                         f"an ActivationStats(full=True); got {type(stats).__name__}"
                         + (" without it" if isinstance(stats, ActivationStats) else ""))
    h = stats.h() if isinstance(stats, ActivationStats) else stats
    p = Problem.from_weight(W, h, options.layer_block_size(tuple(W.shape)), device)
    kwargs = options.optimizer_kwargs()
    if options.optimizer == "reference":
        kwargs["seed"] = options.seed
    if options.objective == "output":
        op = OutputProblem.from_problem(p, stats.H(), options.shrink)
        cands = {name: op.fold(f) for name, f in starts(p, W, stats, options.start).items()}
        start = min(cands, key=lambda name: op.loss(cands[name]))
        passes = kwargs.pop("passes")
        folded, history = descend(op.loss, cands[start], output_steps(op, passes), progress=progress, **kwargs)
        factors = op.unfold(folded, p.r)
    else:
        cands = starts(p, W, stats, options.start)
        start = min(cands, key=lambda name: p.loss(cands[name]))
        factors, history = OPTIMIZE[options.optimizer](p, cands[start], progress=progress, **kwargs)
    return ArmorResult(factors, history, factors.weight().to(W.device, W.dtype), factors.mask.to(W.device), start)
