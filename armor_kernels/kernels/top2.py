"""2:4 mask selection: keep the 2 highest-scoring entries of every group of 4 along the last dim.

`top2_mask_reference` is the plain PyTorch definition (the spec; it serves every device),
`top2_mask_triton` the Triton kernel, and `top2_mask` dispatches between them through
`triton_switch.use_triton`.
"""
from __future__ import annotations

import torch

from ..errors import InputError
from . import triton_switch
from .triton_switch import jit, tl, triton


def top2_mask_reference(score: torch.Tensor) -> torch.Tensor:
    """Boolean mask, same shape as `score`, with exactly 2 True per group of 4 along the last dim.

    Ties go to the lower column (a stable sort), so every device picks the same mask.
    """
    *lead, d = score.shape
    if d % 4:
        raise InputError(f"score: last dimension must be divisible by 4, got shape {tuple(score.shape)}")
    g = score.reshape(*lead, d // 4, 4).float()
    order = torch.sort(-g, dim=-1, stable=True).indices[..., :2]
    mask = torch.zeros_like(g, dtype=torch.bool)
    mask.scatter_(-1, order, True)
    return mask.reshape(score.shape)


def top2_mask(score: torch.Tensor, *, use_triton: bool | None = None) -> torch.Tensor:
    """The 2:4 mask of `score` (..., d), d % 4 == 0: True at the 2 largest entries of every group of 4.

    Same result on every path as `top2_mask_reference` (ties to the lower column, NaN ranks below
    every number). The Triton kernel serves floating-point scores where `triton_switch.use_triton`
    says so (CUDA tensors; CPU tensors under Triton's interpreter with use_triton=True or
    ARMOR_TRITON=1); everything else gets the reference.
    """
    if triton_switch.use_triton(score, use_triton=use_triton) and score.is_floating_point():
        return top2_mask_triton(score)
    return top2_mask_reference(score)


@jit
def _top2_kernel(Sc, Out, n_groups, BLOCK: tl.constexpr):
    """BLOCK groups of 4 per program, loaded as a coalesced [BLOCK, 4] tile.

    Entry i is kept iff fewer than 2 entries j of its group beat it, where j beats i when
    x_j > x_i, or x_j == x_i and j < i (ties to the lower column), and NaN ranks below every
    number (NaNs among themselves by column): exactly `torch.sort(-x, stable=True)`'s order.
    """
    rg = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    c4 = tl.arange(0, 4)
    offs = rg[:, None] * 4 + c4[None, :]
    m = rg[:, None] < n_groups
    x = tl.load(Sc + offs, mask=m, other=0.0).to(tl.float32)
    x_nan = x != x
    cnt = tl.zeros([BLOCK, 4], dtype=tl.int32)
    for j in tl.static_range(4):
        xj = tl.sum(tl.where(c4[None, :] == j, x, 0.0), axis=1)[:, None]   # column j, [BLOCK, 1]
        j_nan = xj != xj
        lower = j < c4[None, :]
        beats = (xj > x) | ((xj == x) & lower) | (x_nan & (j_nan == 0)) | (x_nan & j_nan & lower)
        cnt += beats.to(tl.int32)
    tl.store(Out + offs, cnt < 2, mask=m)


def top2_mask_triton(score: torch.Tensor) -> torch.Tensor:
    """The Triton path of `top2_mask` (no dispatch): fp32/fp16/bf16 read as they are, other floats as fp32."""
    *lead, d = score.shape
    if d % 4:
        raise InputError(f"score: last dimension must be divisible by 4, got shape {tuple(score.shape)}")
    x = score if score.dtype in (torch.float32, torch.float16, torch.bfloat16) else score.float()
    x = x.contiguous()
    out = torch.empty(score.shape, dtype=torch.bool, device=score.device)
    n_groups = x.numel() // 4
    if n_groups:
        BLOCK = 256
        _top2_kernel[(triton.cdiv(n_groups, BLOCK),)](x, out, n_groups, BLOCK=BLOCK, num_warps=4)
    return out
