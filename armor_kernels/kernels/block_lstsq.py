"""Block-diagonal least squares: the A- and B-steps of the optimizer (DESIGN §4).

For every block n, find Z_n minimising Σ_k w_k ‖Y_n[:, k] − Z_n X_n[:, k]‖², i.e.
Z_n = (Y_n W X_nᵀ)(X_n W X_nᵀ)⁻¹ with W = diag(w). Forming the normal equations is the
O(b² K) part and is what a kernel accelerates; the b × b Cholesky solves are O(b³) per block
and stay in torch.linalg.

`normal_equations_reference` is the plain PyTorch definition; it serves every device.
"""
from __future__ import annotations

import torch


def normal_equations_reference(X: torch.Tensor, Y: torch.Tensor, w: torch.Tensor | None):
    """(G, F) = (X diag(w) Xᵀ, Y diag(w) Xᵀ), batched: X (n, b, K), Y (n, m, K), w (K,) or None."""
    Xw = X if w is None else X * w
    return Xw @ X.transpose(1, 2), Y @ Xw.transpose(1, 2)


def normal_equations(X, Y, w):
    return normal_equations_reference(X, Y, w)


def solve_normal_equations(G: torch.Tensor, F: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """Z = F G⁻¹ per block via Cholesky, with a ridge relative to the mean diagonal of G.

    A block whose Gram matrix is still not positive definite retries with a 100× larger ridge,
    so rank-deficient blocks (a dead input, say) get the minimum-norm-like solution instead of NaN.
    """
    G, F = G.double(), F.double()
    scale = G.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)[:, None, None]
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    for lam in (ridge, ridge * 1e2, ridge * 1e4):
        L, info = torch.linalg.cholesky_ex(G + lam * scale * eye)
        if not info.any():
            break
    else:
        raise RuntimeError("block least squares: Gram matrices not positive definite even with ridge")
    # Z G = F  <=>  G Zᵀ = Fᵀ (G symmetric)
    return torch.cholesky_solve(F.transpose(1, 2), L).transpose(1, 2).float()


def block_lstsq(X, Y, w=None, ridge: float = 1e-6) -> torch.Tensor:
    G, F = normal_equations(X, Y, w)
    return solve_normal_equations(G, F, ridge)
