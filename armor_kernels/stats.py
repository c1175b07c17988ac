"""A linear layer's calibration statistics: what every pruning method here reads of its inputs."""
from __future__ import annotations

import torch

from .errors import InputError
from .factors import check_weight, fix_diagonal


class ActivationStats:
    """Streaming statistics of a linear layer's inputs, accumulated in float64.

    `h()` is the diagonal (2/N) Σ_t x_tj² (ARMOR, NoWag, Wanda); `H()` the full (2/N) Σ_t x_t x_tᵀ
    (SparseGPT), kept only when `full=True` since it costs d_in² memory. `cross`, when a paired
    recording gave it (`from_paired`): Σ_t x'_t x_tᵀ, x' the same linear's input on a second stream (the
    dense model's, for asymmetric calibration: `asymmetric_weight`).
    """

    def __init__(self, d_in: int, full: bool = False, device: torch.device | str = "cpu"):
        self.d_in = d_in
        self.n_tokens = 0
        self.sq = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.xx = torch.zeros(d_in, d_in, dtype=torch.float64, device=device) if full else None
        self.cross: torch.Tensor | None = None

    @classmethod
    def from_paired(cls, joint: ActivationStats) -> ActivationStats:
        """The statistics of x from those of the joined inputs [x, x'] (width 2·d_in, full), with `cross`."""
        if joint.xx is None or joint.d_in % 2:
            raise InputError("from_paired: expected full statistics of joined inputs [x, x'] (even width)")
        d = joint.d_in // 2
        s = cls(d, device=joint.sq.device)
        s.n_tokens, s.sq = joint.n_tokens, joint.sq[:d].clone()
        s.xx, s.cross = joint.xx[:d, :d].clone(), joint.xx[d:, :d].clone()
        return s

    def update(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise InputError(f"x: expected last dimension {self.d_in}, got shape {tuple(x.shape)}")
        x = x.detach().reshape(-1, self.d_in).to(self.sq.device, torch.float64)
        self.n_tokens += x.shape[0]
        self.sq += (x * x).sum(0)
        if self.xx is not None:
            self.xx += x.T @ x

    def _check(self) -> None:
        if self.n_tokens == 0:
            raise InputError("calibration: no tokens were seen (empty calibration data)")

    def h(self) -> torch.Tensor:
        """The diagonal statistic, with non-finite or non-positive entries set to the mean of the rest."""
        self._check()
        h = 2.0 * self.sq / self.n_tokens
        return fix_diagonal(h).float()

    def H(self) -> torch.Tensor:
        self._check()
        if self.xx is None:
            raise InputError("ActivationStats(full=False) keeps no full H; construct with full=True")
        return (2.0 * self.xx / self.n_tokens).float()


def asymmetric_weight(W: torch.Tensor, stats: ActivationStats, damp: float) -> torch.Tensor:
    """The weight whose output on this stream's inputs x best matches W's output on the second stream's
    inputs x' (least squares over the calibration tokens), shrunk toward W:

        W̃ = argmin Σ_t ‖W x'_t − W̃ x_t‖² + λ‖W̃ − W‖² = W (C + λI)(H + λI)⁻¹,
        C = Σ x' xᵀ, H = Σ x xᵀ, λ = damp · mean diag H.

    damp → 0: the plain least-squares fit (over-fits the calibration tokens: its correction W (C − H) H⁻¹
    is a regression of the streams' difference on d_in inputs); damp → ∞: W itself, symmetric
    calibration. Pruning W̃ against H fits the pruned layer on the pruned model's inputs to the dense
    model's output on the dense inputs. Float64 inside, W's dtype out."""
    check_weight(W)
    if stats.cross is None or stats.xx is None:
        raise InputError("asymmetric_weight: expected statistics of a paired recording (ActivationStats.from_paired)")
    if stats.cross.shape != (W.shape[1], W.shape[1]):
        raise InputError(f"stats: expected statistics of {W.shape[1]} inputs, got {tuple(stats.cross.shape)}")
    if not (isinstance(damp, (int, float)) and damp >= 0):
        raise InputError(f"damp: expected a non-negative strength, got {damp!r}")
    H = stats.xx.double()
    scale = float(H.diagonal().mean())
    if not scale > 0:
        raise InputError("asymmetric_weight: the calibration inputs are all zero")
    eye = damp * scale * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    WC = W.double().to(H.device) @ (stats.cross.double() + eye)
    return torch.linalg.solve(H + eye, WC.T).T.to(W.dtype).to(W.device)  # H symmetric: (H⁻¹ (WC)ᵀ)ᵀ = WC H⁻¹
