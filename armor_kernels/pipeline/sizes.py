"""Byte accounting of a pruned checkpoint beside the dense model it came from: what results report."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..nn import PRUNED_LINEARS
from .checkpoint import block_shard
from .model import decoder_layers


def block_dense_bf16_bytes(block: nn.Module) -> int:
    """What the block's linears (pruned or not) take as dense bf16 weights and biases."""
    return sum(2 * m.out_features * (m.in_features + (m.bias is not None)) for m in block.modules()
               if isinstance(m, (nn.Linear, *PRUNED_LINEARS)))


def dense_bf16_linear_bytes(model: nn.Module) -> int:
    return sum(block_dense_bf16_bytes(block) for block in decoder_layers(model))


def checkpoint_sizes(out: Path, model: nn.Module) -> dict:
    """Bytes on disk against the dense bf16 model: per block (its shard), all pruned linears, and the
    whole checkpoint directory."""
    per_block = [{"block": i, "bytes": block_shard(out, i).stat().st_size,
                  "dense_bf16_bytes": block_dense_bf16_bytes(b)} for i, b in enumerate(decoder_layers(model))]
    total = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    return {"linear_bytes": sum(b["bytes"] for b in per_block), "checkpoint_bytes": total, "per_block": per_block}


# ---------------------------------------------------------------------------------------------
