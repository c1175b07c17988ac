"""Block-diagonal least squares: the A- and B-steps of the optimizer (docs/DESIGN.md §4).

For every block n, find Z_n minimising Σ_k w_k ‖Y_n[:, k] − Z_n X_n[:, k]‖², i.e.
Z_n = (Y_n W X_nᵀ)(X_n W X_nᵀ)⁻¹ with W = diag(w). Forming the normal equations is the
O(b² K) part and is what a kernel accelerates; the b × b Cholesky solves are O(b³) per block
and stay in torch.linalg.

`normal_equations_reference` is the plain PyTorch definition; it serves every device.
`normal_equations_triton` is the Triton kernel (one program per block × output tile, fp32
accumulate); `normal_equations` dispatches between them through `triton_switch.use_triton`.
`block_lstsq` is the entry point: normal equations, then `solve_normal_equations`.
"""
from __future__ import annotations

import torch

from ..errors import InputError
from . import triton_switch
from .triton_switch import jit, next_pow2, tl, triton


def normal_equations_reference(X: torch.Tensor, Y: torch.Tensor, w: torch.Tensor | None):
    """(G, F) = (X diag(w) Xᵀ, Y diag(w) Xᵀ), batched: X (n, b, K), Y (n, m, K), w (K,) or None."""
    Xw = X if w is None else X * w
    return Xw @ X.transpose(1, 2), Y @ Xw.transpose(1, 2)


def normal_equations(X, Y, w, *, use_triton: bool | None = None):
    """Dispatch: the Triton kernel where `triton_switch.use_triton` says so (fp32 inputs), else the reference."""
    ts = (X, Y) if w is None else (X, Y, w)
    if triton_switch.use_triton(*ts, use_triton=use_triton) and all(t.dtype == torch.float32 for t in ts):
        return normal_equations_triton(X, Y, w)
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
    # Z G = F with G = L Lᵀ: Z = (F L⁻ᵀ) L⁻¹, two triangular solves (faster than cholesky_solve on CPU)
    Y = torch.linalg.solve_triangular(L.transpose(1, 2), F, upper=True, left=False)
    return torch.linalg.solve_triangular(L, Y, upper=False, left=False).float()


def block_lstsq(X, Y, w=None, ridge: float = 1e-6) -> torch.Tensor:
    """Z (n, m, b) minimising Σ_k w_k ‖Y_n[:, k] − Z_n X_n[:, k]‖² per block: X (n, b, K), Y (n, m, K),
    w (K,) or None (unweighted). The normal equations go through `normal_equations` (Triton or the
    reference); the solve is `solve_normal_equations` (float64 Cholesky, float32 result)."""
    G, F = normal_equations(X, Y, w)
    return solve_normal_equations(G, F, ridge)


# ---------------------------------------------------------------------------------------------
# Triton: normal equations C_n = P_n diag(w) Q_nᵀ
# ---------------------------------------------------------------------------------------------

@jit
def _normal_eq_kernel(P, Q, W, C, M, N, K,
                      s_pn, s_pm, s_pk, s_qn, s_qm, s_qk, s_w, s_cn, s_cm, s_cn2,
                      HAS_W: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """One program per (block n, BM × BN output tile); K is streamed in BK chunks.

    Any M, N, K (ragged blocks such as 96 or 12, any token/row count) by masking power-of-2
    aranges; any strides (the B-step passes a transposed view, K-stride ≠ 1). Accumulates in fp32
    with input_precision="ieee": no TF32, so the Gram matrices keep full fp32 accuracy for the
    Cholesky solve that follows.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1)
    n_tn = tl.cdiv(N, BN)
    rm = (pid_t // n_tn) * BM + tl.arange(0, BM)
    rn = (pid_t % n_tn) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    p_rows = P + pid_b * s_pn + rm[:, None] * s_pm
    q_rows = Q + pid_b * s_qn + rn[:, None] * s_qm
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        km = kk[None, :] < K
        p = tl.load(p_rows + kk[None, :] * s_pk, mask=(rm[:, None] < M) & km, other=0.0)
        q = tl.load(q_rows + kk[None, :] * s_qk, mask=(rn[:, None] < N) & km, other=0.0)
        if HAS_W:
            w = tl.load(W + kk * s_w, mask=kk < K, other=0.0)
            p = p * w[None, :]
        acc = tl.dot(p, tl.trans(q), acc, input_precision="ieee")
    c = C + pid_b * s_cn + rm[:, None] * s_cm + rn[None, :] * s_cn2
    tl.store(c, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def _tile(d: int) -> int:
    """Output tile edge for a block edge d: 64/32/16 when it divides d (96 -> 32: no padding),
    else the next power of two up to 64 (12 -> 16, masked). tl.dot needs ≥ 16."""
    for t in (64, 32, 16):
        if d % t == 0:
            return t
    return min(64, max(16, next_pow2(d)))


def _launch_normal_eq(P: torch.Tensor, Q: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    n, M, K = P.shape
    N = Q.shape[1]
    C = torch.empty((n, M, N), dtype=torch.float32, device=P.device)
    if n == 0 or M == 0 or N == 0:
        return C
    BM, BN, BK = _tile(M), _tile(N), 32
    grid = (n, triton.cdiv(M, BM) * triton.cdiv(N, BN))
    W = w if w is not None else P  # dummy pointer when HAS_W is False
    _normal_eq_kernel[grid](P, Q, W, C, M, N, K,
                            P.stride(0), P.stride(1), P.stride(2),
                            Q.stride(0), Q.stride(1), Q.stride(2),
                            w.stride(0) if w is not None else 0,
                            C.stride(0), C.stride(1), C.stride(2),
                            HAS_W=w is not None, BM=BM, BN=BN, BK=BK, num_warps=4)
    return C


def normal_equations_triton(X: torch.Tensor, Y: torch.Tensor, w: torch.Tensor | None):
    """Same contract as `normal_equations_reference`, float32 in and out; two launches
    (G = X W Xᵀ, F = Y W Xᵀ). Inputs may be strided views (no copies are made)."""
    if X.dim() != 3 or Y.dim() != 3 or X.shape[0] != Y.shape[0] or X.shape[2] != Y.shape[2]:
        raise InputError(f"normal_equations: X (n, b, K), Y (n, m, K) expected, got "
                         f"{tuple(X.shape)} and {tuple(Y.shape)}")
    if w is not None and (w.dim() != 1 or w.shape[0] != X.shape[2]):
        raise InputError(f"normal_equations: w must have shape ({X.shape[2]},), got {tuple(w.shape)}")
    return _launch_normal_eq(X, X, w), _launch_normal_eq(Y, X, w)
