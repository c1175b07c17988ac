"""Running a causal LM's decoder blocks one at a time: what pruning, reconstruction and evaluation share.

`calibration_inputs` runs the model once per batch with every block stood in for, recording the first
block's inputs and the arguments (masks, positions) the model passes each block; `run_block` then carries
the hidden states through one block at a time, so only that block's weights need to be in memory.
"""
from __future__ import annotations

import torch
from torch import nn

from .model import decoder_layers


class _Captured(Exception):
    pass


class StandIn(nn.Module):
    """Stands in for a decoder block during a forward of the model, without its weights. Attributes the
    model reads off a block (its attention type, say) come from the block it stands in for."""

    def __init__(self, block: nn.Module, **state):
        super().__init__()
        self.__dict__.update(_block=block, **state)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)


class _Recorder(StandIn):
    """Stands in for decoder block i: records the arguments the model passes it (masks, positions: they
    can differ per block, e.g. Gemma's sliding and full attention), passes the hidden states through, and
    stops the forward after the last block."""

    def __init__(self, block: nn.Module, i: int, last: bool, seen: list):
        super().__init__(block, _i=i, _last=last, _seen=seen)

    def forward(self, hidden_states, *args, **kwargs):
        self._seen[self._i].append((hidden_states, args, kwargs))
        if self._last:
            raise _Captured
        return hidden_states


def calibration_inputs(model: nn.Module, calib: torch.Tensor, batch_size: int, device) -> tuple[list, list]:
    """(hidden, extra): per calibration batch, the first block's input hidden states, and per block, per
    batch, the (args, kwargs) the model passes that block besides them. One forward per batch through
    the model with every block stood in for by a _Recorder: no block's weights are needed."""
    layers = decoder_layers(model)
    seen = [[] for _ in layers]
    blocks = list(layers)
    for i, block in enumerate(blocks):
        layers[i] = _Recorder(block, i, i == len(blocks) - 1, seen)
    try:
        for batch in calib.split(batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        for i, block in enumerate(blocks):
            layers[i] = block
    hidden = [h for h, _, _ in seen[0]]
    return hidden, [[(args, kwargs) for _, args, kwargs in per_block] for per_block in seen]


def run_block(block: nn.Module, hidden: list[torch.Tensor], extra: list[tuple]) -> list[torch.Tensor]:
    """The block's output hidden states for every batch (each batch moved to the block's device and
    back to where it was: activations may be kept off the device)."""
    device = next(block.parameters()).device
    outs = []
    for h, (args, kwargs) in zip(hidden, extra):
        y = block(h.to(device), *args, **kwargs)
        outs.append((y[0] if isinstance(y, tuple) else y).to(h.device))
    return outs
