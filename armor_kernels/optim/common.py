"""What both optimizers share: the NoWag-P start, tiling, the tile residual and the loss history."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from ..errors import InputError
from ..factors import ArmorFactors, block_sizes, check_h, check_weight, normalize, weighted_sq_error
from ..kernels.top2 import top2_mask


@dataclass
class Problem:
    """One layer's normalised weight W̄, statistic h and block sizes, on the optimisation device."""

    Wbar: torch.Tensor
    h: torch.Tensor
    r: torch.Tensor
    c: torch.Tensor
    bA: int
    bB: int

    def __post_init__(self):
        self.norm = (self.Wbar * self.Wbar * self.h).sum(dtype=torch.float64)  # Σ h W̄²: the loss's scale

    @classmethod
    def from_weight(cls, W, h, block_size: int, device) -> Problem:
        check_weight(W)
        check_h(h, W.shape[1])
        if not isinstance(block_size, int) or block_size < 4:
            raise InputError(f"block_size: expected an int ≥ 4, got {block_size!r}")
        device = torch.device(device if device is not None else W.device)
        Wbar, r, c = normalize(W.to(device))
        bA, bB = block_sizes(tuple(W.shape), block_size)
        return cls(Wbar, h.to(device, torch.float32), r, c, bA, bB)

    @property
    def nA(self) -> int:
        return self.Wbar.shape[0] // self.bA

    @property
    def nB(self) -> int:
        return self.Wbar.shape[1] // self.bB

    def nowag_p(self) -> ArmorFactors:
        """ARMOR's start: A = B = I, S = W̄ ⊙ top-2(W̄² h)."""
        S = self.Wbar * top2_mask(self.Wbar * self.Wbar * self.h)
        return ArmorFactors.identity(self.Wbar, self.r, self.c, S, (self.bA, self.bB))

    def loss(self, f: ArmorFactors, core: torch.Tensor | None = None) -> float:
        """Relative proxy loss Σ h (W̄ − ASB)² / Σ h W̄². `core`: f's A·S·B where the caller has it."""
        return float(weighted_sq_error(self.Wbar, self.h, f.core() if core is None else core) / self.norm)

    def to_tiles(self, M: torch.Tensor) -> torch.Tensor:
        """(d_out, d_in) -> (nA·nB, bA, bB), tile t = I·nB + J."""
        return M.reshape(self.nA, self.bA, self.nB, self.bB).transpose(1, 2).reshape(-1, self.bA, self.bB)

    def from_tiles(self, T: torch.Tensor) -> torch.Tensor:
        return T.reshape(self.nA, self.nB, self.bA, self.bB).transpose(1, 2).reshape(self.Wbar.shape)

    def tile_operands(self, f: ArmorFactors, core: torch.Tensor | None = None):
        """Per-tile (R, A_I, B_J D_J^½): the weighted residual and the factors each tile sees."""
        sq = self.h.sqrt()
        R = self.to_tiles((self.Wbar - (f.core() if core is None else core)) * sq)
        A = f.A.repeat_interleave(self.nB, dim=0)
        Bt = (f.B * sq.reshape(self.nB, 1, self.bB)).repeat(self.nA, 1, 1)
        return R, A, Bt


@dataclass
class History:
    """Relative proxy loss after every accepted step (index 0: NoWag-P) and the wall-clock time."""

    loss: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)

    def record(self, loss: float) -> None:
        self.loss.append(loss)
        self.seconds.append(time.perf_counter() - self.t0)

    def out_of_time(self, budget: float | None) -> bool:
        return budget is not None and time.perf_counter() - self.t0 >= budget


Step = Callable[[ArmorFactors, torch.Tensor], tuple[ArmorFactors, torch.Tensor]]


def extrapolate(f: ArmorFactors, old: ArmorFactors) -> tuple[ArmorFactors, torch.Tensor]:
    """f + (f − old) in A, B and in S where the two masks agree; S keeps f's values elsewhere."""
    same = (f.S != 0) == (old.S != 0)
    g = replace(f, A=2 * f.A - old.A, B=2 * f.B - old.B, S=torch.where(same, 2 * f.S - old.S, f.S))
    return g, g.core()


def descend(loss: Callable[[ArmorFactors, torch.Tensor], float], f: ArmorFactors, steps: Sequence[Step], *,
            iters: int, tol: float, extrapolation: bool, time_budget: float | None = None, progress=None
            ) -> tuple[ArmorFactors, History]:
    """Block coordinate descent, monotone by construction: each outer iteration runs `steps` (each maps
    (f, f's A·S·B) to a candidate and its A·S·B) and, with `extrapolation`, the jump along the
    two-iteration displacement; a candidate is kept only if `loss` does not rise. Stops after `iters`,
    when one outer iteration improves the loss by less than `tol` relative, or once `time_budget`
    seconds have passed."""
    hist = History()
    core = f.core()
    best = loss(f, core)
    hist.record(best)
    starts = []                                   # the states the last two outer iterations began from
    for it in range(iters):
        start = best
        starts = [*starts[-1:], f]
        todo = list(steps)
        if extrapolation and len(starts) == 2:
            todo.append(lambda f_, core_: extrapolate(f_, starts[0]))
        for step in todo:
            cand, cand_core = step(f, core)
            cand_loss = loss(cand, cand_core)
            if cand_loss <= best:
                f, core, best = cand, cand_core, cand_loss
                hist.record(best)
        if progress is not None:
            progress(it + 1, iters, best)
        if start - best < tol * start or hist.out_of_time(time_budget):
            break
    return f, hist
