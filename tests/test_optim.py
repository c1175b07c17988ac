import itertools

import pytest
import torch

from armor_kernels import ActivationStats, armor
from armor_kernels.kernels.group_solve import solve_group_reference
from armor_kernels.optim.common import Problem, extrapolate
from armor_kernels.optim.fast import a_step, b_step, s_step


def _problem(d_out=48, d_in=64, b=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g)
    h = torch.rand(d_in, generator=g) * 2 + 0.05
    return W, h, Problem.from_weight(W, h, b, "cpu")


def _perturbed(p, seed=1):
    """NoWag-P start with A, B moved away from identity, so no step is trivially exact."""
    g = torch.Generator().manual_seed(seed)
    f = p.nowag_p()
    f.A = f.A + 0.2 * torch.randn(f.A.shape, generator=g)
    f.B = f.B + 0.2 * torch.randn(f.B.shape, generator=g)
    return f


def test_group_solve_equals_brute_force_over_six_patterns():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        bA, bB = 6, 10
        Rp = torch.randn(bA, bB, generator=g, dtype=torch.float64)   # residual without the group
        a = torch.randn(bA, generator=g, dtype=torch.float64)
        Bt = torch.randn(4, bB, generator=g, dtype=torch.float64)
        best = None
        for P in itertools.combinations(range(4), 2):
            # min over s_P of ‖Rp − a s_Pᵀ Bt_P‖²: least squares on vec
            design = torch.stack([torch.outer(a, Bt[i]).flatten() for i in P], 1)
            sol = torch.linalg.lstsq(design, Rp.flatten()[:, None]).solution[:, 0]
            loss = float(((Rp.flatten() - design @ sol) ** 2).sum())
            if best is None or loss < best[0]:
                s = torch.zeros(4, dtype=torch.float64)
                s[list(P)] = sol
                best = (loss, s)
        s_old = torch.zeros(4, dtype=torch.float64)
        f = Bt @ Rp.T @ a
        s = solve_group_reference(f, Bt @ Bt.T, (a * a).sum(), s_old)
        got = float(((Rp - torch.outer(a, s @ Bt)) ** 2).sum())
        assert got == pytest.approx(best[0], rel=1e-6)
        assert torch.allclose(s, best[1], atol=1e-5)


def test_a_step_equals_weighted_lstsq():
    W, h, p = _problem()
    f = _perturbed(p)
    A = a_step(p, f)[0].A
    P = (f.S @ torch.block_diag(*f.B)).double()
    sq = h.double().sqrt()
    for i in range(p.nA):
        rows = slice(i * p.bA, (i + 1) * p.bA)
        ref = torch.linalg.lstsq((P[rows] * sq).T, (p.Wbar[rows].double() * sq).T).solution.T
        assert torch.allclose(A[i].double(), ref, rtol=1e-4, atol=1e-4)


def test_b_step_equals_lstsq():
    W, h, p = _problem()
    f = _perturbed(p)
    B = b_step(p, f)[0].B
    Q = (torch.block_diag(*f.A) @ f.S).double()
    for J in range(p.nB):
        cols = slice(J * p.bB, (J + 1) * p.bB)
        ref = torch.linalg.lstsq(Q[:, cols], p.Wbar[:, cols].double()).solution
        assert torch.allclose(B[J].double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("step", ["A", "B", "S"])
def test_each_block_step_does_not_raise_the_loss_keeps_24_and_returns_its_product(step):
    W, h, p = _problem(seed=4)
    f = _perturbed(p)
    new, core = {"A": lambda: a_step(p, f), "B": lambda: b_step(p, f), "S": lambda: s_step(p, f, passes=1)}[step]()
    assert p.loss(new) <= p.loss(f) * (1 + 1e-6)
    assert ((new.S != 0).reshape(p.Wbar.shape[0], -1, 4).sum(-1) <= 2).all()
    assert torch.allclose(core, new.core(), rtol=1e-5, atol=1e-5)


def test_extrapolation_keeps_24_and_only_moves_entries_whose_mask_held():
    W, h, p = _problem(seed=7)
    old = _perturbed(p)
    f = s_step(p, b_step(p, a_step(p, old)[0])[0], passes=1)[0]
    g, core = extrapolate(f, old)
    assert torch.allclose(g.A, 2 * f.A - old.A) and torch.allclose(g.B, 2 * f.B - old.B)
    same = (f.S != 0) == (old.S != 0)
    assert torch.equal(g.S[~same], f.S[~same])
    assert torch.allclose(g.S[same], 2 * f.S[same] - old.S[same])
    assert ((g.S != 0).reshape(p.Wbar.shape[0], -1, 4).sum(-1) <= 2).all()
    assert torch.allclose(core, g.core(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,opts", [("fast", {"iters": 4}), ("reference", {"iters": 60})])
def test_history_is_monotone_and_ends_below_nowag_p(method, opts):
    W, h, _ = _problem(seed=5)
    res = armor(W, h, optimizer=method, block_size=16, **opts)
    hist = res.history.loss
    assert all(b <= a for a, b in zip(hist, hist[1:])), "loss rose"
    assert hist[-1] < hist[0], "no improvement over NoWag-P"
    assert ((res.mask.reshape(48, -1, 4)).sum(-1) <= 2).all()


def test_reference_optimizer_is_reproducible_with_a_seed():
    W, h, _ = _problem(seed=6)
    a = armor(W, h, optimizer="reference", block_size=16, iters=20, seed=3)
    b = armor(W, h, optimizer="reference", block_size=16, iters=20, seed=3)
    assert a.history.loss == b.history.loss
    assert torch.equal(a.factors.S, b.factors.S)


def test_armor_rejects_bad_arguments():
    W, h, _ = _problem()
    with pytest.raises(ValueError, match="optimizer"):
        armor(W, h, optimizer="adam")
    with pytest.raises(TypeError, match="optimizer="):  # the old name of the choice
        armor(W, h, method="fast")
    with pytest.raises(TypeError, match="unknown option"):
        armor(W, h, itres=3)
    with pytest.raises(ValueError, match="block_size"):
        armor(W, h, block_size=2)
    with pytest.raises(ValueError, match=r"h: expected a \(64,\)"):
        armor(W, h[:10])
    with pytest.raises(ValueError, match="divisible by 4"):
        armor(torch.randn(8, 6), torch.ones(6))
    with pytest.raises(TypeError, match="floating dtype"):
        armor(torch.ones(8, 8, dtype=torch.int64), torch.ones(8))
    with pytest.raises(ValueError, match="no tokens"):
        armor(W, ActivationStats(64))
