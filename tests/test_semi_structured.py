"""torch's semi-structured 2:4 path (semi_structured.py) against exact math: every CUDA GPU with 2:4 tensor
cores runs these (`cuda` marker; .ci/gpu_check.sh's test stage, where a skip fails). Each test proves the
path ran (ops.LAUNCHES) and bounds the error by the storage dtype's rounding of each of the three stages."""
import pytest
import torch
from helpers import random_24

from armor_kernels import ArmorLinear, Sparse24Linear, ops, semi_structured
from armor_kernels.sparse24 import pack_24

SHAPES = [  # (d_out, d_in, bA, bB): native sizes, ragged ones that need padding, blocks 4…128
    (256, 256, 128, 128),
    (576, 1536, 64, 16),
    (192, 576, 96, 96),
    (328, 264, 8, 4),
    (96, 104, 32, 8),
]


def layer(d_out, d_in, bA, bB, dtype):
    g = torch.Generator().manual_seed(0)
    A = torch.eye(bA) + 0.2 * torch.randn(d_out // bA, bA, bA, generator=g)
    B = torch.eye(bB) + 0.2 * torch.randn(d_in // bB, bB, bB, generator=g)
    S = random_24(d_out, d_in, generator=g) / d_in ** 0.5
    return [t.to(dtype).cuda() for t in (A, S, B, torch.randn(d_out, generator=g))]


def exact_and_scale(x, A, S, B, bias):
    bd = lambda t, f: torch.block_diag(*f(t.double()))
    W = bd(A, lambda t: t) @ S.double() @ bd(B, lambda t: t)
    absW = bd(A, torch.abs) @ S.double().abs() @ bd(B, torch.abs)
    return x.double() @ W.T + bias.double(), x.double().abs() @ absW.T + bias.double().abs()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("tokens", [1, 17, 300])
def test_semi_structured_agrees_with_exact_math(dtype, shape, tokens):
    A, S, B, bias = layer(*shape, dtype)
    semi = semi_structured.compress(*pack_24(S))
    x = torch.randn(tokens, shape[1], device="cuda").to(dtype)
    before = ops.LAUNCHES["semi_structured"]
    y = semi_structured.linear(x, A, semi, B, bias)
    torch.cuda.synchronize()
    assert ops.LAUNCHES["semi_structured"] == before + 1 and y.shape == (tokens, shape[0])
    want, scale = exact_and_scale(x, A, S, B, bias)
    bound = 4 * torch.finfo(dtype).eps * scale + 1e-6
    assert ((y.double() - want).abs() <= bound).all()


@pytest.mark.cuda
def test_prepare_picks_semi_structured_where_the_fused_kernels_do_not_run(monkeypatch):
    monkeypatch.setattr(ops, "fused_supported", lambda *args: False)  # as on an sm_80 / sm_100 GPU
    A, S, B, bias = layer(576, 1536, 64, 16, torch.bfloat16)
    armor = ArmorLinear(A, S, B, bias).pack()
    plain = Sparse24Linear.from_weight(S, bias)
    x = torch.randn(5, 1536, device="cuda").to(torch.bfloat16)
    for mod, a, b in ((armor, A, B), (plain, None, None)):
        assert mod.prepare() == "semi_structured" and mod.dense_weight is None and mod.semi is not None
        before = ops.LAUNCHES["semi_structured"]
        y = mod(x)
        assert ops.LAUNCHES["semi_structured"] == before + 1
        double = lambda t: None if t is None else t.double()
        want = ops.reference(x.double(), double(a), S.double(), double(b), bias.double())
        assert (y.double() - want).abs().max() <= 8 * torch.finfo(torch.bfloat16).eps * want.abs().max()
