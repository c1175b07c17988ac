"""Layer-by-layer pruning of a causal LM (as SparseGPT and ARMOR do), resumable.

One decoder block at a time is on the device. Its calibration inputs are the outputs of the blocks
before it, already pruned; hooks collect the statistics of every linear's inputs, then every linear
of the block is pruned, the block is written to disk atomically, and its pruned outputs become the
next block's inputs. A re-run with the same configuration loads the finished blocks instead of
pruning them again; a different configuration is refused.
"""
from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import __version__
from ..baselines import BASELINES, SPARSEGPT_BLOCK, SPARSEGPT_DAMP
from ..factors import ActivationStats
from ..nn import ArmorLinear, Sparse24Linear, materialize
from ..optim import ArmorOptions, armor
from .checkpoint import (
    FORMAT_VERSION,
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
from .model import adopt, block_linears, decoder_layers, layers_prefix

METHODS = ("dense", "magnitude", "wanda", "sparsegpt", "nowag_p", "armor")


class _Captured(Exception):
    pass


def block_inputs(model: nn.Module, calib: torch.Tensor, batch_size: int, device) -> list[tuple]:
    """(args, kwargs) of the first decoder block for each calibration batch (mask, positions, …)."""
    first = decoder_layers(model)[0]
    seen = []

    def grab(_, args, kwargs):
        seen.append((args, kwargs))
        raise _Captured

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in calib.split(batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return seen


def run_block(block: nn.Module, inputs: list[tuple]) -> list[tuple]:
    """The block's outputs, packaged as the next block's inputs (same keyword arguments)."""
    outs = []
    for args, kwargs in inputs:
        y = block(*args, **kwargs)
        y = y[0] if isinstance(y, tuple) else y
        outs.append(((y,) + tuple(args[1:]), kwargs))
    return outs


def collect_stats(block: nn.Module, inputs: list[tuple], full: bool) -> dict[str, ActivationStats]:
    linears = block_linears(block)
    stats = {name: ActivationStats(lin.in_features, full=full, device=lin.weight.device)
             for name, lin in linears.items()}
    hooks = [lin.register_forward_pre_hook(lambda m, a, s=stats[name]: s.update(a[0]))
             for name, lin in linears.items()]
    try:
        run_block(block, inputs)
    finally:
        for h in hooks:
            h.remove()
    return stats


def prune_linear(lin: nn.Linear, stats: ActivationStats, method: str, options: ArmorOptions) -> tuple[nn.Module, dict]:
    """The pruned replacement of one linear (stored values, model's dtype for compute) and its report."""
    W = lin.weight.detach()
    if method == "armor":
        res = armor(W, stats, options)
        mod = ArmorLinear.from_linear(lin, res.factors, dtype=STORAGE_DTYPE).pack()
        return mod, {"nowag_p_loss": res.history.loss[0], "loss": res.loss}
    pruned = BASELINES[method](W, stats)
    bias = None if lin.bias is None else lin.bias.detach().to(STORAGE_DTYPE)
    return Sparse24Linear.from_weight(pruned.weight.to(STORAGE_DTYPE), bias), {}


def prune_block_linears(linears: dict[str, nn.Linear], stats: dict[str, ActivationStats], method: str,
                        options: ArmorOptions, device: torch.device) -> tuple[dict[str, nn.Module], dict]:
    """Prune a block's linears (independent once the block's statistics are collected).

    On a multi-core CPU, ARMOR runs one linear per core, each single-threaded, largest first: the
    optimizer's small matmuls and per-tile sweeps scale poorly across threads within one layer, so
    whole layers in parallel finish the block sooner (SmolLM2 on 2 cores: see README). Each layer's
    result does not depend on the schedule; outputs are returned in the block's own order.
    """
    workers = min(torch.get_num_threads(), len(linears))
    if method != "armor" or device.type != "cpu" or workers < 2:
        done = {name: prune_linear(lin, stats[name], method, options) for name, lin in linears.items()}
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(workers) as pool:
                largest_first = sorted(linears, key=lambda n: -linears[n].weight.numel())
                futures = {n: pool.submit(prune_linear, linears[n], stats[n], method, options) for n in largest_first}
                done = {name: futures[name].result() for name in linears}
        finally:
            torch.set_num_threads(threads)
    return {n: m for n, (m, _) in done.items()}, {n: r for n, (_, r) in done.items()}


def method_options(method: str, options: ArmorOptions | None) -> dict:
    """The options that decide a method's output, defaults included: ARMOR's ArmorOptions, SparseGPT's
    block and dampening, nothing for the scoring baselines."""
    if method == "armor":
        return (options or ArmorOptions()).to_config()
    if options is not None:
        raise ValueError(f"options: ArmorOptions are for method 'armor', got them with method {method!r}")
    return {"block": SPARSEGPT_BLOCK, "damp": SPARSEGPT_DAMP} if method == "sparsegpt" else {}


def run_config(method: str, options: ArmorOptions | None, calib: torch.Tensor, model: nn.Module,
               source: str | None, batch_size: int) -> dict:
    """Everything that decides a run's output, defaults included: a resumed run must match it exactly."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    config = {
        "package_version": __version__, "format_version": FORMAT_VERSION, "method": method,
        "options": method_options(method, options), "batch_size": batch_size,
        "storage_dtype": str(STORAGE_DTYPE).removeprefix("torch."),
        "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "calibration": {"n_samples": calib.shape[0], "seq_len": calib.shape[1],
                        "tokens_sha256": hashlib.sha256(calib.cpu().numpy().tobytes()).hexdigest()},
        "model_source": source or "bundled SmolLM2-135M-Instruct", "model_config": model.config.to_dict(),
    }
    return json.loads(json.dumps(config))  # the form it has when read back from config.json


def _refuse_foreign_directory(out: Path) -> None:
    """Never write a run over a directory holding something else (a model, say): only an empty one, or one
    whose start was interrupted (config.json already ours), is (re)started."""
    cfg = out / "config.json"
    if cfg.exists():
        quant = json.loads(cfg.read_text()).get("quantization_config") or {}
        if quant.get("quant_method") != "armor":
            raise ValueError(f"output directory {str(out)!r} holds a model that is not a pruning run "
                             f"(no {RUN_FILE}); use a new directory")


def prune_model(model: nn.Module, tokenizer, calib: torch.Tensor, method: str, out: str | Path, *,
                options: ArmorOptions | None = None, device="cpu", batch_size: int = 8, source: str | None = None
                ) -> dict:
    """Prune every decoder block's linears in place and write each block to `out` as it finishes; when
    the last is done, `out` is a Hugging Face model directory (checkpoint.py) and the model in memory is
    what `from_pretrained(out)` builds: same modules, same values, dense copies materialised.

    Returns the run report: config, per-linear losses (ARMOR), time spent. Resumes a run in `out`
    with the same configuration; refuses one with a different configuration.
    """
    out = Path(out)
    config = run_config(method, options, calib, model, source, batch_size)
    options = options or ArmorOptions()
    chash = config_hash(config)
    if not (out / RUN_FILE).exists():
        _refuse_foreign_directory(out)
        start_run(out, model, tokenizer, config, chash, options.block_size if method == "armor" else None)
    else:
        old = read_run(out)
        if config_hash(old["run"]) != chash:
            raise ValueError(f"output directory {str(out)!r} holds a run with a different configuration "
                             f"(method {old['run'].get('method')!r}); use a new directory")
    if method == "dense":
        return {"config": config, "layers": {}, "seconds": 0.0}

    t0 = time.perf_counter()
    dtype = next(model.parameters()).dtype
    layers, prefix = decoder_layers(model), layers_prefix(model)
    report = {}
    with torch.no_grad():
        inputs = block_inputs(model, calib, batch_size, device)
        bar = tqdm(range(len(layers)), desc=f"prune {method}", unit="block")
        for i in bar:
            block = layers[i].to(device)
            if block_shard(out, i).exists():
                pruned, block_report = load_block(out, i, prefix, chash)
                bar.set_postfix_str("resumed")
            else:
                stats = collect_stats(block, inputs, full=(method == "sparsegpt"))
                pruned, block_report = prune_block_linears(block_linears(block), stats, method, options,
                                                           torch.device(device))
                save_block(out, i, f"{prefix}.{i}", pruned, chash, block_report)
            adopt(block, pruned, dtype, device)
            report.update({f"{i}.{name}": r for name, r in block_report.items()})
            inputs = run_block(block, inputs)
            layers[i] = block
    finish_run(out, len(layers), report)
    materialize(model)
    return {"config": config, "layers": report, "seconds": time.perf_counter() - t0}
