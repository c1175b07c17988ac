"""The fast optimizer: exact block coordinate descent with closed-form steps (docs/DESIGN.md §4).

One outer iteration = A-step, B-step, S-step, then one extrapolation:
  A-step  A_I = (W̄_I D P_Iᵀ)(P_I D P_Iᵀ)⁻¹, P = S B      (block least squares, weighted by h)
  B-step  B_J = (Q_Jᵀ Q_J)⁻¹ Q_Jᵀ W̄_:,J,   Q = A S       (h drops out: columns are independent)
  S-step  `passes` sweeps of exact 6-pattern group solves over every group of every tile.
  Extrapolation  x + (x − x₂), x₂ the state two outer iterations back (A, B, and the entries of
          S whose mask did not change, so S stays 2:4). Alternating exact steps on a trilinear
          model zig-zag along narrow valleys, and this jump along the recent displacement (the
          line-search acceleration of alternating least squares) reaches the same loss 2-3× sooner
          on the bundled model's layers (benchmarks/bench_optimizer.py runs it with and without).
Each step minimises the loss exactly over its block of variables; every candidate, the
extrapolation included, is kept only if the loss does not rise (a ridge or round-off effect
could otherwise raise it), so the history never goes up and never ends above NoWag-P.
Steps return the candidate with its product A·S·B, which the loss and the next S-step reuse.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..factors import ArmorFactors, block_left, block_right
from ..kernels.block_lstsq import block_lstsq
from ..kernels.tile_sweep import sweep_tiles
from .common import History, Problem, descend


def a_step(p: Problem, f: ArmorFactors) -> tuple[ArmorFactors, torch.Tensor]:
    P = block_right(f.S, f.B)
    A = block_lstsq(P.reshape(p.nA, p.bA, -1), p.Wbar.reshape(p.nA, p.bA, -1), p.h)
    return replace(f, A=A), block_left(A, P)


def b_step(p: Problem, f: ArmorFactors) -> tuple[ArmorFactors, torch.Tensor]:
    d_out = p.Wbar.shape[0]
    cols = lambda M: M.reshape(d_out, p.nB, p.bB).permute(1, 2, 0)  # noqa: E731  (nB, bB, d_out)
    Q = block_left(f.A, f.S)
    B = block_lstsq(cols(Q), cols(p.Wbar)).transpose(1, 2).contiguous()
    return replace(f, B=B), block_right(Q, B)


def s_step(p: Problem, f: ArmorFactors, passes: int, core: torch.Tensor | None = None
           ) -> tuple[ArmorFactors, torch.Tensor]:
    R, A, Bt = p.tile_operands(f, core)
    _, S = sweep_tiles(R, A, Bt, p.to_tiles(f.S).contiguous(), passes)
    g = replace(f, S=p.from_tiles(S))
    return g, g.core()


def optimize_fast(p: Problem, f: ArmorFactors, *, iters: int, passes: int, tol: float, extrapolation: bool,
                  time_budget: float | None = None, progress=None
                  ) -> tuple[ArmorFactors, History]:
    """Outer iterations of (A, B, S) steps and an extrapolation (common.descend). The defaults of every
    argument are ArmorOptions's."""
    steps = [lambda f, core: a_step(p, f), lambda f, core: b_step(p, f), lambda f, core: s_step(p, f, passes, core)]
    return descend(p.loss, f, steps, iters=iters, tol=tol, extrapolation=extrapolation, time_budget=time_budget,
                   progress=progress)
