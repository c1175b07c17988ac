import pytest
import torch

from armor_kernels.factors import (
    ArmorFactors,
    block_size_for,
    block_sizes,
    normalize,
    output_error,
    proxy_loss,
    tile_losses,
)
from armor_kernels.stats import ActivationStats


def test_normalize_round_trip_and_unit_rows():
    torch.manual_seed(0)
    W = torch.randn(48, 64) * torch.rand(64) * 5
    Wbar, r, c = normalize(W)
    assert torch.allclose(r[:, None] * Wbar * c, W, atol=1e-5)
    # row norms of W̄ are 1 up to NoWag's epsilon
    assert torch.allclose(Wbar.norm(dim=1), torch.ones(48), atol=1e-4)


def test_block_size_rule():
    assert block_sizes((576, 576), 128) == (96, 96)
    assert block_sizes((192, 576), 128) == (96, 96)
    assert block_sizes((1536, 576), 128) == (128, 96)
    assert block_sizes((4096, 11008), 128) == (128, 128)
    assert block_sizes((1000, 1000), 128) == (125, 100)  # d_out: any divisor; d_in: a multiple of 4
    assert block_size_for(100, 128, multiple=4) == 100
    assert block_size_for(4 * 131, 128, multiple=4) == 4  # 131 is prime
    for d in range(4, 400, 4):
        b = block_size_for(d, 128, multiple=4)
        assert d % b == 0 and b % 4 == 0 and b <= 128


def test_activation_stats_streaming_equals_batch_and_fixes_bad_entries():
    torch.manual_seed(0)
    X = torch.randn(3, 50, 16, dtype=torch.float64)
    X[..., 3] = 0.0
    st = ActivationStats(16, full=True)
    for x in X:
        st.update(x.float())
    flat = X.reshape(-1, 16)
    h_direct = 2 * (flat ** 2).sum(0) / flat.shape[0]
    valid = torch.arange(16) != 3
    assert torch.allclose(st.h()[valid].double(), h_direct[valid], rtol=1e-5)
    assert st.h()[3] == pytest.approx(float(h_direct[valid].mean()), rel=1e-5)  # the DESIGN rule
    assert torch.allclose(st.H().double(), 2 * flat.T @ flat / flat.shape[0], rtol=1e-5, atol=1e-6)


def test_activation_stats_errors():
    st = ActivationStats(8)
    with pytest.raises(ValueError, match="no tokens"):
        st.h()
    with pytest.raises(ValueError, match="last dimension 8"):
        st.update(torch.zeros(4, 9))


def _random_factors(d_out, d_in, bA, bB, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d_out // bA, bA, bA, generator=g)
    B = torch.randn(d_in // bB, bB, bB, generator=g)
    S = torch.randn(d_out, d_in, generator=g)
    return ArmorFactors(A, S, B, torch.rand(d_out, generator=g) + 0.5, torch.rand(d_in, generator=g) + 0.5)


@pytest.mark.parametrize("d_out,d_in,bA,bB", [(24, 16, 8, 4), (96, 64, 32, 16), (12, 24, 12, 24)])
def test_tile_loss_equals_full_formula(d_out, d_in, bA, bB):
    f = _random_factors(d_out, d_in, bA, bB)
    Wbar = torch.randn(d_out, d_in)
    h = torch.rand(d_in) + 0.1
    A_full = torch.block_diag(*f.A).double()
    B_full = torch.block_diag(*f.B).double()
    R = Wbar.double() - A_full @ f.S.double() @ B_full
    full = float((R * R * h.double()).sum())
    assert tile_losses(Wbar, h, f).shape == (d_out // bA, d_in // bB)
    # A·S·B is formed in float32 (the optimizer's working precision), the sum in float64
    assert proxy_loss(Wbar, h, f, relative=False) == pytest.approx(full, rel=1e-6)
    rel = full / float((Wbar.double() ** 2 * h.double()).sum())
    assert proxy_loss(Wbar, h, f) == pytest.approx(rel, rel=1e-6)


def test_folded_factors_reconstruct_weight():
    f = _random_factors(24, 16, 8, 4)
    A, S, B = f.folded()
    dense = torch.block_diag(*A) @ S @ torch.block_diag(*B)
    assert torch.allclose(dense, f.weight(), rtol=1e-4, atol=1e-4)


def test_output_error_zero_for_exact_and_positive_otherwise():
    W = torch.randn(8, 16)
    H = torch.eye(16) + 0.1
    assert output_error(W, W, H) == 0.0
    assert output_error(W, W * 0.5, H) == pytest.approx(0.25, rel=1e-6)


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(4, 6), "divisible by 4"),
    (torch.zeros(4, 8, dtype=torch.int32), "floating dtype"),
    (torch.zeros(8), "2-D"),
    (torch.full((4, 8), float("nan")), "NaN or inf"),
    (torch.full((4, 8), float("inf")), "NaN or inf"),
])
def test_normalize_rejects_bad_weights(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        normalize(bad)
