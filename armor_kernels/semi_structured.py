"""Pruned layers on torch's semi-structured 2:4 sparse matmul: every CUDA GPU with 2:4 tensor cores.

    semi = compress(values, idx)                 # once, at prepare: S through to_sparse_semi_structured
    y = linear(x, A, semi, B, bias)              # B' and A' as batched block matmuls around the 2:4 GEMM

torch.sparse.to_sparse_semi_structured runs on sm_80 and later (CUTLASS on sm_8x, cuSPARSELt on sm_80 and
later, Hopper and Blackwell included), in bf16 and fp16. It takes S with rows a multiple of 32 and
columns a multiple of 64: S is zero-padded to that (the zero rows give zero outputs, dropped; the zero
columns meet zero-padded inputs), which leaves the product exact. This is the path of a pruned layer on
a CUDA GPU where the fused Hopper kernels (ops.py) do not apply.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .errors import InputError
from .ops import LAUNCHES, block_diag_apply
from .sparse24 import unpack_24

DTYPES = (torch.bfloat16, torch.float16)
ROWS, COLS = 32, 64  # torch's shape rule for 16-bit semi-structured S (both backends accept it)


class SemiStructured(NamedTuple):
    S: torch.Tensor  # torch.sparse.SparseSemiStructuredTensor of the padded S
    d_out: int
    d_in: int


def unavailable_reason(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Why torch's semi-structured path cannot run a layer of `dtype` on `device` (None when it can)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"device {device} is not a CUDA device"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device (torch.cuda.is_available() is False)"
    if dtype not in DTYPES:
        return f"dtype {dtype}: torch's semi-structured sparse takes torch.bfloat16 or torch.float16"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"{device} is sm_{major}{minor}; 2:4 sparse tensor cores need sm_80 or later"
    return None


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def compress(values: torch.Tensor, idx: torch.Tensor) -> SemiStructured:
    """S (portable packed form) as torch's semi-structured tensor, zero-padded to its shape rule; the dense
    S exists only during the call."""
    d_out, d_in = values.shape[0], 2 * values.shape[1]
    S = F.pad(unpack_24(values, idx), (0, _round_up(d_in, COLS) - d_in, 0, _round_up(d_out, ROWS) - d_out))
    LAUNCHES["semi_compress"] += 1
    return SemiStructured(torch.sparse.to_sparse_semi_structured(S), d_out, d_in)


def linear(x: torch.Tensor, A: torch.Tensor | None, semi: SemiStructured, B: torch.Tensor | None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = ((x B'ᵀ) Sᵀ) A'ᵀ + bias with S on the 2:4 tensor cores (A', B' None: no wrapper)."""
    if x.shape[-1] != semi.d_in:
        raise InputError(f"x: expected last dimension {semi.d_in}, got shape {tuple(x.shape)}")
    lead = x.shape[:-1]
    xb = block_diag_apply(x.reshape(-1, semi.d_in), B)
    xb = F.pad(xb, (0, semi.S.shape[1] - semi.d_in))
    LAUNCHES["semi_structured"] += 1
    y = block_diag_apply(F.linear(xb, semi.S)[:, :semi.d_out], A)
    y = y if bias is None else y + bias
    return y.reshape(*lead, semi.d_out)
