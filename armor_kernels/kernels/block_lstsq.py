"""Block-diagonal least squares: the A- and B-steps of the optimizer (DESIGN §4).

For every block n, find Z_n minimising Σ_k w_k ‖Y_n[:, k] − Z_n X_n[:, k]‖², i.e.
Z_n = (Y_n W X_nᵀ)(X_n W X_nᵀ)⁻¹ with W = diag(w). Forming the normal equations is the
O(b² K) part and is what a kernel accelerates; the b × b Cholesky solves are O(b³) per block
and stay in torch.linalg.

`normal_equations_reference` is the plain PyTorch definition; it serves every device.
`_normal_equations_triton` is the Triton kernel (one program per block × output tile, fp32
accumulate); `normal_equations` dispatches between them through `_use_triton` (below), which
`mask_select` shares.
"""
from __future__ import annotations

import os

import torch

try:  # triton is optional: without it every dispatch point runs its reference
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None


def normal_equations_reference(X: torch.Tensor, Y: torch.Tensor, w: torch.Tensor | None):
    """(G, F) = (X diag(w) Xᵀ, Y diag(w) Xᵀ), batched: X (n, b, K), Y (n, m, K), w (K,) or None."""
    Xw = X if w is None else X * w
    return Xw @ X.transpose(1, 2), Y @ Xw.transpose(1, 2)


def normal_equations(X, Y, w, *, use_triton: bool | None = None):
    """Dispatch: the Triton kernel where `_use_triton` says so (fp32 inputs), else the reference."""
    ts = (X, Y) if w is None else (X, Y, w)
    if _use_triton(*ts, use_triton=use_triton) and all(t.dtype == torch.float32 for t in ts):
        return _normal_equations_triton(X, Y, w)
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
    G, F = normal_equations(X, Y, w)
    return solve_normal_equations(G, F, ridge)


# ---------------------------------------------------------------------------------------------
# Triton: dispatch switch shared by the kernels of this package
# ---------------------------------------------------------------------------------------------

def _interpreting() -> bool:
    """Triton's CPU interpreter is on: TRITON_INTERPRET=1, and it already was when triton was imported.

    Triton (3.x) picks interpreter or compiler when a function is decorated with @triton.jit, and
    its own language library (tl.sum, tl.zeros, ...) is decorated when triton is imported; so the
    variable must be set before the first `import triton` in the process. Setting it later does
    not switch the interpreter on, which is checked here rather than failing inside a launch.
    """
    if triton is None or os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # pragma: no cover
        return False
    return isinstance(tl.standard.sum, InterpretedFunction)


def _use_triton(*tensors: torch.Tensor, use_triton: bool | None = None) -> bool:
    """The one switch every dispatch point asks: run the Triton kernel on these tensors?

    Precedence: the explicit argument `use_triton`, else the environment variable ARMOR_TRITON
    ("0" = never, "1" = also on CPU tensors under TRITON_INTERPRET=1, unset = automatic).
      - False / ARMOR_TRITON=0            -> reference (also on CUDA: a debugging escape hatch)
      - triton not importable             -> reference (use_triton=True raises)
      - all tensors on CUDA               -> Triton
      - CPU tensors, True / ARMOR_TRITON=1, TRITON_INTERPRET=1 -> Triton through the interpreter
      - CPU tensors otherwise             -> reference (use_triton=True without the interpreter raises)
    Each dispatch point adds its own dtype condition (these kernels take float32).
    For the interpreter path, TRITON_INTERPRET=1 must be set before triton is imported (see
    `_interpreting`).
    """
    env = os.environ.get("ARMOR_TRITON", "").strip()
    want = use_triton if use_triton is not None else {"0": False, "1": True}.get(env)
    if want is False:
        return False
    if triton is None:
        if use_triton:
            raise RuntimeError("use_triton=True but triton is not importable")
        return False
    if all(t.is_cuda for t in tensors):
        return True
    if want and _interpreting():
        return True
    if use_triton:
        raise RuntimeError("use_triton=True with CPU tensors needs Triton's CPU interpreter: set "
                           "TRITON_INTERPRET=1 before triton is first imported; or pass CUDA tensors")
    return False


# @triton.jit when triton is importable; otherwise the kernels stay plain, never-called functions
# (this module uses postponed annotations, so `tl.constexpr` is not evaluated without triton).
_jit = triton.jit if triton is not None else (lambda fn: fn)


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


# ---------------------------------------------------------------------------------------------
# Triton: normal equations C_n = P_n diag(w) Q_nᵀ
# ---------------------------------------------------------------------------------------------

@_jit
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
    return min(64, max(16, _next_pow2(d)))


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


def _normal_equations_triton(X: torch.Tensor, Y: torch.Tensor, w: torch.Tensor | None):
    """Same contract as `normal_equations_reference`, float32 in and out; two launches
    (G = X W Xᵀ, F = Y W Xᵀ). Inputs may be strided views (no copies are made)."""
    if X.dim() != 3 or Y.dim() != 3 or X.shape[0] != Y.shape[0] or X.shape[2] != Y.shape[2]:
        raise ValueError(f"normal_equations: X (n, b, K), Y (n, m, K) expected, got "
                         f"{tuple(X.shape)} and {tuple(Y.shape)}")
    if w is not None and (w.dim() != 1 or w.shape[0] != X.shape[2]):
        raise ValueError(f"normal_equations: w must have shape ({X.shape[2]},), got {tuple(w.shape)}")
    return _launch_normal_eq(X, X, w), _launch_normal_eq(Y, X, w)
