"""Layer-by-layer pruning of a causal LM (as SparseGPT and ARMOR do), resumable.

One decoder block at a time is on the device. Its calibration inputs are the outputs of the blocks
before it, already pruned; hooks collect the statistics of every linear's inputs, then every linear
of the block is pruned (and, with `recon`, the block's pruned linears are then tuned together on its
output: reconstruct.py), the block is written to disk atomically, and its pruned outputs become the
next block's inputs. A re-run with the same configuration loads the finished blocks instead of
pruning them again (one whose bytes no longer match its recorded digests is pruned again, with a
warning naming it: it is reproduced exactly from the blocks before it); a different configuration is
refused. One run at a time writes a directory (lock.py).
"""
from __future__ import annotations

import copy
import functools
import json
import logging
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..baselines import BASELINES
from ..errors import InputError
from ..factors import block_sizes
from ..nn import ArmorLinear, Sparse24Linear, prepare
from ..optim import ArmorOptions, armor
from ..stats import ActivationStats, asymmetric_weight
from .blocks import calibration_inputs, run_block
from .budget import BudgetOptions, allocate, layer_options, log_allocation, probe
from .checkpoint import (
    RUN_FILE,
    STORAGE_DTYPE,
    block_shard,
    config_hash,
    finish_run,
    load_block,
    read_run,
    save_block,
    start_run,
)
from .config import PruneConfig, prune_config, run_config
from .distributed import Dist, share_modules
from .lock import RunLock, RunLocked
from .model import (
    adopt,
    block_linears,
    check_supported,
    decoder_layers,
    layers_prefix,
    sublayers,
    swapped,
)
from .reconstruct import reconstruction
from .recorder import collect_stats
from .scheduling import assign, on_cores
from .source import ModelSource
from .verify import DamagedShard

log = logging.getLogger("armor_kernels")


def prune_linear(lin: nn.Linear, stats: ActivationStats, method: str, options: ArmorOptions,
                 asymmetric: float | None = None) -> tuple[nn.Module, dict]:
    """The pruned replacement of one linear (stored values, model's dtype for compute) and its report.
    asymmetric: prune asymmetric_weight(W, stats, asymmetric) instead of W (statistics with a cross term)."""
    W = lin.weight.detach()
    if asymmetric is not None:
        W = asymmetric_weight(W, stats, asymmetric)
    if method == "armor":
        res = armor(W, stats, options)
        mod = ArmorLinear.from_linear(lin, res.factors, dtype=STORAGE_DTYPE).pack()
        return mod, {"start": res.start, "start_loss": res.history.loss[0], "loss": res.loss}
    pruned = BASELINES[method](W, stats)
    bias = None if lin.bias is None else lin.bias.detach().to(STORAGE_DTYPE)
    return Sparse24Linear.from_weight(pruned.weight.to(STORAGE_DTYPE), bias), {}


def prune_block_linears(linears: dict[str, nn.Linear], stats: dict[str, ActivationStats], method: str,
                        options: ArmorOptions | dict[str, ArmorOptions], device: torch.device,
                        asymmetric: float | None = None) -> tuple[dict[str, nn.Module], dict]:
    """Prune a block's linears (independent once the block's statistics are collected); `options`: one
    for all, or one per linear (a budget's allocation); `asymmetric`: prune_linear's.

    ARMOR on a CPU runs one linear per core (scheduling.on_cores); each layer's result does not depend on
    the schedule, and outputs are returned in the block's own order.
    """
    opts = options if isinstance(options, dict) else {n: options for n in linears}
    jobs = {n: functools.partial(prune_linear, lin, stats[n], method, opts[n], asymmetric)
            for n, lin in linears.items()}
    if method == "armor" and device.type == "cpu":
        done = on_cores(jobs, {n: lin.weight.numel() for n, lin in linears.items()})
    else:
        done = {n: job() for n, job in jobs.items()}
    return {n: m for n, (m, _) in done.items()}, {n: r for n, (_, r) in done.items()}


def _refuse_foreign_directory(out: Path) -> None:
    """Never write a run over a directory holding something else (a model, say): only an empty one, or one
    whose start was interrupted (config.json already ours), is (re)started."""
    cfg = out / "config.json"
    if cfg.exists():
        quant = json.loads(cfg.read_text()).get("quantization_config") or {}
        if quant.get("quant_method") != "armor":
            raise InputError(f"output directory {str(out)!r} holds a model that is not a pruning run "
                             f"(no {RUN_FILE}); use a new directory")


def prune_model(model: nn.Module | ModelSource, tokenizer, calib: torch.Tensor, config: PruneConfig | str,
                out: str | Path | None, *, device=None, source: str | None = None, dtype: torch.dtype | None = None,
                offload: bool = False, dist: Dist | None = None) -> dict:
    """Prune every decoder block's linears as `config` says (a PruneConfig, a preset's or a method's name:
    config.prune_config) and, with `out`, write each block to it as it finishes; when the last is done, `out`
    is a Hugging Face model directory (checkpoint.py).

    model: a model in memory, pruned in place (afterwards it is what `from_pretrained(out)` builds, same
           modules, same values, dense copies materialised), or a ModelSource, streamed: one decoder
           block is read, pruned, written and freed at a time, the blocks run in `dtype` (default float32).
    out: the checkpoint directory; None (a model in memory only): nothing written, nothing resumed.
    device: where the blocks are pruned (default: the model's own device; a source's: "cpu"). A model in
           memory elsewhere keeps its blocks there: each visits `device` while it is pruned.
    offload: keep the calibration activations in host memory, moving each batch to `device` in turn.
    dist: the processes sharing the run (distributed.py; default: from torchrun's environment, else one).
           Each holds a share of the calibration batches; the statistics are combined in batch order, so
           every rank sees exactly the one-process statistics; a block's linears are spread over the
           ranks by size and their results shared; rank 0 writes. The checkpoint is bit-identical to a
           one-process run's.
    Returns the run report: config, per-linear losses (ARMOR), time spent. Resumes a run in `out`
    with the same configuration; refuses one with a different configuration.
    """
    config = prune_config(config)
    if device is None:
        device = "cpu" if isinstance(model, ModelSource) else next(model.parameters()).device
    dist = dist or Dist.from_env(device)
    if out is None and isinstance(model, ModelSource):
        raise InputError("out: a streamed model (ModelSource) is pruned into a checkpoint directory, got None")
    out = None if out is None else Path(out)
    with nullcontext() if out is None else _single_writer(out, dist):  # a run in memory writes nothing: no lock
        return _prune(model, tokenizer, calib, config, out, torch.device(device), source, dtype, offload, dist)


@contextmanager
def _single_writer(out: Path, dist: Dist):
    """Hold `out`'s lock (lock.py) for the run: the writer (rank 0) takes it and every rank learns whether it
    could, so a second run, one process or many, stops at once on all its ranks."""
    lock, refused = None, None
    if dist.is_writer:
        try:
            lock = RunLock.acquire(out)
        except OSError as e:  # RunLocked, or the directory cannot be written at all
            refused = str(e)
    refused = dist.agree(refused, "taking the output directory's lock")
    if refused is not None:
        raise RunLocked(refused)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _prune(model, tokenizer, calib, cfg: PruneConfig, out: Path | None, device: torch.device, source, dtype, offload,
           dist) -> dict:
    method, options, budget, protocol = cfg.method, cfg.options, cfg.budget, cfg.protocol
    streamed = isinstance(model, ModelSource)
    if streamed:
        src, model = model, model.skeleton(dtype or torch.float32)
        check_supported(model)
        src.load_rest(model, device, dtype or torch.float32)
        source = source or str(src.path)
    else:
        check_supported(model)
    dtype = next(model.parameters()).dtype if not streamed else (dtype or torch.float32)
    config = run_config(cfg, calib, model, source)
    chash = config_hash(config)
    layers, prefix = decoder_layers(model), layers_prefix(model)
    if streamed and method == "dense":  # the unpruned model as it is: read every block
        for i in range(len(layers)):
            src.load_block(model, i, device, dtype)
    write = (lambda *a: dist.write(*a)) if out is not None else (lambda *a: None)  # noqa: E731
    fresh = out is None or dist.agree(not (out / RUN_FILE).exists())
    if not fresh:
        old = read_run(out)
        if config_hash(old["run"]) != chash:
            raise InputError(f"output directory {str(out)!r} holds a run with a different configuration "
                             f"(method {old['run'].get('method')!r}); use a new directory")
    if method == "dense":
        if fresh:
            write(_start, out, model, tokenizer, config, chash, None)
        return {"config": config, "layers": {}, "seconds": 0.0}
    if fresh:
        write(_refuse_foreign_directory, out)

    t0 = time.perf_counter()
    report = {}
    batches = calib.split(cfg.batch_size)
    mine = dist.my_batches(len(batches))
    home = None if streamed else next(model.parameters()).device  # where an in-memory model's blocks live
    if streamed:
        load, free = (lambda i: src.load_block(model, i, device, dtype)), (lambda i: src.free_block(model, i))
    else:
        load, free = (lambda i: layers[i].to(device)), (lambda i: layers[i].to(home))
        _rest_to(model, device)
    with torch.no_grad():
        if mine:
            hidden, extra = calibration_inputs(model, torch.cat([batches[b] for b in mine]), cfg.batch_size, device)
        else:  # more processes than calibration batches: this one only prunes its share of the linears
            hidden, extra = [], [[] for _ in layers]
        if offload:
            hidden = [h.cpu() for h in hidden]
        act = sum(h.numel() * h.element_size() for h in hidden)
        log.info("calibration activations: %d of %d batches on this process, %.1f MB held %s (twice while a "
                 "block runs%s)", len(hidden), len(batches), act / 2**20,
                 "in host memory" if offload else f"on {device}",
                 "; once more for the dense stream" if cfg.asymmetric is not None else "")
        layer_opts = lambda key: options  # noqa: E731
        blocks_for = options.layer_blocks_for if method == "armor" else None
        if budget is not None:
            blocks = _budget_blocks(budget, options, model, hidden, extra, load, free, dist, mine, len(batches), out)
            if streamed:  # freeing a probed block dropped its norms with its linears
                src.load_rest(model, device, dtype)
            layer_opts = layer_options(options, blocks)
            blocks_for = lambda key, shape: block_sizes(shape, blocks[key])  # noqa: E731
        if fresh:
            write(_start, out, model, tokenizer, config, chash, blocks_for)
        tuner = reconstruction(cfg.recon, protocol, calib,
                               lambda w: calibration_inputs(model, w, cfg.recon.batch, device), offload, dist, device)
        # the dense model's stream: the inputs of protocol "dense", the partner stream of asymmetric calibration
        paired = cfg.asymmetric is not None
        dense_hidden = list(hidden) if protocol == "dense" or paired else None
        bar = tqdm(range(len(layers)), desc=f"prune {method}", unit="block", disable=not dist.is_writer)
        for i in bar:
            block = load(i)
            if tuner is not None:
                tuner.dense_pass(block, i)
            finished = None if out is None else _resumed_block(dist, out, i, prefix, chash)
            if finished is not None:
                pruned, block_report = finished
                bar.set_postfix_str("resumed")
            else:
                linears = block_linears(block)
                full = method == "sparsegpt" or (method == "armor" and options.needs_full_stats)
                # asymmetric calibration prunes the block one sublayer at a time: each linear's cross term is
                # only right once the linears that feed it are pruned (its input is what they now give)
                groups = [list(linears)]
                if paired:
                    groups = dist.agree(sublayers(block, lambda: run_block(block, hidden[:1], extra[i][:1]))
                                        if dist.is_writer else None, f"block {i}'s sublayers")
                pruned, block_report = {}, {}
                with swapped(block, linears):  # and the block dense again afterwards, as the rest of the loop expects
                    for g, group in enumerate(groups):
                        owners = assign({n: linears[n].weight.numel() for n in group}, dist.world_size)
                        stats = collect_stats(block, hidden, extra[i], full, dist=dist, batch_ids=mine,
                                              n_batches=len(batches), owners=owners,
                                              paired=dense_hidden if paired else None,
                                              linears={n: linears[n] for n in group}, dense=linears)
                        own, own_report = prune_block_linears({n: linears[n] for n in stats}, stats, method,
                                                              {n: layer_opts(f"{i}.{n}") for n in stats},
                                                              device, cfg.asymmetric)
                        got, got_report = share_modules(dist, own, owners, own_report)
                        pruned.update(got)
                        block_report.update(got_report)
                        if g + 1 < len(groups):  # the next sublayers calibrate on these (a copy: adopt casts in place)
                            adopt(block, copy.deepcopy(got), dtype, device)
                pruned = {n: pruned[n] for n in linears}  # the block's own order, whoever pruned what
                block_report = {n: block_report[n] for n in linears}
                if tuner is not None:
                    pruned, block_report = tuner.tune(block, pruned, block_report)
                write(save_block, out, i, f"{prefix}.{i}", pruned, chash, block_report)
            if dense_hidden is not None:  # the block is still dense here
                dense_hidden = run_block(block, dense_hidden, extra[i])
            adopt(block, pruned, dtype, device)
            if tuner is not None:
                tuner.advance(block, i)
            report.update({f"{i}.{name}": r for name, r in block_report.items()})
            hidden = dense_hidden if protocol == "dense" else run_block(block, hidden, extra[i])
            free(i)
    write(finish_run, out, len(layers), report, dist.world_size)
    if not streamed:  # the evaluator's figures: the fused kernels where they run, else the product Ŵ
        _rest_to(model, home)
        prepare(model, keep_dense=True)
    return {"config": config, "layers": report, "seconds": time.perf_counter() - t0}


def _rest_to(model: nn.Module, device) -> None:
    """Everything of the model but its decoder blocks (embeddings, final norm, head, rotary tables) to device."""
    layers = decoder_layers(model)
    held = list(layers)
    for i in range(len(layers)):
        layers[i] = nn.Identity()
    try:
        model.to(device)
    finally:
        for i, block in enumerate(held):
            layers[i] = block


def _resumed_block(dist: Dist, out: Path, i: int, prefix: str, chash: str) -> tuple[dict, dict] | None:
    """(modules, report) of block i, on every rank, if a run wrote it and it is intact; None if it must be
    pruned: never written, or damaged (the writer warns, naming the tensor; pruning reproduces its bytes
    exactly, as every block before it is read back as it was written). The writer decides; a shard of
    another configuration stops every rank with load_block's error."""
    finished, refused = None, None
    if dist.is_writer and block_shard(out, i).exists():
        try:
            finished = load_block(out, i, prefix, chash)
        except DamagedShard as e:
            log.warning("%s; pruning block %d again", e, i)
        except ValueError as e:
            refused = str(e)
    intact, refused = dist.agree((finished is not None, refused), f"resuming block {i}")
    if refused is not None:
        raise InputError(refused)
    if not intact:
        return None
    return finished if dist.is_writer else load_block(out, i, prefix, chash)


def _budget_blocks(budget: BudgetOptions, options: ArmorOptions, model: nn.Module, hidden: list, extra: list,
                   load, free, dist: Dist, mine: list[int], n_batches: int, out: Path) -> dict[str, int]:
    """"i.name" -> block size: the budget's probe pass on the dense model's stream, then its allocation."""
    stream = list(hidden)

    def stats_of(i, block, owners):
        return collect_stats(block, stream, extra[i], False, dist=dist, batch_ids=mine, n_batches=n_batches,
                             owners=owners)  # the probe's proxy objective reads the diagonal only

    def advance(i, block):
        stream[:] = run_block(block, stream, extra[i])

    curves = probe(len(decoder_layers(model)), load, free, stats_of, advance, options, budget, dist, out)
    shapes = {f"{i}.{n}": (lin.out_features, lin.in_features)
              for i, block in enumerate(decoder_layers(model)) for n, lin in block_linears(block).items()}
    blocks = allocate(curves, shapes, budget.fraction)
    log_allocation(blocks, shapes)
    return blocks


def _start(out, model, tokenizer, config, chash, blocks_for) -> None:
    _refuse_foreign_directory(out)
    start_run(out, model, tokenizer, config, chash, blocks_for)
