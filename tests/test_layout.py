"""The kernels' layout (layout.py, ops.fused_operands / fused_linear): a layer with any blocks 4…128 and
any sizes, padded and block-expanded, gives the layer's own output. On the CPU the op runs the reference,
on exactly the tensors the kernels would read (everything but the sm90 compression, which needs the GPU);
the nn modules' prepare is exercised here with the device check and the compressor stubbed."""
import re

import pytest
import torch
from helpers import cpu_path, random_24
from test_ops import TOL, assert_close, dense_math, factors

from armor_kernels import ArmorLinear, Sparse24Linear, ops, prepare
from armor_kernels.layout import KERNEL_BLOCK, identity_blocks, layer_layout, side
from armor_kernels.nn import unfused_reasons
from armor_kernels.sparse24 import check_24, pack_24, unpack_24

CASES = [  # (d_out, d_in, bA, bB): blocks per 128-block on each side (k), padded size
    (256, 384, 128, 128),   # native x native
    (576, 576, 96, 96),     # SmolLM2 q/o under the b = 128 rule: k = 1, 576 -> 768 on both sides
    (192, 576, 96, 96),     # k/v: 192 -> 256, 576 -> 768
    (1536, 576, 128, 96),   # gate/up: native x (k = 1)
    (576, 1536, 64, 128),   # down at a 5 % budget: 576 -> 640 (k = 2) x native
    (576, 576, 32, 16),     # k = 4 and 8, ragged
    (576, 576, 12, 12),     # 12 does not divide 128: k = 10, 48 blocks in 5 groups, 576 -> 640
    (192, 576, 6, 4),       # k = 21 (192 -> 256) x k = 32 (576 -> 640)
    (328, 264, 8, 4),       # ragged both ways (-> 384 x 384), the smallest input blocks
    (96, 104, 96, 104),     # one block per side, neither divides 128
    (384, 256, 64, 32),     # blocks expanded, nothing padded
]


def test_sides_and_their_costs():
    assert layer_layout(256, 384, 128, 128).native
    assert side(576, 96, "d_in") == (576, 96, 768, 1) and side(576, 64, "d_in") == (576, 64, 640, 2)
    assert side(576, 12, "d_out") == (576, 12, 640, 10) and side(192, 6, "d_out").padded == 256
    assert side(328, 8, "d_out").padded == 384 and side(104, 104, "d_in").padded == 128
    assert side(384, 32, "d_in").padded == 384
    assert torch.equal(side(576, 64, "d_in").index(), torch.arange(576))  # b | 128: positions stay
    assert side(576, 12, "d_in").index()[[0, 119, 120, 575]].tolist() == [0, 119, 128, 4 * 128 + 7 * 12 + 11]
    assert layer_layout(576, 576, 96, 96).flop_ratio == pytest.approx(768 ** 2 / 576 ** 2)
    assert layer_layout(576, 576, 12, 12).flop_ratio == pytest.approx(640 ** 2 / 576 ** 2)
    assert layer_layout(4096, 4096, 128, 128).flop_ratio == 1.0
    assert "576->768 (1x96 per 128)" in layer_layout(576, 576, 96, 96).describe()


@pytest.mark.parametrize("d_out,d_in,bA,bB,why", [
    (512, 512, 256, 128, "d_out blocks of 256: wider than the kernels' 128-blocks"),
    (512, 512, 128, 256, "d_in blocks of 256"),
    (96, 90, 96, 6, "d_in blocks of 6: not a multiple of 4"),
    (100, 64, 30, 64, "d_out=100 is not a multiple of its block size 30"),
    (480, 480, 80, 80, "the sparse GEMM does at least the dense layer's work"),  # 768²/480² = 2.56
])
def test_refused_layouts_say_why(d_out, d_in, bA, bB, why):
    assert why in layer_layout(d_out, d_in, bA, bB)
    assert why in ops.layer_unavailable_reason(torch.bfloat16, d_out, d_in, bA, bB)
    if d_in % 8 == 0 and d_out % bA == 0:  # layers that exist (block_size=256, blocks of 80), refused by name
        A, S, B, b = factors(d_out, d_in, bA, bB, torch.float32)
        with pytest.raises(ValueError, match=f"fused_operands: .*{re.escape(why)}"):
            ops.fused_operands(A, *pack_24(S), B, b, compress=False)


@pytest.mark.parametrize("d_out,d_in,bA,bB", CASES)
def test_padded_operands_have_the_kernels_shape_and_stay_exact(d_out, d_in, bA, bB):
    """What the kernels read: 128-blocks, multiples of 128, S still 2:4, zeros outside the layer; the
    layer's values at their mapped positions, bit for bit."""
    A, S, B, b = factors(d_out, d_in, bA, bB, torch.float32)
    f = ops.fused_operands(A, *pack_24(S), B, b, compress=False)
    D_out, D_in = f.layout.out.padded, f.layout.in_.padded
    assert D_out % KERNEL_BLOCK == 0 and D_in % KERNEL_BLOCK == 0
    assert f.A.shape == (D_out // 128, 128, 128) and f.B.shape == (D_in // 128, 128, 128)
    S_pad = unpack_24(f.S_values, f.S_idx)
    check_24(S_pad)
    assert S_pad.shape == (D_out, D_in) and f.bias.shape == (D_out,)
    rows, cols = f.layout.out.index(), f.layout.in_.index()
    assert torch.equal(S_pad[rows][:, cols], S)
    assert S_pad.count_nonzero() == S.count_nonzero() and torch.equal(f.bias[rows], b)
    assert f.bias.count_nonzero() == b.count_nonzero()
    for blocks, layer_blocks, idx in ((f.A, A, rows), (f.B, B, cols)):
        dense = torch.block_diag(*blocks)
        assert torch.equal(dense[idx][:, idx], torch.block_diag(*layer_blocks))
        assert dense.count_nonzero() == layer_blocks.count_nonzero()
    if f.layout.native:  # nothing copied
        assert f.A is A and f.B is B and f.bias is b


@pytest.mark.parametrize("d_out,d_in,bA,bB", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("lead", [(1,), (3, 7)], ids=["T1", "T21"])
@pytest.mark.parametrize("bias", [True, False])
def test_padded_layer_gives_the_layers_output(d_out, d_in, bA, bB, dtype, lead, bias):
    A, S, B, b = factors(d_out, d_in, bA, bB, dtype, bias)
    x = torch.randn(*lead, d_in).to(dtype)
    f = ops.fused_operands(A, *pack_24(S), B, b, compress=False)
    y = ops.fused_linear(x, f)
    assert y.shape == (*lead, d_out) and y.dtype == dtype
    assert_close(y, dense_math(x, A, S, B, b), dtype)
    # The padded y: the layer's rows, and exact zeros where the padding is (no bias there, zero rows of S).
    y_pad = ops.linear(f.layout.in_.pad(x), f.A, f.S_values, f.B, f.bias, S_idx=f.S_idx)
    assert torch.equal(f.layout.out.unpad(y_pad), y)
    keep = torch.zeros(f.layout.out.padded, dtype=torch.bool)
    keep[f.layout.out.index()] = True
    assert y_pad[..., ~keep].count_nonzero() == 0
    if dtype == torch.float32:  # the same sums plus exact zeros: the unpadded reference to rounding
        torch.testing.assert_close(y, ops.reference(x, A, S, B, b), rtol=TOL[dtype], atol=TOL[dtype])


def test_fused_linear_names_a_wrong_input():
    A, S, B, b = factors(192, 576, 96, 96, torch.float32)
    f = ops.fused_operands(A, *pack_24(S), B, b, compress=False)
    with pytest.raises(ValueError, match=r"armor.linear: x: expected last dimension 576, got \(2, 768\)"):
        ops.fused_linear(torch.randn(2, 768), f)


def test_identity_blocks_cover_any_size():
    for d in (192, 576, 100, 4096, 50):
        blocks = identity_blocks(d, torch.float32)
        assert torch.equal(torch.block_diag(*blocks), torch.eye(d))
        layout = layer_layout(d, 576, blocks.shape[1], 64)
        if d != 50:  # 50 pads to 128, and 576 to 640: past the break-even work, refused
            assert layout.out.padded == -(-d // 128) * 128
        else:
            assert "at least the dense layer's work" in layout


@pytest.fixture
def cpu_as_sm90(monkeypatch):
    """prepare as on an sm_90 GPU, minus the compressor (GPU-only): the CPU op runs the reference on
    the prepared operands, so what the modules wire up is checked here."""
    monkeypatch.setattr(ops, "fused_unavailable_reason", lambda device, *args: ops.layer_unavailable_reason(*args))
    monkeypatch.setattr(ops, "pack_sm90", lambda S: None)


@pytest.mark.parametrize("d_out,d_in,bA,bB", [(576, 576, 96, 96), (192, 576, 64, 32), (256, 384, 128, 128)])
def test_armor_linear_prepare_fuses_and_keeps_its_output_and_checkpoint(cpu_as_sm90, d_out, d_in, bA, bB):
    A, S, B, b = factors(d_out, d_in, bA, bB, torch.bfloat16)
    mod = ArmorLinear(A, S, B, b).pack()
    x = torch.randn(4, d_in).to(torch.bfloat16)
    want, state = mod(x), {k: v.clone() for k, v in mod.state_dict().items()}
    mod.materialize()
    assert mod.prepare() == "fused" and mod.fused is not None and mod.dense_weight is None
    assert mod.fused.layout == layer_layout(d_out, d_in, bA, bB)
    y = mod(x)
    assert_close(y, want.double(), torch.bfloat16)
    assert set(mod.state_dict()) == set(state) and all(torch.equal(v, state[k]) for k, v in mod.state_dict().items())
    assert_close(mod(x.float()), want.double(), torch.bfloat16)  # another dtype: the reference, not the operands


@pytest.mark.parametrize("d_out,d_in", [(576, 576), (192, 1536), (256, 256)])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse24_linear_prepare_fuses_with_identity_blocks(cpu_as_sm90, d_out, d_in, bias):
    W = random_24(d_out, d_in).to(torch.bfloat16)
    b = torch.randn(d_out).to(torch.bfloat16) if bias else None
    mod = Sparse24Linear.from_weight(W, b).materialize()
    x = torch.randn(3, d_in).to(torch.bfloat16)
    want = torch.nn.functional.linear(x.double(), W.double(), None if b is None else b.double())
    assert mod.prepare() == "fused" and mod.dense_weight is None
    A = torch.block_diag(*mod.fused.A)
    assert torch.equal(A[:d_out, :d_out], torch.eye(d_out, dtype=torch.bfloat16)) and A.count_nonzero() == d_out
    assert_close(mod(x), want, torch.bfloat16)


def test_prepare_off_hopper_drops_the_dense_copy_unless_asked_to_keep_it():
    W = random_24(64, 64)
    mod = Sparse24Linear.from_weight(W).materialize()
    assert mod.prepare() == cpu_path() and mod.fused is None and mod.dense_weight is None
    assert mod.prepare(keep_dense=True) == "dense" and mod.fused is None and mod.dense_weight is not None


@pytest.mark.gpu
@pytest.mark.parametrize("d_out,d_in,bA,bB", CASES)
@pytest.mark.parametrize("tokens", [1, 16, 17, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_padded_layers_run_the_kernels(d_out, d_in, bA, bB, tokens, dtype):
    """On an sm_90 GPU: the padded operands through the decode kernels (≤ 16 tokens) and the sparse GEMM."""
    A, S, B, b = (t.cuda() for t in factors(d_out, d_in, bA, bB, dtype))
    f = ops.fused_operands(A, *pack_24(S), B, b)
    x = torch.randn(tokens, d_in, device="cuda").to(dtype)
    path = ops.linear_path(tokens, f.A, f.S_values, f.B, S_idx=f.S_idx, sm90=ops.Sm90Packed(*f.sm90))
    assert path == ("decode" if tokens <= ops.DECODE_MAX_TOKENS else "sparse_gemm")
    y = ops.fused_linear(x, f)
    torch.cuda.synchronize()
    assert_close(y, dense_math(x, A, S, B, b), dtype)


def test_unfused_reasons_name_each_layer_and_why(cpu_as_sm90):
    A, S, B, b = factors(512, 512, 128, 128, torch.bfloat16)
    plain = Sparse24Linear.from_weight(random_24(192, 512, dtype=torch.bfloat16))
    model = torch.nn.Sequential(ArmorLinear(A, S, B, b), plain,
                                ArmorLinear(*factors(512, 512, 256, 128, torch.bfloat16)),
                                ArmorLinear(*factors(512, 512, 128, 128, torch.float32)))
    here = cpu_path()
    assert prepare(model) == {"0": "fused", "1": "fused", "2": here, "3": here}
    why = unfused_reasons(model)
    assert set(why) == {"2", "3"}
    assert "d_out blocks of 256: wider than the kernels' 128-blocks" in why["2"] and why["2"].endswith(f"runs {here}")
    assert "dtype torch.float32" in why["3"]
    model[0].fused = None  # as after a move to another device
    assert "prepare() has not run" in unfused_reasons(model)["0"]
