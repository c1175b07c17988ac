"""ArmorLinear: a drop-in replacement for nn.Linear holding Ŵ = A' · S · B' (r, c folded in).

forward: y = ((x B'ᵀ) Sᵀ) A'ᵀ + bias. S is kept either dense (with its zeros) or packed in the
portable 2:4 form of `sparse24` (kept values + 2-bit positions); `pack()` converts once.
"""
from __future__ import annotations

import torch
from torch import nn

from . import ops
from .factors import ArmorFactors, block_right
from .sparse24 import check_24, pack_24, unpack_24


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
        self.register_buffer("A", A)
        self.register_buffer("B", B)
        self.register_buffer("S", S)
        self.register_buffer("S_values", None)
        self.register_buffer("S_idx", None)
        # S in the fused kernels' device-specific layout (prepare_fused); rebuilt at load, never saved.
        self.register_buffer("sm90_values", None, persistent=False)
        self.register_buffer("sm90_meta", None, persistent=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, factors: ArmorFactors, dtype: torch.dtype | None = None) -> "ArmorLinear":
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

    def pack(self) -> "ArmorLinear":
        """Replace dense S by its packed 2:4 form (once, at load or export time)."""
        if not self.packed:
            self.S_values, self.S_idx = pack_24(self.S)
            self.S = None
        return self

    def sparse_core(self) -> torch.Tensor:
        return unpack_24(self.S_values, self.S_idx) if self.packed else self.S

    def to_dense(self) -> torch.Tensor:
        """The dense weight Ŵ = A' S B' (d_out, d_in), in the module's dtype."""
        W = block_right(self.sparse_core().float(), self.B.float())
        nA, bA, _ = self.A.shape
        W = torch.bmm(self.A.float(), W.reshape(nA, bA, -1)).reshape(W.shape)
        return W.to(self.A.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last dimension {self.in_features}, got shape {tuple(x.shape)}")
        # torch.ops.armor.linear: the fused Hopper kernels when prepare_fused() ran, the reference otherwise.
        S, S_idx = (self.S_values, self.S_idx) if self.packed else (self.S, None)
        fused = self.sm90_values is not None and self.sm90_values.dtype == x.dtype
        return ops.linear(x, self.A.to(x.dtype), S.to(x.dtype), self.B.to(x.dtype),
                          None if self.bias is None else self.bias.to(x.dtype), S_idx=S_idx,
                          sm90=ops.Sm90Packed(self.sm90_values, self.sm90_meta) if fused else None)

    def prepare_fused(self) -> bool:
        """Make the layer run the fused kernels if they apply (sm_90, bf16/fp16, 128-blocks): S packed (read
        by the decode kernels, up to 16 tokens) and compressed once into the sparse GEMM's layout."""
        if not ops.fused_supported(self.A.device, self.A.dtype, self.out_features, self.in_features,
                                   self.A.shape[1], self.B.shape[1]):
            return False
        self.pack()
        self.sm90_values, self.sm90_meta = ops.pack_sm90(self.sparse_core().to(self.A.dtype))
        return True

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block=({self.A.shape[1]}, {self.B.shape[1]}), packed={self.packed}, bias={self.bias is not None}")


def prepare_fused(model: nn.Module) -> int:
    """Call `prepare_fused()` on every ArmorLinear of a model (after moving it to its GPU, once);
    returns how many layers will run the fused kernels (the rest run the reference)."""
    return sum(m.prepare_fused() for m in model.modules() if isinstance(m, ArmorLinear))
