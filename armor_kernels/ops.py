"""The ARMOR inference op, y = ((x B'ᵀ) Sᵀ) A'ᵀ + bias, as the torch op `torch.ops.armor.linear`.

    y = linear(x, A, S, B, bias)                       # S dense (d_out, d_in), 2:4 along d_in
    y = linear(x, A, values, B, bias, S_idx=idx)       # S in the portable packed form of sparse24
    y = linear(x, None, values, None, bias, S_idx=idx) # a plain 2:4 layer: no wrappers
    sm90 = pack_sm90(S)                                # once, at load/export (CUDA, sm_90, extension)
    y = linear(x, A, S, B, bias, sm90=sm90)            # fused Hopper kernels where they apply
    linear_path(x, A, S, B, sm90=sm90)                 # which implementation that call runs

    f = fused_operands(A, values, idx, B, bias)        # any layer in the kernels' layout (layout.py), once
    y = fused_linear(x, f)                             # pads x, runs the op on f, slices y back

A: (d_out/bA, bA, bA) and B: (d_in/bB, bB, bB) hold the diagonal blocks, or None for no wrapper on that
side. Every device can run the PyTorch reference (`reference`). On the CPU, with S packed and the C++
extension built (csrc/cpu/packed_linear.cpp), the packed kernels run instead, any dtype, blocks and sizes.
On CUDA, where the kernels of csrc/ apply (sm_90, bf16/fp16, operands in the kernels' layout: bA = bB =
128, d_out and d_in multiples of 128, built extension) they run instead. Any other layer the pipeline
writes (blocks 4…128, ragged sizes) reaches them through `fused_operands`, which builds the exactly
equivalent padded, block-expanded operands (layout.py says how and what it costs). `linear_path` is the
one rule:
- "cpu_sparse": on the CPU with S packed, any token count: S's kept values and 2-bit positions read
  straight from the packed form, half the dense multiplications, float32 accumulation, B' before and
  A' + bias after. Up to 15 tokens it streams S once per 4 tokens and picks each value's input by vector
  permutes; from 16 on it turns the activations around so that each kept value multiplies 8 tokens per
  instruction (csrc/cpu/packed_linear.cpp);
- "cpu_gemm": on the CPU with S packed, where it multiplies less (`cpu_gemm_folds`: small layers, long
  inputs): S unpacked a tile of rows at a time into one buffer, the wrappers folded into the tile, and
  multiplied by torch's own GEMM (the dense S is never whole in memory);
- "decode": CUDA, up to DECODE_MAX_TOKENS (16) tokens with S packed (S_idx given): the decode kernels,
  which stream the portable packed S once, split along K over the SMs, with B' before and A' + bias
  folded into the reduction;
- "sparse_gemm": CUDA, otherwise, with the sm90 compressed form passed: B' as a block-diagonal GEMM,
  then the 2:4 sparse tensor-core GEMM with A' and bias in its epilogue;
- "reference": everything else.
Every native launch is counted in LAUNCHES (kernel family -> calls), so that a test can tell a kernel
that ran from the reference it is compared with, and the grids each family last launched in LAUNCH_GRIDS
(its launch plan: the GEMMs' persistent CTAs, the decode kernels' K splits).
`backend=` forces one of them (tests, benchmarks; FlashInfer's `backend="auto"` style) and raises
ValueError saying why when it does not apply. `sm_count=` is how many CTAs the kernels' persistent and
split-K grids plan for (0: the device's SM count); results of "sparse_gemm" do not depend on it.

Why the fused kernels cannot run is `fused_unavailable_reason(device)`. An extension that is not built
is normal (CPU machines); one that is built but fails to load warns at import (RuntimeWarning) and is
kept in NATIVE_IMPORT_ERROR instead of being hidden.
The op has a fake implementation, so torch.compile(fullgraph=True), CUDA graphs and export see it.
"""
from __future__ import annotations

import collections
import functools
import threading
from typing import NamedTuple, Optional

import torch

from . import extensions
from .errors import InputError
from .factors import block_right
from .kernels.tile_sweep import cpu_ext
from .layout import KERNEL_BLOCK, MAX_DIM, FusedOperands, layer_layout, pad_core
from .sparse24 import check_24, pack_24, unpack_24

BACKENDS = ("auto", "cpu_sparse", "cpu_gemm", "decode", "sparse_gemm", "reference")
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
KERNEL_DTYPES = (torch.bfloat16, torch.float16)  # what the kernels take (csrc/armor_cuda.h), known without them


# built by setup.py only with nvcc and a CUDA build of torch
_native, NATIVE_IMPORT_ERROR = extensions.load(
    "_armor_cuda", "pip install with nvcc and a CUDA build of torch, or ARMOR_BUILD_CUDA=1")
if _native is not None:  # csrc/armor_cuda.h's constants, as the binding exports them
    if _native.BLOCK != KERNEL_BLOCK:  # layout.py plans for the mirrored value: a rebuilt header must match it
        raise ImportError(f"{_native.__name__}: block {_native.BLOCK}, layout.KERNEL_BLOCK is {KERNEL_BLOCK}")
    DECODE_MAX_TOKENS: int = _native.DECODE_MAX_TOKENS
    _FUSED_DTYPES = {torch.bfloat16: _native.BF16, torch.float16: _native.FP16}
else:
    DECODE_MAX_TOKENS, _FUSED_DTYPES = 0, {}

# Dense tile of S per GEMM in "cpu_gemm": large enough for torch's GEMM to run near full speed. 2-core AVX2
# machine, bf16 layer, wrappers on the activations, median of 5, time / dense float32 F.linear, tiles of
# 4 / 8 / 16 / 32 MiB: 4096 x 4096 at 512 tokens 1.22 / 1.13 / 1.11 / 1.12, at 2048 1.44 / 1.24 / 1.16 / 1.15;
# 4096 x 14336 at 64 tokens 1.05 / 1.11 / 1.16 / 1.18, at 2048 1.59 / 1.40 / 1.30 / 1.17. With B' and A' as
# one batched matmul each, tiles of 16 / 32 / 64 MiB: 4096 x 4096 at 512 1.04 / 1.10 / 1.11, at 2048 1.19 /
# 1.20 / 1.16; 14336 x 4096 at 512 1.06 / 1.14 / 1.10, at 2048 1.12 / 1.07 / 1.08; 4096 x 14336 at 512 1.07 /
# 0.97 / 1.00, at 2048 1.10 / 1.11 / 1.09 (ops._cpu_gemm timed with only the size varied; expect ±10 % between
# runs on a shared machine, more than these sizes differ by).
CPU_TILE_BYTES = 16 << 20
_CPU_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # csrc/cpu/packed_linear.h's Dtype
LAUNCHES: collections.Counter = collections.Counter()  # kernel family -> native calls since import
LAUNCH_GRIDS: dict = {}  # kernel family -> the grids (x, y, z) its last native call launched: the launch plan


class Sm90Packed(NamedTuple):
    """S compressed for the sm90 sparse tensor cores (CUTLASS layout): opaque flat buffers."""
    values: torch.Tensor  # S's dtype
    meta: torch.Tensor    # uint8


def _round_up(n, m):
    return (n + m - 1) // m * m


def sm90_compressed_sizes(d_out: int, d_in: int) -> tuple[int, int]:
    """(values numel, meta bytes) of `pack_sm90`'s buffers for a bf16/fp16 S of shape (d_out, d_in).

    The formula of CUTLASS 4.2's StructuredSparseCompressorUtility for the sm90 16-bit 2:4 layout with
    K-major S (csrc/sm90_fused_linear.cuh's compressed_sizes), mirrored so that the op's checks run
    without the extension (CPU, fake tensors): half the values along K padded to 16, and one metadata
    byte per 8 elements of S padded to the metadata atom of 64 rows x 128 columns. tests/test_ops.py
    checks it against the binding where that is built."""
    return d_out * _round_up(d_in, 16) // 2, _round_up(d_out, 64) * _round_up(d_in, 128) // 8


def block_diag_apply(x: torch.Tensor, blocks: Optional[torch.Tensor]) -> torch.Tensor:
    """x · blockdiag(blocks)ᵀ over the last dim: y[..., J] = x[..., J] @ blocks[J]ᵀ, blocks (n, b, b);
    x itself for blocks None (no wrapper)."""
    return x if blocks is None else block_right(x, blocks.transpose(1, 2))


def reference(x: torch.Tensor, A: Optional[torch.Tensor], S: torch.Tensor, B: Optional[torch.Tensor],
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The PyTorch reference with dense S: block-diagonal B' on x, S, block-diagonal A', + bias (A' or
    B' None: no wrapper on that side)."""
    y = block_diag_apply(torch.nn.functional.linear(block_diag_apply(x, B), S), A)
    return y if bias is None else y + bias


def _fail(arg: str, expected: str, got) -> None:
    raise InputError(f"armor.linear: {arg}: expected {expected}, got {got}")


def _check(x, A, S, B, bias, S_idx, sm90_values, sm90_meta, backend="auto", sm_count=0) -> tuple[int, int]:
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
        if t is None:
            continue
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
    if sm90_values is not None:  # what the compressor wrote for this S: flat, contiguous, exactly sized
        if sm90_meta.dtype != torch.uint8:
            _fail("sm90.meta", "dtype torch.uint8", sm90_meta.dtype)
        for name, t, numel in zip(("sm90.values", "sm90.meta"), (sm90_values, sm90_meta),
                                  sm90_compressed_sizes(d_out, d_in)):
            if t.dim() != 1 or t.numel() != numel or not t.is_contiguous():
                _fail(name, f"a contiguous 1-D tensor of {numel} elements (pack_sm90 of a ({d_out}, {d_in}) S)",
                      f"shape {tuple(t.shape)} with strides {t.stride()}")
    if backend not in BACKENDS:
        _fail("backend", f"one of {BACKENDS}", repr(backend))
    if sm_count < 0:
        _fail("sm_count", ">= 0 (0: the device's SM count)", sm_count)
    return d_out, d_in


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    p = torch.cuda.get_device_properties(index)
    return p.major, p.minor


def fused_unavailable_reason(device: torch.device | str = "cuda", dtype: Optional[torch.dtype] = None,
                             d_out: Optional[int] = None, d_in: Optional[int] = None,
                             block_A: Optional[int] = None, block_B: Optional[int] = None) -> Optional[str]:
    """Why the fused kernels cannot run (None when they can): on `device` at all (the extension not built
    or not loading, not a CUDA device, not an sm_90 one), and, given a layer's dtype and shape, for that
    layer (blocks of A' and B': 128 unless given), through `fused_operands` where its blocks or sizes are
    not the kernels' own (layout.py)."""
    if _native is None:
        return NATIVE_IMPORT_ERROR
    device = torch.device(device)
    if device.type != "cuda":
        return f"device {device} is not a CUDA device"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device (torch.cuda.is_available() is False)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = _capability(index)
    if (major, minor) != (9, 0):
        return f"cuda:{index} is sm_{major}{minor}; the kernels are compiled for sm_90a only"
    return layer_unavailable_reason(dtype, d_out, d_in, block_A, block_B)


def layer_unavailable_reason(dtype: Optional[torch.dtype], d_out: Optional[int] = None, d_in: Optional[int] = None,
                             block_A: Optional[int] = None, block_B: Optional[int] = None) -> Optional[str]:
    """The part of `fused_unavailable_reason` that depends on the layer alone (no device needed: what a
    checkpoint's layer would do on an sm_90 GPU with the extension built)."""
    if dtype is None:
        return None
    if dtype not in KERNEL_DTYPES:
        return f"dtype {dtype}: the kernels take torch.bfloat16 or torch.float16"
    if d_out is None:
        return None
    layout = layer_layout(d_out, d_in, block_A or KERNEL_BLOCK, block_B or KERNEL_BLOCK)
    return layout if isinstance(layout, str) else None


def fused_supported(device: torch.device | str, dtype: torch.dtype, d_out: int, d_in: int,
                    block_A: Optional[int] = None, block_B: Optional[int] = None) -> bool:
    """Whether the fused kernels can run this layer: decides whether `fused_operands` is worth calling."""
    return fused_unavailable_reason(device, dtype, d_out, d_in, block_A, block_B) is None


def _operands_reason(d_out: int, d_in: int, block_A: int, block_B: int) -> Optional[str]:
    """Why the op's own operands are not in the kernels' layout (None when they are)."""
    if (block_A, block_B) == (KERNEL_BLOCK, KERNEL_BLOCK) and all(
            0 < d <= MAX_DIM and d % KERNEL_BLOCK == 0 for d in (d_out, d_in)):
        return None
    return (f"blocks ({block_A}, {block_B}) of a ({d_out}, {d_in}) layer: the kernels read {KERNEL_BLOCK}-blocks and "
            f"multiples of {KERNEL_BLOCK} (pass the layer through ops.fused_operands and fused_linear)")


def cpu_unavailable_reason(device: torch.device | str = "cpu") -> Optional[str]:
    """Why the packed CPU kernels cannot run on `device` (None when they can)."""
    if cpu_ext is None:
        return ("the C++ extension armor_kernels._armor_cpu is not built (pip install the package with a C++ "
                "compiler), or ARMOR_CPU_EXT=0")
    return None if torch.device(device).type == "cpu" else f"device {device} is not the CPU"


def linear_path(x: torch.Tensor | int, A: Optional[torch.Tensor], S: torch.Tensor, B: Optional[torch.Tensor], *,
                S_idx: Optional[torch.Tensor] = None, sm90: Optional[Sm90Packed] = None,
                backend: str = "auto") -> str:
    """Which implementation `linear` runs for these arguments: "cpu_sparse", "cpu_gemm", "decode",
    "sparse_gemm" or "reference".

    x: the input, or its token count (the product of its leading dimensions); the other arguments as
    for `linear`, whose device and dtype are S's. backend="auto" picks the first of those that applies
    (see the module docstring); naming a backend returns it, or raises ValueError saying why it does
    not apply."""
    if backend not in BACKENDS:
        raise InputError(f"armor.linear: backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    d_out = S.shape[0]
    d_in = S.shape[1] * (2 if S_idx is not None else 1)
    tokens = x if isinstance(x, int) else (x.numel() // d_in if d_in else 0)
    cpu = cpu_unavailable_reason(S.device) or ("S is not packed (pass S_idx)" if S_idx is None else None)
    if A is None or B is None:
        fused = "the fused kernels need both wrappers (a plain 2:4 layer passes identities: layout.identity_blocks)"
    else:
        fused = fused_unavailable_reason(S.device, S.dtype) or _operands_reason(d_out, d_in, A.shape[1], B.shape[1])
    if fused is None and tokens < 1:
        fused = "x has no tokens"
    # both CPU paths are correct at any token count; "auto" takes the tiles only where they multiply less
    tiled = backend == "auto" and _cpu_path(tokens, d_out, d_in, A, B) == "cpu_gemm"
    why_not = {
        "cpu_sparse": cpu or (f"{tokens} tokens: the tiles multiply less (cpu_gemm_folds)" if tiled else None),
        "cpu_gemm": cpu,
        "decode": fused or ("S is not packed (pass S_idx)" if S_idx is None else
                            f"{tokens} tokens, the decode kernels take at most {DECODE_MAX_TOKENS}"
                            if tokens > DECODE_MAX_TOKENS else None),
        "sparse_gemm": fused or ("no sm90 compressed S (pass sm90=pack_sm90(S))" if sm90 is None else None),
    }
    if backend == "auto":
        return next((path for path, why in why_not.items() if why is None), "reference")
    if why_not[backend] is not None:
        raise InputError(f"armor.linear: backend={backend!r} does not apply: {why_not[backend]}")
    return backend


def pack_sm90(S: torch.Tensor) -> Sm90Packed:
    """One-time compression of dense 2:4 S (d_out, d_in) on an sm_90 GPU into the fused kernels' layout."""
    if _native is None:
        raise RuntimeError(f"pack_sm90: {NATIVE_IMPORT_ERROR}")
    reason = "not 2-D" if S.dim() != 2 else (
        fused_unavailable_reason(S.device, S.dtype) or _operands_reason(*S.shape, KERNEL_BLOCK, KERNEL_BLOCK))
    if reason is not None:
        raise InputError(f"pack_sm90: S: expected a 2-D bf16/fp16 CUDA tensor on sm_90 with both dims multiples of "
                         f"{KERNEL_BLOCK}, got {S.dtype} {tuple(S.shape)} on {S.device} ({reason})")
    check_24(S)
    S = S.contiguous()
    d_out, d_in = S.shape
    dtype = _FUSED_DTYPES[S.dtype]
    with torch.cuda.device(S.device):
        n_values, n_meta = _native.compressed_sizes(dtype, d_out, d_in)
        values = torch.empty(n_values, dtype=S.dtype, device=S.device)
        meta = torch.empty(n_meta, dtype=torch.uint8, device=S.device)
        stream = torch.cuda.current_stream(S.device).cuda_stream
        LAUNCHES["compress"] += 1
        _native.compress(dtype, S.data_ptr(), d_out, d_in, values.data_ptr(), meta.data_ptr(), stream)
    return Sm90Packed(values, meta)


@torch.library.custom_op("armor::linear", mutates_args=())
def _linear(x: torch.Tensor, A: Optional[torch.Tensor], S: torch.Tensor, B: Optional[torch.Tensor],
            bias: Optional[torch.Tensor],
            S_idx: Optional[torch.Tensor], sm90_values: Optional[torch.Tensor], sm90_meta: Optional[torch.Tensor],
            backend: str = "auto", sm_count: int = 0) -> torch.Tensor:
    """Reference kernel, registered for every device (the CUDA kernel below may take over)."""
    _check(x, A, S, B, bias, S_idx, sm90_values, sm90_meta, backend, sm_count)
    _path(x, A, S, B, S_idx, sm90_values, sm90_meta, backend)  # a forced fused backend raises here
    return _reference_kernel(x, A, S, B, bias, S_idx)


def _path(x, A, S, B, S_idx, sm90_values, sm90_meta, backend):
    sm90 = None if sm90_values is None else Sm90Packed(sm90_values, sm90_meta)
    return linear_path(x, A, S, B, S_idx=S_idx, sm90=sm90, backend=backend)


def _checked_path(x, A, S, B, bias, S_idx, sm90_values, sm90_meta, backend, sm_count) -> tuple[int, int, str]:
    """What every device kernel starts with: the checks, then the path: (d_out, d_in, path)."""
    d_out, d_in = _check(x, A, S, B, bias, S_idx, sm90_values, sm90_meta, backend, sm_count)
    return d_out, d_in, _path(x, A, S, B, S_idx, sm90_values, sm90_meta, backend)


def _reference_kernel(x, A, S, B, bias, S_idx):
    return reference(x, A, S if S_idx is None else unpack_24(S, S_idx), B, bias)


@_linear.register_fake
def _linear_fake(x, A, S, B, bias, S_idx, sm90_values, sm90_meta, backend="auto", sm_count=0):
    d_out, _ = _check(x, A, S, B, bias, S_idx, sm90_values, sm90_meta, backend, sm_count)
    return x.new_empty(*x.shape[:-1], d_out)


def _aligned(*ts) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in ts)


@_linear.register_kernel("cpu")
def _linear_cpu(x, A, S, B, bias, S_idx, sm90_values, sm90_meta, backend="auto", sm_count=0):
    _, _, path = _checked_path(x, A, S, B, bias, S_idx, sm90_values, sm90_meta, backend, sm_count)
    if path == "reference":
        return _reference_kernel(x, A, S, B, bias, S_idx)
    return cpu_packed_linear(x, A, S, S_idx, B, bias, path)


def cpu_packed_linear(x: torch.Tensor, A: Optional[torch.Tensor], S_values: torch.Tensor, S_idx: torch.Tensor,
                      B: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      path: Optional[str] = None, lanes_from: int = 0) -> torch.Tensor:
    """`linear` on the packed CPU kernels without the op's dispatch and argument checks, for a layer whose
    tensors were checked when it was built (nn.py's eager forward: a torch op call costs ~0.1 ms here, a
    decode step of a 576-wide layer not much more). path: "cpu_sparse" or "cpu_gemm"; None: by shape
    as `linear_path` decides. Operands on the CPU, in x's dtype (made contiguous: the kernels read raw memory).
    lanes_from: the token count from which "cpu_sparse" holds the tokens along the vector lanes (0: the
    kernel's own, 16; benchmarks force either layout with it)."""
    if path is None:
        path = _cpu_path(x.numel() // x.shape[-1], S_values.shape[0], x.shape[-1], A, B)
    S = S_values
    A, S, S_idx, B, bias = (None if t is None else t.contiguous() for t in (A, S, S_idx, B, bias))
    d_out, d_in = S.shape[0], x.shape[-1]
    tokens = x.numel() // d_in if d_in else 0
    x2 = x.reshape(tokens, d_in).contiguous()
    LAUNCHES[path] += 1
    if path == "cpu_sparse":
        y = x2.new_empty(tokens, d_out)
        ptr = lambda t: 0 if t is None else t.data_ptr()
        cpu_ext.packed_linear(x2.data_ptr(), S.data_ptr(), S_idx.data_ptr(), ptr(A), ptr(B), ptr(bias), y.data_ptr(),
                              tokens, d_in, d_out, 0 if A is None else A.shape[1], 0 if B is None else B.shape[1],
                              _CPU_DTYPES[x.dtype], torch.get_num_threads(), lanes_from=lanes_from)
    else:
        y = _cpu_gemm(x2, A, S, S_idx, B, bias)
    return y.reshape(*x.shape[:-1], d_out)


def cpu_gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype "cpu_gemm" multiplies in: the storage dtype where this CPU has native 16-bit matrix
    instructions for it (AVX-512 BF16 or AMX), else float32, which torch's GEMM then runs several times
    faster (the dense bf16 model on such a CPU is slower than the same model in float32)."""
    native = {torch.bfloat16: torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported(),
              torch.float16: torch.cpu._is_amx_fp16_supported()}
    return dtype if native.get(dtype, True) else torch.float32


_WORKSPACE = threading.local()  # each calling thread's buffers, kept: a fresh large one costs its page faults


def _workspace(name: str, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A (rows, cols) buffer of this thread's, reused across calls. The allocator hands every tensor of 32 MiB
    or more fresh pages, and touching them costs more than the block matmuls that fill them (measured: 20 ms to
    convert a 2048 × 4096 input to float32 into a new tensor, 0.3 ms at a quarter of the size)."""
    bufs = _WORKSPACE.__dict__
    buf = bufs.get(name)
    if buf is None or buf.dtype != dtype or buf.numel() < rows * cols:
        buf = bufs[name] = torch.empty(rows * cols, dtype=dtype)
    return buf[:rows * cols].view(rows, cols)


def cpu_gemm_folds(tokens: int, d_out: int, d_in: int, a: int, b: int) -> bool:
    """"cpu_gemm"'s one choice: fold A' and B' into each tile of S (A'·S·B', a cost that does not grow with the
    tokens) rather than apply them to the activations (one that does): whichever multiplies less, ties folded
    (its matmuls are the larger ones). 2-core AVX2 machine, bf16 layers, median of 9, on x / folded ms:
    576² at 2048 tokens 19.3 / 14.1, 1536 × 576 41.5 / 30.0, 2048² (a tie) 202.5 / 169.3; at 512 tokens,
    where the rule keeps them on x, 576² 5.0 / 4.6, 1536 × 576 9.7 / 9.6, 2048² 39.0 / 56.4."""
    return d_out * d_in * (a + b) <= tokens * (d_in * b + d_out * a)


def _cpu_path(tokens: int, d_out: int, d_in: int, A: Optional[torch.Tensor], B: Optional[torch.Tensor]) -> str:
    """The CPU's one rule: "cpu_gemm" where it folds the wrappers (cpu_gemm_folds), else "cpu_sparse", which
    does half the multiplications of a dense layer. In benchmarks/results/bench_linear_cpu.csv (both forced
    on six shapes at 1…2048 tokens) it picks the faster of the two in all 42 cases of ARMOR and all 42 of plain
    2:4; the tiles win only where they fold (the 576-wide layers at 2048 tokens, by 10-26 %)."""
    folds = A is not None and B is not None and cpu_gemm_folds(tokens, d_out, d_in, A.shape[1], B.shape[1])
    return "cpu_gemm" if folds else "cpu_sparse"


def _cpu_gemm(x2, A, values, idx, B, bias):
    """"cpu_gemm": S unpacked a tile (CPU_TILE_BYTES, whole blocks of A' rows) at a time into one buffer and
    multiplied by torch's GEMM, in cpu_gemm_dtype, rounded to x's dtype once at the end; the dense S is never
    whole. The wrappers either go on the activations, in transposed form (tokens along the rows, so every
    block is a contiguous slab: xbᵀ = B'·xᵀ, then tile·xbᵀ, then A', each wrapper one batched matmul over its
    blocks: the same bits as a matmul per block, 2-22 % faster in a paired run on the shapes of bench_linear), or, where
    that multiplies more (cpu_gemm_folds: small layers, long inputs), into the tile: A'·S·B' by blocks while
    the tile is in cache, then x·tileᵀ."""
    tokens, d_in = x2.shape
    d_out = values.shape[0]
    dt = cpu_gemm_dtype(x2.dtype)
    threads = torch.get_num_threads()
    x = x2 if dt == x2.dtype else _workspace("x", tokens, d_in, dt).copy_(x2)
    a = d_out if A is None else A.shape[1]  # tiles hold whole blocks of A'
    b = 0 if B is None else B.shape[1]
    fold = A is not None and B is not None and cpu_gemm_folds(tokens, d_out, d_in, a, b)
    Ad, Bd = (None if t is None else t.to(dt) for t in (A, B))
    rows = min(d_out, max(a, CPU_TILE_BYTES // (d_in * dt.itemsize) // a * a))
    tile = _workspace("tile", rows, d_in, dt)
    if fold:
        y, nb = x2.new_empty(tokens, d_out), d_in // b
        sb = _workspace("sb", rows, d_in, dt)
    else:
        yt = _workspace("yt", d_out, tokens, dt)
        xbt = x.t() if B is None else _workspace("xbt", d_in, tokens, dt)
        if B is not None:  # every block of B' at once: (d_in/b, b, b) times x's column slabs as (d_in/b, b, tokens)
            torch.bmm(Bd, x.view(tokens, d_in // b, b).permute(1, 2, 0), out=xbt.view(d_in // b, b, tokens))
        sy = None if A is None else _workspace("sy", rows, tokens, dt)
    for r0 in range(0, d_out, rows):
        n = min(rows, d_out - r0)
        cpu_ext.unpack_rows(values.data_ptr(), idx.data_ptr(), r0, n, d_in, _CPU_DTYPES[x2.dtype], tile.data_ptr(),
                            dt != x2.dtype, threads)
        if fold:  # S·B' block-major by one batched matmul, back to rows in the tile, then A' on row blocks
            sbm = sb[:n].view(nb, n, b)
            torch.bmm(tile[:n].view(n, nb, b).transpose(0, 1), Bd, out=sbm)
            tile[:n].view(n, nb, b).copy_(sbm.transpose(0, 1))
            w = sb[:n]
            torch.bmm(Ad[r0 // a:(r0 + n) // a], tile[:n].view(n // a, a, d_in), out=w.view(n // a, a, d_in))
            out = _workspace("part", tokens, n, dt)
            torch.mm(x, w.t(), out=out)
            if bias is not None:
                out.add_(bias[r0:r0 + n].to(dt))
            y[:, r0:r0 + n].copy_(out)
        elif A is None:
            torch.mm(tile[:n], xbt, out=yt[r0:r0 + n])
        else:
            torch.mm(tile[:n], xbt, out=sy[:n])
            k = n // a
            torch.bmm(Ad[r0 // a:r0 // a + k], sy[:n].view(k, a, tokens), out=yt[r0:r0 + n].view(k, a, tokens))
    if fold:
        return y
    if bias is not None:
        yt.add_(bias.to(dt)[:, None])
    return x2.new_empty(tokens, d_out).copy_(yt.t())


@_linear.register_kernel("cuda")
def _linear_cuda(x, A, S, B, bias, S_idx, sm90_values, sm90_meta, backend="auto", sm_count=0):
    d_out, d_in, path = _checked_path(x, A, S, B, bias, S_idx, sm90_values, sm90_meta, backend, sm_count)
    if path == "reference":
        return _reference_kernel(x, A, S, B, bias, S_idx)
    tokens = x.numel() // d_in
    x2 = x.reshape(tokens, d_in).contiguous()
    A, B = A.contiguous(), B.contiguous()
    bias = bias.contiguous() if bias is not None else None
    if not _aligned(x2, A, B):  # e.g. a view starting mid-allocation
        x2 = x2.clone()
        A, B = A.clone(), B.clone()
    LAUNCHES[path] += 1
    if path == "decode":
        S_values, S_meta = (t if _aligned(t) else t.clone() for t in (S.contiguous(), S_idx.contiguous()))
        workspace_bytes, run = _native.decode_workspace_bytes, _native.decode_linear
    else:
        S_values, S_meta = sm90_values, sm90_meta
        workspace_bytes, run = _native.linear_workspace_bytes, _native.linear
    with torch.cuda.device(x.device):  # the kernels run on the current device: make it x's
        y = torch.empty(tokens, d_out, dtype=x.dtype, device=x.device)
        params = _native.Params(
            dtype=_FUSED_DTYPES[x.dtype], tokens=tokens, d_in=d_in, d_out=d_out, x=x2.data_ptr(),
            B_blocks=B.data_ptr(), A_blocks=A.data_ptr(), bias=0 if bias is None else bias.data_ptr(),
            S_values=S_values.data_ptr(), S_meta=S_meta.data_ptr(), y=y.data_ptr(), sm_count=sm_count,
            stream=torch.cuda.current_stream(x.device).cuda_stream)
        workspace = torch.empty(workspace_bytes(params), dtype=torch.uint8, device=x.device)
        params.workspace = workspace.data_ptr()
        run(params)
        LAUNCH_GRIDS[path] = _native.last_launches()
    return y.reshape(*x.shape[:-1], d_out)


def linear(x: torch.Tensor, A: Optional[torch.Tensor], S: torch.Tensor, B: Optional[torch.Tensor],
           bias: Optional[torch.Tensor] = None, *, S_idx: Optional[torch.Tensor] = None,
           sm90: Optional[Sm90Packed] = None, backend: str = "auto", sm_count: int = 0) -> torch.Tensor:
    """y = ((x B'ᵀ) Sᵀ) A'ᵀ + bias through torch.ops.armor.linear (see the module docstring)."""
    values, meta = sm90 if sm90 is not None else (None, None)
    return torch.ops.armor.linear(x, A, S, B, bias, S_idx, values, meta, backend, sm_count)


def fused_operands(A: torch.Tensor, S_values: torch.Tensor, S_idx: torch.Tensor, B: torch.Tensor,
                   bias: Optional[torch.Tensor] = None, *, compress: bool = True) -> FusedOperands:
    """A layer (any blocks 4…128, any sizes; S in the portable packed form) as the operands the kernels
    read: 128-blocks, zero-padded multiples of 128 (layout.py), S packed for the decode kernels and, with
    `compress` (an sm_90 GPU), compressed for the sparse GEMM. A layer already in the kernels' layout
    keeps its own tensors. Raises ValueError naming the reason where the kernels cannot take the layer."""
    d_out, d_in = S_values.shape[0], 2 * S_values.shape[1]
    layout = layer_layout(d_out, d_in, A.shape[1], B.shape[1])
    if isinstance(layout, str):
        raise InputError(f"fused_operands: {layout}")
    if not layout.native:
        S_values, S_idx = pack_24(pad_core(layout, unpack_24(S_values, S_idx)))
    sm90 = pack_sm90(unpack_24(S_values, S_idx)) if compress else None
    return FusedOperands(layout, layout.out.blocks(A), S_values, S_idx, layout.in_.blocks(B),
                         None if bias is None else layout.out.pad(bias), sm90)


def fused_linear(x: torch.Tensor, f: FusedOperands, *, backend: str = "auto", sm_count: int = 0) -> torch.Tensor:
    """y = x Ŵᵀ + bias of the layer behind `f` (fused_operands): x padded into the kernels' layout, the op
    on f's operands (decode or sparse GEMM as linear_path decides; the reference where no kernel runs),
    y sliced back to the layer's d_out."""
    if x.shape[-1] != f.layout.in_.d:
        _fail("x", f"last dimension {f.layout.in_.d}", tuple(x.shape))
    y = linear(f.layout.in_.pad(x), f.A, f.S_values, f.B, f.bias, S_idx=f.S_idx,
               sm90=None if f.sm90 is None else Sm90Packed(*f.sm90), backend=backend, sm_count=sm_count)
    return f.layout.out.unpad(y)
