"""ArmorOptions: every knob that decides ARMOR's result for a layer, besides W and its statistics.

The defaults live here and nowhere else: the optimizers take their arguments from these fields, the
CLI builds its flags from them, and a pruning run hashes `to_config()` (every field the chosen
optimizer reads, defaults resolved) so that a resumed run refuses to mix layers computed differently.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..errors import InputError
from ..factors import block_size_under_overhead, block_sizes

OPTIMIZERS = ("fast", "reference")
OBJECTIVES = ("proxy", "output")      # the paper's diagonal proxy; the layer's output error (optim/output.py)
STARTS = ("nowag_p", "sparsegpt", "best")

# Defaults that differ by optimizer; None in ArmorOptions means "this optimizer's default".
OPTIMIZER_DEFAULTS = {
    "fast": {"iters": 80, "tol": 1e-4},          # outer (A, B, S, extrapolation) iterations
    "reference": {"iters": 20_000, "tol": 1e-6},  # the published loop's iterations
}
# The fields each optimizer reads (besides block_size and seed, which every run uses).
OPTIMIZER_FIELDS = {
    "fast": ("iters", "tol", "passes", "extrapolation", "time_budget"),
    "reference": ("iters", "tol", "lr", "patience", "time_budget"),
}


@dataclass(frozen=True)
class ArmorOptions:
    """ARMOR's options (docs/DESIGN.md §4).

    optimizer      "fast" (closed-form A/B steps, exact tile sweeps, extrapolation) or "reference"
                   (the published Adam + sampled-group loop)
    block_size     nominal block size b of A and B (the block-size rule of factors.py applies)
    overhead       a parameter budget instead: each layer gets the largest b ≤ block_size whose A and B add
                   at most this fraction of the layer's parameters (factors.block_size_under_overhead)
    iters, tol     iterations, and the relative improvement below which the run stops
                   (fast: per outer iteration; reference: `patience` iterations in a row);
                   None = the optimizer's default (OPTIMIZER_DEFAULTS)
    passes         fast: S-sweeps over every group per outer iteration
    extrapolation  fast: try the jump along the two-iteration displacement
    lr, patience   reference: Adam's learning rate; iterations without improvement before stopping
    seed           the reference loop's group sampling (its own generator; torch's global one is untouched)
    time_budget    seconds per layer, None = unlimited (a budget makes the result machine-dependent)
    objective      "proxy": the paper's Σ h_j (W̄ − A S B)²_ij (diagonal statistics); "output": the layer's
                   output error tr(ΔW H ΔWᵀ) with the full, dampened H (optim/output.py; fast optimizer only)
    shrink         objective "output": H's off-diagonal part is scaled by 1 − shrink, H_s = (1 − s) H + s diag(H)
                   (covariance shrinkage: 0 trusts the calibration's correlations fully, 1 keeps only the
                   diagonal, the proxy's statistic with rows weighted by their scale)
    start          the factors the descent starts from, A = B = I: "nowag_p" (the paper's), "sparsegpt"
                   (SparseGPT's mask and values), or "best" (whichever of the two has the lower loss in
                   the objective). The result never ends above its start, in its own objective
    """

    optimizer: str = "fast"
    block_size: int = 128
    overhead: float | None = None
    iters: int | None = None
    tol: float | None = None
    passes: int = 1
    extrapolation: bool = True
    lr: float = 1e-4
    patience: int = 100
    seed: int = 0
    time_budget: float | None = None
    objective: str = "proxy"
    shrink: float = 0.0
    start: str = "nowag_p"

    def __post_init__(self):
        for name, allowed in (("optimizer", OPTIMIZERS), ("objective", OBJECTIVES), ("start", STARTS)):
            if getattr(self, name) not in allowed:
                raise InputError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        if self.optimizer == "reference" and (self.objective, self.start) != ("proxy", "nowag_p"):
            raise InputError("optimizer 'reference' is the published loop: objective 'proxy' from start 'nowag_p' "
                             f"only, got objective {self.objective!r}, start {self.start!r}")
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size < 4:
            raise InputError(f"block_size: expected an int ≥ 4, got {self.block_size!r}")
        if self.overhead is not None and not (isinstance(self.overhead, (int, float)) and self.overhead > 0):
            raise InputError(f"overhead: expected a positive fraction of the layer's parameters, got {self.overhead!r}")
        if not (isinstance(self.shrink, (int, float)) and 0.0 <= self.shrink <= 1.0):
            raise InputError(f"shrink: expected a fraction in [0, 1], got {self.shrink!r}")
        if self.shrink and self.objective != "output":
            raise InputError(f"shrink: applies to objective 'output' only, got it with objective {self.objective!r}")
        for name in ("iters", "passes", "patience"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise InputError(f"{name}: expected a non-negative int, got {value!r}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> ArmorOptions:
        """ArmorOptions(**kwargs) with an error that names an unknown option and lists the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if "method" in unknown:
            raise TypeError("armor(): the optimizer choice is now `optimizer=` ('fast' or 'reference'), not `method=`")
        if unknown:
            raise TypeError(f"armor(): unknown option(s) {unknown}; ArmorOptions has {sorted(known)}")
        return cls(**kwargs)

    @property
    def needs_full_stats(self) -> bool:
        """Whether the layer's full H (ActivationStats(full=True)) is needed, not only its diagonal."""
        return self.objective == "output" or self.start != "nowag_p"

    def layer_block_size(self, W_shape: tuple[int, int]) -> int:
        """The nominal block size of a layer of this shape: block_size, or the budget's choice."""
        if self.overhead is None:
            return self.block_size
        return block_size_under_overhead(W_shape, self.overhead, self.block_size)

    def layer_blocks(self, W_shape: tuple[int, int]) -> tuple[int, int]:
        """(bA, bB) of a layer of this shape."""
        return block_sizes(W_shape, self.layer_block_size(W_shape))

    def layer_blocks_for(self, key: str, W_shape: tuple[int, int]) -> tuple[int, int]:
        """layer_blocks as checkpoint.module_specs asks for it (by layer name, which this rule ignores)."""
        return self.layer_blocks(W_shape)

    def optimizer_kwargs(self) -> dict:
        """The keyword arguments of the chosen optimizer, defaults resolved."""
        resolved = {**asdict(self), **{k: v if getattr(self, k) is None else getattr(self, k)
                                       for k, v in OPTIMIZER_DEFAULTS[self.optimizer].items()}}
        return {k: resolved[k] for k in OPTIMIZER_FIELDS[self.optimizer]}

    def to_config(self) -> dict:
        """What a run records and hashes: the optimizer, block size, seed and every option it reads."""
        return {"optimizer": self.optimizer, "block_size": self.block_size, "overhead": self.overhead,
                "seed": self.seed, "objective": self.objective, "start": self.start,
                **({"shrink": self.shrink} if self.objective == "output" else {}), **self.optimizer_kwargs()}
