"""2:4 mask selection: keep the 2 highest-scoring entries of every group of 4 along the last dim.

`top2_mask_reference` is the plain PyTorch definition; it serves every device.
"""
from __future__ import annotations

import torch


def top2_mask_reference(score: torch.Tensor) -> torch.Tensor:
    """Boolean mask, same shape as `score`, with exactly 2 True per group of 4 along the last dim.

    Ties go to the lower column (a stable sort), so every device picks the same mask.
    """
    *lead, d = score.shape
    if d % 4:
        raise ValueError(f"score: last dimension must be divisible by 4, got shape {tuple(score.shape)}")
    g = score.reshape(*lead, d // 4, 4).float()
    order = torch.sort(-g, dim=-1, stable=True).indices[..., :2]
    mask = torch.zeros_like(g, dtype=torch.bool)
    mask.scatter_(-1, order, True)
    return mask.reshape(score.shape)


def top2_mask(score: torch.Tensor) -> torch.Tensor:
    return top2_mask_reference(score)


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


def sweep_tiles_reference(R, A, Bt, S, passes: int = 1):
    """S-step: exact group solves swept over every group of every tile, residual kept up to date.

    All tiles are independent and processed in lockstep (the batch dim T = nA · nB):
      R  (T, bA, bB)  weighted residual (W̄ − A S B)^IJ D_J^½, updated in place
      A  (T, bA, bA)  A_I of each tile
      Bt (T, bB, bB)  B_J D_J^½ of each tile
      S  (T, bA, bB)  the tile of the sparse core, updated in place
    Row k's groups share a = A_I[:, k], so v = Rᵀa is formed once per row and kept current by a
    4-row update after each group; the residual takes one rank-one update per row (DESIGN §5).
    """
    T, bA, bB = S.shape
    ng = bB // 4
    Bg = Bt.reshape(T, ng, 4, bB)
    Gram = Bg @ Bg.transpose(-1, -2)                                     # (T, ng, 4, 4)
    inv = pattern_inverses(Gram)                                         # (T, ng, 3, 6)
    Bgs, Grams, invs = Bg.unbind(1), Gram.unbind(1), inv.unbind(1)
    for _ in range(passes):
        for k in range(bA):
            a = A[:, :, k]
            n = (a * a).sum(-1)
            v = (a.unsqueeze(1) @ R).squeeze(1)                          # Rᵀa, (T, bB)
            old = S[:, k, :].clone()
            row = old.clone().reshape(T, ng, 4)
            for g in range(ng):
                s_old = row[:, g]
                f = (Bgs[g] @ v.unsqueeze(-1)).squeeze(-1) + n[:, None] * (Grams[g] @ s_old.unsqueeze(-1)).squeeze(-1)
                s_new = solve_group_reference(f, Grams[g], n, s_old, invs[g])
                v = v - n[:, None] * ((s_new - s_old).unsqueeze(1) @ Bgs[g]).squeeze(1)
                row[:, g] = s_new
            row = row.reshape(T, bB)
            R -= a.unsqueeze(-1) * ((row - old).unsqueeze(1) @ Bt)
            S[:, k, :] = row
    return R, S


def _load_cpu_module():
    """armor_kernels._armor_cpu (csrc/cpu, built by setup.py), or None: the reference then serves."""
    import os
    if os.environ.get("ARMOR_KERNELS_NO_CPU_EXT", "") not in ("", "0"):
        return None
    try:
        from .. import _armor_cpu
    except ImportError:
        return None
    return _armor_cpu


_armor_cpu = _load_cpu_module()


def sweep_tiles_cpu(R, A, Bt, S, passes: int = 1):
    """The C++/OpenMP kernel (csrc/cpu/sweep.cpp): same semantics as `sweep_tiles_reference`.

    float32 CPU tensors only; non-contiguous inputs are copied and R, S written back in place.
    """
    if _armor_cpu is None:
        raise RuntimeError("armor_kernels._armor_cpu is not built (pip install the package to build it)")
    T, bA, bB = S.shape
    if bB % 4 or R.shape != S.shape or A.shape != (T, bA, bA) or Bt.shape != (T, bB, bB):
        raise ValueError(f"sweep_tiles: shapes R {tuple(R.shape)}, A {tuple(A.shape)}, Bt {tuple(Bt.shape)}, "
                         f"S {tuple(S.shape)} do not fit (T,bA,bB)/(T,bA,bA)/(T,bB,bB)/(T,bA,bB), bB % 4 == 0")
    Rc, Sc = R.contiguous(), S.contiguous()
    if Rc.data_ptr() == Sc.data_ptr() and Rc.numel():
        Sc = Sc.clone()
    Ac, Btc = A.contiguous(), Bt.contiguous()
    _armor_cpu.sweep_tiles(Rc.data_ptr(), Ac.data_ptr(), Btc.data_ptr(), Sc.data_ptr(),
                           T, bA, bB, int(passes), torch.get_num_threads())
    if Rc is not R:
        R.copy_(Rc)
    if Sc is not S:
        S.copy_(Sc)
    return R, S


def _cpu_sweep_applies(R, A, Bt, S) -> bool:
    ts = (R, A, Bt, S)
    return (_armor_cpu is not None
            and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.dim() == 3 for t in ts)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in ts)))


def sweep_tiles(R, A, Bt, S, passes: int = 1):
    if _cpu_sweep_applies(R, A, Bt, S):
        return sweep_tiles_cpu(R, A, Bt, S, passes)
    return sweep_tiles_reference(R, A, Bt, S, passes)
