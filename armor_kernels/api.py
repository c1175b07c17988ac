"""The model-level entry point: prune a transformers causal LM that is already in memory.

    import armor_kernels
    model = armor_kernels.prune(model, texts, tokenizer=tokenizer)            # the "quality" preset
    model = armor_kernels.prune(model, texts, tokenizer=tokenizer, config="armor", out="runs/armor")

It runs the same pipeline as the command line (pipeline/prune.py) with the same configuration object
(pipeline/config.py): the same calibration windows and configuration give the same bits.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import InputError
from .nn import prepare
from .pipeline.config import PruneConfig, prune_config
from .pipeline.data import N_SAMPLES, SEQ_LEN, calibration_windows
from .pipeline.prune import prune_model


def prune(model: nn.Module, calibration, config: PruneConfig | str = "quality", *, tokenizer=None,
          out: str | Path | None = None, device=None, n_samples: int = N_SAMPLES, seq_len: int = SEQ_LEN,
          seed: int = 0) -> nn.Module:
    """Prune `model` (a transformers causal LM) in place, one decoder block at a time, and return it prepared
    to run from the packed form (`prepare`: the fastest path on its device, no dense copy).

    calibration: texts (a str, or a list of str, each a document) tokenized with `tokenizer`, from which
                 `n_samples` windows of `seq_len` tokens are drawn at random (`seed`), none crossing a
                 document's end (the command line's draw); or token windows, an int tensor (n, seq_len); or
                 an iterable of batches, each such a tensor or a mapping with "input_ids" (an
                 "attention_mask" beside it must be all ones: padded windows would calibrate on padding).
    config: a PruneConfig, a preset's name ("quality", pipeline/config.py's PRESETS) or a method's name
            ("armor", "sparsegpt", ...: its defaults).
    out: also write the result as a Hugging Face checkpoint directory (format v2; `from_pretrained` loads
         it), resumable like the command line's runs; None: nothing is written.
    device: where each block is pruned (default: the model's device); the model stays where it is.
    """
    cfg = prune_config(config)
    if out is not None and tokenizer is None:
        raise InputError("tokenizer: a checkpoint directory (out) holds the model's tokenizer; got None")
    calib = calibration_tokens(calibration, tokenizer, n_samples=n_samples, seq_len=seq_len, seed=seed)
    prune_model(model, tokenizer, calib, cfg, out, device=device)
    prepare(model)
    return model


def calibration_tokens(calibration, tokenizer=None, *, n_samples: int = N_SAMPLES, seq_len: int = SEQ_LEN,
                       seed: int = 0) -> torch.Tensor:
    """The calibration windows, an int64 tensor (n, seq_len), from what `prune` takes (its docstring)."""
    if isinstance(calibration, str):
        calibration = [calibration]
    if isinstance(calibration, torch.Tensor):
        return _windows(calibration, "calibration")
    batches = list(calibration)
    if not batches:
        raise InputError("calibration: expected texts, token windows or batches, got an empty sequence")
    if all(isinstance(b, str) for b in batches):
        if tokenizer is None:
            raise InputError("tokenizer: calibration texts need the model's tokenizer, got None")
        docs = [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"], dtype=torch.long) for t in batches]
        return calibration_windows(docs, n_samples=n_samples, seq_len=seq_len, seed=seed)[0]
    windows = []
    for k, b in enumerate(batches):
        if isinstance(b, Mapping):
            mask = b.get("attention_mask")
            if mask is not None and not bool(torch.as_tensor(mask).all()):
                raise InputError(f"calibration batch {k}: attention_mask has zeros (padding); give windows of "
                                 "real tokens only, all of one length")
            b = b["input_ids"]
        windows.append(_windows(torch.as_tensor(b), f"calibration batch {k}"))
    if len({w.shape[1] for w in windows}) > 1:
        raise InputError("calibration: batches of one window length expected, got lengths "
                         f"{sorted({w.shape[1] for w in windows})}")
    return torch.cat(windows)


def _windows(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() != 2 or t.dtype.is_floating_point or t.dtype == torch.bool or t.numel() == 0:
        raise InputError(f"{name}: expected token ids, an int tensor (n_windows, seq_len), got "
                         f"{t.dtype} {tuple(t.shape)}")
    return t.long().cpu()

