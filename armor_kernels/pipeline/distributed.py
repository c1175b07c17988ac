"""Many processes through torch.distributed: `torchrun --nproc_per_node N -m armor_kernels prune …`.

The primitives the block loop of prune.py needs, one code path for 1 and N processes (gloo on CPU, nccl
on CUDA; with one process nothing communicates and no process group exists):

    Dist.from_env(device)        rank, world size, the writer (rank 0); `barrier`, `agree`, `write`
    Dist.my_batches(n)           this rank's calibration batches: a contiguous, balanced chunk of range(n)
    share_modules                every rank ends with every pruned module (the owner's exact tensors)

Beside it: recorder.py (every linear's ActivationStats over the ranks, bit-identical to one process over all
batches) and scheduling.py (linears to ranks, and to the cores of one process).

Failures. Every collective here runs under the process group's timeout, ARMOR_DIST_TIMEOUT seconds (default
600): a peer that exits makes gloo fail at once (connection reset); one that hangs is given up after the
timeout. Either way each surviving rank raises `PeerStopped` (a RuntimeError): "armor-kernels: rank R: a peer
process stopped (…); finished blocks are saved, the same torchrun command resumes". The timeout must exceed
the longest wait between two collectives: the slowest rank's share of one block. On CUDA, nccl only raises
(instead of aborting the process from its watchdog) with TORCH_NCCL_BLOCKING_WAIT=1, which `from_env` sets
unless the environment says otherwise. Writes are the writer's alone (`write`), atomic (checkpoint.py), and
every rank waits for them before it reads: a killed run leaves only whole files, and resumes from them.
Multi-node runs need the output directory on a filesystem every node sees.
"""
from __future__ import annotations

import datetime
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from ..errors import InputError

TIMEOUT_ENV = "ARMOR_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0


class PeerStopped(RuntimeError):
    """A collective failed or timed out: a peer process exited or hangs."""

    def __init__(self, rank: int, detail: str):
        super().__init__(f"armor-kernels: rank {rank}: a peer process stopped ({detail}); "
                         "finished blocks are saved, the same torchrun command resumes")


def dist_timeout() -> float:
    """Seconds a collective waits for its peers: ARMOR_DIST_TIMEOUT, default 600."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise InputError(f"{TIMEOUT_ENV}: expected a positive number of seconds, got {raw!r}")
    return value


def _env_int(name: str) -> int:
    raw = os.environ.get(name)
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise InputError(f"torch.distributed: environment variable {name} must be an integer "
                         f"(torchrun sets it), got {raw!r}") from None


@dataclass
class Dist:
    """This process's place in the run. `world_size == 1`: no process group, nothing communicates."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout_s: float = DEFAULT_TIMEOUT_S
    _owns_group: bool = field(default=False, repr=False)

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: str | torch.device = "cpu") -> Dist:
        """The default process group from torchrun's variables (WORLD_SIZE > 1, RANK, MASTER_ADDR, …):
        gloo for a CPU device, nccl for CUDA (device `cuda` becomes `cuda:LOCAL_RANK`), timeout
        ARMOR_DIST_TIMEOUT seconds. Without them (or WORLD_SIZE=1), a single-process Dist."""
        device = torch.device(device)
        timeout = dist_timeout()
        world = _env_int("WORLD_SIZE") if os.environ.get("WORLD_SIZE") else 1
        if world <= 1:
            return cls(0, 1, device, timeout)
        if not tdist.is_available():
            raise RuntimeError("torch.distributed: this torch build has no distributed support")
        rank = _env_int("RANK")
        if device.type == "cuda":
            if device.index is None:
                local = _env_int("LOCAL_RANK") if os.environ.get("LOCAL_RANK") else 0
                device = torch.device("cuda", local)
            torch.cuda.set_device(device)
            backend = "nccl"
            os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
        elif device.type == "cpu":
            backend = "gloo"
        else:
            raise InputError(f"torch.distributed: device {device} is not supported (cpu: gloo, cuda: nccl)")
        owns = not tdist.is_initialized()
        if owns:
            try:
                tdist.init_process_group(backend, rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=timeout))
            except (RuntimeError, OSError) as e:
                raise RuntimeError(f"armor-kernels: rank {rank}: the {world} processes did not all start within "
                                   f"{TIMEOUT_ENV}={timeout:g} s ({_short(e)})") from e
        elif (tdist.get_rank(), tdist.get_world_size()) != (rank, world):
            raise RuntimeError(f"torch.distributed: the process group (rank {tdist.get_rank()} of "
                               f"{tdist.get_world_size()}) disagrees with RANK={rank}, WORLD_SIZE={world}")
        return cls(rank, world, device, timeout, owns)

    def close(self) -> None:
        """Destroy the process group if `from_env` created it (after a PeerStopped, just exit instead)."""
        if self._owns_group and tdist.is_initialized():
            tdist.destroy_process_group()
        self._owns_group = False

    def __enter__(self) -> Dist:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()

    # -- calibration sharding -------------------------------------------------------------------

    def my_batches(self, n_batches: int) -> list[int]:
        """This rank's global batch indices: rank r gets the r-th of `world_size` contiguous chunks of
        range(n_batches), the first n_batches % world_size chunks one longer (rank 0 starts at batch 0)."""
        return list(batch_range(n_batches, self.rank, self.world_size))

    # -- collectives, each failing as PeerStopped -----------------------------------------------

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Turn a failing collective (dead peer, timeout) into PeerStopped naming `what`."""
        try:
            yield
        except PeerStopped:
            raise
        except (RuntimeError, OSError) as e:
            raise PeerStopped(self.rank, f"{what}: {_short(e)}; a silent peer is given up after "
                                         f"{TIMEOUT_ENV}={self.timeout_s:g} s") from e

    def barrier(self, what: str = "barrier") -> None:
        if self.distributed:
            with self.guard(what):
                tdist.barrier()

    def broadcast_object(self, obj: Any, src: int = 0, what: str = "broadcast") -> Any:
        """`obj` of rank `src` (picklable, small), on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.rank == src else None]
        with self.guard(what):
            tdist.broadcast_object_list(box, src=src, device=self._object_device())
        return box[0]

    def agree(self, value: Any, what: str = "agree") -> Any:
        """The writer's `value` on every rank (e.g. whether block i's shard exists), so that no rank
        takes another branch than the others."""
        return self.broadcast_object(value, 0, what)

    def write(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """Run `fn(*args, **kwargs)` on the writer only; every rank returns once it has finished (so what
        it wrote can be read). Returns fn's result on the writer, None elsewhere. If fn raises, the writer
        re-raises it and the others raise RuntimeError naming it: no rank waits for a write that failed."""
        error, result = None, None
        if self.is_writer:
            try:
                result = fn(*args, **kwargs)
            except Exception as e:
                if not self.distributed:
                    raise
                error = e
        failed = self.broadcast_object(None if error is None else f"{type(error).__name__}: {error}",
                                       0, what=f"waiting for the writer (rank 0) to finish {_name(fn)}")
        if error is not None:
            raise error
        if failed is not None:
            raise RuntimeError(f"armor-kernels: rank {self.rank}: the writer (rank 0) failed in "
                               f"{_name(fn)}: {failed}")
        return result

    def _object_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _send(self, t: torch.Tensor, dst: int, what: str) -> None:
        with self.guard(what):
            tdist.send(t, dst)

    def _recv(self, t: torch.Tensor, src: int, what: str) -> torch.Tensor:
        with self.guard(what):
            tdist.recv(t, src)
        return t

    def _broadcast(self, t: torch.Tensor, src: int, what: str) -> torch.Tensor:
        with self.guard(what):
            tdist.broadcast(t, src)
        return t


def batch_range(n_batches: int, rank: int, world_size: int) -> range:
    """The contiguous chunk of range(n_batches) that `rank` of `world_size` calibrates."""
    if n_batches < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise InputError(f"batch_range: bad arguments n_batches={n_batches}, rank={rank}, world_size={world_size}")
    q, extra = divmod(n_batches, world_size)
    start = rank * q + min(rank, extra)
    return range(start, start + q + (rank < extra))


def _short(e: BaseException, limit: int = 300) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if text.startswith("[") and "] " in text:  # gloo's "[/path/pair.cc:537] Read error …"
        text = text.split("] ", 1)[1]
    text = text.split(" This is typically caused", 1)[0]  # gloo's advice to look at the remote worker's logs
    return text if len(text) <= limit else text[:limit] + "…"


def _name(fn: Callable) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


# ---------------------------------------------------------------------------------------------
# Sharing the results
# ---------------------------------------------------------------------------------------------

def rebuild_module(name: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """The default `template_fn` of share_modules: an ArmorLinear or Sparse24Linear from its state dict
    (the checkpoint loader's rule)."""
    from .checkpoint import modules_from_tensors  # imports transformers: only when a module is received

    return modules_from_tensors({f"{name}.{k}": v for k, v in tensors.items()}, f"module {name!r} from its owner")[name]


def share_modules(dist: Dist, modules: dict[str, nn.Module], assignment: dict[str, int],
                  reports: dict[str, dict] | None = None,
                  template_fn: Callable[[str, dict[str, torch.Tensor]], nn.Module] = rebuild_module,
                  ) -> tuple[dict[str, nn.Module], dict[str, dict]]:
    """Every rank ends with every module of `assignment` and its report.

    `modules` / `reports`: what this rank made (at least the names assigned to it). Each owner broadcasts,
    once per rank, a small pickled message (its reports and each module's state-dict keys, dtypes and
    shapes), then each module's tensors as one buffer of raw bytes; receivers rebuild the module with
    `template_fn(name, tensors)` (tensors on dist.device) and check it has the same state-dict keys. The
    tensors are bit-identical to the owner's; the owner keeps its own objects. Order: `assignment`'s."""
    reports = reports or {}
    mine = [n for n, r in assignment.items() if r == dist.rank]
    missing = [n for n in mine if n not in modules]
    if missing:
        raise KeyError(f"share_modules: rank {dist.rank} was assigned {missing} but has no such module")
    bad = sorted({r for r in assignment.values() if not 0 <= r < dist.world_size})
    if bad:
        raise InputError(f"share_modules: assignment names ranks {bad}, world size is {dist.world_size}")
    if not dist.distributed:
        return {n: modules[n] for n in assignment}, {n: reports.get(n, {}) for n in assignment}

    got_modules, got_reports = {}, {}
    for src in range(dist.world_size):
        names = [n for n, r in assignment.items() if r == src]
        if not names:
            continue
        meta = None
        if src == dist.rank:
            meta = {n: {"report": reports.get(n, {}),
                        "tensors": [(k, v.dtype, tuple(v.shape)) for k, v in modules[n].state_dict().items()]}
                    for n in names}
        meta = dist.broadcast_object(meta, src, f"receiving module shapes and reports from rank {src}")
        for n in names:
            specs = meta[n]["tensors"]
            nbytes = [_nbytes(dtype, shape) for _, dtype, shape in specs]
            if src == dist.rank:
                state = modules[n].state_dict()
                parts = [_as_bytes(state[k].detach().to(dist.device)) for k, _, _ in specs]
                buf = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8, device=dist.device)
            else:
                buf = torch.empty(sum(nbytes), dtype=torch.uint8, device=dist.device)
            if buf.numel():
                dist._broadcast(buf, src, f"receiving the tensors of {n} from rank {src}")
            if src == dist.rank:
                got_modules[n] = modules[n]
            else:
                tensors, off = {}, 0
                for (k, dtype, shape), size in zip(specs, nbytes):
                    tensors[k] = _from_bytes(buf[off:off + size], dtype, shape)
                    off += size
                mod = template_fn(n, tensors)
                if list(mod.state_dict()) != [k for k, _, _ in specs]:
                    raise InputError(f"share_modules: the module rebuilt for {n!r} has state-dict keys "
                                     f"{list(mod.state_dict())}, its owner's {[k for k, _, _ in specs]}")
                got_modules[n] = mod
            got_reports[n] = meta[n]["report"]
    return {n: got_modules[n] for n in assignment}, {n: got_reports[n] for n in assignment}


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * dtype.itemsize


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _from_bytes(b: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return b.clone().view(dtype).reshape(shape)  # clone: a fresh, aligned storage for view(dtype)
