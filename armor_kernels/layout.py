"""Every pruned layer in the fused kernels' layout: 128-blocks, dimensions multiples of 128.

The kernels of csrc/ take A' and B' as 128 × 128 diagonal blocks and d_out, d_in multiples of 128. A
layer with other blocks or sizes runs on them through exactly equivalent operands, built once (at
`prepare`), per side of the layer (output: A', the rows of S; input: B', the columns of S and x):

- "native": b = 128: the layer's own tensors, nothing copied.
- "packed": b < 128: k = ⌊128/b⌋ consecutive b-blocks share one 128-block, on its diagonal (zeros off
  them, and after them when k·b < 128), the last 128-block holding what is left. Block j of the layer is
  slot j mod k of 128-block ⌊j/k⌋, so position p = j·b + i moves to ⌊j/k⌋·128 + (j mod k)·b + i: x is
  scattered into that layout (zeros elsewhere) and y gathered back. Where b divides 128 (the 4…64 the
  parameter budget picks, k·b = 128) positions do not move and d is just zero-padded at the end.

Zeros multiply zeros in the padding: the sparse tensor cores see S's padded rows and columns as zero
groups (still 2:4: b is a multiple of 4 on the input side, so no group of 4 straddles a block), x's
padded columns are zero, and y's padded rows are dropped. The result is the layer's, exactly, up to the
order in which the kernels add terms. The price is work on zeros: the sparse GEMM's FLOPs grow by
(D_out·D_in)/(d_out·d_in) (`LayerLayout.flop_ratio`): SmolLM2's 576 × 576 at b = 96 (k = 1) 768²/576² =
1.78; at b = 64, 32 or 12 (k = 10) 640²/576² = 1.23. A layout at or above MAX_FLOP_RATIO is refused, as
are blocks wider than 128 (they cannot be split into 128-blocks); `layer_layout` returns the reason.

The dense identity blocks that let `Sparse24Linear` (a baseline's plain 2:4 weight) run the same
kernels are `identity_blocks`: A' = B' = I, the epilogue and the B' GEMM then cost 256/d_in and
256/d_out of the sparse GEMM's FLOPs.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

KERNEL_BLOCK = 128  # csrc/armor_cuda.h's ARMOR_SM90_BLOCK, mirrored so a layout is planned without the extension
MAX_DIM = 2 ** 31 - KERNEL_BLOCK  # the kernels' GEMM extents are 32-bit (armor_sm90_supported)
# The 2:4 GEMM does half a dense GEMM's multiply-adds: a layout that pads it to twice the layer's work or
# more does at least the dense copy's, so it cannot be faster than the one matmul the layer keeps.
MAX_FLOP_RATIO = 2.0


class Side(NamedTuple):
    """How one dimension of a layer (size d, blocks of b) maps into the kernels' layout (size `padded`)."""
    d: int
    b: int
    padded: int
    k: int  # b-blocks per 128-block

    @property
    def native(self) -> bool:
        return self.b == KERNEL_BLOCK

    @property
    def groups(self) -> int:
        return self.padded // KERNEL_BLOCK

    def index(self, device=None) -> torch.Tensor:
        """The positions of the layer's d entries in the padded layout."""
        p = torch.arange(self.d, device=device)
        j = p // self.b
        return j // self.k * KERNEL_BLOCK + j % self.k * self.b + p % self.b

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) in the padded layout (..., padded), zeros in the padding."""
        if self.native:
            return x
        lead, n = x.shape[:-1], self.d // self.b
        x = x.reshape(*lead, n, self.b)
        x = torch.nn.functional.pad(x, (0, 0, 0, self.groups * self.k - n)).reshape(*lead, self.groups, -1)
        return torch.nn.functional.pad(x, (0, KERNEL_BLOCK - self.k * self.b)).reshape(*lead, self.padded)

    def unpad(self, y: torch.Tensor) -> torch.Tensor:
        """The inverse of `pad` on the last dimension: (..., padded) -> (..., d)."""
        if self.native:
            return y
        lead = y.shape[:-1]
        y = y.reshape(*lead, self.groups, KERNEL_BLOCK)[..., : self.k * self.b]
        return y.reshape(*lead, self.groups * self.k * self.b)[..., : self.d]

    def blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """The layer's diagonal blocks (d/b, b, b) as the kernels' 128-blocks (padded/128, 128, 128)."""
        if self.native:
            return blocks
        full = blocks.new_zeros(self.groups * self.k, self.b, self.b)
        full[: blocks.shape[0]] = blocks
        full = full.reshape(self.groups, self.k, self.b, self.b)
        out = blocks.new_zeros(self.groups, KERNEL_BLOCK, KERNEL_BLOCK)
        for s in range(self.k):  # k ≤ 32 copies of padded/128 blocks each: a one-time cost at prepare
            sl = slice(s * self.b, (s + 1) * self.b)
            out[:, sl, sl] = full[:, s]
        return out

    def describe(self) -> str:
        return "native" if self.native else f"{self.d}->{self.padded} ({self.k}x{self.b} per 128)"


def side(d: int, b: int, name: str) -> Side | str:
    """The Side of a dimension d with blocks of b, or why the kernels cannot take it."""
    if b < 1 or d % b:
        return f"{name}={d} is not a multiple of its block size {b}"
    if b > KERNEL_BLOCK:
        return f"{name} blocks of {b}: wider than the kernels' {KERNEL_BLOCK}-blocks, they cannot be split into them"
    k = KERNEL_BLOCK // b
    padded = -(-(d // b) // k) * KERNEL_BLOCK
    if padded > MAX_DIM:
        return f"{name}={d} padded to {padded}: beyond the kernels' 32-bit extents"
    return Side(d, b, padded, k)


class LayerLayout(NamedTuple):
    """Both sides of a layer: out (d_out, A', S's rows) and in_ (d_in, B', S's columns, x)."""
    out: Side
    in_: Side

    @property
    def native(self) -> bool:
        return self.out.native and self.in_.native

    @property
    def flop_ratio(self) -> float:
        """The sparse GEMM's work in this layout over the layer's: (D_out·D_in) / (d_out·d_in)."""
        return self.out.padded * self.in_.padded / (self.out.d * self.in_.d)

    def describe(self) -> str:
        """One phrase for tables and messages, e.g. "576->768 (1x96 per 128) x native, sparse GEMM FLOPs x1.33"."""
        if self.native:
            return "native"
        return f"{self.out.describe()} x {self.in_.describe()}, sparse GEMM FLOPs x{self.flop_ratio:.2f}"


def layer_layout(d_out: int, d_in: int, block_A: int, block_B: int) -> LayerLayout | str:
    """The kernels' layout of a (d_out, d_in) layer with blocks (block_A, block_B), or why there is none."""
    out, in_ = side(d_out, block_A, "d_out"), side(d_in, block_B, "d_in")
    if isinstance(in_, Side) and in_.b % 4:
        in_ = f"d_in blocks of {block_B}: not a multiple of 4, a 2:4 group would straddle two blocks"
    for s in (out, in_):
        if isinstance(s, str):
            return s
    layout = LayerLayout(out, in_)
    if layout.flop_ratio >= MAX_FLOP_RATIO:
        return (f"blocks ({block_A}, {block_B}) of a ({d_out}, {d_in}) layer: padded to the kernels' layout "
                f"({layout.describe()}) the sparse GEMM does at least the dense layer's work")
    return layout


def identity_block(d: int) -> int:
    """The block size of a plain 2:4 layer's identity A' or B' on a dimension d: gcd(d, 128), which
    divides 128, so `side` maps it onto 128-blocks for any d (expanded, zero-padded)."""
    return math.gcd(d, KERNEL_BLOCK)


def identity_blocks(d: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """(d/b, b, b) identity blocks, b = identity_block(d)."""
    b = identity_block(d)
    return torch.eye(b, dtype=dtype, device=device).expand(d // b, b, b).contiguous()


class FusedOperands(NamedTuple):
    """A layer's operands in the kernels' layout, as `fused_operands` builds them: what they read."""
    layout: LayerLayout
    A: torch.Tensor                  # (D_out/128, 128, 128)
    S_values: torch.Tensor           # (D_out, D_in/2), the portable packed S (decode kernels)
    S_idx: torch.Tensor              # (D_out, D_in/8) uint8
    B: torch.Tensor                  # (D_in/128, 128, 128)
    bias: torch.Tensor | None        # (D_out,)
    sm90: tuple | None               # ops.Sm90Packed of the padded S (sparse GEMM), None where not compressed


def pad_core(layout: LayerLayout, S: torch.Tensor) -> torch.Tensor:
    """Dense S (d_out, d_in) in the padded layout (D_out, D_in), zeros elsewhere (still 2:4)."""
    if layout.native:
        return S
    out = S.new_zeros(layout.out.padded, layout.in_.padded)
    out[layout.out.index(S.device)[:, None], layout.in_.index(S.device)[None, :]] = S
    return out
