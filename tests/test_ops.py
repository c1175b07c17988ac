"""torch.ops.armor.linear: the reference against plain dense math, the op contract (opcheck, compile,
errors), and on an sm_90 GPU with the built extension the fused kernels against the reference."""
import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from armor_kernels import ops
from armor_kernels.sparse24 import pack_24

# Relative tolerances of a few roundings of intermediates in the dtype (8 bits of mantissa for bf16,
# 11 for fp16) accumulated over reductions of a few hundred terms.
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def rand_24(d_out, d_in, dtype=torch.float32, generator=None):
    """Random S with exactly 2 non-zeros in every group of 4 along d_in."""
    S = torch.randn(d_out, d_in, generator=generator)
    keep = torch.rand(d_out, d_in // 4, 4, generator=generator).argsort(-1)[..., :2]
    mask = torch.zeros(d_out, d_in // 4, 4).scatter_(-1, keep, 1.0).reshape(d_out, d_in)
    return (S * mask).to(dtype)


def factors(d_out, d_in, bA, bB, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Blocks near the identity, as ARMOR's are (it starts from A = B = I), keep outputs O(1).
    A = torch.eye(bA) + 0.1 * torch.randn(d_out // bA, bA, bA, generator=g)
    B = torch.eye(bB) + 0.1 * torch.randn(d_in // bB, bB, bB, generator=g)
    S = rand_24(d_out, d_in, generator=g) / d_in ** 0.5
    b = torch.randn(d_out, generator=g) if bias else None
    return [t if t is None else t.to(dtype) for t in (A, S, B, b)]


def dense_math(x, A, S, B, bias):
    """x Ŵᵀ + bias with Ŵ = blockdiag(A) S blockdiag(B) built densely, in float64."""
    W = torch.block_diag(*A.double()) @ S.double() @ torch.block_diag(*B.double())
    y = x.double() @ W.T
    return y if bias is None else y + bias.double()


def assert_close(y, want, dtype):
    err = (y.double() - want).abs().max().item()
    scale = want.abs().max().item() + 1e-12
    assert err <= TOL[dtype] * scale, f"max abs error {err:.3g} vs scale {scale:.3g} ({dtype})"


SHAPES = [  # (d_out, d_in, bA, bB)
    (256, 256, 128, 128),
    (384, 256, 128, 128),   # non-square
    (128, 384, 128, 128),
    (192, 288, 96, 96),     # small-layer block size
    (256, 192, 128, 96),    # bA != bB
]


@pytest.mark.parametrize("d_out,d_in,bA,bB", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead", [(1,), (7,), (3, 5), (0,)])  # ragged token counts, batch dims, empty
@pytest.mark.parametrize("bias", [True, False])
def test_reference_matches_dense_math(d_out, d_in, bA, bB, dtype, lead, bias):
    A, S, B, b = factors(d_out, d_in, bA, bB, dtype, bias)
    x = torch.randn(*lead, d_in, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = ops.linear(x, A, S, B, b)
    assert y.shape == (*lead, d_out) and y.dtype == dtype
    if x.numel():
        assert_close(y, dense_math(x, A, S, B, b), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_core_is_exactly_the_dense_core(dtype):
    A, S, B, b = factors(256, 384, 128, 128, dtype)
    x = torch.randn(9, 384).to(dtype)
    values, idx = pack_24(S)
    torch.testing.assert_close(ops.linear(x, A, values, B, b, S_idx=idx), ops.linear(x, A, S, B, b), rtol=0, atol=0)


def test_block_diag_apply_is_the_block_diagonal_matmul():
    blocks = torch.randn(3, 4, 4, dtype=torch.float64)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(ops.block_diag_apply(x, blocks), x @ torch.block_diag(*blocks).T)


def op_args(dtype=torch.float32, bias=True, packed=False):
    A, S, B, b = factors(256, 256, 128, 128, dtype, bias)
    x = torch.randn(2, 3, 256).to(dtype)
    if packed:
        values, idx = pack_24(S)
        return x, A, values, B, b, idx, None, None
    return x, A, S, B, b, None, None, None


@pytest.mark.parametrize("bias,packed", [(True, False), (False, False), (True, True)])
def test_opcheck(bias, packed):
    torch.library.opcheck(torch.ops.armor.linear.default, op_args(bias=bias, packed=packed))


def test_compile_fullgraph_cpu():
    x, A, S, B, b, *_ = op_args()

    def layer(x):
        return torch.relu(ops.linear(x, A, S, B, b)) * 2

    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))
    torch.testing.assert_close(compiled(x[:, :1]), layer(x[:, :1]))  # another token count


@pytest.mark.parametrize("change,arg,expected,got", [
    (dict(A=lambda a: a.float()), "A", "torch.bfloat16", "torch.float32"),
    (dict(x=lambda x: x[..., :128]), "S", "(256, 128)", "(256, 256)"),
    (dict(B=lambda t: t[:1]), "B", "n * b = 256", "(1, 128, 128)"),
    (dict(bias=lambda t: t[:5]), "bias", "(256,)", "(5,)"),
    (dict(x=lambda x: x.to(torch.int32)), "x", "dtype in", "torch.int32"),
    (dict(S=lambda t: t.to("meta")), "S", "x's device cpu", "meta"),
])
def test_errors_name_argument_expected_and_got(change, arg, expected, got):
    x, A, S, B, b, *_ = op_args(torch.bfloat16)
    args = dict(x=x, A=A, S=S, B=B, bias=b)
    for name, f in change.items():
        args[name] = f(args[name])
    with pytest.raises(ValueError) as e:
        ops.linear(**args)
    msg = str(e.value)
    assert f"armor.linear: {arg}:" in msg and expected in msg and got in msg, msg


def test_fused_not_supported_without_gpu_kernels():
    assert not ops.fused_supported("cpu", torch.bfloat16, 4096, 4096)
    if ops._armor_cuda is None:
        with pytest.raises(RuntimeError, match="not built"):
            ops.pack_sm90(rand_24(128, 128, torch.bfloat16))


# --- GPU: the fused kernels (sm_90 + built extension) ---------------------------------------------

fused = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops.fused_supported("cuda", torch.bfloat16, 128, 128)),
    reason="needs an sm_90 GPU and the built armor_kernels._armor_cuda extension")

FUSED_SHAPES = [(256, 256), (384, 512), (512, 128), (4096, 4096)]


@fused
@pytest.mark.parametrize("d_out,d_in", FUSED_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("tokens", [1, 5, 9, 16, 17, 100, 129, 300])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("packed", [False, True])  # packed: the decode kernels up to 16 tokens
def test_fused_matches_reference(d_out, d_in, dtype, tokens, bias, packed):
    A, S, B, b = (t if t is None else t.cuda() for t in factors(d_out, d_in, 128, 128, dtype, bias))
    x = torch.randn(tokens, d_in, device="cuda").to(dtype)
    values, idx = pack_24(S) if packed else (S, None)
    y = ops.linear(x, A, values, B, b, S_idx=idx, sm90=ops.pack_sm90(S))
    torch.cuda.synchronize()
    assert_close(y, dense_math(x, A, S, B, b), dtype)
    # The same roundings of intermediates as the reference, so closer to it than to exact math.
    assert_close(y, ops.reference(x, A, S, B, b).double(), dtype)


@fused
@pytest.mark.parametrize("tokens", [1, 16])
def test_decode_is_deterministic_and_graphable(tokens):
    """The split-K reduction sums in a fixed order: replays and graph replays are bit-identical."""
    A, S, B, b = (t.cuda() for t in factors(4096, 4096, 128, 128, torch.bfloat16))
    values, idx = pack_24(S)
    x = torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16)
    run = lambda: ops.linear(x, A, values, B, b, S_idx=idx)
    want = run()
    assert all(torch.equal(run(), want) for _ in range(5))
    graph = torch.cuda.CUDAGraph()
    run()  # warm-up outside capture
    with torch.cuda.graph(graph):
        y = run()
    graph.replay()
    torch.testing.assert_close(y, want, rtol=0, atol=0)


@fused
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compressor_round_trip_exact(dtype):
    """With A' = B' = I and x = I every output is one product s * 1: y must be Sᵀ bit for bit."""
    d_out, d_in = 384, 256
    S = rand_24(d_out, d_in, dtype).cuda()
    eye = lambda n: torch.eye(128, dtype=dtype, device="cuda").expand(n // 128, 128, 128).contiguous()
    x = torch.eye(d_in, dtype=dtype, device="cuda")
    y = ops.linear(x, eye(d_out), S, eye(d_in), sm90=ops.pack_sm90(S))
    torch.testing.assert_close(y, S.T, rtol=0, atol=0)


@fused
def test_fused_cuda_graph_and_compile():
    A, S, B, b = (t.cuda() for t in factors(512, 256, 128, 128, torch.bfloat16))
    sm90 = ops.pack_sm90(S)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    want = ops.linear(x, A, S, B, b, sm90=sm90)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.linear(x, A, S, B, b, sm90=sm90)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.linear(x, A, S, B, b, sm90=sm90)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(y, ops.linear(x, A, S, B, b, sm90=sm90), rtol=0, atol=0)
    assert not torch.equal(y, want)
    compiled = torch.compile(lambda x: ops.linear(x, A, S, B, b, sm90=sm90), fullgraph=True, mode="reduce-overhead")
    torch.testing.assert_close(compiled(x), y, rtol=0, atol=0)


# --- The decode kernels' lane logic, emulated on the host (runs everywhere) -------------------------

@pytest.fixture(scope="module")
def decode_emulator(tmp_path_factory):
    """tests/csrc/decode_emulation.cpp built as a shared library: csrc/sm90_decode.cuh's per-lane code
    (csrc/decode_fragments.h) run for every lane, with the warp's mma emulated from its PTX layout."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("needs a C++ compiler")
    root = Path(__file__).resolve().parents[1]
    lib = tmp_path_factory.mktemp("decode") / "decode_emulation.so"
    subprocess.run([cxx, "-std=c++17", "-O2", "-shared", "-fPIC", f"-I{root / 'csrc'}",
                    str(root / "tests/csrc/decode_emulation.cpp"), "-o", str(lib)], check=True)
    fn = ctypes.CDLL(str(lib)).armor_emulate_decode_linear
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int] * 4
    return fn


def emulate_decode(fn, x, A, values, idx, B, bias, sm_count):
    """(y, K splits) of the emulated decode kernels, bf16 on the CPU."""
    tokens, d_in = x.shape
    d_out = values.shape[0]
    y = torch.full((tokens, d_out), float("nan"), dtype=torch.bfloat16)
    splits = fn(x.data_ptr(), B.data_ptr(), values.data_ptr(), idx.data_ptr(), A.data_ptr(),
                None if bias is None else bias.data_ptr(), y.data_ptr(), tokens, d_in, d_out, sm_count)
    return y, splits


@pytest.mark.parametrize("d_out,d_in,tokens,sm_count,bias,splits", [
    (128, 128, 1, 1, True, 1),      # one CTA per kernel
    (256, 384, 5, 4, False, 1),     # ragged token tile (5 of 8); too little K to split
    (384, 256, 8, 132, True, 1),    # a full n8 tile
    (128, 640, 9, 2, True, 2),      # two n8 tiles, the second with one token
    (256, 1152, 16, 8, False, 4),   # 16 tokens; 18 steps of K as 5 + 5 + 5 + 3
    (512, 2048, 3, 132, True, 8),   # at most d_in / 256 splits
])
def test_decode_lane_logic_matches_reference(decode_emulator, d_out, d_in, tokens, sm_count, bias, splits):
    A, S, B, b = factors(d_out, d_in, 128, 128, torch.bfloat16, bias)
    values, idx = pack_24(S)
    x = torch.randn(tokens, d_in, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    y, used = emulate_decode(decode_emulator, x, A, values, idx, B, b, sm_count)
    assert used == splits
    # Same roundings of xb and S xb^T as the reference, fp32 sums in another order: close to it.
    assert_close(y, ops.reference(x, A, S, B, b).double(), torch.bfloat16)
    assert_close(y, dense_math(x, A, S, B, b), torch.bfloat16)


def test_decode_lane_logic_reads_positions(decode_emulator):
    """Moving one kept value to another position of its group must change exactly that output row."""
    A, S, B, _ = factors(128, 256, 128, 128, torch.bfloat16, bias=False)
    eye = torch.eye(128, dtype=torch.bfloat16).expand(2, 128, 128).contiguous()
    S[5, 4:8] = torch.tensor([0, 1.5, 0, -2.0])
    values, idx = pack_24(S)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    y0, _ = emulate_decode(decode_emulator, x, eye[:1], values, idx, eye, None, 4)
    S2 = S.clone()
    S2[5, 4:8] = torch.tensor([1.5, 0, 0, -2.0])
    values2, idx2 = pack_24(S2)
    assert torch.equal(values2, values) and not torch.equal(idx2, idx)
    y1, _ = emulate_decode(decode_emulator, x, eye[:1], values2, idx2, eye, None, 4)
    changed = (y1 != y0).any(0).nonzero().flatten().tolist()
    assert changed == [5]
    assert_close(y1, ops.reference(x, eye[:1], S2, eye, None).double(), torch.bfloat16)
