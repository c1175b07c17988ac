"""Every linear's ActivationStats over the calibration batches, with one process or many (distributed.py):
`collect_stats` runs a block over its batches under a StatsRecorder's hooks and combines what they saw.

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
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as tdist
from torch import nn

from ..errors import InputError
from ..stats import ActivationStats
from .blocks import run_block
from .distributed import Dist
from .model import block_linears, swapped


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


def collect_stats(block: nn.Module, hidden: list[torch.Tensor], extra: list[tuple], full: bool, *,
                  dist: Dist | None = None, batch_ids: list[int] | None = None, n_batches: int | None = None,
                  owners: dict[str, int] | None = None, paired: list[torch.Tensor] | None = None,
                  linears: dict[str, nn.Linear] | None = None, dense: dict[str, nn.Linear] | None = None
                  ) -> dict[str, ActivationStats]:
    """Statistics of the inputs of the block's linears (or of `linears`, some of them) over the calibration
    batches: this process's batches (`batch_ids` of `n_batches`, default all), combined over the processes
    in batch order (distributed.py), for the linears `owners` gives this rank (default all). `paired`: the
    same batches' hidden states on the dense model's stream, run through the block with its `dense`
    linears put back (default: the block as it is); each linear's statistics then carry the cross term
    with its dense inputs (ActivationStats.cross, and the full H: asymmetric calibration)."""
    dist = dist or Dist()
    batch_ids = list(range(len(hidden))) if batch_ids is None else batch_ids
    with StatsRecorder(linears or block_linears(block), full, dist, paired=paired is not None) as rec:
        for k, (b, h, e) in enumerate(zip(batch_ids, hidden, extra)):
            if paired is not None:
                with swapped(block, dense or {}):
                    rec.partners(lambda: run_block(block, [paired[k]], [e]))  # noqa: B023 (called at once)
            with rec.batch(b):
                run_block(block, [h], [e])
    stats = combine_stats(dist, rec, len(hidden) if n_batches is None else n_batches, owners=owners)
    if paired is not None:
        stats = {n: ActivationStats.from_paired(st) for n, st in stats.items()}
    check_tokens(block, stats)
    return stats


def check_tokens(block: nn.Module, stats: dict[str, ActivationStats]) -> None:
    """Refuse to prune a linear from empty statistics (a mixture-of-experts expert no calibration token
    was routed to, say)."""
    empty = [name for name, st in stats.items() if st.n_tokens == 0]
    if empty:
        raise InputError(f"{type(block).__name__}: linear(s) {empty} saw no calibration tokens (a "
                         "mixture-of-experts expert, say); pruning them from empty statistics is refused")
