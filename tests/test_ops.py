"""torch.ops.armor.linear: the reference against plain dense math, the op contract (opcheck, compile,
errors, the checks of the sm90 buffers, the dispatch rule), the binding's own checks where it is built,
what the `gpu` marker guarantees, and on an sm_90 GPU (tests marked `gpu`) the fused kernels against
the reference."""
import ctypes
import importlib
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import assert_within_ulps, launched, random_24, rounded_reference

from armor_kernels import ops
from armor_kernels.sparse24 import pack_24

ROOT = Path(__file__).resolve().parents[1]

# Relative tolerances of a few roundings of intermediates in the dtype (8 bits of mantissa for bf16,
# 11 for fp16) accumulated over reductions of a few hundred terms.
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def factors(d_out, d_in, bA, bB, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Blocks near the identity, as ARMOR's are (it starts from A = B = I), keep outputs O(1).
    A = torch.eye(bA) + 0.1 * torch.randn(d_out // bA, bA, bA, generator=g)
    B = torch.eye(bB) + 0.1 * torch.randn(d_in // bB, bB, bB, generator=g)
    S = random_24(d_out, d_in, generator=g) / d_in ** 0.5
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
    packed = ops.linear(x, A, values, B, b, S_idx=idx, backend="reference")
    torch.testing.assert_close(packed, ops.linear(x, A, S, B, b), rtol=0, atol=0)


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
    if ops.NATIVE_IMPORT_ERROR is not None:
        match = "not built" if importlib.util.find_spec("armor_kernels._armor_cuda") is None else "failed to load"
        with pytest.raises(RuntimeError, match=match):
            ops.pack_sm90(random_24(128, 128, dtype=torch.bfloat16))


def sm90_buffers(d_out, d_in, dtype=torch.bfloat16, device="cpu"):
    """Buffers of the sizes pack_sm90 gives a (d_out, d_in) S (contents irrelevant to the checks)."""
    n_values, n_meta = ops.sm90_compressed_sizes(d_out, d_in)
    return ops.Sm90Packed(torch.zeros(n_values, dtype=dtype, device=device),
                          torch.zeros(n_meta, dtype=torch.uint8, device=device))


@pytest.mark.parametrize("device", ["cpu", "meta"])  # meta: the fake kernel, what torch.compile traces
@pytest.mark.parametrize("change,arg,expected", [
    (lambda v, m: (v[:-8], m), "sm90.values", "contiguous 1-D tensor of 32768 elements"),
    (lambda v, m: (v.reshape(256, 128), m), "sm90.values", "contiguous 1-D tensor of 32768 elements"),
    (lambda v, m: (torch.zeros(2 * v.numel(), dtype=v.dtype, device=v.device)[::2], m), "sm90.values",
     "contiguous 1-D"),
    (lambda v, m: (v, m.view(torch.int8)), "sm90.meta", "dtype torch.uint8"),
    (lambda v, m: (v, sm90_buffers(512, 256, device=m.device).meta), "sm90.meta", "8192 elements"),
    (lambda v, m: (v.float(), m), "sm90.values", "x's dtype torch.bfloat16"),
])
def test_sm90_buffers_are_checked(device, change, arg, expected):
    """sm90 buffers are validated against the layer (sizes of sm90_compressed_sizes, flat, contiguous,
    dtypes) wherever the op runs: on CPU, where the reference ignores them, and at trace time."""
    x, A, S, B, b = (t.to(device) for t in op_args(torch.bfloat16)[:5])
    good = sm90_buffers(256, 256, device=device)
    y = ops.linear(x, A, S, B, b, sm90=good)
    assert y.shape == (2, 3, 256)
    with pytest.raises(ValueError, match=f"armor.linear: {arg}: expected .*{expected}"):
        ops.linear(x, A, S, B, b, sm90=ops.Sm90Packed(*change(*good)))


def test_sm90_buffer_checks_at_a_real_size_on_meta():
    d = 4096
    x = torch.empty(8, d, dtype=torch.bfloat16, device="meta")
    A = B = torch.empty(d // 128, 128, 128, dtype=torch.bfloat16, device="meta")
    S = torch.empty(d, d, dtype=torch.bfloat16, device="meta")
    sm90 = sm90_buffers(d, d, device="meta")
    assert ops.linear(x, A, S, B, sm90=sm90).shape == (8, d)
    with pytest.raises(ValueError, match="sm90.meta: expected a contiguous 1-D tensor of 2097152 elements"):
        ops.linear(x, A, S, B, sm90=ops.Sm90Packed(sm90.values, sm90.meta[1:]))


def python_env(**extra):
    """The environment of a child interpreter that imports this checkout's armor_kernels."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def native_module():
    """armor_kernels._armor_cuda, imported directly (its own checks), or a skip saying why it is absent."""
    if ops.NATIVE_IMPORT_ERROR is not None:
        pytest.skip(ops.NATIVE_IMPORT_ERROR)
    return importlib.import_module("armor_kernels._armor_cuda")


@pytest.mark.parametrize("d_out,d_in", [(128, 128), (256, 384), (384, 128), (4096, 11008), (11008, 4096)])
def test_sm90_compressed_sizes_mirror_the_binding(d_out, d_in):
    native = native_module()  # a pure host computation: runs wherever the binding is built
    for dtype in (native.BF16, native.FP16):
        assert native.compressed_sizes(dtype, d_out, d_in) == ops.sm90_compressed_sizes(d_out, d_in)


def test_binding_checks_its_arguments():
    """The C API's checks, reached through the binding without touching a device."""
    native = native_module()
    assert native.supported(native.BF16, 256, 384) and not native.supported(native.BF16, 256, 100)
    assert not native.supported(7, 256, 256)
    ok = dict(dtype=native.BF16, tokens=5, d_in=256, d_out=384, sm_count=4)
    assert native.linear_workspace_bytes(native.Params(**ok)) == 5 * 256 * 2
    assert native.decode_workspace_bytes(native.Params(**ok)) > 5 * 256 * 2
    bad = [(dict(dtype=7), "unsupported dtype"), (dict(d_in=100), "unsupported shape"),
           (dict(tokens=0), "unsupported shape"), (dict(sm_count=-1), "invalid argument")]
    for change, message in bad:
        for fn in (native.linear_workspace_bytes, native.decode_workspace_bytes, native.linear, native.decode_linear):
            with pytest.raises(RuntimeError, match=message):
                fn(native.Params(**{**ok, **change}))
    with pytest.raises(RuntimeError, match="decode_workspace_bytes: invalid argument"):
        native.decode_workspace_bytes(native.Params(**{**ok, "tokens": native.DECODE_MAX_TOKENS + 1}))
    with pytest.raises(RuntimeError, match="linear: invalid argument"):  # null pointers, before any launch
        native.linear(native.Params(**ok))
    assert native.last_launches() == []  # a refused call launches nothing and leaves no older plan behind
    pointers = dict(x=1 << 20, B_blocks=2 << 20, A_blocks=3 << 20, S_values=4 << 20, S_meta=5 << 20,
                    workspace=6 << 20, y=(7 << 20) + 8)
    with pytest.raises(RuntimeError, match="not 16-byte aligned"):
        native.decode_linear(native.Params(**ok, **pointers))
    params = native.Params(**ok, **pointers)
    params.workspace = 64
    assert (params.workspace, params.sm_count, params.y) == (64, 4, (7 << 20) + 8)
    if not torch.cuda.is_available():  # sm_count = 0 asks the current device
        with pytest.raises(RuntimeError, match="SM count could not be queried"):
            native.linear_workspace_bytes(native.Params(**{**ok, "sm_count": 0}))


def test_linear_path_rule(monkeypatch):
    """The one dispatch rule, first where only the reference runs, then as on an sm_90 device."""
    A, S, B, b = factors(256, 256, 128, 128, torch.bfloat16)
    values, idx = pack_24(S)
    sm90 = sm90_buffers(256, 256)
    x = torch.randn(5, 256).to(torch.bfloat16)
    cpu = ops.cpu_unavailable_reason() is None
    assert ops.linear_path(x, A, values, B, S_idx=idx, sm90=sm90) == ("cpu_sparse" if cpu else "reference")
    many = 4096  # where the tiles fold the wrappers into S
    assert ops.cpu_gemm_folds(many, 256, 256, 128, 128)
    assert ops.linear_path(many, A, values, B, S_idx=idx) == ("cpu_gemm" if cpu else "reference")
    assert ops.linear_path(x, A, S, B) == "reference"  # dense S: no packed kernel reads it
    assert ops.linear_path(5, A, S, B, backend="reference") == "reference"
    for backend in ("decode", "sparse_gemm"):
        with pytest.raises(ValueError, match=f"backend='{backend}' does not apply: .*(not built|not a CUDA device)"):
            ops.linear(x, A, values, B, b, S_idx=idx, sm90=sm90, backend=backend)
    with pytest.raises(ValueError, match="backend: expected one of"):
        ops.linear(x, A, S, B, b, backend="cutlass")
    with pytest.raises(ValueError, match="sm_count: expected >= 0"):
        ops.linear(x, A, S, B, b, sm_count=-1)
    torch.testing.assert_close(ops.linear(x, A, S, B, b, backend="reference"), ops.linear(x, A, S, B, b))

    monkeypatch.setattr(ops, "fused_unavailable_reason", lambda *args: None)
    monkeypatch.setattr(ops, "cpu_unavailable_reason", lambda *args: "as on a GPU")
    monkeypatch.setattr(ops, "DECODE_MAX_TOKENS", 16)
    path = ops.linear_path
    assert path(16, A, values, B, S_idx=idx, sm90=sm90) == "decode"
    assert path(17, A, values, B, S_idx=idx, sm90=sm90) == "sparse_gemm"
    assert path(17, A, values, B, S_idx=idx) == "reference"
    assert path(1, A, S, B, sm90=sm90) == "sparse_gemm"
    assert path(0, A, values, B, S_idx=idx, sm90=sm90) == "reference"
    assert path(torch.empty(2, 8, 256), A, values, B, S_idx=idx) == "decode"  # tokens: the leading dims
    assert path(torch.empty(3, 6, 256), A, values, B, S_idx=idx) == "reference"
    assert path(3, A, values, B, S_idx=idx, sm90=sm90, backend="sparse_gemm") == "sparse_gemm"
    for tokens, kwargs, backend, why in [
        (17, dict(S_idx=idx), "decode", "17 tokens, the decode kernels take at most 16"),
        (4, dict(sm90=sm90), "decode", "S is not packed"),
        (4, dict(S_idx=idx), "sparse_gemm", "no sm90 compressed S"),
        (0, dict(S_idx=idx, sm90=sm90), "sparse_gemm", "x has no tokens"),
    ]:
        with pytest.raises(ValueError, match=f"backend='{backend}' does not apply: {why}"):
            path(tokens, A, values if "S_idx" in kwargs else S, B, backend=backend, **kwargs)


def test_native_load_failure_is_reported_not_hidden():
    """A built extension that fails to load (here: a simulated missing libarmor_cuda.so) warns at import
    and is the reason the fused path is unusable; before, ops set it to None silently."""
    code = textwrap.dedent("""
        import importlib.abc, sys, warnings
        class Broken(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "armor_kernels._armor_cuda":
                    raise ImportError("libarmor_cuda.so: cannot open shared object file")
        sys.meta_path.insert(0, Broken())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from armor_kernels import ops
        print([str(w.message) for w in caught if w.category is RuntimeWarning])
        print(ops.fused_unavailable_reason("cuda"))
    """)
    out = subprocess.run([sys.executable, "-c", code], env=python_env(), capture_output=True, text=True,
                         check=True).stdout
    warned, reason = out.splitlines()[-2:]
    assert "failed to load" in warned and "libarmor_cuda.so: cannot open shared object file" in warned
    assert reason.startswith("the extension armor_kernels._armor_cuda is built but failed to load")


SIMULATED_GPU_TESTS = """
import pytest
from armor_kernels import ops

ops.fused_unavailable_reason = lambda *args: {reason!r}  # the machine this run simulates

@pytest.mark.gpu
@pytest.mark.sanitize("memcheck")
def test_fused():
    pass

@pytest.mark.gpu
def test_fused_that_skips_itself():
    pytest.skip("some other reason")

def test_cpu():
    pass
"""
UNUSABLE = "simulated: the native library failed to load"


@pytest.mark.parametrize("reason,require,args,rc,summary,shown", [
    (UNUSABLE, False, [], 0, "1 passed, 2 skipped", UNUSABLE),
    (UNUSABLE, True, [], 1, "1 passed, 2 errors", UNUSABLE),  # before the fix: 1 passed, 2 skipped, rc 0
    (None, True, [], 1, "1 failed, 2 passed", "some other reason"),
    (UNUSABLE, True, ["-k", "test_cpu"], 1, "1 passed, 2 deselected", "0 gpu-marked tests passed"),
    (None, False, ["--sanitizer", "memcheck"], 0, "1 passed, 2 deselected", ""),
    (None, False, ["--sanitizer", "racecheck"], 5, "3 deselected", ""),
])
def test_gpu_marker_cannot_pass_by_skipping(tmp_path, reason, require, args, rc, summary, shown):
    """tests/conftest.py's hooks on a simulated machine: where the fused path is unusable (reason given)
    or usable (None), with and without ARMOR_REQUIRE_FUSED=1, and the --sanitizer selection."""
    (tmp_path / "conftest.py").write_text((Path(__file__).parent / "conftest.py").read_text())
    (tmp_path / "test_simulated.py").write_text(SIMULATED_GPU_TESTS.format(reason=reason))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        "-W", "ignore::pytest.PytestUnknownMarkWarning", *args, str(tmp_path)], cwd=tmp_path,
                       env=python_env(ARMOR_REQUIRE_FUSED="1" if require else "0"), capture_output=True, text=True)
    out = r.stdout + r.stderr
    assert r.returncode == rc and summary in out and shown in out, out


# --- GPU: the fused kernels (sm_90 + built extension), marked `gpu` -------------------------------
# tests/conftest.py skips them where the kernels cannot run, and fails them instead under
# ARMOR_REQUIRE_FUSED=1. `sanitize` marks the cases .ci/gpu_check.sh runs under compute-sanitizer.

gpu = pytest.mark.gpu
memcheck = pytest.mark.sanitize("memcheck")
racecheck = pytest.mark.sanitize("racecheck")  # the decode kernels' shared memory

FUSED_SHAPES = [(256, 256), (384, 512), (512, 128), (4096, 4096)]
SANITIZED = {  # (d_out, d_in, dtype, tokens, bias, packed) -> marks
    (384, 512, torch.bfloat16, 1, True, True): [memcheck],
    (384, 512, torch.bfloat16, 16, True, True): [memcheck],
    (384, 512, torch.bfloat16, 300, True, False): [memcheck],
    (256, 256, torch.bfloat16, 1, True, True): [racecheck],
    (256, 256, torch.bfloat16, 16, True, True): [racecheck],
}


def fused_cases():
    """Every combination, with the IDs that stacked parametrize decorators gave them before the marks:
    packed-bias-tokens-dtype-d_out-d_in."""
    for d_out, d_in in FUSED_SHAPES:
        for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
            for tokens in (1, 5, 9, 16, 17, 100, 129, 300):
                for bias in (True, False):
                    for packed in (False, True):  # packed: the decode kernels up to 16 tokens
                        yield pytest.param(d_out, d_in, dtype, tokens, bias, packed,
                                           marks=SANITIZED.get((d_out, d_in, dtype, tokens, bias, packed), []),
                                           id=f"{packed}-{bias}-{tokens}-{name}-{d_out}-{d_in}")


def cuda_factors(d_out, d_in, dtype=torch.bfloat16, bias=True):
    return [t if t is None else t.cuda() for t in factors(d_out, d_in, 128, 128, dtype, bias)]


@gpu
@pytest.mark.parametrize("d_out,d_in,dtype,tokens,bias,packed", list(fused_cases()))
def test_fused_matches_reference(d_out, d_in, dtype, tokens, bias, packed):
    A, S, B, b = cuda_factors(d_out, d_in, dtype, bias)
    x = torch.randn(tokens, d_in, device="cuda").to(dtype)
    values, idx = pack_24(S) if packed else (S, None)
    sm90 = ops.pack_sm90(S)
    path = "decode" if packed and tokens <= ops.DECODE_MAX_TOKENS else "sparse_gemm"
    assert ops.linear_path(x, A, values, B, S_idx=idx, sm90=sm90) == path
    with launched(**{path: 1}):
        y = ops.linear(x, A, values, B, b, S_idx=idx, sm90=sm90)
    torch.cuda.synchronize()
    assert_close(y, dense_math(x, A, S, B, b), dtype)
    # The reference's roundings of intermediates, fp32 sums in another order: within two output ulps.
    assert_within_ulps(y, rounded_reference(x, A, S, B, b))


@gpu
@pytest.mark.parametrize("sm_count", [1, pytest.param(2, marks=memcheck), 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_sparse_gemm_persistent_loop(sm_count, dtype):
    """Fewer CTAs than tiles: 3 x 3 = 9 output tiles (the last token tile ragged) and 3 x 2 tiles of the B'
    GEMM on 1, 2, 3 CTAs, so each CTA runs several tiles (epilogue buffers reused, A' loaded per tile).
    Every tile is computed by exactly one CTA: the result is bit-identical to the full grid's."""
    d_out, d_in, tokens = 384, 256, 300
    A, S, B, b = cuda_factors(d_out, d_in, dtype)
    x = torch.randn(tokens, d_in, device="cuda").to(dtype)
    sm90 = ops.pack_sm90(S)
    with launched(sparse_gemm=1):
        y = ops.linear(x, A, S, B, b, sm90=sm90, backend="sparse_gemm", sm_count=sm_count)
    torch.cuda.synchronize()
    assert_within_ulps(y, rounded_reference(x, A, S, B, b))
    # the plan that ran: the B' GEMM's and the sparse GEMM's persistent grids, sm_count CTAs each (fewer than
    # their 6 and 9 tiles); a launch that ignored sm_count would give the full grids and the same result
    assert [math.prod(g) for g in ops.LAUNCH_GRIDS["sparse_gemm"]] == [sm_count, sm_count]
    torch.testing.assert_close(y, ops.linear(x, A, S, B, b, sm90=sm90, backend="sparse_gemm"), rtol=0, atol=0)


@gpu
def test_sparse_gemm_many_tiles_per_sm():
    """T = 1000 on 4096 x 4096: 32 x 8 = 256 output tiles on the device's SMs (132 on an H100 / H200),
    the default grid's persistent loop."""
    A, S, B, b = cuda_factors(4096, 4096)
    x = torch.randn(1000, 4096, device="cuda").to(torch.bfloat16)
    sm90 = ops.pack_sm90(S)
    assert ops.linear_path(x, A, S, B, sm90=sm90) == "sparse_gemm"
    with launched(sparse_gemm=1):
        y = ops.linear(x, A, S, B, b, sm90=sm90)
    torch.cuda.synchronize()
    assert_close(y, dense_math(x, A, S, B, b), torch.bfloat16)
    assert_within_ulps(y, rounded_reference(x, A, S, B, b))
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    b_gemm, sparse_gemm = (math.prod(g) for g in ops.LAUNCH_GRIDS["sparse_gemm"])
    assert b_gemm <= sms and sparse_gemm == min(sms, 32 * 8)  # persistent: at most one CTA per SM


@gpu
@pytest.mark.parametrize("sm_count", [1, 2, 7])  # 2, 4 and 8 splits of K at this shape (split_k.h)
@pytest.mark.parametrize("tokens", [5, 16])
def test_decode_sm_count(sm_count, tokens, decode_emulator):
    A, S, B, b = cuda_factors(256, 2048)
    values, idx = pack_24(S)
    x = torch.randn(tokens, 2048, device="cuda").to(torch.bfloat16)
    with launched(decode=1):
        y = ops.linear(x, A, values, B, b, S_idx=idx, backend="decode", sm_count=sm_count)
    torch.cuda.synchronize()
    assert_within_ulps(y, rounded_reference(x, A, S, B, b))
    # the plan that ran: one CTA per 128 columns of x, then 2 row blocks x the K splits split_k.h plans for
    # sm_count (the host emulation's count); ignoring sm_count would split for the whole device
    _, splits = emulate_decode(decode_emulator, *(t.cpu() for t in (x, A, values, idx, B, b)), sm_count)
    assert ops.LAUNCH_GRIDS["decode"] == [(2048 // 128, 1, 1), (256 // 128, splits, 1)]


@gpu
def test_forced_backends_on_gpu():
    A, S, B, b = cuda_factors(256, 256)
    values, idx = pack_24(S)
    sm90 = ops.pack_sm90(S)
    x = torch.randn(17, 256, device="cuda").to(torch.bfloat16)
    with pytest.raises(ValueError, match="backend='decode' does not apply: 17 tokens"):
        ops.linear(x, A, values, B, b, S_idx=idx, sm90=sm90, backend="decode")
    with pytest.raises(ValueError, match="backend='sparse_gemm' does not apply: no sm90"):
        ops.linear(x, A, values, B, b, S_idx=idx, backend="sparse_gemm")
    x1 = x[:1]  # the sparse GEMM at a decode size, where "auto" would decode
    y = ops.linear(x1, A, values, B, b, S_idx=idx, sm90=sm90, backend="sparse_gemm")
    assert_within_ulps(y, rounded_reference(x1, A, S, B, b))


@gpu
@pytest.mark.parametrize("tokens", [pytest.param(1, marks=memcheck), pytest.param(16, marks=memcheck)])
def test_decode_is_deterministic_and_graphable(tokens):
    """The split-K reduction sums in a fixed order: replays and graph replays are bit-identical."""
    A, S, B, b = cuda_factors(4096, 4096)
    values, idx = pack_24(S)
    x = torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16)

    def run():
        return ops.linear(x, A, values, B, b, S_idx=idx)

    want = run()
    assert all(torch.equal(run(), want) for _ in range(5))
    graph = torch.cuda.CUDAGraph()
    run()  # warm-up outside capture
    with torch.cuda.graph(graph):
        y = run()
    graph.replay()
    torch.testing.assert_close(y, want, rtol=0, atol=0)


@gpu
@memcheck
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compressor_round_trip_exact(dtype):
    """With A' = B' = I and x = I every output is one product s * 1: y must be Sᵀ bit for bit."""
    d_out, d_in = 384, 256
    S = random_24(d_out, d_in, dtype=dtype).cuda()

    def eye(n):
        return torch.eye(128, dtype=dtype, device="cuda").expand(n // 128, 128, 128).contiguous()

    x = torch.eye(d_in, dtype=dtype, device="cuda")
    y = ops.linear(x, eye(d_out), S, eye(d_in), sm90=ops.pack_sm90(S))
    torch.testing.assert_close(y, S.T, rtol=0, atol=0)


@gpu
def test_fused_cuda_graph_and_compile():
    A, S, B, b = cuda_factors(512, 256)
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


@pytest.mark.multigpu  # not `gpu`: the GPU check's `test` stage runs on one device; `multigpu` runs it
def test_kernels_run_on_the_tensors_device():
    """Inputs on cuda:1 while cuda:0 is current: the op guards the device the kernels run on."""
    dev = torch.device("cuda", 1)
    if ops.fused_unavailable_reason(dev) is not None:
        pytest.skip(ops.fused_unavailable_reason(dev))
    A, S, B, b = (t.to(dev) for t in factors(256, 256, 128, 128, torch.bfloat16))
    x = torch.randn(33, 256, device=dev).to(torch.bfloat16)
    values, idx = pack_24(S)
    with torch.cuda.device(0):
        sm90 = ops.pack_sm90(S)
        with launched(sparse_gemm=1, decode=1):
            y = ops.linear(x, A, S, B, b, sm90=sm90)
            y1 = ops.linear(x[:3], A, values, B, b, S_idx=idx)
    assert_within_ulps(y.cpu(), rounded_reference(*(t.cpu() for t in (x, A, S, B, b))))
    assert_within_ulps(y1.cpu(), rounded_reference(*(t.cpu() for t in (x[:3], A, S, B, b))))


# --- The decode kernels' lane logic, emulated on the host (runs everywhere) -------------------------

@pytest.fixture(scope="module")
def decode_emulator(tmp_path_factory):
    """tests/csrc/decode_emulation.cpp built as a shared library: csrc/sm90_decode.cuh's per-lane code
    (csrc/decode_fragments.h) run for every lane, with the warp's mma emulated from its PTX layout."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("needs a C++ compiler")
    lib = tmp_path_factory.mktemp("decode") / "decode_emulation.so"
    subprocess.run([cxx, "-std=c++17", "-O2", "-shared", "-fPIC", f"-I{ROOT / 'csrc'}",
                    str(ROOT / "tests/csrc/decode_emulation.cpp"), "-o", str(lib)], check=True)
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
    # The reference's roundings of xb and S xb^T, fp32 sums in another order: within two output ulps.
    assert_within_ulps(y, rounded_reference(x, A, S, B, b))
    assert_close(y, dense_math(x, A, S, B, b), torch.bfloat16)


def test_decode_lane_logic_reads_positions(decode_emulator):
    """Moving one kept value to another position of its group must change exactly that output row."""
    _, S, _, _ = factors(128, 256, 128, 128, torch.bfloat16, bias=False)
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
    assert_within_ulps(y1, rounded_reference(x, eye[:1], S2, eye, None))


def test_ulp_bound_tells_one_rounding_from_a_wrong_output():
    """The GPU tests' bound, on the host: the reference's arithmetic in float32 (another summation order)
    passes; the same output with one element three ulps off fails."""
    for dtype in (torch.bfloat16, torch.float16):
        A, S, B, b = factors(384, 256, 128, 128, dtype)
        x = torch.randn(17, 256, generator=torch.Generator().manual_seed(4)).to(dtype)
        xb = ops.block_diag_apply(x.float(), B.float()).to(dtype)
        z = torch.nn.functional.linear(xb.float(), S.float()).to(dtype)
        y = (ops.block_diag_apply(z.float(), A.float()) + b.float()).to(dtype)
        want = rounded_reference(x, A, S, B, b)
        assert_within_ulps(y, want)
        t = want[3].abs().argmax()
        bad = y.clone()
        bad[3, t] = torch.nextafter(torch.nextafter(torch.nextafter(want[3, t], want[3, t] * 2), want[3, t] * 2),
                                    want[3, t] * 2)
        with pytest.raises(AssertionError, match="off by 3.00 ulps"):
            assert_within_ulps(bad, want)
