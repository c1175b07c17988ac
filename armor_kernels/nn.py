"""The pruned linear layers: drop-in replacements for nn.Linear.

ArmorLinear      Ŵ = A' · S · B' (r, c folded in); y = ((x B'ᵀ) Sᵀ) A'ᵀ + bias. S is kept either dense
                 (with its zeros) or packed in the portable 2:4 form of `sparse24` (kept values + 2-bit
                 positions); `pack()` converts once.
Sparse24Linear   a baseline's 2:4 weight, packed the same way (9/16 of the dense bf16 bytes).

Both store, besides their tensors, an empty uint8 `weight` (shape (0,)): a checkpoint of them has a tensor
under every pruned linear's `.weight` name whose shape cannot match nn.Linear's, so a loader that does
not know the format (transformers without this package's plugin) fails loudly instead of building
random weights.

How a layer runs: `prepare()` (one layer) or `prepare(model)` (every pruned layer; `from_pretrained` runs
it, and a user runs it again after moving the model to another device) picks, on the layer's device, the
first path of PATHS that applies and returns its name:
- "fused": the fused Hopper kernels (sm_90, the CUDA extension built, bf16/fp16, blocks up to 128): the
  layer's operands in the kernels' layout (`ops.fused_operands`: any blocks 4…128 and sizes, padded
  exactly, see layout.py; Sparse24Linear with identity A' and B');
- "dense" (only with keep_dense=True): the dense product Ŵ (or the unpacked 2:4 weight) kept beside the
  packed form, one F.linear per call: dense prefill speed at the dense model's memory and more;
- "semi_structured": other CUDA GPUs with 2:4 tensor cores (sm_80 and later, bf16/fp16): S on torch's
  semi-structured sparse matmul, B' and A' as block matmuls (semi_structured.py);
- "cpu_packed": the CPU with the C++ extension: the op's packed CPU kernels ("cpu_sparse", or "cpu_gemm"
  where it multiplies less; ops.py);
- "reference": the PyTorch reference, from the packed form.
Nothing but the packed form is kept by default: the layer holds its stored bytes plus, for "fused" and
"semi_structured", S once more in the device's compressed layout. The operands prepare builds are
device-specific and never saved; after a move to another device or dtype the layer runs the op (the
CPU kernels or the reference) until prepare runs again. A layer nobody prepared (as the pruning pipeline
builds and calibrates them) runs the reference: the arithmetic every pruning run was made with.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops, semi_structured
from .errors import InputError
from .factors import ArmorFactors, block_right
from .layout import identity_block, identity_blocks
from .sparse24 import check_24, check_packed_24, pack_24, unpack_24

PATHS = ("fused", "dense", "semi_structured", "cpu_packed", "reference")


class ArmorLinear(nn.Module):
    def __init__(self, A: torch.Tensor, S: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        d_out, d_in = S.shape
        if A.dim() != 3 or A.shape[0] * A.shape[1] != d_out or A.shape[1] != A.shape[2]:
            raise InputError(f"A: expected (d_out/bA, bA, bA) blocks with d_out={d_out}, got {tuple(A.shape)}")
        if B.dim() != 3 or B.shape[0] * B.shape[1] != d_in or B.shape[1] != B.shape[2]:
            raise InputError(f"B: expected (d_in/bB, bB, bB) blocks with d_in={d_in}, got {tuple(B.shape)}")
        if bias is not None and bias.shape != (d_out,):
            raise InputError(f"bias: expected shape ({d_out},), got {tuple(bias.shape)}")
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
                raise InputError(f"block: {name}={d} is not a multiple of its block size {b}")
        return cls.from_packed(torch.empty(d_out // bA, bA, bA, **kw), torch.empty(d_out, d_in // 2, **kw),
                               torch.empty(d_out, d_in // 8, dtype=torch.uint8, device=device),
                               torch.empty(d_in // bB, bB, bB, **kw), torch.empty(d_out, **kw) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, factors: ArmorFactors, dtype: torch.dtype | None = None) -> ArmorLinear:
        """Build from the layer's factors; r and c are folded into A and B. dtype: the linear's by default."""
        if (linear.out_features, linear.in_features) != tuple(factors.S.shape):
            raise InputError(
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
        (the "dense" path of the module docstring)."""
        self.dense_weight = self.to_dense(dtype)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise InputError(f"x: expected last dimension {self.in_features}, got shape {tuple(x.shape)}")
        y = _prepared_forward(self, x, self.A, self.B)
        if y is not None:
            return y
        S, S_idx = (self.S_values, self.S_idx) if self.packed else (self.S, None)
        return ops.linear(x, self.A.to(x.dtype), S.to(x.dtype), self.B.to(x.dtype),
                          None if self.bias is None else self.bias.to(x.dtype), S_idx=S_idx, backend=_backend(self))

    def prepare(self, keep_dense: bool = False) -> str:
        """Pick the fastest path on the layer's device (module docstring; S packed first); returns its name."""
        self.pack()
        return _prepare(self, self.A, self.B, keep_dense)

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
            raise InputError(f"bias: expected shape ({d_out},), got {tuple(bias.shape)}")
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
            raise InputError(f"x: expected last dimension {self.in_features}, got shape {tuple(x.shape)}")
        y = _prepared_forward(self, x, None, None)
        if y is not None:
            return y
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.path is None:  # never prepared: the dense 2:4 weight, one matmul (module docstring)
            return F.linear(x, self.to_dense(x.dtype), bias)
        return ops.linear(x, None, self.S_values.to(x.dtype), None, bias, S_idx=self.S_idx, backend=_backend(self))

    def prepare(self, keep_dense: bool = False) -> str:
        """Pick the fastest path on the layer's device (module docstring): no wrappers, except the identity
        A' and B' (layout.identity_blocks) the fused kernels take; returns the path's name."""
        kw = {"dtype": self.S_values.dtype, "device": self.S_values.device}
        return _prepare(self, lambda: identity_blocks(self.out_features, **kw),
                        lambda: identity_blocks(self.in_features, **kw), keep_dense, wrapped=False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


PRUNED_LINEARS = (ArmorLinear, Sparse24Linear)


def _add_marker_and_dense(mod: nn.Module, device) -> None:
    """The empty `weight` marker (saved; see the module docstring), the dense copy and the device's
    operands (never saved)."""
    mod.register_buffer("weight", torch.empty(0, dtype=torch.uint8, device=device))
    mod.register_buffer("dense_weight", None, persistent=False)
    mod.fused = None  # ops.FusedOperands, set by prepare on an sm_90 GPU
    mod.semi = None   # semi_structured.SemiStructured, set by prepare on other CUDA GPUs
    mod.path = None   # what prepare chose (PATHS); None: never prepared


def _backend(mod: nn.Module) -> str:
    """The op's backend for a layer whose prepared operands do not apply: "auto" (the CPU kernels on the
    CPU) once prepared, the reference for a layer never prepared or prepared to it."""
    return "reference" if mod.path in (None, "reference") else "auto"


def path_for(device, dtype: torch.dtype, d_out: int, d_in: int, blocks: tuple[int, int],
             keep_dense: bool = False) -> str:
    """The path `prepare` picks on `device` for a layer of this dtype, shape and blocks (the fused kernels'
    blocks: Sparse24Linear's identities, layout.identity_block), from the layer's description alone."""
    if ops.fused_supported(device, dtype, d_out, d_in, *blocks):
        return "fused"
    if keep_dense:
        return "dense"
    if semi_structured.unavailable_reason(device, dtype) is None:
        return "semi_structured"
    return "cpu_packed" if ops.cpu_unavailable_reason(device) is None else "reference"


def _prepare(mod: nn.Module, A, B, keep_dense: bool, wrapped: bool = True) -> str:
    """Both layers' prepare: the first path of PATHS that applies where the layer is (A, B: its wrappers,
    or callables building the identities the fused kernels need for a plain 2:4 layer), kept in mod.path."""
    values = mod.S_values
    mod.fused = mod.semi = mod.dense_weight = None
    blocks = (A.shape[1], B.shape[1]) if wrapped else (identity_block(mod.out_features),
                                                       identity_block(mod.in_features))
    path = path_for(values.device, values.dtype, mod.out_features, mod.in_features, blocks, keep_dense)
    if path == "fused":
        A, B = (A, B) if wrapped else (A(), B())
        mod.fused = ops.fused_operands(A, values, mod.S_idx, B, mod.bias)
    elif path == "dense":
        mod.materialize()
    elif path == "semi_structured":
        mod.semi = semi_structured.compress(values, mod.S_idx)
    mod.path = path
    return path


def _prepared_forward(mod: nn.Module, x: torch.Tensor, A, B) -> torch.Tensor | None:
    """y through what prepare built, where it applies to x (its device and dtype), else None (the op)."""
    if (mod.path == "cpu_packed" and x.device.type == "cpu" and x.dtype == mod.S_values.dtype
            and not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and x.requires_grad)):
        return ops.cpu_packed_linear(x, A, mod.S_values, mod.S_idx, B, mod.bias)  # the op's CPU kernel, undispatched
    if mod.dense_weight is not None and mod.dense_weight.dtype == x.dtype:
        return F.linear(x, mod.dense_weight, None if mod.bias is None else mod.bias.to(x.dtype))
    f = mod.fused
    if f is not None and f.A.dtype == x.dtype and f.A.device == x.device:
        return ops.fused_linear(x, f)
    semi = mod.semi
    if semi is not None and semi.S.dtype == x.dtype and semi.S.device == x.device:
        return semi_structured.linear(x, A, semi, B, mod.bias)
    return None


def pruned_linears(model: nn.Module) -> dict[str, nn.Module]:
    """name -> module of every ArmorLinear / Sparse24Linear in `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PRUNED_LINEARS)}


def prepare(model: nn.Module, keep_dense: bool = False) -> dict[str, str]:
    """Each pruned linear of `model` on the fastest path its device has (module docstring), after a move
    to another device too; returns name -> path. keep_dense=True keeps a dense copy wherever the fused
    kernels do not run (dense speed for long prompts, at dense memory and more)."""
    return {name: m.prepare(keep_dense) for name, m in pruned_linears(model).items()}


def unfused_reasons(model: nn.Module) -> dict[str, str]:
    """name -> why that pruned linear does not run the fused kernels and which path it takes instead, for
    every one prepare did not switch over to them (empty when all run them)."""
    out = {}
    for name, m in pruned_linears(model).items():
        if m.fused is None:
            blocks = (m.A.shape[1], m.B.shape[1]) if isinstance(m, ArmorLinear) else (
                identity_block(m.out_features), identity_block(m.in_features))
            core = m.S_values if m.S_values is not None else m.S
            why = (ops.fused_unavailable_reason(core.device, core.dtype, m.out_features, m.in_features, *blocks)
                   or "prepare() has not run on it where it is now")
            out[name] = f"{why}; runs {layer_path(m)}"
    return out


def paths(model: nn.Module) -> dict[str, str]:
    """name -> the path each pruned linear of `model` takes now (see `layer_path`)."""
    return {name: layer_path(m) for name, m in pruned_linears(model).items()}


def layer_path(m: nn.Module) -> str:
    """The path a pruned linear's forward takes now, for inputs of its stored dtype on its device."""
    core = m.S_values if m.S_values is not None else m.S
    if m.fused is not None and m.fused.A.device == core.device:
        return "fused"
    if m.dense_weight is not None:
        return "dense"
    if m.semi is not None and m.semi.S.device == core.device:
        return "semi_structured"
    if m.path not in (None, "reference") and m.S_values is not None and ops.cpu_unavailable_reason(core.device) is None:
        return "cpu_packed"
    return "reference"
