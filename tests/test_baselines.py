import pytest
import torch

from armor_kernels import BASELINES, ActivationStats, armor, sparsegpt


def _stats(d_in, n=256, seed=0, full=True):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g) * (torch.rand(d_in, generator=g) * 3 + 0.1)
    X = X + 0.5 * X[:, torch.randperm(d_in, generator=g)]  # correlated inputs, as in real layers
    st = ActivationStats(d_in, full=full)
    st.update(X)
    return st


def _assert_24(mask):
    groups = mask.reshape(mask.shape[0], -1, 4).sum(-1)
    assert (groups == 2).all(), "every group of 4 along d_in keeps exactly 2"


@pytest.mark.parametrize("name", sorted(BASELINES))
@pytest.mark.parametrize("shape", [(16, 32), (40, 96), (7, 12)])
def test_every_baseline_is_exactly_24(name, shape):
    W = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    out = BASELINES[name](W, _stats(shape[1]))
    _assert_24(out.mask)
    assert not out.weight[~out.mask].any()
    assert out.weight.dtype == W.dtype


def test_armor_mask_is_24_and_weight_is_its_reconstruction():
    W = torch.randn(24, 48, generator=torch.Generator().manual_seed(2))
    res = armor(W, _stats(48), block_size=12, iters=3)
    assert (res.mask.reshape(24, -1, 4).sum(-1) <= 2).all()
    assert torch.allclose(res.weight, res.factors.weight(), atol=1e-6)


def test_magnitude_and_nowag_choose_by_their_scores():
    W = torch.tensor([[4.0, -3.0, 2.0, 1.0]])
    st = ActivationStats(4)
    st.update(torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.1, 0.1, 10.0, 10.0]]))
    assert BASELINES["magnitude"](W).mask.tolist() == [[True, True, False, False]]
    assert BASELINES["wanda"](W, st).mask.tolist() == [[False, False, True, True]]
    assert BASELINES["nowag_p"](W, st).mask.tolist() == [[False, False, True, True]]


def naive_obs_24(W, H, damp=0.01):
    """SparseGPT spelled out: explicit inverses of H over the not-yet-processed columns."""
    W, H = W.double().clone(), H.double().clone()
    d = W.shape[1]
    H += damp * torch.diag(H).mean() * torch.eye(d, dtype=H.dtype)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for q in range(d):
        if q % 4 == 0:
            sal = torch.stack([W[:, j] ** 2 / torch.linalg.inv(H[j:, j:])[0, 0] for j in range(q, q + 4)], 1)
            keep = sal.argsort(dim=1, descending=True, stable=True)[:, :2]
            mask[:, q:q + 4].scatter_(1, keep, True)
        Hinv = torch.linalg.inv(H[q:, q:])
        err = W[:, q] * ~mask[:, q]
        W[:, q:] -= err[:, None] * Hinv[0][None, :] / Hinv[0, 0]
    return W * mask, mask


@pytest.mark.parametrize("block", [128, 8, 4])
def test_sparsegpt_equals_naive_obs(block):
    W = torch.randn(6, 16, generator=torch.Generator().manual_seed(3))
    st = _stats(16, n=64)
    ours = sparsegpt(W, st, block=block)
    ref_w, ref_m = naive_obs_24(W, st.H())
    assert torch.equal(ours.mask, ref_m)
    assert torch.allclose(ours.weight.double(), ref_w, atol=1e-5)


def test_baselines_reject_bad_input():
    W = torch.randn(4, 8)
    with pytest.raises(TypeError, match="stats"):
        BASELINES["wanda"](W, None)
    with pytest.raises(ValueError, match="d_in=16"):
        BASELINES["nowag_p"](W, _stats(16))
    with pytest.raises(ValueError, match="full H"):
        sparsegpt(W, _stats(8, full=False))
    with pytest.raises(ValueError, match="no tokens"):
        BASELINES["wanda"](W, ActivationStats(8))
