"""The published ARMOR loop (docs/DESIGN.md §4), made monotone: the reference the fast optimizer must beat.

Per iteration: one joint Adam step on A, B and the kept values of S; then in every tile one group
of 4, sampled with probability ∝ the L1 norm of the loss gradient on it, solved exactly over the
6 patterns. The Adam step is kept only if the loss does not rise (otherwise the parameters are
restored); the group solve is an exact minimisation, so the recorded loss never rises.
Stops after `iters` iterations, after `patience` iterations without a relative improvement of `tol`,
or once `time_budget` seconds have passed.
"""
from __future__ import annotations

import torch

from ..factors import ArmorFactors, block_left, block_right
from ..kernels.group_solve import solve_group_reference
from .common import History, Problem


def _loss(p: Problem, A, S, B) -> torch.Tensor:
    R = p.Wbar - block_left(A, block_right(S, B))
    return (R * R * p.h).sum() / p.norm.float()


def group_step(p: Problem, f: ArmorFactors, grad_S: torch.Tensor, gen: torch.Generator) -> ArmorFactors:
    """One sampled group per tile, solved exactly; all tiles at once (they are independent)."""
    R, A, Bt = p.tile_operands(f)
    S = p.to_tiles(f.S).clone()
    T, bA, bB = S.shape
    ng = bB // 4
    weight = p.to_tiles(grad_S.abs()).reshape(T, bA * ng, 4).sum(-1) + 1e-30
    pick = torch.multinomial(weight.cpu(), 1, generator=gen).squeeze(1).to(S.device)
    k, g = pick // ng, pick % ng
    t = torch.arange(T, device=S.device)
    a = A[t, :, k]                                                    # (T, bA)
    n = (a * a).sum(-1)
    cols = 4 * g[:, None] + torch.arange(4, device=S.device)          # (T, 4)
    Bg = Bt[t[:, None], cols]                                         # (T, 4, bB)
    s_old = S[t[:, None], k[:, None], cols]                           # (T, 4)
    G = Bg @ Bg.transpose(1, 2)
    v = (a.unsqueeze(1) @ R).squeeze(1)                               # Rᵀa
    f_vec = (Bg @ v.unsqueeze(-1)).squeeze(-1) + n[:, None] * (G @ s_old.unsqueeze(-1)).squeeze(-1)
    S[t[:, None], k[:, None], cols] = solve_group_reference(f_vec, G, n, s_old)
    return ArmorFactors(f.A, p.from_tiles(S), f.B, f.r, f.c)


def optimize_reference(p: Problem, f: ArmorFactors, *, iters: int, lr: float, tol: float, patience: int,
                       seed: int, time_budget: float | None = None, progress=None) -> tuple[ArmorFactors, History]:
    gen = torch.Generator().manual_seed(seed)
    A, B = f.A.clone().requires_grad_(), f.B.clone().requires_grad_()
    S = f.S.clone().requires_grad_()
    opt = torch.optim.Adam([A, B, S], lr=lr)
    hist = History()
    best = p.loss(f)
    hist.record(best)
    stale = 0
    for it in range(iters):
        mask = f.S != 0
        opt.zero_grad(set_to_none=True)
        loss = _loss(p, A, S * mask, B)
        loss.backward()
        grad_S = S.grad.detach().clone()
        saved = [x.detach().clone() for x in (A, B, S)]
        S.grad *= mask
        opt.step()
        with torch.no_grad():
            cand = ArmorFactors(A.detach().clone(), S.detach() * mask, B.detach().clone(), f.r, f.c)
            cand_loss = p.loss(cand)
            if cand_loss > best:  # reject the Adam step
                for x, old in zip((A, B, S), saved):
                    x.copy_(old)
                cand = ArmorFactors(saved[0], saved[2] * mask, saved[1], f.r, f.c)
                cand_loss = best
            f = group_step(p, cand, grad_S, gen)
            new = p.loss(f)
            if new > cand_loss:  # round-off only: keep the state before the solve
                f, new = cand, cand_loss
            S.copy_(f.S)
        stale = 0 if best - new > tol * best else stale + 1
        best = new
        hist.record(best)
        if progress is not None:
            progress(it + 1, iters, best)
        if stale >= patience or hist.out_of_time(time_budget):
            break
    return f, hist
