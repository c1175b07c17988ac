"""Every pruned layer in the fused kernels' layout: 128-blocks, dimensions multiples of 128.

The kernels of csrc/ take A' and B' as 128 × 128 diagonal blocks and d_out, d_in multiples of 128. A
layer with other blocks or sizes runs on them through exactly equivalent operands, built once (at
`prepare_fused`), per side of the layer (output: A', the rows of S; input: B', the columns of S and x):

- "native": b = 128 and d a multiple of 128: the layer's own tensors, nothing copied.
- "expand": b divides 128: 128/b consecutive b-blocks form one 128-block (block-diagonal inside it,
  zeros elsewhere), and d is zero-padded to the next multiple of 128 (the last 128-block holds the
  remaining b-blocks and zeros). Positions do not move: x is padded at the end, y sliced.
- "spread": b < 128 does not divide 128 (the block-size rule gives 96 for SmolLM2's 576 and 192): each
  b-block gets a 128-block of its own, zeros after it. Position p moves to (p // b)·128 + p % b; x is
  scattered into that layout and y gathered back.

Zeros multiply zeros in the padding: the sparse tensor cores see S's padded rows and columns as zero
groups (still 2:4: b is a multiple of 4 on the input side, so no group of 4 straddles a block), x's
padded columns are zero, and y's padded rows are dropped. The result is the layer's, exactly, up to the
order in which the kernels add terms. The price is work on zeros: the sparse GEMM's FLOPs grow by
(D_out·D_in)/(d_out·d_in) (`LayerLayout.flop_ratio`; SmolLM2's 576 × 576 at b = 96: 768²/576² = 1.78,
at b = 64 or 32: 640²/576² = 1.23). Blocks wider than 128 cannot be split into 128-blocks: refused, with
the reason (`layer_layout` returns it).

The dense identity blocks that let `Sparse24Linear` (a baseline's plain 2:4 weight) run the same
kernels are `identity_blocks`: A' = B' = I, the epilogue and the B' GEMM then cost 256/d_in and
256/d_out of the sparse GEMM's FLOPs.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

KERNEL_BLOCK = 128  # csrc/armor_cuda.h's ARMOR_SM90_BLOCK, mirrored so a layout is planned without the extension
MAX_DIM = 2 ** 31 - KERNEL_BLOCK  # the kernels' GEMM extents are 32-bit (armor_sm90_supported)


class Side(NamedTuple):
    """How one dimension of a layer (size d, blocks of b) maps into the kernels' layout (size `padded`)."""
    d: int
    b: int
    padded: int
    kind: str  # "native", "expand" or "spread" (module docstring)

    def index(self, device=None) -> torch.Tensor:
        """The positions of the layer's d entries in the padded layout."""
        p = torch.arange(self.d, device=device)
        return p // self.b * KERNEL_BLOCK + p % self.b if self.kind == "spread" else p

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) in the padded layout (..., padded), zeros in the padding."""
        if self.kind == "native":
            return x
        if self.kind == "expand":
            return F.pad(x, (0, self.padded - self.d))
        x = x.reshape(*x.shape[:-1], self.d // self.b, self.b)
        return F.pad(x, (0, KERNEL_BLOCK - self.b)).reshape(*x.shape[:-2], self.padded)

    def unpad(self, y: torch.Tensor) -> torch.Tensor:
        """The inverse of `pad` on the last dimension: (..., padded) -> (..., d)."""
        if self.kind == "native":
            return y
        if self.kind == "expand":
            return y[..., :self.d]
        y = y.reshape(*y.shape[:-1], self.d // self.b, KERNEL_BLOCK)[..., :self.b]
        return y.reshape(*y.shape[:-2], self.d)

    def blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """The layer's diagonal blocks (d/b, b, b) as the kernels' 128-blocks (padded/128, 128, 128)."""
        if self.kind == "native":
            return blocks
        n = self.padded // KERNEL_BLOCK
        out = blocks.new_zeros(n, KERNEL_BLOCK, KERNEL_BLOCK)
        if self.kind == "spread":
            out[: self.d // self.b, : self.b, : self.b] = blocks
            return out
        per = KERNEL_BLOCK // self.b  # b-blocks per 128-block; the last 128-block may hold fewer
        full = torch.zeros(n * per, self.b, self.b, dtype=blocks.dtype, device=blocks.device)
        full[: blocks.shape[0]] = blocks
        full = full.reshape(n, per, self.b, self.b)
        for k in range(per):  # per ≤ 32 copies of n blocks each: a one-time cost at prepare_fused
            sl = slice(k * self.b, (k + 1) * self.b)
            out[:, sl, sl] = full[:, k]
        return out


def side(d: int, b: int, name: str) -> Side | str:
    """The Side of a dimension d with blocks of b, or why the kernels cannot take it."""
    if b < 1 or d % b:
        return f"{name}={d} is not a multiple of its block size {b}"
    if b > KERNEL_BLOCK:
        return f"{name} blocks of {b}: wider than the kernels' {KERNEL_BLOCK}-blocks, they cannot be split into them"
    if b == KERNEL_BLOCK or KERNEL_BLOCK % b == 0:
        padded = -(-d // KERNEL_BLOCK) * KERNEL_BLOCK
        kind = "native" if padded == d and b == KERNEL_BLOCK else "expand"
    else:
        padded, kind = d // b * KERNEL_BLOCK, "spread"
    if padded > MAX_DIM:
        return f"{name}={d} padded to {padded}: beyond the kernels' 32-bit extents"
    return Side(d, b, padded, kind)


class LayerLayout(NamedTuple):
    """Both sides of a layer: out (d_out, A', S's rows) and in_ (d_in, B', S's columns, x)."""
    out: Side
    in_: Side

    @property
    def native(self) -> bool:
        return self.out.kind == self.in_.kind == "native"

    @property
    def flop_ratio(self) -> float:
        """The sparse GEMM's work in this layout over the layer's: (D_out·D_in) / (d_out·d_in)."""
        return self.out.padded * self.in_.padded / (self.out.d * self.in_.d)

    def describe(self) -> str:
        """One phrase for tables and messages, e.g. "spread 576->768 (b 96) x expand 576->640 (b 64)"."""
        def one(s: Side) -> str:
            return "native" if s.kind == "native" else f"{s.kind} {s.d}->{s.padded} (b {s.b})"
        if self.native:
            return "native"
        return f"{one(self.out)} x {one(self.in_)}, sparse GEMM FLOPs x{self.flop_ratio:.2f}"


def layer_layout(d_out: int, d_in: int, block_A: int, block_B: int) -> LayerLayout | str:
    """The kernels' layout of a (d_out, d_in) layer with blocks (block_A, block_B), or why there is none."""
    out, in_ = side(d_out, block_A, "d_out"), side(d_in, block_B, "d_in")
    if isinstance(in_, Side) and in_.b % 4:
        in_ = f"d_in blocks of {block_B}: not a multiple of 4, a 2:4 group would straddle two blocks"
    for s in (out, in_):
        if isinstance(s, str):
            return s
    return LayerLayout(out, in_)


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
