"""ARMOR on the layer's output error (optim/output.py): closed forms, exact group solves, monotone descent."""
import itertools

import pytest
import torch

from armor_kernels import ActivationStats, armor
from armor_kernels.baselines import sparsegpt
from armor_kernels.factors import ArmorFactors, block_right
from armor_kernels.kernels.top2 import top2_mask
from armor_kernels.optim import fast
from armor_kernels.optim.common import Problem
from armor_kernels.optim.output import OutputProblem, a_step, b_step, dampened, s_step


def _layer(d_out=24, d_in=32, n=400, seed=0):
    """A weight and the full statistics of correlated inputs (off-diagonal H matters)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g)
    X = torch.randn(n, d_in, generator=g) @ (0.5 * torch.randn(d_in, d_in, generator=g) + torch.eye(d_in))
    st = ActivationStats(d_in, full=True)
    st.update(X)
    return W, st


def _state(W, st, b=8, seed=1):
    """An OutputProblem and a perturbed folded state (A, B away from I, S 2:4)."""
    p = Problem.from_weight(W, st.h(), b, "cpu")
    op = OutputProblem.from_problem(p, st.H())
    g = torch.Generator().manual_seed(seed)
    f = op.fold(p.nowag_p())
    f = ArmorFactors(f.A + 0.1 * torch.randn(f.A.shape, generator=g), f.S,
                     f.B + 0.1 * torch.randn(f.B.shape, generator=g), f.r, f.c)
    return op, f


def _loss(op, A, S, B):
    return op.loss(ArmorFactors(A, S, B, torch.ones(S.shape[0]), torch.ones(S.shape[1])))


def test_loss_is_the_layers_relative_output_error():
    W, st = _layer()
    p = Problem.from_weight(W, st.h(), 8, "cpu")
    op = OutputProblem.from_problem(p, st.H())
    What = sparsegpt(W, st).weight
    f = op.fold(ArmorFactors.identity(p.Wbar, p.r, p.c, What / (p.r[:, None] * p.c), (p.bA, p.bB)))
    H, dW = dampened(st.H()), (W - What).double()
    expected = float(((dW @ H) * dW).sum() / ((W.double() @ H) * W.double()).sum())
    assert op.loss(f) == pytest.approx(expected, rel=1e-4)


def test_a_step_is_each_rows_least_squares():
    W, st = _layer()
    op, f = _state(W, st)
    g, core = a_step(op, f)
    P = block_right(f.S, f.B)
    Lh = torch.linalg.cholesky(op.H.double())               # Ĥ = Lh Lhᵀ: tr(E Ĥ Eᵀ) = ‖E Lh‖²
    for i in range(op.nA):
        rows = slice(i * op.bA, (i + 1) * op.bA)
        sol = torch.linalg.lstsq((P[rows].double() @ Lh).T, (op.Wc[rows].double() @ Lh).T).solution.T
        torch.testing.assert_close(g.A[i].double(), sol, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(core, g.core())


def test_b_step_single_block_is_the_global_least_squares():
    W, st = _layer(d_in=16)
    op, f = _state(W, st, b=16)  # bB = 16 = d_in: one block, so B's optimum is (QᵀQ)⁻¹ Qᵀ W_c, whatever Ĥ
    assert op.nB == 1
    g, _ = b_step(op, f, f.core())
    Q = (torch.block_diag(*f.A) @ f.S).double()
    torch.testing.assert_close(g.B[0].double(), torch.linalg.lstsq(Q, op.Wc.double()).solution, rtol=1e-3, atol=1e-4)


def test_b_step_zeroes_the_gradient_of_the_last_block_and_never_raises_the_loss():
    W, st = _layer()
    op, f = _state(W, st)
    before = op.loss(f)
    g, core = b_step(op, f, f.core())
    assert op.loss(g, core) <= before
    B = g.B.clone().requires_grad_()
    Bfull = torch.block_diag(*B)
    Afull = torch.block_diag(*g.A)
    Err = op.Wc - Afull @ g.S @ Bfull
    ((Err @ op.H) * Err).sum().backward()
    assert B.grad[-1].abs().max() < 1e-3 * B.grad[:-1].abs().max().clamp_min(1e-6) + 1e-4


def test_steps_equal_the_proxy_steps_when_h_is_diagonal():
    """With a diagonal Ĥ the output objective is the proxy on W_c: every step must give the proxy's."""
    g = torch.Generator().manual_seed(3)
    Wc, h = torch.randn(24, 32, generator=g), torch.rand(32, generator=g) + 0.1
    op = OutputProblem(Wc, torch.diag(h), 8, 8)
    p = Problem(Wc, h, torch.ones(24), torch.ones(32), 8, 8)
    eye = torch.eye(8)
    A, B = eye + 0.1 * torch.randn(3, 8, 8, generator=g), eye + 0.1 * torch.randn(4, 8, 8, generator=g)
    f = ArmorFactors(A, Wc * top2_mask(Wc.abs()), B, torch.ones(24), torch.ones(32))
    pairs = [(a_step(op, f), fast.a_step(p, f)), (b_step(op, f, f.core()), fast.b_step(p, f)),
             (s_step(op, f, f.core(), 1), fast.s_step(p, f, 1))]
    for (mine, _), (theirs, _) in pairs:
        for x, y in zip((mine.A, mine.S, mine.B), (theirs.A, theirs.S, theirs.B)):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_s_step_leaves_no_group_improvable():
    """Swept to a fixed point, no group of 4 of S has a pattern and values with a lower output error: each
    group solve is exact for the full objective, across column blocks too (d_in = 2 blocks)."""
    W, st = _layer(d_out=8, d_in=16)
    op, f = _state(W, st, b=8)
    losses = [op.loss(f)]
    g = f
    for _ in range(30):
        g, _ = s_step(op, g, g.core(), passes=1)
        losses.append(op.loss(g))
        assert losses[-1] <= losses[-2] * (1 + 1e-6)
        if losses[-2] - losses[-1] <= 1e-9 * losses[-1]:
            break
    best = losses[-1]
    for i, q in itertools.product(range(8), range(4)):
        cols = list(range(4 * q, 4 * q + 4))

        def loss_at(vals, keep):
            S = g.S.clone()
            S[i, cols] = 0.0
            S[i, [cols[k] for k in keep]] = vals
            return _loss(op, g.A, S, g.B)

        for keep in itertools.combinations(range(4), 2):
            # the loss is quadratic in the two kept values: minimise it exactly from 6 evaluations
            v = torch.zeros(2, dtype=torch.float64, requires_grad=True)
            Hs = torch.autograd.functional.hessian(lambda x: _loss_t(op, g, i, cols, keep, x), v.detach())
            grad = torch.autograd.functional.jacobian(lambda x: _loss_t(op, g, i, cols, keep, x), v.detach())
            x = -torch.linalg.solve(Hs + 1e-12 * torch.eye(2, dtype=Hs.dtype), grad)
            assert loss_at(x.float(), keep) >= best * (1 - 1e-4)


def _loss_t(op, g, i, cols, keep, x):
    """Differentiable absolute output error with row i's group `cols` set to x on the kept pair."""
    S = g.S.double().clone()
    S[i, cols] = 0.0
    S[i, [cols[k] for k in keep]] = x
    A, B = torch.block_diag(*g.A.double()), torch.block_diag(*g.B.double())
    E = op.Wc.double() - A @ S @ B
    return ((E @ op.H.double()) * E).sum()


@pytest.mark.parametrize("start", ["nowag_p", "sparsegpt", "best"])
def test_descent_is_monotone_and_ends_below_its_start(start):
    W, st = _layer(d_out=48, d_in=64)
    res = armor(W, st, objective="output", start=start, block_size=16, iters=15)
    L = res.history.loss
    assert all(b <= a for a, b in zip(L, L[1:]))
    assert L[-1] < 0.5 * L[0]
    assert res.start == ("sparsegpt" if start == "best" else start)  # correlated inputs: SparseGPT's is lower
    assert res.mask.reshape(48, 16, 4).sum(-1).le(2).all()


def test_ends_below_sparsegpts_output_error():
    """From SparseGPT's start the layer's (dampened) output error can only fall below SparseGPT's."""
    W, st = _layer(d_out=48, d_in=64)
    H = dampened(st.H())
    err = lambda What: float((((W - What).double() @ H) * (W - What).double()).sum())  # noqa: E731
    res = armor(W, st, objective="output", start="sparsegpt", block_size=16, iters=10)
    assert err(res.weight) < err(sparsegpt(W, st).weight)


def test_needs_the_full_statistics():
    W, st = _layer()
    with pytest.raises(ValueError, match=r"full H.*ActivationStats\(full=True\)"):
        armor(W, st.h(), objective="output")
    diag = ActivationStats(W.shape[1])
    diag.update(torch.randn(10, W.shape[1]))
    with pytest.raises(ValueError, match="without it"):
        armor(W, diag, start="sparsegpt")
    with pytest.raises(ValueError, match="reference"):
        armor(W, st, optimizer="reference", objective="output")


def test_shrink_scales_the_off_diagonal_and_one_gives_the_row_weighted_proxy():
    W, st = _layer()
    p = Problem.from_weight(W, st.h(), 8, "cpu")
    full, half, diag = (OutputProblem.from_problem(p, st.H(), s).H for s in (0.0, 0.5, 1.0))
    off = ~torch.eye(W.shape[1], dtype=torch.bool)
    torch.testing.assert_close(half[off], 0.5 * full[off])
    assert diag[off].abs().max() == 0
    # shrink = 1: the loss is Σ_ij r_i² ĥ_j E_ij², the proxy with each row weighed by its scale
    op = OutputProblem.from_problem(p, st.H(), 1.0)
    f = op.fold(p.nowag_p())
    E = op.Wc - f.core()
    assert op.loss(f) == pytest.approx(float((E * E * diag.diagonal()).sum() / (op.Wc ** 2 * diag.diagonal()).sum()),
                                       rel=1e-5)
    with pytest.raises(ValueError, match="shrink"):
        armor(W, st, shrink=0.5)
    res = armor(W, st, objective="output", shrink=0.5, block_size=8, iters=3)
    assert res.history.loss[-1] <= res.history.loss[0]
