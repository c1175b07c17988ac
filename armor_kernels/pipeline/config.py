"""One pruning run's configuration: every choice that decides its output besides the model and the
calibration tokens. The CLI's flags, the run hash (run_config), the named presets, the benchmarks
and llm-compressor's ArmorModifier are all built from a PruneConfig."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .. import __version__
from ..baselines import SPARSEGPT_BLOCK, SPARSEGPT_DAMP
from ..errors import InputError
from ..optim import ArmorOptions
from .budget import BudgetOptions
from .checkpoint import FORMAT_VERSION, STORAGE_DTYPE
from .reconstruct import ReconOptions

METHODS = ("dense", "magnitude", "wanda", "sparsegpt", "nowag_p", "armor")
PROTOCOLS = ("sequential", "dense")


@dataclass(frozen=True)
class PruneConfig:
    """method      one of METHODS ("dense": nothing pruned, the reference point)
    options     ARMOR's optimizer (ArmorOptions; method "armor" only; None: the defaults)
    protocol    "sequential": each block calibrated on the pruned blocks before it; "dense" (the paper's):
                on the dense model's outputs
    recon       block-wise reconstruction after each block's layer-wise pruning (ReconOptions; None: off)
    asymmetric  fit each linear, on the pruned model's inputs, to the dense model's outputs; the value is
                the damp of stats.asymmetric_weight (None: off; protocol "sequential" only)
    budget      ARMOR's block sizes allocated model-wide under one parameter budget (BudgetOptions; None: off)
    batch_size  calibration windows per forward
    """

    method: str = "armor"
    options: ArmorOptions | None = field(default_factory=ArmorOptions)
    protocol: str = "sequential"
    recon: ReconOptions | None = None
    asymmetric: float | None = None
    budget: BudgetOptions | None = None
    batch_size: int = 8

    def __post_init__(self):
        if self.options is None:
            object.__setattr__(self, "options", ArmorOptions())
        if self.method not in METHODS:
            raise InputError(f"method: expected one of {METHODS}, got {self.method!r}")
        if self.protocol not in PROTOCOLS:
            raise InputError(f"protocol: expected one of {PROTOCOLS}, got {self.protocol!r}")
        if self.method != "armor" and self.options != ArmorOptions():
            raise InputError(f"options: ArmorOptions are for method 'armor', got them with method {self.method!r}")
        if self.tuned and self.method == "dense":
            raise InputError("recon: block-wise reconstruction tunes pruned blocks, got it with method 'dense'")
        if self.asymmetric is not None and (self.method == "dense" or self.protocol != "sequential"):
            raise InputError("asymmetric: fits the pruned model's inputs to the dense model's outputs, so it needs "
                             f"a pruning method and protocol 'sequential', got method {self.method!r}, protocol "
                             f"{self.protocol!r}")
        if self.budget is not None and (self.method != "armor" or self.options.overhead is not None):
            raise InputError("budget: allocates ARMOR's block sizes model-wide; it takes method 'armor' without a "
                             f"per-layer overhead, got method {self.method!r}"
                             + (f", overhead {self.options.overhead}" if self.options.overhead else ""))
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise InputError(f"batch_size: expected an int ≥ 1, got {self.batch_size!r}")

    @property
    def tuned(self) -> bool:
        """Block-wise reconstruction is on."""
        return self.recon is not None and self.recon.enabled

    def with_seed(self, seed: int) -> PruneConfig:
        """The same configuration with every seed it holds (ARMOR's, reconstruction's) set to `seed`."""
        return replace(self, options=replace(self.options, seed=seed),
                       recon=None if self.recon is None else replace(self.recon, seed=seed))


# The recommended configuration: ARMOR under a model-wide budget of 5 % of the linears' parameters for A' and
# B', then block-wise reconstruction (docs/results.md gives its perplexity and bytes beside the alternatives).
PRESETS: dict[str, PruneConfig] = {
    "quality": PruneConfig(budget=BudgetOptions(0.05), recon=ReconOptions(steps=42, lr=3e-3, batch=2, check=7)),
}


def prune_config(config: PruneConfig | str) -> PruneConfig:
    """A PruneConfig as given, a preset by name (PRESETS), or a method's defaults by its name (METHODS)."""
    if isinstance(config, PruneConfig):
        return config
    if config in PRESETS:
        return PRESETS[config]
    if config in METHODS:
        return PruneConfig(method=config)
    raise InputError(f"config: expected a PruneConfig, a preset in {sorted(PRESETS)} or a method in {METHODS}, "
                     f"got {config!r}")


def method_options(config: PruneConfig) -> dict:
    """The options that decide a method's output, defaults included: ARMOR's ArmorOptions, SparseGPT's
    block and dampening, nothing for the scoring baselines."""
    if config.method == "armor":
        return config.options.to_config()
    return {"block": SPARSEGPT_BLOCK, "damp": SPARSEGPT_DAMP} if config.method == "sparsegpt" else {}


def run_config(config: PruneConfig, calib: torch.Tensor, model: nn.Module, source: str | None) -> dict:
    """Everything that decides a run's output, defaults included: a resumed run must match it exactly.
    Reconstruction, asymmetric calibration and a budget are recorded only when on, so a run without them
    keeps the hash it always had."""
    c = config
    recorded = {
        "package_version": __version__, "format_version": FORMAT_VERSION, "method": c.method,
        "options": method_options(c), "batch_size": c.batch_size, "protocol": c.protocol,
        "storage_dtype": str(STORAGE_DTYPE).removeprefix("torch."),
        "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "calibration": {"n_samples": calib.shape[0], "seq_len": calib.shape[1],
                        "tokens_sha256": hashlib.sha256(calib.cpu().numpy().tobytes()).hexdigest()},
        "model_source": source or "bundled SmolLM2-135M-Instruct",
        # where it was read from is model_source's business; the architecture is the model's class
        "model_config": {**model.config.to_dict(), "_name_or_path": None, "architectures": [type(model).__name__]},
        **({"reconstruction": c.recon.to_config()} if c.tuned else {}),
        **({"asymmetric": {"damp": c.asymmetric}} if c.asymmetric is not None else {}),
        **({"budget": c.budget.to_config()} if c.budget is not None else {}),
    }
    return json.loads(json.dumps(recorded))  # the form it has when read back from config.json
