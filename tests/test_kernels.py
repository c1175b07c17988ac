"""Triton kernels against their PyTorch references (armor_kernels/kernels/*.py).

On a CPU-only machine the kernels run under Triton's interpreter at small shapes; on a machine
with CUDA the same tests also run the compiled kernels on the GPU.

How triton (3.x, checked on 3.9) reads TRITON_INTERPRET: `@triton.jit` returns an
InterpretedFunction or a JITFunction depending on the variable at decoration time, and triton's
own language library (tl.sum, tl.zeros, ...) is decorated when triton is imported. So the
variable must be set before the process first imports triton, which in a pytest session has
already happened (conftest imports the package) by the time this module is collected. Hence:
  - run as `TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py`, the interpreter tests run
    in-process;
  - in a plain session they are skipped in-process and `test_interpreter_in_subprocess` runs
    this module in a fresh interpreter with TRITON_INTERPRET=1 (and --noconftest: no model or
    text fixtures are needed here), reporting its result.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

try:
    import triton  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"triton is not importable ({exc!r}): the Triton kernels cannot be tested",
                allow_module_level=True)

from armor_kernels.kernels import block_lstsq as bl  # noqa: E402
from armor_kernels.kernels import mask_select as ms  # noqa: E402

INTERPRETING = bl._interpreting()
# compiled CUDA kernels when a GPU is present (not under the interpreter: that would be slow)
DEVICES = ["interpret"] + (["cuda"] if torch.cuda.is_available() and not INTERPRETING else [])
needs_interpreter = pytest.mark.skipif(
    not INTERPRETING, reason="Triton's interpreter is not active in this process (TRITON_INTERPRET=1 must "
    "precede the first triton import); covered by test_interpreter_in_subprocess")


@pytest.fixture(params=DEVICES)
def dev(request, monkeypatch):
    """'interpret': CPU tensors through Triton's interpreter; 'cuda': the compiled kernels."""
    if request.param == "interpret":
        if not INTERPRETING:
            pytest.skip("Triton's interpreter is not active in this process: "
                        "covered by test_interpreter_in_subprocess")
        monkeypatch.setenv("ARMOR_TRITON", "1")
        return torch.device("cpu")
    monkeypatch.delenv("ARMOR_TRITON", raising=False)
    return torch.device("cuda")


@pytest.mark.skipif(INTERPRETING, reason="the interpreter is active: the tests run in this process")
def test_interpreter_in_subprocess():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest",
                           "-k", "not test_interpreter_in_subprocess", str(Path(__file__).resolve())],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"interpreter tests failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-3000:]


# ------------------------------------------------------------------------------------ dispatch

@needs_interpreter
def test_use_triton_switch(monkeypatch):
    x = torch.zeros(4)
    monkeypatch.delenv("ARMOR_TRITON", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not bl._use_triton(x)                                   # CPU, automatic: reference
    assert bl._use_triton(x, use_triton=True)                      # explicit + interpreter
    monkeypatch.setenv("ARMOR_TRITON", "1")
    assert bl._use_triton(x)                                       # env + interpreter
    assert not bl._use_triton(x, use_triton=False)                 # explicit beats env
    monkeypatch.setenv("ARMOR_TRITON", "0")
    assert not bl._use_triton(x)
    monkeypatch.setenv("ARMOR_TRITON", "1")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not bl._use_triton(x)                                   # CPU without interpreter: reference
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        bl._use_triton(x, use_triton=True)


def test_use_triton_without_interpreter(monkeypatch):
    """In a process whose triton was imported without the interpreter, CPU tensors get the reference,
    whatever TRITON_INTERPRET says now, and an explicit request fails clearly."""
    x = torch.zeros(4)
    monkeypatch.setenv("ARMOR_TRITON", "1")
    if not INTERPRETING:
        monkeypatch.setenv("TRITON_INTERPRET", "1")               # too late to matter: must be ignored
    else:
        monkeypatch.delenv("TRITON_INTERPRET")
    assert not bl._use_triton(x)
    with pytest.raises(RuntimeError, match="before triton is first imported"):
        ms.top2_mask(torch.randn(2, 8), use_triton=True)


@needs_interpreter
def test_dispatch_reaches_the_kernels(monkeypatch):
    """With ARMOR_TRITON=1 (+ the interpreter) the public dispatch points call the kernels."""
    monkeypatch.setenv("ARMOR_TRITON", "1")
    called = []
    for mod, name in ((bl, "_normal_equations_triton"), (ms, "_top2_mask_triton"),
                      (ms, "_sweep_tiles_triton")):
        orig = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _o=orig, _n=name, **k: (called.append(_n), _o(*a, **k))[1])
    g = torch.Generator().manual_seed(0)
    X, Y, w = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 8, generator=g), torch.rand(8, generator=g)
    Z = bl.block_lstsq(X, Y, w)
    assert torch.allclose(Z, bl.solve_normal_equations(*bl.normal_equations_reference(X, Y, w)), atol=1e-4)
    ms.top2_mask(torch.randn(3, 8, generator=g))
    R, A, Bt, S = _tiles(1, 4, 4, g)
    ms.sweep_tiles(R, A, Bt, S, 1)
    assert called == ["_normal_equations_triton", "_top2_mask_triton", "_sweep_tiles_triton"]
    # float64 inputs are not the kernels' business: the reference serves them
    called.clear()
    bl.normal_equations(X.double(), Y.double(), w.double())
    assert called == []


# --------------------------------------------------------------------------- normal equations

@pytest.mark.parametrize("n, b, m, K, weighted, layout", [
    (2, 96, 96, 24, True, "contig"),     # 576 / 96 blocks, small K
    (3, 12, 12, 37, True, "contig"),     # ragged 12 (pads to 16), K not a multiple of the K tile
    (2, 16, 8, 5, False, "contig"),      # unweighted (B-step), K < tile
    (2, 12, 12, 40, True, "cols"),       # the B-step's strided view: (n, b, K) with K-stride ≠ 1
    (1, 128, 64, 33, True, "contig"),    # 128-blocks: several output tiles per block
])
def test_normal_equations_match_reference(dev, n, b, m, K, weighted, layout):
    g = torch.Generator().manual_seed(n * 1000 + b + K)
    if layout == "cols":   # as optim.fast.b_step: M (K, n·b) -> (n, b, K) without a copy
        X = torch.randn(K, n * b, generator=g).reshape(K, n, b).permute(1, 2, 0)
        Y = torch.randn(K, n * m, generator=g).reshape(K, n, m).permute(1, 2, 0)
    else:
        X, Y = torch.randn(n, b, K, generator=g), torch.randn(n, m, K, generator=g)
    w = torch.rand(K, generator=g) + 0.1 if weighted else None
    X, Y = X.to(dev), Y.to(dev)
    w = w.to(dev) if w is not None else None
    G, F = bl.normal_equations(X, Y, w, use_triton=True)
    G0, F0 = bl.normal_equations_reference(X, Y, w)
    assert G.shape == (n, b, b) and F.shape == (n, m, b) and G.dtype == F.dtype == torch.float32
    tol = 2e-6 * K
    torch.testing.assert_close(G, G0, atol=tol, rtol=1e-5)
    torch.testing.assert_close(F, F0, atol=tol, rtol=1e-5)


def test_normal_equations_bad_shapes(dev):
    X = torch.randn(2, 4, 6, device=dev)
    with pytest.raises(ValueError, match="normal_equations"):
        bl.normal_equations(X, torch.randn(2, 4, 5, device=dev), None, use_triton=True)
    with pytest.raises(ValueError, match="normal_equations"):
        bl.normal_equations(X, X, torch.rand(5, device=dev), use_triton=True)


# -------------------------------------------------------------------------------------- top-2

@pytest.mark.parametrize("shape", [(7, 12), (3, 5, 16), (24, 576), (192, 4)])
def test_top2_matches_reference_random(dev, shape):
    g = torch.Generator().manual_seed(sum(shape))
    score = torch.randn(shape, generator=g).to(dev)
    assert torch.equal(ms.top2_mask(score, use_triton=True), ms.top2_mask_reference(score))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_top2_ties_and_specials(dev, dtype):
    """Heavy ties go to the lower column; NaN ranks below everything; ±inf, ±0 as the stable sort."""
    g = torch.Generator().manual_seed(1)
    score = torch.randint(0, 3, (300, 16), generator=g).float()
    score[score == 2] = float("nan")
    score[0, :4] = float("-inf")
    score[1, :4] = torch.tensor([0.0, -0.0, 0.0, -0.0])
    score[2, :4] = torch.tensor([float("nan"), float("inf"), float("nan"), 1.0])
    score[3, :4] = float("nan")
    score[4, :4] = 5.0
    score = score.to(dev, dtype)
    mask = ms.top2_mask(score, use_triton=True)
    assert torch.equal(mask, ms.top2_mask_reference(score))
    assert (mask.reshape(-1, 4).sum(-1) == 2).all()
    assert mask[4, :4].tolist() == [True, True, False, False]
    assert mask[2, :4].tolist() == [False, True, False, True]


def test_top2_bad_shape(dev):
    with pytest.raises(ValueError, match="divisible by 4"):
        ms.top2_mask(torch.randn(3, 6, device=dev), use_triton=True)


# ------------------------------------------------------------------------------- tile sweep

def _tiles(T, bA, bB, g):
    """Tiles in the state the optimizer hands to the S-step: A, B̃ near identity (B̃ column-scaled
    as B D^½), S a 2:4 core (NoWag-P-like), R the weighted residual of a dense target."""
    h = torch.rand(bB, generator=g) + 0.2
    A = torch.eye(bA) + 0.2 * torch.randn(T, bA, bA, generator=g)
    Bt = (torch.eye(bB) + 0.2 * torch.randn(T, bB, bB, generator=g)) * h.sqrt()
    W = torch.randn(T, bA, bB, generator=g)
    S = W * ms.top2_mask_reference(W * W * h)
    R = (W - A @ S @ (Bt / h.sqrt())) * h.sqrt()
    return R, A, Bt, S


@pytest.mark.parametrize("T, bA, bB, passes, regs", [
    (4, 12, 8, 1, False),    # 576 × 192-shaped layer at 1/48 scale with blocks 12 × 8 (4 tiles)
    (2, 12, 8, 2, True),     # same, residual in registers, 2 passes
    (1, 8, 12, 2, False),    # ragged bB = 12 (pads to 16)
    (1, 96, 4, 1, False),    # ragged bA = 96 (pads to 128)
])
def test_sweep_matches_reference(dev, T, bA, bB, passes, regs):
    g = torch.Generator().manual_seed(T * 100 + bA + bB)
    R, A, Bt, S = (t.to(dev) for t in _tiles(T, bA, bB, g))
    R0, S0 = R.clone(), S.clone()
    Rr, Sr = ms.sweep_tiles_reference(R.clone(), A, Bt, S.clone(), passes)
    Rk, Sk = ms._sweep_tiles_triton(R, A, Bt, S, passes, r_in_registers=regs)
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


def test_sweep_dispatch_and_edge_cases(dev):
    g = torch.Generator().manual_seed(7)
    R, A, Bt, S = (t.to(dev) for t in _tiles(2, 4, 8, g))
    A[1, :, 2] = 0.0                                               # a dead row: n = 0, left unchanged
    Rr, Sr = ms.sweep_tiles_reference(R.clone(), A, Bt, S.clone(), 1)
    S_before = S.clone()
    Rk, Sk = ms.sweep_tiles(R, A, Bt, S, 1, use_triton=True)
    assert torch.equal(Sk[1, 2], S_before[1, 2])
    assert torch.equal(Sk != 0, Sr != 0)
    torch.testing.assert_close(Sk, Sr, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(Rk, Rr, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="sweep_tiles"):
        ms._sweep_tiles_triton(R[:, :, :6], A, Bt[:, :6, :6], S[:, :, :6].contiguous(), 1)
