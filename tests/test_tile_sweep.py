"""sweep_tiles (armor_kernels/kernels/tile_sweep.py): its two kernels against `sweep_tiles_reference`.

The Triton kernel: tiles in the state the optimizer hands to the S-step, at small shapes under
Triton's interpreter and on the GPU when there is one (see tests/triton_testing.py).

The C++/OpenMP kernel (armor_kernels._armor_cpu, csrc/cpu/sweep.cpp): the data is planted so that
every group decision is well separated: W = A S* B̃ + small noise with S* 2:4 (|values| in [1, 2]),
A and B̃ near (not equal to) the identity, and a start S0 on other random patterns. Round-off
differences between the two implementations (~1e-6) then cannot flip a pattern choice, so the
final masks must agree exactly, with nothing skipped.
"""
import pytest
import torch
from helpers import mask_24
from triton_testing import dev, interpreter_rerun, needs_interpreter, record_calls  # noqa: F401

from armor_kernels.kernels import tile_sweep as ts
from armor_kernels.kernels.top2 import top2_mask_reference

NO_CPU_EXT = "armor_kernels._armor_cpu is not built (`pip install -e .` builds it) or ARMOR_CPU_EXT=0 is set"
needs_module = pytest.mark.skipif(ts.cpu_ext is None, reason=NO_CPU_EXT)
test_interpreter_in_subprocess = interpreter_rerun(__file__, allowed_skips=(NO_CPU_EXT,))


@pytest.fixture(autouse=True)
def _no_triton(monkeypatch):
    """Automatic dispatch unless a test asks otherwise (the `dev` fixture sets ARMOR_TRITON=1)."""
    monkeypatch.delenv("ARMOR_TRITON", raising=False)


# ----------------------------------------------------------------------------- Triton kernel

def _tiles(T, bA, bB, g):
    """Tiles in the state the optimizer hands to the S-step: A, B̃ near identity (B̃ column-scaled
    as B D^½), S a 2:4 core (NoWag-P-like), R the weighted residual of a dense target."""
    h = torch.rand(bB, generator=g) + 0.2
    A = torch.eye(bA) + 0.2 * torch.randn(T, bA, bA, generator=g)
    Bt = (torch.eye(bB) + 0.2 * torch.randn(T, bB, bB, generator=g)) * h.sqrt()
    W = torch.randn(T, bA, bB, generator=g)
    S = W * top2_mask_reference(W * W * h)
    R = (W - A @ S @ (Bt / h.sqrt())) * h.sqrt()
    return R, A, Bt, S


@needs_interpreter
def test_dispatch_reaches_the_kernel(monkeypatch):
    """With ARMOR_TRITON=1 (+ the interpreter) `sweep_tiles` calls the Triton kernel."""
    called = record_calls(monkeypatch, ts, "sweep_tiles_triton")
    R, A, Bt, S = _tiles(1, 4, 4, torch.Generator().manual_seed(0))
    ts.sweep_tiles(R, A, Bt, S, 1)
    assert called == ["sweep_tiles_triton"]


@pytest.mark.parametrize("T, bA, bB, passes, regs", [
    (4, 12, 8, 1, False),    # 576 × 192-shaped layer at 1/48 scale with blocks 12 × 8 (4 tiles)
    (2, 12, 8, 2, True),     # same, residual in registers, 2 passes
    (1, 8, 12, 2, False),    # ragged bB = 12 (pads to 16)
    (1, 96, 4, 1, False),    # ragged bA = 96 (pads to 128)
])
def test_sweep_matches_reference(dev, T, bA, bB, passes, regs):  # noqa: F811
    g = torch.Generator().manual_seed(T * 100 + bA + bB)
    R, A, Bt, S = (t.to(dev) for t in _tiles(T, bA, bB, g))
    R0, S0 = R.clone(), S.clone()
    Rr, Sr = ts.sweep_tiles_reference(R.clone(), A, Bt, S.clone(), passes)
    Rk, Sk = ts.sweep_tiles_triton(R, A, Bt, S, passes, r_in_registers=regs)
    assert Rk is R and Sk is S                                     # in place, as the reference
    assert torch.equal(Sk != 0, Sr != 0)                           # exactly the same mask
    assert ((Sk != 0).reshape(T, bA, -1, 4).sum(-1) <= 2).all()    # 2:4 holds
    torch.testing.assert_close(Sk, Sr, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(Rk, Rr, atol=1e-5, rtol=1e-4)
    # the kernel's residual is the residual of its S: R = R0 − A (S − S0) B̃
    torch.testing.assert_close(Rk, R0 - A @ (Sk - S0) @ Bt, atol=1e-4, rtol=1e-4)
    # the tile loss ‖R‖² (the weighted proxy loss of each tile) does not rise, and it falls
    before, after = (R0.double() ** 2).sum((1, 2)), (Rk.double() ** 2).sum((1, 2))
    assert (after <= before * (1 + 1e-6)).all()
    assert after.sum() < before.sum()


def test_sweep_dispatch_and_edge_cases(dev):  # noqa: F811
    g = torch.Generator().manual_seed(7)
    R, A, Bt, S = (t.to(dev) for t in _tiles(2, 4, 8, g))
    A[1, :, 2] = 0.0                                               # a dead row: n = 0, left unchanged
    Rr, Sr = ts.sweep_tiles_reference(R.clone(), A, Bt, S.clone(), 1)
    S_before = S.clone()
    Rk, Sk = ts.sweep_tiles(R, A, Bt, S, 1, use_triton=True)
    assert torch.equal(Sk[1, 2], S_before[1, 2])
    assert torch.equal(Sk != 0, Sr != 0)
    torch.testing.assert_close(Sk, Sr, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(Rk, Rr, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="sweep_tiles"):
        ts.sweep_tiles_triton(R[:, :, :6], A, Bt[:, :6, :6], S[:, :, :6].contiguous(), 1)


# --------------------------------------------------------------------------- C++/OpenMP kernel

def planted(T, bA, bB, seed=0, zero_cols=True):
    """(W, R, A, Bt, S0): R = W − A S0 B̃ for tiles with a planted, well separated 2:4 optimum.

    zero_cols: column k of A is zero in some tiles (n = ‖a‖² = 0: that row must never change).
    """
    g = torch.Generator().manual_seed(seed)
    A = torch.eye(bA) + 0.2 * torch.randn(T, bA, bA, generator=g) / bA ** 0.5
    d = 0.5 + torch.rand(T, 1, bB, generator=g)                     # the D_J^½ column weights
    Bt = (torch.eye(bB) + 0.2 * torch.randn(T, bB, bB, generator=g) / bB ** 0.5) * d
    sign = torch.where(torch.rand(T, bA, bB, generator=g) < 0.5, -1.0, 1.0)
    S_star = mask_24(T, bA, bB, generator=g) * sign * (1 + torch.rand(T, bA, bB, generator=g))
    S0 = mask_24(T, bA, bB, generator=g) * 0.5 * torch.randn(T, bA, bB, generator=g)
    if zero_cols:
        for t in range(0, T, 3):
            A[t, :, (t * 7) % bA] = 0.0
    W = A @ S_star @ Bt + 0.01 * torch.randn(T, bA, bB, generator=g)
    R = W - A @ S0 @ Bt
    return W, R.contiguous(), A.contiguous(), Bt.contiguous(), S0.contiguous()


def exact_residual(W, A, S, Bt):
    return W.double() - A.double() @ S.double() @ Bt.double()


def tile_loss(W, A, S, Bt):
    return (exact_residual(W, A, S, Bt) ** 2).sum((1, 2))


SHAPES = [  # (T, bA, bB, passes)
    (1, 8, 8, 1),
    (1, 8, 8, 2),
    (3, 12, 16, 2),
    (5, 16, 12, 1),
    (24, 16, 16, 2),
    (24, 12, 8, 1),
    (7, 96, 16, 2),
    (3, 8, 128, 2),
    (4, 96, 96, 1),
    (2, 128, 96, 1),
]


@needs_module
@pytest.mark.parametrize("T, bA, bB, passes", SHAPES)
def test_cpu_sweep_matches_reference(T, bA, bB, passes):
    W, R, A, Bt, S0 = planted(T, bA, bB, seed=T * 1000 + bA * 10 + bB)
    Rr, Sr = ts.sweep_tiles_reference(R.clone(), A, Bt, S0.clone(), passes)
    Rc, Sc = R.clone(), S0.clone()
    out = ts.sweep_tiles_cpu(Rc, A, Bt, Sc, passes)
    assert out[0] is Rc and out[1] is Sc                           # in place

    # same decisions: identical masks, and the sweep really moved (not a vacuous comparison)
    assert torch.equal(Sc != 0, Sr != 0)
    assert not torch.equal(Sc != 0, S0 != 0)
    scale = Sr.abs().max().item()
    torch.testing.assert_close(Sc, Sr, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(Rc, Rr, rtol=1e-4, atol=1e-4 * W.abs().max().item())

    # the residual is the one of the new S (recomputed from scratch) ...
    Rx = exact_residual(W, A, Sc, Bt)
    assert (Rc.double() - Rx).abs().max().item() <= 2e-5 * W.abs().max().item() * max(1, bA // 16) ** 0.5
    # ... and no tile's loss went up (from NoWag-style start S0), and it matches the reference's
    before, after = tile_loss(W, A, S0, Bt), tile_loss(W, A, Sc, Bt)
    assert torch.all(after <= before * (1 + 1e-6))
    torch.testing.assert_close(after, tile_loss(W, A, Sr, Bt), rtol=1e-4, atol=1e-6 * before.max().item())

    # rows with a = A[:, k] = 0 (n = 0) are left exactly as they were
    for t in range(0, T, 3):
        k = (t * 7) % bA
        assert torch.equal(Sc[t, k], S0[t, k])
    # every group still keeps at most 2 of 4
    assert int((Sc.reshape(T, bA, bB // 4, 4) != 0).sum(-1).max()) <= 2


@needs_module
@pytest.mark.parametrize("T, bA, bB, passes", [(8, 128, 128, 2), (5, 96, 128, 3), (16, 12, 96, 2)])
def test_cpu_sweep_invariants_on_generic_data(T, bA, bB, passes):
    """Unstructured data (near-ties allowed): the loss never rises and R stays the true residual."""
    g = torch.Generator().manual_seed(bA + bB + T)
    A = torch.randn(T, bA, bA, generator=g) / bA ** 0.5 + torch.eye(bA)
    Bt = torch.randn(T, bB, bB, generator=g) / bB ** 0.5
    W = torch.randn(T, bA, bB, generator=g)
    S0 = W * mask_24(T, bA, bB, generator=g)
    R = (W - A @ S0 @ Bt).contiguous()
    S = S0.clone()
    ts.sweep_tiles_cpu(R, A, Bt, S, passes)
    before, after = tile_loss(W, A, S0, Bt), tile_loss(W, A, S, Bt)
    assert torch.all(after <= before * (1 + 1e-6))
    assert torch.all(after < 0.9 * before)                         # and it did real work
    assert (R.double() - exact_residual(W, A, S, Bt)).abs().max().item() <= 1e-4 * W.abs().max().item()
    assert int((S.reshape(T, bA, bB // 4, 4) != 0).sum(-1).max()) <= 2


@needs_module
def test_dispatch_uses_cpu_kernel_and_writes_back_non_contiguous(monkeypatch):
    calls = []
    real = ts.cpu_ext

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def sweep_tiles(self, *a, **k):
            calls.append(a[4:8])
            return real.sweep_tiles(*a, **k)

    monkeypatch.setattr(ts, "cpu_ext", Spy())
    W, R, A, Bt, S0 = planted(3, 16, 16, seed=5)
    Rr, Sr = ts.sweep_tiles_reference(R.clone(), A, Bt, S0.clone(), 2)

    # non-contiguous views of the same values: the kernel works on copies, results land in place
    Rn = R.transpose(1, 2).contiguous().transpose(1, 2)
    Sn = S0.transpose(1, 2).contiguous().transpose(1, 2)
    An = A.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (Rn.is_contiguous() or Sn.is_contiguous() or An.is_contiguous())
    out = ts.sweep_tiles(Rn, An, Bt, Sn, 2)
    assert calls == [(3, 16, 16, 2)]
    assert out[0] is Rn and out[1] is Sn
    assert torch.equal(Sn != 0, Sr != 0)
    torch.testing.assert_close(Sn, Sr, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(Rn, Rr, rtol=1e-4, atol=1e-4)

    # float64 is not the kernel's business: the reference serves it
    calls.clear()
    Rd, Sd = ts.sweep_tiles(R.double(), A.double(), Bt.double(), S0.double(), 1)
    assert calls == []
    assert Sd.dtype == torch.float64


def test_dispatch_falls_back_to_reference_without_module(monkeypatch):
    monkeypatch.setattr(ts, "cpu_ext", None)
    W, R, A, Bt, S0 = planted(2, 8, 8, seed=3)
    Rr, Sr = ts.sweep_tiles_reference(R.clone(), A, Bt, S0.clone(), 1)
    Rd, Sd = ts.sweep_tiles(R.clone(), A, Bt, S0.clone(), 1)
    assert torch.equal(Sd, Sr) and torch.equal(Rd, Rr)               # literally the reference
    with pytest.raises(RuntimeError, match="not built"):
        ts.sweep_tiles_cpu(R, A, Bt, S0, 1)


@needs_module
def test_cpu_sweep_argument_checks():
    R, S = torch.zeros(1, 4, 6), torch.zeros(1, 4, 6)
    with pytest.raises(ValueError, match="bB % 4"):
        ts.sweep_tiles_cpu(R, torch.zeros(1, 4, 4), torch.zeros(1, 6, 6), S, 1)
    with pytest.raises(ValueError):                                  # the C++ check itself
        ts.cpu_ext.sweep_tiles(R.data_ptr(), 0, 0, S.data_ptr(), 1, 4, 6, 1)
    # nothing to do: T = 0 and passes = 0 return untouched
    W, R, A, Bt, S0 = planted(2, 8, 8, seed=1)
    Rc, Sc = R.clone(), S0.clone()
    ts.sweep_tiles_cpu(Rc, A, Bt, Sc, 0)
    assert torch.equal(Rc, R) and torch.equal(Sc, S0)
    ts.sweep_tiles_cpu(Rc[:0], A[:0], Bt[:0], Sc[:0], 1)
    assert "openmp" in ts.cpu_ext.build_info()
