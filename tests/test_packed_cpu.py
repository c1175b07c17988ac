"""The packed CPU kernels of torch.ops.armor.linear (csrc/cpu/packed_linear.cpp) against exact math.

Every test proves the kernel it claims ran (ops.LAUNCHES) and bounds the error against float64 math on
the same stored values: the sparse kernel accumulates in float32 and rounds once, so it is within
half an ulp of the storage dtype plus float32 accumulation error; the tiled GEMM rounds like the
reference in the dtype it multiplies in (ops.cpu_gemm_dtype). A skip here is a failure in CI, where the
extension is always built (ARMOR_REQUIRE_CPU_EXT=1, set by .ci/run).
"""
import os

import pytest
import torch
from helpers import random_24

from armor_kernels import ArmorLinear, Sparse24Linear, ops
from armor_kernels.kernels.tile_sweep import cpu_ext
from armor_kernels.sparse24 import pack_24

if cpu_ext is None:
    if os.environ.get("ARMOR_REQUIRE_CPU_EXT", "") not in ("", "0"):
        raise ImportError(f"ARMOR_REQUIRE_CPU_EXT=1 but {ops.cpu_unavailable_reason()}")
    pytest.skip(ops.cpu_unavailable_reason(), allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [  # (d_out, d_in, bA, bB): d_in not a multiple of the 16 kept values a vector step takes, blocks 4…128
    (24, 40, 8, 8),
    (128, 136, 4, 8),
    (96, 72, 32, 24),
    (576, 1536, 64, 16),
    (256, 384, 128, 128),
]


def layer(d_out, d_in, bA, bB, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.eye(bA) + 0.2 * torch.randn(d_out // bA, bA, bA, generator=g)
    B = torch.eye(bB) + 0.2 * torch.randn(d_in // bB, bB, bB, generator=g)
    S = random_24(d_out, d_in, generator=g) / d_in ** 0.5
    bias = torch.randn(d_out, generator=g)
    return [t.to(dtype) for t in (A, S, B, bias)]


def blockdiag(blocks, n, f):
    """The dense (n, n) block-diagonal matrix of f(blocks) in float64, the identity for None."""
    return torch.eye(n, dtype=torch.float64) if blocks is None else torch.block_diag(*f(blocks.double()))


def exact(x, A, S, B, bias):
    """(y, scale) in float64: y of the stored values, and Σ of the absolute terms behind each output."""
    (d_out, d_in), S = S.shape, S.double()
    W = blockdiag(A, d_out, lambda t: t) @ S @ blockdiag(B, d_in, lambda t: t)
    absW = blockdiag(A, d_out, torch.abs) @ S.abs() @ blockdiag(B, d_in, torch.abs)
    b = 0 if bias is None else bias.double()
    return x.double() @ W.T + b, x.double().abs() @ absW.T + abs(b)


def check(y, x, A, S, B, bias, compute_dtype, roundings):
    """|y − exact| ≤ half an ulp of y's dtype + roundings · eps(compute) · scale, elementwise."""
    want, scale = exact(x, A, S, B, bias)
    half_ulp = torch.finfo(y.dtype).eps / 2 * want.abs()
    bound = half_ulp + roundings * torch.finfo(compute_dtype).eps * scale + torch.finfo(y.dtype).tiny
    err = (y.double() - want).abs()
    assert (err <= bound).all(), f"max error {err.max():.3g}, where bound {bound[err > bound][0]:.3g}"


def run(backend, x, A, S, B, bias):
    values, idx = pack_24(S)
    before = ops.LAUNCHES[backend]
    y = ops.linear(x, A, values, B, bias, S_idx=idx, backend=backend)
    assert ops.LAUNCHES[backend] == before + 1, f"{backend} did not run"
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("tokens", [1, 3, 15, 16, 17, 130])  # both layouts; 130: chunks of 64, 64 and 2
def test_sparse_kernel_rounds_once(dtype, shape, tokens):
    A, S, B, bias = layer(*shape, dtype)
    x = torch.randn(tokens, shape[1]).to(dtype)
    check(run("cpu_sparse", x, A, S, B, bias), x, A, S, B, bias, torch.float32, 8)


def binding(x, A, S, B, bias, **kw):
    """y through the binding itself, where the tests choose the kernel's layout (lanes_from) or its code."""
    values, idx = pack_24(S)
    (tokens, d_in), d_out = x.shape, S.shape[0]
    y = torch.empty(tokens, d_out, dtype=x.dtype)
    ptr = lambda t: 0 if t is None else t.data_ptr()
    cpu_ext.packed_linear(x.data_ptr(), values.data_ptr(), idx.data_ptr(), ptr(A), ptr(B), ptr(bias), y.data_ptr(),
                          tokens, d_in, d_out, 0 if A is None else A.shape[1], 0 if B is None else B.shape[1],
                          ops._CPU_DTYPES[x.dtype], 2, **kw)
    return y


@pytest.mark.skipif(cpu_ext.packed_isa() != "avx2", reason="the lanes layout is AVX2 code")
@pytest.mark.parametrize("tokens", [1, 9, 64, 65])
@pytest.mark.parametrize("wrappers", [True, False], ids=["ARMOR", "plain 2:4"])
def test_both_layouts_at_any_token_count(tokens, wrappers):
    """Each layout forced where the kernel would not pick it: both within the bound, and different code (in
    float32 their sums, in different orders, differ in the last bits somewhere)."""
    A, S, B, bias = layer(576, 1536, 64, 16, torch.float32)
    A, B = (A, B) if wrappers else (None, None)
    x = torch.randn(tokens, 1536)
    lanes, permutes = binding(x, A, S, B, bias, lanes_from=1), binding(x, A, S, B, bias, lanes_from=1 << 30)
    for y in (lanes, permutes):
        check(y, x, A, S, B, bias, torch.float32, 8)
    assert not torch.equal(lanes, permutes)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES[::2], ids=[str(s) for s in SHAPES[::2]])
@pytest.mark.parametrize("tokens", [1, 17, 1000])
@pytest.mark.parametrize("fold", [False, True], ids=["wrappers on x", "wrappers folded into S"])
def test_tiled_gemm_rounds_like_the_reference(dtype, shape, tokens, fold, monkeypatch):
    monkeypatch.setattr(ops, "CPU_TILE_BYTES", 4096)  # several tiles even on small layers
    monkeypatch.setattr(ops, "cpu_gemm_folds", lambda *args: fold)
    A, S, B, bias = layer(*shape, dtype)
    x = torch.randn(tokens, shape[1]).to(dtype)
    compute = ops.cpu_gemm_dtype(dtype)
    check(run("cpu_gemm", x, A, S, B, bias), x, A, S, B, bias, compute, 8 if compute == torch.float32 else 4)


def test_the_wrappers_are_folded_where_that_multiplies_less():
    assert ops.cpu_gemm_folds(2048, 576, 576, 96, 96)  # SmolLM2's attention, a long prefill
    assert not ops.cpu_gemm_folds(512, 576, 576, 96, 96)
    assert ops.cpu_gemm_folds(2048, 2048, 2048, 128, 128)  # a tie
    assert not ops.cpu_gemm_folds(2048, 4096, 4096, 128, 128)  # folding would cost a 4096-token input's work


@pytest.mark.parametrize("backend", ["cpu_sparse", "cpu_gemm"])
@pytest.mark.parametrize("tokens", [5, 40])
def test_no_wrappers_non_contiguous_x_and_leading_dims(backend, tokens):
    A, S, B, bias = layer(96, 72, 32, 24, torch.bfloat16)
    x = torch.randn(2, 72, tokens).to(torch.bfloat16).transpose(1, 2)  # (2, tokens, 72), not contiguous
    y = run(backend, x, None, S, None, bias)
    assert y.shape == (2, tokens, 96)
    compute = torch.float32 if backend == "cpu_sparse" else ops.cpu_gemm_dtype(torch.bfloat16)
    check(y.reshape(2 * tokens, 96), x.reshape(2 * tokens, 72), None, S, None, bias, compute, 8)


def test_portable_code_agrees_with_exact_math():
    """The portable fallback (what a CPU without AVX2 runs), called through the binding."""
    for dtype in DTYPES:
        A, S, B, bias = layer(128, 136, 4, 8, dtype)
        for tokens in (5, 20):
            x = torch.randn(tokens, 136).to(dtype)
            check(binding(x, A, S, B, bias, portable=True), x, A, S, B, bias, torch.float32, 8)


@pytest.mark.parametrize("backend", ["cpu_sparse", "cpu_gemm"])
@pytest.mark.parametrize("tokens", [3, 17, 130])
def test_result_does_not_depend_on_the_thread_count(backend, tokens):
    A, S, B, bias = layer(576, 1536, 64, 16, torch.bfloat16)
    x = torch.randn(tokens, 1536).to(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(backend, x, A, S, B, bias)
        torch.set_num_threads(max(2, threads))
        many = run(backend, x, A, S, B, bias)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_auto_takes_the_tiles_only_where_they_fold_the_wrappers():
    for (d_out, d_in, b), tokens, want in (((64, 64, 16), 1, "cpu_sparse"), ((64, 64, 16), 16, "cpu_sparse"),
                                           ((256, 256, 32), 200, "cpu_sparse"), ((64, 64, 16), 200, "cpu_gemm")):
        assert (want == "cpu_gemm") == ops.cpu_gemm_folds(tokens, d_out, d_in, b, b)
        A, S, B, bias = layer(d_out, d_in, b, b, torch.bfloat16)
        values, idx = pack_24(S)
        before = dict(ops.LAUNCHES)
        ops.linear(torch.randn(tokens, d_in).to(torch.bfloat16), A, values, B, bias, S_idx=idx)
        assert ops.LAUNCHES[want] == before.get(want, 0) + 1
        assert sum(ops.LAUNCHES.values()) == sum(before.values()) + 1
    # without wrappers there is nothing to fold: the sparse kernel at any length
    assert ops.linear_path(4096, None, values, None, S_idx=idx) == "cpu_sparse"


def test_modules_run_the_packed_kernel_without_a_dense_copy():
    A, S, B, bias = layer(96, 72, 32, 24, torch.float32)
    armor = ArmorLinear(A, S, B, bias).pack()
    plain = Sparse24Linear.from_weight(S, bias)
    x = torch.randn(3, 72)
    for mod, (a, b) in ((armor, (A, B)), (plain, (None, None))):
        assert mod.prepare() == "cpu_packed" and mod.dense_weight is None
        before = ops.LAUNCHES["cpu_sparse"]
        y = mod(x)
        assert ops.LAUNCHES["cpu_sparse"] == before + 1
        check(y, x, a, S, b, bias, torch.float32, 8)


def test_opcheck_compile_and_export_on_the_packed_kernel():
    A, S, B, bias = layer(64, 128, 16, 32, torch.bfloat16)
    values, idx = pack_24(S)
    x = torch.randn(4, 128).to(torch.bfloat16)
    torch.library.opcheck(torch.ops.armor.linear.default, (x, A, values, B, bias, idx, None, None, "auto", 0))
    torch.library.opcheck(torch.ops.armor.linear.default, (x, None, values, None, None, idx, None, None, "auto", 0))
    compiled = torch.compile(lambda x: ops.linear(x, A, values, B, bias, S_idx=idx), fullgraph=True)
    assert torch.equal(compiled(x), ops.linear(x, A, values, B, bias, S_idx=idx))
    mod = ArmorLinear.from_packed(A, values, idx, B, bias)
    mod.prepare()  # the eager shortcut past the op must not hide it from export
    exported = torch.export.export(mod, (x,))
    assert any(n.target == torch.ops.armor.linear.default for n in exported.graph.nodes)
    assert torch.equal(exported.module()(x), mod(x))
