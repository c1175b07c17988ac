"""The 2:4 baselines ARMOR is compared with (docs/DESIGN.md §3), one signature for all:

    method(W, stats) -> Pruned(weight, mask)

W is (d_out, d_in); `stats` an ActivationStats of the layer's inputs (magnitude ignores it,
SparseGPT needs it built with full=True). `mask` is True where a weight is kept: exactly 2 of
every 4 consecutive entries along d_in. `weight` has W's dtype.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .errors import InputError
from .factors import check_weight, normalize
from .kernels.top2 import top2_mask
from .stats import ActivationStats

SPARSEGPT_BLOCK = 128
SPARSEGPT_DAMP = 0.01


class Pruned(NamedTuple):
    weight: torch.Tensor
    mask: torch.Tensor


def _check_stats(stats, W: torch.Tensor) -> None:
    if not isinstance(stats, ActivationStats):
        raise TypeError(f"stats: expected ActivationStats, got {type(stats).__name__}")
    if stats.d_in != W.shape[1]:
        raise InputError(f"stats: collected for d_in={stats.d_in}, weight has d_in={W.shape[1]}")


def _by_score(W: torch.Tensor, score: torch.Tensor) -> Pruned:
    mask = top2_mask(score)
    return Pruned(W * mask, mask)


def magnitude(W: torch.Tensor, stats: ActivationStats | None = None) -> Pruned:
    """Keep the 2 largest |W_ij| of every group."""
    check_weight(W)
    return _by_score(W, W.abs())


def wanda(W: torch.Tensor, stats: ActivationStats) -> Pruned:
    """Score |W_ij| · ‖X_j‖₂ (‖X_j‖ ∝ √h_j, the constant does not change the choice)."""
    check_weight(W)
    _check_stats(stats, W)
    return _by_score(W, W.abs().float() * stats.h().to(W.device).sqrt())


def nowag_p(W: torch.Tensor, stats: ActivationStats) -> Pruned:
    """Score W̄_ij² · h_j on the NoWag-normalised weight; values unchanged. ARMOR's start."""
    check_weight(W)
    _check_stats(stats, W)
    Wbar, _, _ = normalize(W)
    return _by_score(W, Wbar * Wbar * stats.h().to(W.device))


def sparsegpt(W: torch.Tensor, stats: ActivationStats, block: int = SPARSEGPT_BLOCK,
              damp: float = SPARSEGPT_DAMP) -> Pruned:
    """SparseGPT 2:4: OBS updates with the Cholesky factor of H⁻¹, lazy in column blocks.

    Every 4th column, each row keeps the 2 of the next 4 weights with the largest w² / [H⁻¹]_qq
    (the smallest OBS error), then the error of every processed column is pushed onto the
    columns not yet processed.
    """
    check_weight(W)
    _check_stats(stats, W)
    H = stats.H().to(W.device, torch.float64)
    W1 = W.to(torch.float64).clone()
    d_in = W1.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W1[:, dead] = 0.0
    H += damp * torch.diag(H).mean() * torch.eye(d_in, dtype=H.dtype, device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    mask = torch.zeros_like(W1, dtype=torch.bool)
    for b0 in range(0, d_in, block):
        b1 = min(b0 + block, d_in)
        Wb, Ub = W1[:, b0:b1].clone(), U[b0:b1, b0:b1]
        Err = torch.zeros_like(Wb)
        for i in range(b1 - b0):
            if i % 4 == 0:
                score = Wb[:, i:i + 4] ** 2 / torch.diag(Ub)[i:i + 4] ** 2
                mask[:, b0 + i:b0 + i + 4] = top2_mask(score)
            w, d = Wb[:, i], Ub[i, i]
            q = w * mask[:, b0 + i]
            err = (w - q) / d
            Wb[:, i:] -= err[:, None] * Ub[i, i:][None, :]
            Wb[:, i] = q
            Err[:, i] = err
        W1[:, b0:b1] = Wb
        W1[:, b1:] -= Err @ U[b0:b1, b1:]
    return Pruned((W1 * mask).to(W.dtype), mask)


BASELINES = {"magnitude": magnitude, "wanda": wanda, "sparsegpt": sparsegpt, "nowag_p": nowag_p}
