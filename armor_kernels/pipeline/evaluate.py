"""Perplexity of a causal LM on a token stream."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.inference_mode()
def perplexity(model, tokens: torch.Tensor, seq_len: int = 512, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over the non-overlapping ``seq_len`` windows of ``tokens``.

    Each window is scored on its own (no context carried over), every predicted token (``seq_len - 1``
    per window) weighs the same, and a trailing part shorter than a window is left out: 20,000 tokens
    at 512 give 39 windows. ``batch_size`` windows go through the model at once; it trades memory
    (the logits are batch x seq_len x vocab floats) for little speed on a CPU.
    """
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 to predict a token, got {seq_len}")
    n_windows = len(tokens) // seq_len
    if n_windows == 0:
        raise ValueError(f"tokens has {len(tokens)} tokens, fewer than one window of seq_len={seq_len}")
    windows = tokens[:n_windows * seq_len].view(n_windows, seq_len)
    device = next(model.parameters()).device
    total_nll = 0.0
    with tqdm(total=n_windows, desc="perplexity", unit="window") as bar:
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            logits = model(batch, use_cache=False).logits[:, :-1]
            nll = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none")
            total_nll += nll.double().sum().item()  # float64 sum: 20k float32 terms would lose ~1e-5
            bar.update(len(batch))
    return math.exp(total_nll / (n_windows * (seq_len - 1)))
