import pytest
import torch
from helpers import assert_within_ulps, launched, rounded_reference
from torch import nn

from armor_kernels import ActivationStats, ArmorLinear, armor, ops


def _layer(d_out, d_in, bias, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(d_in, d_out, bias=bias)
    st = ActivationStats(d_in)
    st.update(torch.randn(128, d_in))
    return lin, armor(lin.weight.detach(), st, block_size=16, iters=2)


def _abs_chain(mod, x):
    """|x|·|B'|ᵀ·|S|ᵀ·|A'|ᵀ: the scale that rounding errors of the three stages are relative to."""
    ab = ArmorLinear(mod.A.float().abs(), mod.sparse_core().float().abs(), mod.B.float().abs())
    return ab(x.float().abs())


@pytest.mark.parametrize("d_out,d_in", [(32, 48), (48, 16)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_matches_dense_reconstruction(d_out, d_in, bias, dtype):
    lin, res = _layer(d_out, d_in, bias)
    mod = ArmorLinear.from_linear(lin, res.factors, dtype=dtype)
    x = torch.randn(3, 5, d_in, dtype=dtype)
    W = mod.to_dense().float()
    ref = x.float() @ W.T + (mod.bias.float() if bias else 0)
    y = mod(x)
    assert y.dtype == dtype and y.shape == (3, 5, d_out)
    # each of the 3 stages (and the bias add) rounds once to dtype: |error| ≤ ~4·eps·|x||B'||S||A'|
    eps = torch.finfo(dtype).eps
    assert ((y.float() - ref).abs() <= 4 * eps * _abs_chain(mod, x) + eps * ref.abs() + 1e-6).all()
    # the folded factors reproduce diag(r) A S B diag(c)
    if dtype == torch.float32:
        assert torch.allclose(W, res.factors.weight(), rtol=1e-5, atol=1e-5 * W.abs().max())


def test_packed_and_unpacked_forms_agree_exactly():
    lin, res = _layer(32, 48, True)
    mod = ArmorLinear.from_linear(lin, res.factors)
    x = torch.randn(7, 48)
    before, dense = mod(x), mod.to_dense()
    mod.pack()
    assert mod.packed and mod.S is None and mod.S_idx.dtype == torch.uint8
    assert torch.equal(mod(x), before)
    assert torch.equal(mod.to_dense(), dense)
    assert set(mod.state_dict()) >= {"A", "B", "S_values", "S_idx", "bias"}


def test_a_layer_rebuilt_from_its_bytes_computes_the_same_bits():
    """Folding r into A leaves A's blocks strided; the layer stores them row-major, so a copy rebuilt from
    the stored tensors (a checkpoint, another rank) forwards bit-identically."""
    lin, res = _layer(64, 48, False)
    mod = ArmorLinear.from_linear(lin, res.factors).pack()
    assert not res.factors.folded()[0].is_contiguous()  # what the layer is built from
    copy = ArmorLinear.from_packed(*(mod.state_dict()[k].clone().contiguous() for k in ("A", "S_values", "S_idx", "B")))
    x = torch.randn(5, 48)
    assert all(t.is_contiguous() for t in mod.state_dict().values())
    assert torch.equal(mod(x), copy(x))


def test_errors_name_the_argument():
    lin, res = _layer(32, 48, False)
    mod = ArmorLinear.from_linear(lin, res.factors)
    with pytest.raises(ValueError, match="x: expected last dimension 48"):
        mod(torch.randn(2, 40))
    with pytest.raises(ValueError, match="factors"):
        ArmorLinear.from_linear(nn.Linear(48, 16), res.factors)
    f = res.factors
    with pytest.raises(ValueError, match="2:4"):
        ArmorLinear(f.A, torch.ones(32, 48), f.B)
    with pytest.raises(ValueError, match="A: expected"):
        ArmorLinear(f.A[:1], f.S, f.B)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 16, 64])  # the decode kernels, then the sparse GEMM
def test_prepare_runs_the_fused_kernels_and_keeps_the_checkpoint(tokens):
    torch.manual_seed(0)
    lin = nn.Linear(512, 256, bias=True)
    st = ActivationStats(512)
    st.update(torch.randn(256, 512))
    res = armor(lin.weight.detach(), st, block_size=128, iters=2)
    mod = ArmorLinear.from_linear(lin, res.factors, dtype=torch.bfloat16).cuda()
    x = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16)
    state = {k: v.clone() for k, v in mod.pack().state_dict().items()}
    assert mod.prepare() == "fused" and mod.packed and mod.fused.sm90 is not None and mod.fused.layout.native
    with launched(**{"decode" if tokens <= ops.DECODE_MAX_TOKENS else "sparse_gemm": 1}):
        y = mod(x)
    assert_within_ulps(y, rounded_reference(x, mod.A, mod.sparse_core(), mod.B, mod.bias))
    assert all(torch.equal(v, state[k]) for k, v in mod.state_dict().items())  # fused operands not saved
