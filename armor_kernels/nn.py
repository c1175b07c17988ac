"""The pruned linear layers: drop-in replacements for nn.Linear.

ArmorLinear      Ŵ = A' · S · B' (r, c folded in); y = ((x B'ᵀ) Sᵀ) A'ᵀ + bias. S is kept either dense
                 (with its zeros) or packed in the portable 2:4 form of `sparse24` (kept values + 2-bit
                 positions); `pack()` converts once.
Sparse24Linear   a baseline's 2:4 weight, packed the same way (9/16 of the dense bf16 bytes).

Both store, besides their tensors, an empty uint8 `weight` (shape (0,)): a checkpoint of them has a tensor
under every pruned linear's `.weight` name whose shape cannot match nn.Linear's, so a loader that does
not know the format (transformers without this package's plugin) fails loudly instead of building
random weights.

Speed where the fused kernels do not run (CPU, other GPUs, fp32): `materialize()` keeps the dense
product Ŵ (or the unpacked 2:4 weight) in the compute dtype beside the stored form and the forward is
one F.linear: as fast as the dense model, at the dense model's memory (docs/DESIGN.md §5). The stored
(saved) form stays packed; `prepare_fused()` (on an sm_90 GPU, after the move to it) builds the layer's
operands in the kernels' layout (`ops.fused_operands`: any blocks 4…128 and sizes, padded exactly, see
layout.py; for Sparse24Linear with identity A' and B') and drops the dense copy. Those operands are the
layer's own tensors where it is already in that layout, else padded copies beside them; they are
device-specific and never saved: after another move the layer runs the reference until prepare_fused
runs again.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .factors import ArmorFactors, block_right
from .layout import identity_block, identity_blocks
from .sparse24 import check_24, check_packed_24, pack_24, unpack_24


class ArmorLinear(nn.Module):
    def __init__(self, A: torch.Tensor, S: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        d_out, d_in = S.shape
        if A.dim() != 3 or A.shape[0] * A.shape[1] != d_out or A.shape[1] != A.shape[2]:
            raise ValueError(f"A: expected (d_out/bA, bA, bA) blocks with d_out={d_out}, got {tuple(A.shape)}")
        if B.dim() != 3 or B.shape[0] * B.shape[1] != d_in or B.shape[1] != B.shape[2]:
            raise ValueError(f"B: expected (d_in/bB, bB, bB) blocks with d_in={d_in}, got {tuple(B.shape)}")
        if bias is not None and bias.shape != (d_out,):
            raise ValueError(f"bias: expected shape ({d_out},), got {tuple(bias.shape)}")
        check_24(S)
        self.in_features, self.out_features = d_in, d_out
        # row-major whatever the caller's strides: the forward's matmuls (and so its rounding) then depend on
        # the values alone, as they do for a layer rebuilt from its bytes (loaded, or received from a rank)
        self.register_buffer("A", A.contiguous())
        self.register_buffer("B", B.contiguous())
        self.register_buffer("S", S.contiguous())
        self.register_buffer("S_values", None)
        self.register_buffer("S_idx", None)
        _add_marker_and_dense(self, A.device)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_packed(cls, A: torch.Tensor, values: torch.Tensor, idx: torch.Tensor, B: torch.Tensor,
                    bias: torch.Tensor | None = None) -> ArmorLinear:
        """A packed layer from stored tensors (S in the portable form of `sparse24`)."""
        check_packed_24(values, idx)
        mod = cls(A, torch.zeros(values.shape[0], 2 * values.shape[1], dtype=values.dtype, device="meta"), B, bias)
        mod.S, mod.S_values, mod.S_idx = None, values, idx
        return mod

    @classmethod
    def empty(cls, d_out: int, d_in: int, block: tuple[int, int], bias: bool, dtype: torch.dtype,
              device=None) -> ArmorLinear:
        """A packed layer of the right shapes with uninitialised tensors, for a loader to fill in."""
        (bA, bB), kw = block, {"dtype": dtype, "device": device}
        for name, d, b in (("d_out", d_out, bA), ("d_in", d_in, bB)):
            if b < 1 or d % b:
                raise ValueError(f"block: {name}={d} is not a multiple of its block size {b}")
        return cls.from_packed(torch.empty(d_out // bA, bA, bA, **kw), torch.empty(d_out, d_in // 2, **kw),
                               torch.empty(d_out, d_in // 8, dtype=torch.uint8, device=device),
                               torch.empty(d_in // bB, bB, bB, **kw), torch.empty(d_out, **kw) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, factors: ArmorFactors, dtype: torch.dtype | None = None) -> ArmorLinear:
        """Build from the layer's factors; r and c are folded into A and B. dtype: the linear's by default."""
        if (linear.out_features, linear.in_features) != tuple(factors.S.shape):
            raise ValueError(
                f"factors: S has shape {tuple(factors.S.shape)}, linear is "
                f"({linear.out_features}, {linear.in_features})"
            )
        dtype = dtype or linear.weight.dtype
        dev = linear.weight.device
        A, S, B = (t.to(dev, dtype) for t in factors.folded())
        bias = linear.bias.detach().to(dtype) if linear.bias is not None else None
        return cls(A, S, B, bias)

    @property
    def packed(self) -> bool:
        return self.S is None

    def pack(self) -> ArmorLinear:
        """Replace dense S by its packed 2:4 form (once, at load or export time)."""
        if not self.packed:
            self.S_values, self.S_idx = pack_24(self.S)
            self.S = None
        return self

    def sparse_core(self) -> torch.Tensor:
        return unpack_24(self.S_values, self.S_idx) if self.packed else self.S

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight Ŵ = A' S B' (d_out, d_in), computed in float32, returned in `dtype`
        (default: the module's)."""
        W = block_right(self.sparse_core().float(), self.B.float())
        nA, bA, _ = self.A.shape
        W = torch.bmm(self.A.float(), W.reshape(nA, bA, -1)).reshape(W.shape)
        return W.to(dtype or self.A.dtype)

    def materialize(self, dtype: torch.dtype | None = None) -> ArmorLinear:
        """Keep Ŵ in `dtype` (default: the module's) for a one-matmul forward on inputs of that dtype
        (see the module docstring)."""
        self.dense_weight = self.to_dense(dtype)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last dimension {self.in_features}, got shape {tuple(x.shape)}")
        if self.dense_weight is not None and self.dense_weight.dtype == x.dtype:
            return F.linear(x, self.dense_weight, None if self.bias is None else self.bias.to(x.dtype))
        if _runs_fused(self, x):
            return ops.fused_linear(x, self.fused)
        S, S_idx = (self.S_values, self.S_idx) if self.packed else (self.S, None)
        return ops.linear(x, self.A.to(x.dtype), S.to(x.dtype), self.B.to(x.dtype),
                          None if self.bias is None else self.bias.to(x.dtype), S_idx=S_idx)

    def prepare_fused(self) -> bool:
        """Make the layer run the fused kernels if they apply (sm_90, bf16/fp16, blocks up to 128): S packed
        (read by the decode kernels, up to 16 tokens) and compressed once into the sparse GEMM's layout."""
        self.pack()
        return _prepare_fused(self, self.A, self.B)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block=({self.A.shape[1]}, {self.B.shape[1]}), packed={self.packed}, bias={self.bias is not None}")


class Sparse24Linear(nn.Module):
    """A 2:4 weight in the portable packed form (kept values + 2-bit positions) and an optional bias."""

    def __init__(self, values: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        d_out, d_in = values.shape[0], values.shape[1] * 2
        check_packed_24(values, idx)
        if bias is not None and bias.shape != (d_out,):
            raise ValueError(f"bias: expected shape ({d_out},), got {tuple(bias.shape)}")
        self.in_features, self.out_features = d_in, d_out
        self.register_buffer("S_values", values)
        self.register_buffer("S_idx", idx)
        _add_marker_and_dense(self, values.device)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Sparse24Linear:
        """Pack a dense 2:4 weight (d_out, d_in); values keep the weight's dtype."""
        return cls(*pack_24(weight.detach()), None if bias is None else bias.detach().to(weight.dtype))

    @classmethod
    def empty(cls, d_out: int, d_in: int, bias: bool, dtype: torch.dtype, device=None) -> Sparse24Linear:
        """A layer of the right shapes with uninitialised tensors, for a loader to fill in."""
        kw = {"dtype": dtype, "device": device}
        return cls(torch.empty(d_out, d_in // 2, **kw), torch.empty(d_out, d_in // 8, dtype=torch.uint8, device=device),
                   torch.empty(d_out, **kw) if bias else None)

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense 2:4 weight (d_out, d_in) in `dtype` (default: the stored values')."""
        return unpack_24(self.S_values, self.S_idx).to(dtype or self.S_values.dtype)

    def materialize(self, dtype: torch.dtype | None = None) -> Sparse24Linear:
        self.dense_weight = self.to_dense(dtype)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last dimension {self.in_features}, got shape {tuple(x.shape)}")
        if _runs_fused(self, x) and (self.dense_weight is None or self.dense_weight.dtype != x.dtype):
            return ops.fused_linear(x, self.fused)
        W = self.dense_weight if self.dense_weight is not None and self.dense_weight.dtype == x.dtype \
            else self.to_dense(x.dtype)
        return F.linear(x, W, None if self.bias is None else self.bias.to(x.dtype))

    def prepare_fused(self) -> bool:
        """Make the layer run the fused kernels if they apply (sm_90, bf16/fp16): the 2:4 sparse GEMM with
        identity A' and B' (layout.identity_blocks)."""
        kw = {"dtype": self.S_values.dtype, "device": self.S_values.device}
        return _prepare_fused(self, identity_blocks(self.out_features, **kw), identity_blocks(self.in_features, **kw))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


PRUNED_LINEARS = (ArmorLinear, Sparse24Linear)


def _add_marker_and_dense(mod: nn.Module, device) -> None:
    """The empty `weight` marker (saved; see the module docstring), the dense copy and the fused
    operands (never saved)."""
    mod.register_buffer("weight", torch.empty(0, dtype=torch.uint8, device=device))
    mod.register_buffer("dense_weight", None, persistent=False)
    mod.fused = None  # ops.FusedOperands, set by prepare_fused


def _prepare_fused(mod: nn.Module, A: torch.Tensor, B: torch.Tensor) -> bool:
    """Both layers' prepare_fused once their A' and B' are known: the layer in the kernels' layout."""
    values = mod.S_values
    if not ops.fused_supported(values.device, values.dtype, mod.out_features, mod.in_features, A.shape[1], B.shape[1]):
        return False
    mod.fused = ops.fused_operands(A, values, mod.S_idx, B, mod.bias)
    mod.dense_weight = None  # the fused kernels read the operands just built
    return True


def _runs_fused(mod: nn.Module, x: torch.Tensor) -> bool:
    """Whether the operands prepare_fused built apply to x (not after a move to another device or dtype)."""
    f = mod.fused
    return f is not None and f.A.dtype == x.dtype and f.A.device == x.device


def materialize(model: nn.Module) -> int:
    """`materialize()` on every pruned linear of a model, each in its own dtype; returns how many."""
    mods = [m for m in model.modules() if isinstance(m, PRUNED_LINEARS)]
    for m in mods:
        m.materialize()
    return len(mods)


def prepare_fused(model: nn.Module) -> int:
    """Call `prepare_fused()` on every pruned linear of a model (after moving it to its GPU, once);
    returns how many layers will run the fused kernels (the rest keep their dense copy, or run the
    reference where they have none; `unfused_reasons` says why)."""
    return sum(m.prepare_fused() for m in model.modules() if isinstance(m, PRUNED_LINEARS))


def unfused_reasons(model: nn.Module) -> dict[str, str]:
    """name -> why that pruned linear does not run the fused kernels, for every one prepare_fused did not
    switch over (empty when all run them)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, PRUNED_LINEARS) and m.fused is None:
            blocks = (m.A.shape[1], m.B.shape[1]) if isinstance(m, ArmorLinear) else (
                identity_block(m.out_features), identity_block(m.in_features))
            core = m.S_values if m.S_values is not None else m.S
            out[name] = (ops.fused_unavailable_reason(core.device, core.dtype, m.out_features, m.in_features, *blocks)
                         or "prepare_fused() has not run on it where it is now")
    return out
