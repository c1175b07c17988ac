"""The exact solve of one group of 4 over its six 2:4 patterns: the step both S-steps are made of.

`solve_group_reference` (with `PATTERNS`, `pattern_inverses` and `group_objective`) is the plain
PyTorch definition, batched over any leading dims. It has no kernel of its own: the reference
optimizer calls it for one sampled group per tile, and the tile sweep's kernels (tile_sweep.py:
C++ and Triton) inline the same arithmetic group by group, with these functions as their spec.
"""
from __future__ import annotations

import torch

# The six ways to keep 2 of 4: (first, second) position inside the group.
PATTERNS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


def pattern_inverses(G: torch.Tensor, ridge: float = 1e-7) -> torch.Tensor:
    """(G_PP + ridge)⁻¹ for the 6 patterns as (c_ii, c_ij, c_jj): G (..., 4, 4) -> (..., 3, 6)."""
    i, j = torch.tensor(PATTERNS, device=G.device).T
    gii, gjj, gij = G[..., i, i], G[..., j, j], G[..., i, j]
    eps = ridge * (gii + gjj).clamp_min(1e-30)
    gii, gjj = gii + eps, gjj + eps
    det = gii * gjj - gij * gij
    return torch.stack((gjj / det, -gij / det, gii / det), dim=-2)


def group_objective(s: torch.Tensor, f: torch.Tensor, G: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """q(s) = −2 sᵀf + n sᵀGs: the tile loss as a function of one group's values, up to a constant."""
    Gs = (G @ s.unsqueeze(-1)).squeeze(-1)
    return (s * (n.unsqueeze(-1) * Gs - 2 * f)).sum(-1)


def solve_group_reference(f, G, n, s_old, inv=None):
    """Exact minimiser of q over the 6 two-of-four patterns, batched over leading dims.

    One group of row k in a tile contributes a·sᵀB̃ to the residual (a = A_I[:, k], B̃ the group's
    4 rows of B_J D_J^½). With f = B̃ R'ᵀa (R' the tile residual without the group), G = B̃B̃ᵀ and
    n = ‖a‖², the loss is const + q(s); on a pattern P the minimiser is s_P = G_PP⁻¹ f_P / n and
    q = −f_P·s_P. The new values are returned only where q does not rise above q(s_old) (the tiny
    ridge and round-off could otherwise break the monotone guarantee) and where n > 0.
    f: (..., 4), G: (..., 4, 4), n: (...,), s_old: (..., 4), inv: pattern_inverses(G) if at hand
    -> s_new (..., 4).
    """
    if inv is None:
        inv = pattern_inverses(G)
    onehot = torch.eye(4, dtype=f.dtype, device=f.device)
    Ei, Ej = onehot[[p[0] for p in PATTERNS]], onehot[[p[1] for p in PATTERNS]]   # (6, 4)
    fi, fj = f @ Ei.T, f @ Ej.T                                                   # (..., 6)
    rn = 1.0 / n.clamp_min(1e-30).unsqueeze(-1)
    si = (inv[..., 0, :] * fi + inv[..., 1, :] * fj) * rn
    sj = (inv[..., 1, :] * fi + inv[..., 2, :] * fj) * rn
    best = (fi * si + fj * sj).argmax(-1, keepdim=True)
    s_new = si.gather(-1, best) * Ei[best[..., 0]] + sj.gather(-1, best) * Ej[best[..., 0]]
    ok = (group_objective(s_new, f, G, n) <= group_objective(s_old, f, G, n)) & (n > 0)
    return torch.where(ok.unsqueeze(-1), s_new, s_old)
