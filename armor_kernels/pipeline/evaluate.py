"""Perplexity of a causal LM on a token stream: of a model in memory, or streamed block by block."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import InputError
from .blocks import StandIn, calibration_inputs, run_block
from .model import decoder_layers


def _windows(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    if tokens.dim() != 1:
        raise InputError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    if seq_len < 2:
        raise InputError(f"seq_len must be at least 2 to predict a token, got {seq_len}")
    n_windows = len(tokens) // seq_len
    if n_windows == 0:
        raise InputError(f"tokens has {len(tokens)} tokens, fewer than one window of seq_len={seq_len}")
    return tokens[:n_windows * seq_len].view(n_windows, seq_len)


# The most float32 logits held at once: the head and the loss run on chunks of positions, so evaluation's
# memory does not grow with batch x context x vocabulary (a 262k-token vocabulary at 4 x 4096 positions
# would be 17 GB of logits).
LOGITS_BYTES = 256 << 20


def _head_nll(model, batch: torch.Tensor, out: torch.Tensor, layers, blocks) -> float:
    """Summed next-token NLL of `batch` given `out`, the last block's output for it: the model's own forward
    with every block stood in for (the last one returning `out`), its head run on LOGITS_BYTES-sized chunks
    of positions (`logits_to_keep`), each chunk's terms summed in float64 (20k float32 terms would lose ~1e-5)."""
    B, L = batch.shape
    chunk = max(1, LOGITS_BYTES // (B * model.get_output_embeddings().out_features * 4))
    total = 0.0
    try:
        for i, block in enumerate(blocks):
            layers[i] = _Replay(block, _out=out if i == len(blocks) - 1 else None)
        for c0 in range(0, L - 1, chunk):
            keep = torch.arange(c0, min(c0 + chunk, L - 1), device=batch.device)
            logits = model(batch, use_cache=False, logits_to_keep=keep).logits
            nll = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, keep + 1].flatten(), reduction="none")
            total += nll.double().sum().item()
    finally:
        for i, block in enumerate(blocks):
            layers[i] = block
    return total


@torch.inference_mode()
def perplexity(model, tokens: torch.Tensor, seq_len: int = 512, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over the non-overlapping ``seq_len`` windows of ``tokens``.

    Each window is scored on its own (no context carried over), every predicted token (``seq_len - 1``
    per window) weighs the same, and a trailing part shorter than a window is left out: 20,000 tokens
    at 512 give 39 windows. ``batch_size`` windows go through the blocks at once (their activations are
    what it trades for speed); the logits never exceed LOGITS_BYTES.
    """
    windows = _windows(tokens, seq_len)
    device = next(model.parameters()).device
    layers = decoder_layers(model)
    blocks, total_nll = list(layers), 0.0
    with tqdm(total=len(windows), desc="perplexity", unit="window") as bar:
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            hidden, extra = calibration_inputs(model, batch, len(batch), device)
            for i, block in enumerate(blocks):
                hidden = run_block(block, hidden, extra[i])
            total_nll += _head_nll(model, batch, hidden[0], layers, blocks)
            bar.update(len(batch))
    return math.exp(total_nll / (len(windows) * (seq_len - 1)))


class _Replay(StandIn):
    """Stands in for a decoder block in the model's final forward: the last block returns the hidden states
    the streamed blocks computed, every other one passes its input through."""

    def forward(self, hidden_states, *args, **kwargs):
        return self._out if self._out is not None else hidden_states


@torch.inference_mode()
def streamed_perplexity(source, tokens: torch.Tensor, seq_len: int = 512, batch_size: int = 4, device="cpu",
                        dtype: torch.dtype = torch.float32) -> float:
    """perplexity() of the model `source` streams (a ModelSource, or a CheckpointSource of a pruned
    directory), one decoder block in memory at a time, as calibration runs: every window's hidden states
    go through block 0, which is then freed, then through block 1, …; the model's own forward, its blocks
    stood in for, gives the inputs of block 0 and, from the last block's outputs, the logits (in chunks). Same windows,
    batches and operations as perplexity() on the whole model, so the same value (tests: bit-identical on a
    tiny model). Peak memory: the non-block tensors, one block and the hidden states of all windows
    (twice while a block runs) plus LOGITS_BYTES of logits."""
    windows = _windows(tokens, seq_len)
    model = source.skeleton(dtype)
    source.load_rest(model, device, dtype)
    layers = decoder_layers(model)
    hidden, extra = calibration_inputs(model, windows, batch_size, device)
    for i in tqdm(range(len(layers)), desc="perplexity, streamed", unit="block"):
        hidden = run_block(source.load_block(model, i, device, dtype), hidden, extra[i])
        source.free_block(model, i)
    blocks, total_nll = list(layers), 0.0
    for batch, out in zip(windows.split(batch_size), hidden):
        total_nll += _head_nll(model, batch.to(device), out, layers, blocks)
    return math.exp(total_nll / (len(windows) * (seq_len - 1)))
