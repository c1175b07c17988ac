"""Many processes through torch.distributed: `torchrun --nproc_per_node N -m armor_kernels prune …`.

The primitives the block loop of prune.py needs, one code path for 1 and N processes (gloo on CPU, nccl
on CUDA; with one process nothing communicates and no process group exists):

    Dist.from_env(device)        rank, world size, the writer (rank 0); `barrier`, `agree`, `write`
    Dist.my_batches(n)           this rank's calibration batches: a contiguous, balanced chunk of range(n)
    StatsRecorder, combine_stats every linear's ActivationStats, bit-identical to one process over all batches
    assign                       linear -> rank, longest processing time first, so the ranks finish together
    share_modules                every rank ends with every pruned module (the owner's exact tensors)

Bit-identity of the statistics. One process forms `sq = ((0 + c_0) + c_1) + …` (and `xx`, `n_tokens` alike),
c_b being what `ActivationStats.update` adds for batch b (one term per call of the linear, in call order).
Float addition is not associative, so an all-reduce of per-rank partial sums would differ in the last bits.
Instead the running sum travels along the ranks in batch order: rank 0 folds its own batches (0, 1, …) into
zeros as it sees them; rank r receives the running sum over all batches before its chunk from rank r - 1,
adds its own terms in order, passes it on; the last rank's sum is the one-process sum, operation for
operation, and is broadcast (or sent to the linear's owner only). Each term is computed exactly as `update`
computes it, on the same device, from bit-identical block inputs.

Costs. Ranks 1..N-1 keep their own terms until the running sum arrives: per batch and linear d_in float64
values, plus d_in² with full=True (SparseGPT's H: 8 d_in² bytes, 134 MB at d_in 4096, 970 MB at 11008);
fewer, larger batches cost less, and `store_device="cpu"` keeps them off the accelerator. Messages per block:
N - 1 hops of Σ 8 d_in (+ 8 d_in² if full) bytes, pipelined linear by linear, then one broadcast of the same
(or one send per linear to its owner). `share_modules` broadcasts each pruned module's tensors once, as raw
bytes (one message per module, plus one small pickled message of shapes, dtypes and reports per rank).

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
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from ..errors import InputError
from ..factors import ActivationStats

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
# Statistics
# ---------------------------------------------------------------------------------------------

class StatsRecorder:
    """Hooks on a block's linears that record each calibration batch's contributions to its statistics.

        with StatsRecorder(linears, full, dist) as rec:
            for b in dist.my_batches(n):
                with rec.batch(b):
                    block(*args[b], **kwargs[b])
        stats = combine_stats(dist, rec, n)     # name -> ActivationStats, as one process over all n batches

    Batches must be recorded in increasing global order. Rank 0 folds its terms into zeros at once (its
    batches are the first ones); other ranks keep theirs, on `store_device` (default: the linear's
    device), until `combine_stats`. A linear called k times in a batch adds k terms, in call order.

    paired: each call's input x is recorded joined with the same linear's input x' on a second stream,
    [x, x']: the statistics of a 2·d_in-wide input, whose full H holds Σ x xᵀ and the cross term Σ x' xᵀ
    (asymmetric calibration, prune.py; ActivationStats.from_paired). Before each batch, `rec.partners(run)`
    runs the second stream's forward and keeps its inputs.
    """

    def __init__(self, linears: dict[str, nn.Linear], full: bool, dist: Dist,
                 store_device: str | torch.device | None = None, paired: bool = False):
        self.names = list(linears)
        self.paired = paired
        self.d_in = {n: lin.in_features * (2 if paired else 1) for n, lin in linears.items()}
        self.devices = {n: lin.weight.device for n, lin in linears.items()}
        self.full, self.dist = full or paired, dist  # the cross term is part of the joint H
        self.store_device = None if store_device is None else torch.device(store_device)
        self._linears = linears
        self._fold = dist.rank == 0
        self.head = ({n: ActivationStats(self.d_in[n], full=self.full, device=self.devices[n]) for n in self.names}
                     if self._fold else None)
        self.terms: dict[str, list[tuple[torch.Tensor, torch.Tensor | None, int]]] = {n: [] for n in self.names}
        self.batches: list[int] = []
        self._current: int | None = None
        self._partners: dict[str, list[torch.Tensor]] | None = None  # this batch's second-stream inputs
        self._capture: dict[str, list[torch.Tensor]] | None = None   # set while partners() runs
        self._hooks: list = []

    def __enter__(self) -> StatsRecorder:
        self._hooks = [lin.register_forward_pre_hook(lambda m, a, name=name: self._record(name, a[0]))
                       for name, lin in self._linears.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def partners(self, run: Callable[[], object]) -> None:
        """Run the second stream (`run()`: the same linears on other inputs) and keep each linear's inputs,
        in call order, for the next batch to join with its own (paired recorders)."""
        if not self.paired:
            raise InputError("StatsRecorder: partners() is for a paired recorder")
        self._capture = {n: [] for n in self.names}
        try:
            run()
            self._partners = self._capture
        finally:
            self._capture = None

    @contextmanager
    def batch(self, index: int) -> Iterator[None]:
        """Calls of the linears inside this context belong to global batch `index`."""
        if self.batches and index <= self.batches[-1]:
            raise InputError(f"StatsRecorder: batches must come in increasing order, got {index} "
                             f"after {self.batches[-1]}")
        if self.paired and self._partners is None:
            raise InputError("StatsRecorder: a paired recorder needs partners(run) before each batch")
        self.batches.append(index)
        self._current = index
        try:
            yield
            left = {n: len(xs) for n, xs in (self._partners or {}).items() if xs}
            if left:
                raise InputError(f"StatsRecorder: the second stream called {left} more times than the first")
        finally:
            self._current, self._partners = None, None

    def _record(self, name: str, x: torch.Tensor) -> None:
        if self._capture is not None:
            self._capture[name].append(x.detach())
            return
        if self._current is None:
            raise RuntimeError(f"StatsRecorder: {name} was called outside `with recorder.batch(index)`")
        if self.paired:
            partners = self._partners.get(name)
            if not partners:
                raise InputError(f"StatsRecorder: {name} was called more times than on the second stream")
            x = torch.cat([x, partners.pop(0).to(x.device, x.dtype)], dim=-1)
        d_in = self.d_in[name]
        if x.shape[-1] != d_in:
            raise InputError(f"x: expected last dimension {d_in}, got shape {tuple(x.shape)}")
        # exactly ActivationStats.update's terms, on the device the one-process statistics live on
        x = x.detach().reshape(-1, d_in).to(self.devices[name], torch.float64)
        sq = (x * x).sum(0)
        xx = x.T @ x if self.full else None
        if self._fold:
            s = self.head[name]
            s.n_tokens += x.shape[0]
            s.sq += sq
            if xx is not None:
                s.xx += xx
            return
        if self.store_device is not None:
            sq = sq.to(self.store_device)
            xx = None if xx is None else xx.to(self.store_device)
        self.terms[name].append((sq, xx, x.shape[0]))


def combine_stats(dist: Dist, recorder: StatsRecorder, n_batches: int | None = None,
                  owners: dict[str, int] | None = None) -> dict[str, ActivationStats]:
    """name -> ActivationStats whose sums are the one-process sums over all batches, bit for bit (module
    docstring). `owners` (name -> rank, from `assign`): each linear's statistics only on its owner (the
    others get the small sq and n_tokens but not H), and the result holds only this rank's linears.
    `n_batches`: check that the ranks together recorded exactly range(n_batches).

    Every rank must call it with recorders over the same linears (same names, widths, `full`)."""
    names, full = recorder.names, recorder.full
    if owners is not None:
        missing = [n for n in names if n not in owners]
        if missing:
            raise InputError(f"combine_stats: owners has no rank for {missing}")
    if not dist.distributed:
        return {n: s for n, s in recorder.head.items() if owners is None or owners[n] == dist.rank}
    _check_batch_order(dist, recorder.batches, n_batches)

    rank, last, dev = dist.rank, dist.world_size - 1, dist.device
    offsets, total = {}, 0
    for n in names:
        offsets[n], total = total, total + recorder.d_in[n]

    # the small sums: token counts and diagonals, one message per hop
    if rank == 0:
        counts = torch.tensor([recorder.head[n].n_tokens for n in names], dtype=torch.int64, device=dev)
        sq = torch.cat([recorder.head[n].sq.to(dev) for n in names])
    else:
        counts = dist._recv(torch.zeros(len(names), dtype=torch.int64, device=dev), rank - 1,
                            f"receiving token counts and diagonals from rank {rank - 1}")
        sq = dist._recv(torch.zeros(total, dtype=torch.float64, device=dev), rank - 1,
                        f"receiving token counts and diagonals from rank {rank - 1}")
        for i, n in enumerate(names):
            view = sq[offsets[n]:offsets[n] + recorder.d_in[n]]
            for t_sq, _, rows in recorder.terms[n]:
                counts[i] += rows
                view += t_sq.to(dev)
    if rank < last:
        what = f"sending token counts and diagonals to rank {rank + 1}"
        dist._send(counts, rank + 1, what)
        dist._send(sq, rank + 1, what)
    dist._broadcast(counts, last, "broadcasting token counts")
    dist._broadcast(sq, last, "broadcasting diagonals")

    out = {}
    for i, n in enumerate(names):
        mine = owners is None or owners[n] == rank
        d = recorder.d_in[n]
        xx = None
        if full:  # the running H, linear by linear (hops pipeline across linears)
            if rank == 0:
                xx = recorder.head[n].xx.to(dev)
            else:
                xx = dist._recv(torch.zeros(d, d, dtype=torch.float64, device=dev), rank - 1,
                                f"receiving H of {n} from rank {rank - 1}")
                for _, t_xx, _ in recorder.terms[n]:
                    xx += t_xx.to(dev)
            if rank < last:
                dist._send(xx, rank + 1, f"sending H of {n} to rank {rank + 1}")
                xx = None
            if owners is None:
                if xx is None:
                    xx = torch.zeros(d, d, dtype=torch.float64, device=dev)
                dist._broadcast(xx, last, f"broadcasting H of {n}")
            elif owners[n] != last:
                if rank == last:
                    dist._send(xx, owners[n], f"sending H of {n} to rank {owners[n]}")
                    xx = None
                elif mine:
                    xx = dist._recv(torch.zeros(d, d, dtype=torch.float64, device=dev), last,
                                    f"receiving H of {n} from rank {last}")
        if not mine:
            continue
        s = ActivationStats(d, full=False, device=recorder.devices[n])
        s.n_tokens = int(counts[i])
        s.sq = sq[offsets[n]:offsets[n] + d].to(recorder.devices[n]).clone()
        s.xx = None if xx is None else xx.to(recorder.devices[n])
        out[n] = s
    return out


def _check_batch_order(dist: Dist, batches: list[int], n_batches: int | None) -> None:
    """The ranks' batches, concatenated in rank order, must be increasing (and range(n_batches))."""
    every = [None] * dist.world_size
    with dist.guard("gathering the recorded batch indices"):
        tdist.all_gather_object(every, list(batches))
    flat = [b for chunk in every for b in chunk]
    ok = all(a < b for a, b in zip(flat, flat[1:]))
    if n_batches is not None:
        ok = ok and flat == list(range(n_batches))
    if not ok:
        shown = ", ".join(f"rank {r}: {c[:3]}{'…' if len(c) > 3 else ''} ({len(c)})" for r, c in enumerate(every))
        raise InputError("combine_stats: the ranks must record contiguous chunks of the batches in rank order "
                         f"(Dist.my_batches{'' if n_batches is None else f'({n_batches})'}), got {shown}")


# ---------------------------------------------------------------------------------------------
# Work assignment and sharing the results
# ---------------------------------------------------------------------------------------------

def on_cores(jobs: dict[str, Callable[[], Any]], sizes: dict[str, int]) -> dict[str, Any]:
    """Each job's result, the jobs run one per CPU core, each single-threaded, largest `sizes` first.

    Why: the optimizer's small matmuls and per-tile sweeps scale poorly across threads within one layer,
    so whole layers in parallel finish a block sooner (SmolLM2 on 2 cores: docs/DESIGN.md §9). Results are
    returned in `jobs`' order; with one thread the jobs simply run in turn."""
    workers = min(torch.get_num_threads(), len(jobs))
    if workers < 2:
        return {k: job() for k, job in jobs.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            futures = {k: pool.submit(jobs[k]) for k in sorted(jobs, key=lambda k: -sizes[k])}
            return {k: futures[k].result() for k in jobs}
    finally:
        torch.set_num_threads(threads)


def assign(sizes: dict[str, int], world_size: int) -> dict[str, int]:
    """name -> rank by longest processing time first: the largest job goes to the least loaded rank
    (ties: lower rank), jobs of equal size in name order. Deterministic and independent of the dict's
    order; the result follows `sizes`' order. The most loaded rank carries at most the least loaded's
    load plus one job (and at most 4/3 of the optimum)."""
    if world_size < 1:
        raise InputError(f"assign: world_size must be ≥ 1, got {world_size}")
    bad = {n: s for n, s in sizes.items() if not isinstance(s, int) or s < 0}
    if bad:
        raise InputError(f"assign: sizes must be non-negative integers, got {bad}")
    load, owner = [0] * world_size, {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = min(range(world_size), key=lambda k: (load[k], k))
        owner[name] = r
        load[r] += sizes[name]
    return {n: owner[n] for n in sizes}


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
