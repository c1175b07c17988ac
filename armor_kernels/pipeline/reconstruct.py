"""Block-wise reconstruction: after a decoder block's linears are pruned one by one, tune the block's
continuous parameters together so that the pruned block's output matches the dense block's.

Layer-wise pruning fits each linear to its own dense output; nothing sees how the errors of q/k/v/o and
gate/up/down combine through the attention, the norms and the activation of their block. Here, with the
2:4 mask fixed, Adam tunes A', B' and the kept values of S of every pruned linear of the block (for a
2:4 baseline's Sparse24Linear, its kept values) on the relative squared error of the block's output

    L = Σ_w ‖block_pruned(x_w) − y_w‖² / Σ_w ‖y_w‖²      over calibration windows w,

the block called with the arguments the model passes it (masks, positions: recorded per block, as
calibration records them). Inputs x follow the run's protocol: the pruned model's (sequential) or the
dense model's (dense). Targets y (`target`): "dense", the dense block's output on the dense model's
input (with sequential inputs it also corrects what the pruned blocks before passed on), or "local",
the dense block's output on the same input x. Under protocol "dense" the two are the same.

Validation. The last `holdout` calibration windows are held back from the gradient (the layer-wise
statistics still use every window, so the layer-wise result is the run's without reconstruction). The
values are tuned in float32 but stored in bf16 (STORAGE_DTYPE): every `check` steps the held-back loss is
computed on the values rounded as they will be stored, and the best rounded state is kept; the
layer-wise result is the first candidate, so what is stored is never worse than it on the held-back
windows. Tuning stops after `patience` checks without a new best.

Cost. Its own calibration stream, batched by `batch` windows (its extra memory: the block inputs and
targets of every window, plus the dense model's stream for target "dense" with protocol "sequential");
per step one forward and backward of the block on `batch` windows. Under torchrun the writer (rank 0)
holds the streams, tunes every block exactly as one process does and broadcasts the tuned tensors, so
the checkpoint stays bit-identical to a one-process run's; the other ranks wait meanwhile. A resumed
run reads the tuned tensors from the block's shard; a block interrupted before its shard was written is
pruned and tuned again, identically (the step order is seeded by the run's seed and the block index).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..factors import block_right
from ..nn import ArmorLinear, Sparse24Linear
from .distributed import Dist, share_modules
from .model import replace_module

log = logging.getLogger("armor_kernels")

TARGETS = ("dense", "local")


@dataclass(frozen=True)
class ReconOptions:
    """Block-wise reconstruction's options (module docstring). steps 0: off, the run is layer-wise only.

    steps     Adam steps per block, at most (0: off)
    lr        Adam's learning rate relative to each tensor's root mean square (each A', B' and S-values
              tensor gets lr · rms of its layer-wise values: steps of comparable relative size whatever the
              tensor's scale)
    batch     calibration windows per step (and per batch of the validation)
    target    "dense" or "local" (module docstring)
    holdout   the last `holdout` calibration windows, held back as validation
    check     steps between two validations (and one after the last step)
    patience  validations without a new best before tuning stops
    seed      the order in which the training windows' batches are visited
    """

    steps: int = 0
    lr: float = 1e-3
    batch: int = 4
    target: str = "dense"
    holdout: int = 4
    check: int = 5
    patience: int = 3
    seed: int = 0

    def __post_init__(self):
        if self.target not in TARGETS:
            raise InputError(f"target: expected one of {TARGETS}, got {self.target!r}")
        for name, low in (("steps", 0), ("batch", 1), ("holdout", 1), ("check", 1), ("patience", 1), ("seed", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InputError(f"{name}: expected an int ≥ {low}, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise InputError(f"lr: expected a positive learning rate, got {self.lr!r}")

    @property
    def enabled(self) -> bool:
        return self.steps > 0

    def to_config(self) -> dict:
        """What a run records and hashes (only when enabled: a run without reconstruction keeps its hash)."""
        return asdict(self)


class _Tunable(nn.Module):
    """Stands in for one packed pruned linear while its block is tuned: its A', B' (ArmorLinear) and kept
    values as float32 parameters, the 2:4 positions fixed; the weight A' S B' is formed as
    ArmorLinear.to_dense forms it. `rounded`: compute from the parameters rounded to the stored dtype."""

    def __init__(self, mod: ArmorLinear | Sparse24Linear):
        super().__init__()
        if isinstance(mod, ArmorLinear) and not mod.packed:
            raise InputError("reconstruction: expected packed pruned linears (ArmorLinear.pack()), got an unpacked one")
        values, idx = mod.S_values, mod.S_idx
        rows, half = values.shape
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=idx.device)
        # the kept values' positions in each group of 4, as unpack_24 scatters them
        self.register_buffer("pos", ((idx.unsqueeze(-1) >> shifts) & 3).reshape(rows, half // 2, 2).long())
        self.stored_dtype = values.dtype
        self.shape = (mod.out_features, mod.in_features)
        self.names = ("A", "S_values", "B") if isinstance(mod, ArmorLinear) else ("S_values",)
        for name in self.names:  # contiguous: a module received from another rank is, its owner's may not be,
            # and float32 results depend on the layout (the run must not depend on who pruned what)
            setattr(self, name, nn.Parameter(getattr(mod, name).detach().float().contiguous().clone()))
        self.bias = None if mod.bias is None else mod.bias.detach()
        self.rounded = False

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tuned tensors, rounded to the stored dtype."""
        return {n: getattr(self, n).detach().to(self.stored_dtype) for n in self.names}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, t in tensors.items():
                getattr(self, n).copy_(t.float())

    def _value(self, name: str) -> torch.Tensor:
        p = getattr(self, name)
        return p.to(self.stored_dtype).float() if self.rounded else p

    def weight(self) -> torch.Tensor:
        values = self._value("S_values")
        rows, half = values.shape
        S = torch.zeros(rows, half // 2, 4, dtype=values.dtype, device=values.device)
        S = S.scatter(-1, self.pos, values.reshape(rows, half // 2, 2)).reshape(self.shape)
        if "A" not in self.names:
            return S
        A = self._value("A")
        W = block_right(S, self._value("B"))
        nA, bA, _ = A.shape
        return torch.bmm(A, W.reshape(nA, bA, -1)).reshape(W.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def _output(block: nn.Module, h: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    y = block(h, *args, **kwargs)
    return y[0] if isinstance(y, tuple) else y


class Reconstruction:
    """The writer's calibration streams and the tuning of each block; on the other ranks it only receives
    the tuned tensors. Per block i, in prune.py's loop: `dense_pass(block, i)` with the block still dense,
    `tune(block, pruned)` before the block is written (not for a resumed block), `advance(block, i)` once
    the block holds its pruned modules."""

    def __init__(self, options: ReconOptions, protocol: str, calib: torch.Tensor,
                 record: Callable[[torch.Tensor], tuple[list, list]], offload: bool, dist: Dist, device):
        n = calib.shape[0]
        if options.holdout >= n:
            raise InputError(f"reconstruction holdout: expected fewer windows than the calibration's {n}, got "
                             f"{options.holdout}")
        self.options, self.protocol, self.dist, self.device = options, protocol, dist, torch.device(device)
        self.block_index = -1
        if not dist.is_writer:
            return
        self.inputs, self.extra = {}, {}
        for part, windows in (("train", calib[:n - options.holdout]), ("heldout", calib[n - options.holdout:])):
            hidden, self.extra[part] = record(windows)
            self.inputs[part] = [h.cpu() for h in hidden] if offload else hidden
        # the dense model's own stream, when it differs from the inputs: sequential inputs, dense targets
        self.dense = dict(self.inputs) if protocol == "sequential" and options.target == "dense" else None
        self.targets = None

    def _run(self, block: nn.Module, part: str, hidden: list[torch.Tensor], i: int) -> list[torch.Tensor]:
        return [_output(block, h.to(self.device), *e).to(h.device) for h, e in zip(hidden, self.extra[part][i])]

    def dense_pass(self, block: nn.Module, i: int) -> None:
        """Block i's targets, from the block while it is dense."""
        self.block_index = i
        if not self.dist.is_writer:
            return
        source = self.dense if self.dense is not None else self.inputs
        self.targets = {part: self._run(block, part, source[part], i) for part in source}
        if self.dense is not None:
            self.dense = self.targets

    def advance(self, block: nn.Module, i: int) -> None:
        """The next block's inputs: the pruned block's outputs (sequential) or the dense ones (dense)."""
        if not self.dist.is_writer:
            return
        if self.protocol == "dense":
            self.inputs = self.targets
        else:
            self.inputs = {part: self._run(block, part, self.inputs[part], i) for part in self.inputs}
        self.targets = None

    def tune(self, block: nn.Module, pruned: dict[str, nn.Module], report: dict) -> tuple[dict, dict]:
        """(pruned, report) with the block's tuned modules (the writer's, broadcast: the same tensors on
        every rank) and report["reconstruction"]: its losses before and after, train and held-back."""
        own, result = {}, None
        if self.dist.is_writer:
            tunables = {n: _Tunable(m) for n, m in pruned.items()}
            with _standing_in(block, tunables):
                best, result = self._descend(block, tunables)
            log.info("block %d: reconstruction kept step %d of %d: held-back loss %.4g -> %.4g, train %.4g -> %.4g",
                     self.block_index, result["kept_step"], result["steps"], result["heldout_before"],
                     result["heldout_after"], result["train_before"], result["train_after"])
            own = {n: _with_tensors(pruned[n], best[n]) for n in pruned}
        shared, _ = share_modules(self.dist, own, {n: 0 for n in pruned})
        result = self.dist.agree(result, f"receiving block {self.block_index}'s reconstruction report")
        return shared, {**report, "reconstruction": result}

    def _loss(self, block: nn.Module, part: str) -> float:
        device = self.device
        err = ref = 0.0
        for h, t, e in zip(self.inputs[part], self.targets[part], self.extra[part][self.block_index]):
            t = t.to(device).float()
            err += float(((_output(block, h.to(device), *e).float() - t) ** 2).sum())
            ref += float((t ** 2).sum())
        return err / ref

    def _descend(self, block: nn.Module, tunables: dict[str, _Tunable]) -> tuple[dict, dict]:
        """Adam from the layer-wise result; the best state by held-back loss (rounded), and the report."""
        o, i, device = self.options, self.block_index, self.device
        params = [getattr(t, n) for t in tunables.values() for n in t.names]
        opt = torch.optim.Adam([{"params": [p], "lr": o.lr * float(p.detach().pow(2).mean().sqrt())} for p in params])

        def rounded_loss(part):
            for t in tunables.values():
                t.rounded = True
            try:
                with torch.no_grad():
                    return self._loss(block, part)
            finally:
                for t in tunables.values():
                    t.rounded = False

        best = {n: t.tensors() for n, t in tunables.items()}  # the layer-wise result, already in stored dtype
        train_before, heldout_before = rounded_loss("train"), rounded_loss("heldout")
        best_loss, best_step, since_best, step = heldout_before, 0, 0, 0
        g = torch.Generator().manual_seed(o.seed * 1_000_003 + i)
        n_batches, order = len(self.inputs["train"]), []
        with torch.enable_grad():
            while step < o.steps and since_best < o.patience:
                if not order:
                    order = torch.randperm(n_batches, generator=g).tolist()
                b = order.pop(0)
                h, t = self.inputs["train"][b].to(device), self.targets["train"][b].to(device).float()
                loss = ((_output(block, h, *self.extra["train"][i][b]).float() - t) ** 2).sum() / (t ** 2).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if step % o.check == 0 or step == o.steps:
                    held = rounded_loss("heldout")
                    if held < best_loss:
                        best = {n: t.tensors() for n, t in tunables.items()}
                        best_loss, best_step, since_best = held, step, 0
                    else:
                        since_best += 1
        for n, t in tunables.items():
            t.load(best[n])
        return best, {"steps": step, "kept_step": best_step, "train_before": train_before,
                      "train_after": rounded_loss("train"), "heldout_before": heldout_before,
                      "heldout_after": best_loss}


@contextmanager
def _standing_in(block: nn.Module, tunables: dict[str, _Tunable]):
    """The block with its linears replaced by the tunables and its own parameters frozen (only the
    tunables get gradients); the block as it was afterwards."""
    originals = {n: block.get_submodule(n) for n in tunables}
    frozen = [(p, p.requires_grad) for p in block.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    for n, t in tunables.items():
        replace_module(block, n, t)
    try:
        yield
    finally:
        for n, m in originals.items():
            replace_module(block, n, m)
        for p, flag in frozen:
            p.requires_grad_(flag)


def _with_tensors(mod: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """The pruned module with its tuned tensors (2:4 positions and bias as they were)."""
    for name, t in tensors.items():
        setattr(mod, name, t.to(getattr(mod, name).device))
    return mod


def reconstruction(options: ReconOptions | None, protocol: str, calib: torch.Tensor,
                   record: Callable[[torch.Tensor], tuple[list, list]], offload: bool, dist: Dist, device
                   ) -> Reconstruction | None:
    """The run's Reconstruction, or None when it is off (no options, or 0 steps). record(windows): the
    first block's inputs and every block's arguments for those windows, batched by options.batch."""
    if options is None or not options.enabled:
        return None
    return Reconstruction(options, protocol, calib, record, offload, dist, device)
