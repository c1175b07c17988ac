"""The ARMOR inference op, y = ((x B'ᵀ) Sᵀ) A'ᵀ + bias, as the torch op `torch.ops.armor.linear`.

    y = linear(x, A, S, B, bias)                       # S dense (d_out, d_in), 2:4 along d_in
    y = linear(x, A, values, B, bias, S_idx=idx)       # S in the portable packed form of sparse24
    sm90 = pack_sm90(S)                                # once, at load/export (CUDA, sm_90, extension)
    y = linear(x, A, S, B, bias, sm90=sm90)            # fused Hopper kernels where they apply

A: (d_out/bA, bA, bA) and B: (d_in/bB, bB, bB) hold the diagonal blocks. Every device runs the PyTorch
reference (`reference`); on CUDA, where the kernels of csrc/ apply (sm_90, bf16/fp16, bA = bB = 128,
d_out and d_in multiples of 128, built extension) they run instead:
- up to 16 tokens with S packed (S_idx given): the decode kernels, which stream the portable packed S
  once, split along K over all SMs, with B' before and A' + bias folded into the reduction;
- otherwise, with the sm90 compressed form passed: B' as a block-diagonal GEMM, then the 2:4 sparse
  tensor-core GEMM with A' and bias in its epilogue.
The op has a fake implementation, so torch.compile(fullgraph=True), CUDA graphs and export see it.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from .factors import block_right
from .sparse24 import check_24, unpack_24

try:  # the native extension is optional: built by setup.py only with nvcc and a CUDA build of torch
    from . import _armor_cuda
except ImportError:
    _armor_cuda = None

FUSED_BLOCK = 128
_FUSED_DTYPES = {torch.bfloat16: 0, torch.float16: 1}  # codes of csrc/armor_cuda.h's ArmorDtype
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class Sm90Packed(NamedTuple):
    """S compressed for the sm90 sparse tensor cores (CUTLASS layout): opaque flat buffers."""
    values: torch.Tensor  # S's dtype
    meta: torch.Tensor    # uint8


def block_diag_apply(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x · blockdiag(blocks)ᵀ over the last dim: y[..., J] = x[..., J] @ blocks[J]ᵀ, blocks (n, b, b)."""
    return block_right(x, blocks.transpose(1, 2))


def reference(x: torch.Tensor, A: torch.Tensor, S: torch.Tensor, B: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The PyTorch reference with dense S: block-diagonal B' on x, S, block-diagonal A', + bias."""
    y = block_diag_apply(torch.nn.functional.linear(block_diag_apply(x, B), S), A)
    return y if bias is None else y + bias


def _fail(arg: str, expected: str, got) -> None:
    raise ValueError(f"armor.linear: {arg}: expected {expected}, got {got}")


def _check(x, A, S, B, bias, S_idx, sm90_values, sm90_meta) -> tuple[int, int]:
    """Validate the arguments (also at trace time, from the fake kernel); returns (d_out, d_in)."""
    if x.dtype not in _DTYPES:
        _fail("x", f"dtype in {_DTYPES}", x.dtype)
    if x.dim() < 1:
        _fail("x", "at least 1 dimension (..., d_in)", tuple(x.shape))
    d_in = x.shape[-1]
    packed = S_idx is not None
    if S.dim() != 2:
        _fail("S", "a 2-D tensor", tuple(S.shape))
    d_out = S.shape[0]
    want_S = (d_out, d_in // 2) if packed else (d_out, d_in)
    if tuple(S.shape) != want_S:
        what = "packed values (d_out, d_in/2)" if packed else "(d_out, d_in)"
        _fail("S", f"shape {what} = {want_S} for x of shape {tuple(x.shape)}", tuple(S.shape))
    if packed and (S_idx.dtype != torch.uint8 or tuple(S_idx.shape) != (d_out, d_in // 8)):
        _fail("S_idx", f"uint8 of shape {(d_out, d_in // 8)}", f"{S_idx.dtype} {tuple(S_idx.shape)}")
    for name, t, dim in (("A", A, d_out), ("B", B, d_in)):
        if t.dim() != 3 or t.shape[1] != t.shape[2] or t.shape[0] * t.shape[1] != dim:
            _fail(name, f"blocks (n, b, b) with n * b = {dim}", tuple(t.shape))
    if bias is not None and tuple(bias.shape) != (d_out,):
        _fail("bias", f"shape ({d_out},)", tuple(bias.shape))
    if (sm90_values is None) != (sm90_meta is None):
        _fail("sm90", "both sm90 tensors (values and meta) or neither", "only one")
    named = [("A", A), ("S", S), ("B", B), ("bias", bias), ("sm90.values", sm90_values)]
    for name, t in named:
        if t is not None and t.dtype != x.dtype:
            _fail(name, f"x's dtype {x.dtype}", t.dtype)
    for name, t in named + [("S_idx", S_idx), ("sm90.meta", sm90_meta)]:
        if t is not None and t.device != x.device:
            _fail(name, f"x's device {x.device}", t.device)
    return d_out, d_in


@torch.library.custom_op("armor::linear", mutates_args=())
def _linear(x: torch.Tensor, A: torch.Tensor, S: torch.Tensor, B: torch.Tensor, bias: Optional[torch.Tensor],
            S_idx: Optional[torch.Tensor], sm90_values: Optional[torch.Tensor],
            sm90_meta: Optional[torch.Tensor]) -> torch.Tensor:
    """Reference kernel, registered for every device (the CUDA kernel below may take over)."""
    _check(x, A, S, B, bias, S_idx, sm90_values, sm90_meta)
    return _reference_kernel(x, A, S, B, bias, S_idx)


def _reference_kernel(x, A, S, B, bias, S_idx):
    return reference(x, A, S if S_idx is None else unpack_24(S, S_idx), B, bias)


@_linear.register_fake
def _linear_fake(x, A, S, B, bias, S_idx, sm90_values, sm90_meta):
    d_out, _ = _check(x, A, S, B, bias, S_idx, sm90_values, sm90_meta)
    return x.new_empty(*x.shape[:-1], d_out)


@functools.lru_cache(maxsize=None)
def _device_info(index: int) -> tuple[tuple[int, int], int]:
    p = torch.cuda.get_device_properties(index)
    return (p.major, p.minor), p.multi_processor_count


def fused_supported(device: torch.device | str, dtype: torch.dtype, d_out: int, d_in: int,
                    block_A: int = FUSED_BLOCK, block_B: int = FUSED_BLOCK) -> bool:
    """Whether the fused kernels can run this layer: decides whether `pack_sm90` is worth calling."""
    device = torch.device(device)
    return (_armor_cuda is not None and device.type == "cuda" and dtype in _FUSED_DTYPES
            and block_A == FUSED_BLOCK and block_B == FUSED_BLOCK and d_out % FUSED_BLOCK == 0
            and d_in % FUSED_BLOCK == 0 and _device_info(device.index or 0)[0] == (9, 0))


def pack_sm90(S: torch.Tensor) -> Sm90Packed:
    """One-time compression of dense 2:4 S (d_out, d_in) on an sm_90 GPU into the fused kernels' layout."""
    if _armor_cuda is None:
        raise RuntimeError("pack_sm90: the native extension armor_kernels._armor_cuda is not built "
                           "(pip install with nvcc and a CUDA build of torch, or ARMOR_BUILD_CUDA=1)")
    if S.dim() != 2 or not fused_supported(S.device, S.dtype, *S.shape):
        raise ValueError(f"pack_sm90: S: expected a 2-D bf16/fp16 CUDA tensor on sm_90 with both dims multiples of "
                         f"{FUSED_BLOCK}, got {S.dtype} {tuple(S.shape)} on {S.device}")
    check_24(S)
    S = S.contiguous()
    d_out, d_in = S.shape
    dtype = _FUSED_DTYPES[S.dtype]
    n_values, n_meta = _armor_cuda.compressed_sizes(dtype, d_out, d_in)
    values = torch.empty(n_values, dtype=S.dtype, device=S.device)
    meta = torch.empty(n_meta, dtype=torch.uint8, device=S.device)
    stream = torch.cuda.current_stream(S.device).cuda_stream
    _armor_cuda.compress(dtype, S.data_ptr(), d_out, d_in, values.data_ptr(), meta.data_ptr(), stream)
    return Sm90Packed(values, meta)


def _aligned(*ts) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in ts)


@_linear.register_kernel("cuda")
def _linear_cuda(x, A, S, B, bias, S_idx, sm90_values, sm90_meta):
    d_out, d_in = _check(x, A, S, B, bias, S_idx, sm90_values, sm90_meta)
    tokens = x.numel() // d_in
    decode = S_idx is not None and tokens <= getattr(_armor_cuda, "DECODE_MAX_TOKENS", 0)
    if (tokens == 0 or not (decode or sm90_values is not None)
            or not fused_supported(x.device, x.dtype, d_out, d_in, A.shape[1], B.shape[1])):
        return _reference_kernel(x, A, S, B, bias, S_idx)
    x2 = x.reshape(tokens, d_in).contiguous()
    A, B = A.contiguous(), B.contiguous()
    bias = bias.contiguous() if bias is not None else None
    if not _aligned(x2, A, B):  # e.g. a view starting mid-allocation
        x2 = x2.clone()
        A, B = A.clone(), B.clone()
    dtype, sm_count = _FUSED_DTYPES[x.dtype], _device_info(x.device.index)[1]
    stream = torch.cuda.current_stream(x.device).cuda_stream
    bias_ptr = 0 if bias is None else bias.data_ptr()
    y = torch.empty(tokens, d_out, dtype=x.dtype, device=x.device)
    if decode:
        S, S_idx = (t if _aligned(t) else t.clone() for t in (S.contiguous(), S_idx.contiguous()))
        workspace = torch.empty(_armor_cuda.decode_workspace_bytes(dtype, d_out, d_in, tokens, sm_count),
                                dtype=torch.uint8, device=x.device)
        _armor_cuda.decode_linear(dtype, x2.data_ptr(), B.data_ptr(), S.data_ptr(), S_idx.data_ptr(), A.data_ptr(),
                                  bias_ptr, workspace.data_ptr(), y.data_ptr(), tokens, d_in, d_out, sm_count, stream)
    else:
        xb = torch.empty(tokens, d_in, dtype=x.dtype, device=x.device)  # B'-transformed activations
        _armor_cuda.linear(dtype, x2.data_ptr(), B.data_ptr(), sm90_values.data_ptr(), sm90_meta.data_ptr(),
                           A.data_ptr(), bias_ptr, xb.data_ptr(), y.data_ptr(), tokens, d_in, d_out, sm_count, stream)
    return y.reshape(*x.shape[:-1], d_out)


def linear(x: torch.Tensor, A: torch.Tensor, S: torch.Tensor, B: torch.Tensor,
           bias: Optional[torch.Tensor] = None, *, S_idx: Optional[torch.Tensor] = None,
           sm90: Optional[Sm90Packed] = None) -> torch.Tensor:
    """y = ((x B'ᵀ) Sᵀ) A'ᵀ + bias through torch.ops.armor.linear (see the module docstring)."""
    values, meta = sm90 if sm90 is not None else (None, None)
    return torch.ops.armor.linear(x, A, S, B, bias, S_idx, values, meta)
