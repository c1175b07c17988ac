"""The exact 6-pattern group solve (armor_kernels/kernels/group_solve.py), batched, against a
brute-force enumeration of the patterns (one least-squares solve per pattern, in float64).

The module is reference-only (the tile sweep's kernels inline it and are compared with the sweep's
reference in tests/test_tile_sweep.py); test_optim.py checks one group against the tile loss itself.
"""
import itertools

import pytest
import torch

from armor_kernels.kernels.group_solve import PATTERNS, group_objective, pattern_inverses, solve_group_reference


def _groups(lead, seed, dtype=torch.float64):
    """Random (f, G, n, s_old) of shape lead: G = B̃B̃ᵀ of 4 random rows, s_old on a random pattern."""
    g = torch.Generator().manual_seed(seed)
    Bt = torch.randn(*lead, 4, 10, generator=g, dtype=dtype)
    G = Bt @ Bt.transpose(-1, -2)
    f = torch.randn(*lead, 4, generator=g, dtype=dtype)
    n = torch.rand(lead, generator=g, dtype=dtype) + 0.1
    keep = torch.rand(*lead, 4, generator=g).argsort(-1)[..., :2]
    s_old = torch.zeros(*lead, 4, dtype=dtype).scatter_(-1, keep, 1.0) * torch.randn(*lead, 4, generator=g, dtype=dtype)
    return f, G, n, s_old


def _brute_force(f, G, n):
    """Per group: min over the 6 patterns P of q(s) with s_P = (n G_PP)⁻¹ f_P (no ridge) -> (q, s)."""
    fl, Gl, nl = f.reshape(-1, 4), G.reshape(-1, 4, 4), n.reshape(-1)
    qs, ss = [], []
    for k in range(fl.shape[0]):
        best = None
        for P in itertools.combinations(range(4), 2):
            s = torch.zeros(4, dtype=f.dtype)
            s[list(P)] = torch.linalg.solve(nl[k] * Gl[k][list(P)][:, list(P)], fl[k][list(P)])
            q = float(group_objective(s, fl[k], Gl[k], nl[k]))
            if best is None or q < best[0]:
                best = (q, s)
        qs.append(best[0])
        ss.append(best[1])
    return torch.tensor(qs, dtype=f.dtype).reshape(n.shape), torch.stack(ss).reshape(f.shape)


def test_patterns_are_the_six_pairs_in_order():
    assert PATTERNS == tuple(itertools.combinations(range(4), 2))


@pytest.mark.parametrize("lead", [(), (1,), (7,), (3, 5), (2, 3, 4)])
def test_solve_equals_brute_force(lead):
    f, G, n, s_old = _groups(lead, seed=len(lead) * 10 + sum(lead))
    s = solve_group_reference(f, G, n, s_old)
    q_best, s_best = _brute_force(f, G, n)
    assert s.shape == f.shape
    assert ((s != 0).sum(-1) <= 2).all()                                      # a 2:4 group
    torch.testing.assert_close(group_objective(s, f, G, n), q_best, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(s, s_best, rtol=1e-5, atol=1e-6)
    # never worse than where it started
    assert (group_objective(s, f, G, n) <= group_objective(s_old, f, G, n)).all()


@pytest.mark.parametrize("lead", [(5,), (2, 6)])
def test_batched_equals_one_at_a_time_float32(lead):
    f, G, n, s_old = _groups(lead, seed=3, dtype=torch.float32)
    s = solve_group_reference(f, G, n, s_old)
    inv = pattern_inverses(G)
    assert inv.shape == (*lead, 3, 6)
    assert torch.equal(solve_group_reference(f, G, n, s_old, inv), s)           # inv at hand: same bits
    fl, Gl, nl, ol = f.reshape(-1, 4), G.reshape(-1, 4, 4), n.reshape(-1), s_old.reshape(-1, 4)
    one = torch.stack([solve_group_reference(fl[k:k + 1], Gl[k:k + 1], nl[k:k + 1], ol[k:k + 1])[0]
                       for k in range(fl.shape[0])])
    torch.testing.assert_close(one.reshape(s.shape), s, rtol=1e-6, atol=1e-7)


def test_pattern_inverses_are_the_ridged_2x2_inverses():
    f, G, n, s_old = _groups((4,), seed=5)
    ridge = 1e-3
    inv = pattern_inverses(G, ridge=ridge)
    for p, (i, j) in enumerate(PATTERNS):
        eps = ridge * (G[:, i, i] + G[:, j, j])
        M = G[:, [i, j]][:, :, [i, j]] + eps[:, None, None] * torch.eye(2, dtype=G.dtype)
        Minv = torch.linalg.inv(M)
        torch.testing.assert_close(inv[:, 0, p], Minv[:, 0, 0])
        torch.testing.assert_close(inv[:, 1, p], Minv[:, 0, 1])
        torch.testing.assert_close(inv[:, 2, p], Minv[:, 1, 1])


def test_edge_cases_dead_row_optimal_start_and_singular_gram():
    f, G, n, s_old = _groups((6,), seed=9)
    _, s_best = _brute_force(f, G, n)
    n = n.clone()
    n[0] = 0.0                                             # a dead row (a = 0): left unchanged
    s_start = s_old.clone()
    s_start[1] = s_best[1]                                 # already optimal: stays optimal
    G, f = G.clone(), f.clone()
    G[2, 3, :] = G[2, :, 3] = 0.0                          # a zero row of B̃ (so f_3 = 0 too): singular
    f[2, 3] = 0.0                                          # Gram, the ridge keeps the result finite
    s = solve_group_reference(f, G, n, s_start)
    assert torch.equal(s[0], s_start[0])
    torch.testing.assert_close(s[1], s_best[1], rtol=1e-6, atol=1e-9)
    assert torch.isfinite(s).all()
    assert (group_objective(s, f, G, n) <= group_objective(s_start, f, G, n)).all()
