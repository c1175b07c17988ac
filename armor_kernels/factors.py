"""ARMOR's factorisation W ≈ diag(r) · A · S · B · diag(c), NoWag normalisation and the proxy loss.

Shapes used throughout the package (y = x Wᵀ, W is d_out × d_in):
    A: (d_out / bA, bA, bA)  the diagonal blocks of the output-side block-diagonal matrix
    S: (d_out, d_in)         the 2:4 sparse core, groups of 4 along d_in, stored dense
    B: (d_in / bB, bB, bB)   the diagonal blocks of the input-side block-diagonal matrix
    r: (d_out,), c: (d_in,)  NoWag's row and column norms

Block-size rule (DESIGN §1): a dimension d gets the largest block ≤ b that divides d; on the input
side the block must also be a multiple of 4 so no 2:4 group straddles two blocks. So every block
of a layer has one size, tiles are uniform and the tile-wise loss is exact. SmolLM2-135M
(576, 192, 1536) gets 96, 96 and 128 at b = 128. A prime-ish dimension degrades to small blocks
(still exact, just less expressive).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError

EPS_NORM = 1e-5  # NoWag's epsilon on row/column norms


def check_weight(W: torch.Tensor, name: str = "weight") -> None:
    """Clear errors for weights the math cannot take."""
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(W).__name__}")
    if W.dim() != 2:
        raise InputError(f"{name}: expected a 2-D (d_out, d_in) matrix, got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype (float32/bfloat16/float16), got {W.dtype}")
    if W.shape[1] % 4:
        raise InputError(f"{name}: d_in must be divisible by 4 for 2:4 groups, got shape {tuple(W.shape)}")
    if W.numel() == 0:
        raise InputError(f"{name}: empty matrix of shape {tuple(W.shape)}")
    if not torch.isfinite(W).all():
        raise InputError(f"{name}: contains NaN or inf")


def block_size_for(d: int, b: int, multiple: int = 1) -> int:
    """Largest divisor of d that is ≤ b and a multiple of `multiple` (the module docstring's rule)."""
    if b < multiple:
        raise InputError(f"block_size: must be ≥ {multiple}, got {b}")
    if d % multiple:
        raise InputError(f"dimension {d} is not divisible by {multiple}")
    for cand in range(min(b, d) - min(b, d) % multiple, 0, -multiple):
        if d % cand == 0:
            return cand
    raise AssertionError("unreachable: `multiple` divides d")


def block_sizes(W_shape: tuple[int, int], b: int) -> tuple[int, int]:
    """(bA, bB) for a d_out × d_in weight at nominal block size b."""
    d_out, d_in = W_shape
    return block_size_for(d_out, b), block_size_for(d_in, b, multiple=4)


def block_overhead(W_shape: tuple[int, int], blocks: tuple[int, int]) -> float:
    """Extra parameters of A and B as a fraction of the layer's: (d_out·bA + d_in·bB) / (d_out·d_in)."""
    (d_out, d_in), (bA, bB) = W_shape, blocks
    return (d_out * bA + d_in * bB) / (d_out * d_in)


def block_size_under_overhead(W_shape: tuple[int, int], overhead: float, max_block: int = 128) -> int:
    """The largest nominal block size b ≤ max_block whose blocks (the rule above) cost at most `overhead`
    (block_overhead); 4, the smallest, when none does."""
    if not overhead > 0:
        raise InputError(f"overhead: expected a positive fraction of the layer's parameters, got {overhead!r}")
    for b in range(max_block, 4, -1):
        if block_overhead(W_shape, block_sizes(W_shape, b)) <= overhead:
            return b
    return 4


def normalize(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NoWag normalisation: W = diag(r) W̄ diag(c). Returns float32 (W̄, r, c)."""
    check_weight(W)
    W = W.double()
    c = W.norm(dim=0) + EPS_NORM
    W = W / c
    r = W.norm(dim=1) + EPS_NORM
    return (W / r[:, None]).float(), r.float(), c.float()


def denormalize(Wbar: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return r[:, None] * Wbar * c


def block_left(A: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """blockdiag(A) @ M for M of shape (d_out, k)."""
    n, b, _ = A.shape
    return torch.bmm(A, M.reshape(n, b, -1)).reshape(M.shape)


def block_right(M: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """M @ blockdiag(B) for M of shape (..., d_in)."""
    n, b, _ = B.shape
    lead = M.shape[:-1]
    return torch.einsum("tnj,njk->tnk", M.reshape(-1, n, b), B).reshape(*lead, n * b)


def fix_diagonal(h: torch.Tensor) -> torch.Tensor:
    """DESIGN §2: replace non-finite or non-positive entries by the mean of the valid ones."""
    valid = torch.isfinite(h) & (h > 0)
    if not valid.any():
        raise InputError("h: no finite positive entry (all calibration inputs zero or non-finite)")
    return torch.where(valid, h, h[valid].mean())


def check_h(h: torch.Tensor, d_in: int) -> None:
    if not isinstance(h, torch.Tensor) or h.shape != (d_in,):
        got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
        raise InputError(f"h: expected a ({d_in},) tensor of input statistics, got {got}")
    if not (torch.isfinite(h).all() and (h > 0).all()):
        raise InputError("h: must be finite and positive (ActivationStats.h() applies the DESIGN rule)")


@dataclass
class ArmorFactors:
    """W ≈ diag(r) · blockdiag(A) · S · blockdiag(B) · diag(c). All float32 during optimisation."""

    A: torch.Tensor
    S: torch.Tensor
    B: torch.Tensor
    r: torch.Tensor
    c: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        return self.S != 0

    def core(self) -> torch.Tensor:
        """A · S · B, the approximation of W̄."""
        return block_left(self.A, block_right(self.S, self.B))

    def weight(self) -> torch.Tensor:
        """The dense reconstruction Ŵ = diag(r) A S B diag(c)."""
        return denormalize(self.core(), self.r, self.c)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A', S, B') with r folded into A's rows and c into B's columns: Ŵ = A' S B'."""
        nA, bA, _ = self.A.shape
        nB, bB, _ = self.B.shape
        A = self.A * self.r.reshape(nA, bA, 1)
        B = self.B * self.c.reshape(nB, 1, bB)
        return A, self.S, B

    @classmethod
    def identity(cls, Wbar, r, c, S, block: tuple[int, int]) -> ArmorFactors:
        bA, bB = block
        d_out, d_in = S.shape
        eye = lambda n, b: torch.eye(b, device=S.device).expand(n // b, b, b).clone()  # noqa: E731
        return cls(eye(d_out, bA), S, eye(d_in, bB), r, c)


def tile_losses(Wbar: torch.Tensor, h: torch.Tensor, f: ArmorFactors) -> torch.Tensor:
    """Proxy loss of every (bA × bB) tile: L_IJ = ‖(W̄^IJ − A_I S^IJ B_J) D_J^½‖², shape (nA, nB)."""
    nA, bA, _ = f.A.shape
    nB, bB, _ = f.B.shape
    R = Wbar - f.core()
    return (R * R * h).reshape(nA, bA, nB, bB).sum((1, 3), dtype=torch.float64)


def weighted_sq_error(Wbar: torch.Tensor, h: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
    """Σ_ij h_j (W̄ − core)_ij² as a float64 scalar: each row's sum is one matrix-vector product in
    W̄'s dtype (relative error ~1e-7 per row), the rows are summed in float64. The optimizers
    evaluate this several times per iteration, so it is one pass over R, not a tile reduction."""
    R = Wbar - core
    R.mul_(R)
    return torch.mv(R, h.to(R.dtype)).double().sum()


def proxy_loss(Wbar: torch.Tensor, h: torch.Tensor, f: ArmorFactors, relative: bool = True) -> float:
    """Σ_ij h_j (W̄ − A S B)_ij², relative to Σ_ij h_j W̄_ij² by default."""
    L = weighted_sq_error(Wbar, h, f.core())
    if relative:
        L = L / (Wbar.double() ** 2 * h.double()).sum()
    return float(L)


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """True layer-output error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), the figure the diagonal proxy ignores."""
    W, dW, H = W.double(), (W_hat - W).double(), H.double()
    return float(((dW @ H) * dW).sum() / ((W @ H) * W).sum())
