"""The fast optimizer: exact block coordinate descent with closed-form steps (DESIGN §4).

One outer iteration = A-step, B-step, S-step:
  A-step  A_I = (W̄_I D P_Iᵀ)(P_I D P_Iᵀ)⁻¹, P = S B      (block least squares, weighted by h)
  B-step  B_J = (Q_Jᵀ Q_J)⁻¹ Q_Jᵀ W̄_:,J,   Q = A S       (h drops out: columns are independent)
  S-step  `passes` sweeps of exact 6-pattern group solves over every group of every tile.
Each step minimises the loss exactly over its block of variables; an A/B step that would raise the
loss (a ridge or round-off effect) is rejected, and the sweep accepts a group only if its local
objective does not rise, so the history never goes up and never ends above NoWag-P.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..factors import ArmorFactors, block_left, block_right
from ..kernels.block_lstsq import block_lstsq
from ..kernels.mask_select import sweep_tiles
from .common import History, Problem


def a_step(p: Problem, f: ArmorFactors) -> ArmorFactors:
    P = block_right(f.S, f.B).reshape(p.nA, p.bA, -1)
    A = block_lstsq(P, p.Wbar.reshape(p.nA, p.bA, -1), p.h)
    return replace(f, A=A)


def b_step(p: Problem, f: ArmorFactors) -> ArmorFactors:
    d_out = p.Wbar.shape[0]
    cols = lambda M: M.reshape(d_out, p.nB, p.bB).permute(1, 2, 0)  # noqa: E731  (nB, bB, d_out)
    Bt = block_lstsq(cols(block_left(f.A, f.S)), cols(p.Wbar))
    return replace(f, B=Bt.transpose(1, 2).contiguous())


def s_step(p: Problem, f: ArmorFactors, passes: int) -> ArmorFactors:
    R, A, Bt = p.tile_operands(f)
    _, S = sweep_tiles(R, A, Bt, p.to_tiles(f.S).contiguous(), passes)
    return replace(f, S=p.from_tiles(S))


def optimize_fast(p: Problem, f: ArmorFactors, *, iters: int = 30, passes: int = 1, tol: float = 1e-4,
                  time_budget: float | None = None, progress=None) -> tuple[ArmorFactors, History]:
    """Outer iterations of (A, B, S) steps; stop after `iters`, when one outer iteration improves
    the loss by less than `tol` relative, or once `time_budget` seconds have passed."""
    hist = History()
    best = p.loss(f)
    hist.record(best)
    for it in range(iters):
        start = best
        for step in (a_step, b_step, lambda p_, f_: s_step(p_, f_, passes)):
            cand = step(p, f)
            loss = p.loss(cand)
            if loss <= best:
                f, best = cand, loss
                hist.record(best)
        if progress is not None:
            progress(it + 1, iters, best)
        if start - best < tol * start or hist.out_of_time(time_budget):
            break
    return f, hist
