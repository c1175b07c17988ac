"""ARMOR on the layer's output error: the same factorisation, the full H instead of its diagonal
(docs/DESIGN.md §12).

ARMOR's published proxy Σ_ij h_j (W̄ − A S B)_ij² sees only the diagonal h of H = (2/N) XᵀX. This
objective is the layer's own output error on the calibration inputs, tr(ΔW H ΔWᵀ) with ΔW = W − Ŵ, the
one SparseGPT minimises, with H dampened as SparseGPT dampens it. NoWag's r and c fold into the factors
(A' = diag(r) A is block-diagonal, and so is B diag(c)), so the optimizer works with

    L = tr(E Ĥ Eᵀ),   E = W_c − A' S B,   W_c = diag(r) W̄ = W diag(c)⁻¹,   Ĥ = diag(c) H diag(c),

the rows of A' weighing each output row by its true scale. Every step minimises L exactly over its block
of variables:
  A-step  A'_I = W_c,I Ĥ P_Iᵀ (P_I Ĥ P_Iᵀ)⁻¹,  P = S B        (rows of A' are independent least squares)
  B-step  for each input block J in turn:  B_J += (Q_Jᵀ Q_J)⁻¹ Q_Jᵀ (E Ĥ)_{:,J} Ĥ_JJ⁻¹,  Q = A' S
          (Gauss-Seidel: Ĥ's off-diagonal blocks couple the blocks of B, so they are solved one by one)
  S-step  for each input block J in turn, the proxy optimizer's tile sweep (kernels/tile_sweep.py) on
          the tiles of column block J with R = (E Ĥ)_{:,J} L_J⁻ᵀ and Bt = B_J L_J, L_J Lᵀ_J = Ĥ_JJ: for
          these operands its exact 6-pattern group solves minimise L itself; E Ĥ is brought up to date
          before the next J (tiles of one column block are independent, tiles of one row block are not)
  Extrapolation as in fast.py.
common.descend keeps a candidate only if L, computed afresh, does not rise.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..baselines import SPARSEGPT_DAMP
from ..factors import ArmorFactors, block_left, block_right
from ..kernels.block_lstsq import solve_normal_equations
from ..kernels.tile_sweep import sweep_tiles
from .common import Problem


def dampened(H: torch.Tensor, damp: float = SPARSEGPT_DAMP, shrink: float = 0.0) -> torch.Tensor:
    """H + damp · mean(diag H) · I, float64, as SparseGPT dampens it (a dead input's zero diagonal
    entry gets the dampening alone, so the result is positive definite), with its off-diagonal part
    scaled by 1 − shrink (ArmorOptions.shrink)."""
    H = H.double()
    if shrink:
        H = (1.0 - shrink) * H + shrink * torch.diag(H.diagonal())
    return H + damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)


@dataclass
class OutputProblem:
    """One layer's W_c, Ĥ and block sizes; factors are (A', S, B) as ArmorFactors with r = 1."""

    Wc: torch.Tensor
    H: torch.Tensor
    bA: int
    bB: int

    def __post_init__(self):
        self._last = None  # (core, E Ĥ) of the last state asked about: see residual_h
        self.norm = self._error(self.Wc)  # tr(W_c Ĥ W_cᵀ): L relative to it is the layer's relative error
        nB, bB = self.Wc.shape[1] // self.bB, self.bB
        diag = torch.stack([self.H[j * bB:(j + 1) * bB, j * bB:(j + 1) * bB] for j in range(nB)]).double()
        self.L = torch.linalg.cholesky(diag)
        self.HJJ_inv = torch.cholesky_inverse(self.L).float()
        self.L = self.L.float()

    @classmethod
    def from_problem(cls, p: Problem, H: torch.Tensor, shrink: float = 0.0) -> OutputProblem:
        """The output objective of the layer `p` normalises, H its (undampened) full statistic."""
        Hc = (p.c.double()[:, None] * dampened(H.to(p.Wbar.device), shrink=shrink) * p.c.double()[None, :]).float()
        return cls((p.r[:, None] * p.Wbar).contiguous(), Hc, p.bA, p.bB)

    @property
    def nA(self) -> int:
        return self.Wc.shape[0] // self.bA

    @property
    def nB(self) -> int:
        return self.Wc.shape[1] // self.bB

    def _error(self, E: torch.Tensor, EH: torch.Tensor | None = None) -> torch.Tensor:
        return ((E @ self.H if EH is None else EH) * E).sum(dtype=torch.float64)

    def loss(self, f: ArmorFactors, core: torch.Tensor | None = None) -> float:
        """Relative output error tr(E Ĥ Eᵀ) / tr(W_c Ĥ W_cᵀ). `core`: f's A'·S·B where the caller has it."""
        core = f.core() if core is None else core
        E = self.Wc - core
        EH = self.residual_h(core)
        return float(self._error(E, EH) / self.norm)

    def residual_h(self, core: torch.Tensor) -> torch.Tensor:
        """E Ĥ for the state whose A'·S·B is `core` (not to be modified). The last one is kept: the descent
        evaluates a candidate's loss, then (if kept) steps from it, and both need this product."""
        if self._last is None or self._last[0] is not core:
            self._last = (core, (self.Wc - core) @ self.H)
        return self._last[1]

    def fold(self, f: ArmorFactors) -> ArmorFactors:
        """ArmorFactors (A, S, B, r, c) -> (A' = diag(r) A, S, B) with r = 1, the form the steps take."""
        A = f.A * f.r.reshape(self.nA, self.bA, 1)
        return ArmorFactors(A, f.S, f.B, torch.ones_like(f.r), f.c)

    def unfold(self, f: ArmorFactors, r: torch.Tensor) -> ArmorFactors:
        return replace(f, A=f.A / r.reshape(self.nA, self.bA, 1), r=r)


def a_step(p: OutputProblem, f: ArmorFactors) -> tuple[ArmorFactors, torch.Tensor]:
    P = block_right(f.S, f.B)
    PH = (P @ p.H).reshape(p.nA, p.bA, -1)
    Pn, Wn = P.reshape(p.nA, p.bA, -1), p.Wc.reshape(p.nA, p.bA, -1)
    A = solve_normal_equations(PH @ Pn.transpose(1, 2), Wn @ PH.transpose(1, 2))
    return replace(f, A=A), block_left(A, P)


def b_step(p: OutputProblem, f: ArmorFactors, core: torch.Tensor) -> tuple[ArmorFactors, torch.Tensor]:
    Q = block_left(f.A, f.S)
    EH = p.residual_h(core).clone()
    B = f.B.clone()
    for j in range(p.nB):
        cols = slice(j * p.bB, (j + 1) * p.bB)
        QJ = Q[:, cols]
        # (Q_Jᵀ Q_J)⁻¹ Q_Jᵀ (E Ĥ)_J = ((E Ĥ)_Jᵀ Q_J (Q_Jᵀ Q_J)⁻¹)ᵀ, by the block solver
        step = solve_normal_equations((QJ.T @ QJ)[None], (EH[:, cols].T @ QJ)[None])[0].T @ p.HJJ_inv[j]
        B[j] += step
        EH -= (QJ @ step) @ p.H[cols]
    return replace(f, B=B), block_right(Q, B)


def s_step(p: OutputProblem, f: ArmorFactors, core: torch.Tensor, passes: int) -> tuple[ArmorFactors, torch.Tensor]:
    EH = p.residual_h(core).clone()
    S = f.S.clone()
    for j in range(p.nB):
        cols = slice(j * p.bB, (j + 1) * p.bB)
        R = torch.linalg.solve_triangular(p.L[j].T, EH[:, cols], upper=True, left=False)  # (E Ĥ)_J L_J⁻ᵀ
        Bt = (f.B[j] @ p.L[j]).expand(p.nA, p.bB, p.bB).contiguous()
        old = S[:, cols].reshape(p.nA, p.bA, p.bB).contiguous()
        _, new = sweep_tiles(R.reshape(p.nA, p.bA, p.bB).contiguous(), f.A, Bt, old.clone(), passes)
        dS = (new - old).reshape(-1, p.bB)
        EH -= (block_left(f.A, dS) @ f.B[j]) @ p.H[cols]
        S[:, cols] = new.reshape(-1, p.bB)
    g = replace(f, S=S)
    return g, g.core()


def output_steps(p: OutputProblem, passes: int) -> list:
    """The (A, B, S) steps of one outer iteration, in common.descend's form."""
    return [lambda f, core: a_step(p, f), lambda f, core: b_step(p, f, core),
            lambda f, core: s_step(p, f, core, passes)]
