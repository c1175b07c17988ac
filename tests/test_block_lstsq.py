"""block_lstsq (armor_kernels/kernels/block_lstsq.py): the Triton normal equations against
`normal_equations_reference`.

Interpreter and GPU cases: see tests/triton_testing.py.
"""
import pytest
import torch
from triton_testing import dev, interpreter_rerun, needs_interpreter, needs_triton, record_calls  # noqa: F401

from armor_kernels.kernels import block_lstsq as bl

pytestmark = needs_triton
test_interpreter_in_subprocess = interpreter_rerun(__file__)


@needs_interpreter
def test_dispatch_reaches_the_kernel(monkeypatch):
    """With ARMOR_TRITON=1 (+ the interpreter) `block_lstsq` calls the kernel; float64 gets the reference."""
    called = record_calls(monkeypatch, bl, "normal_equations_triton")
    g = torch.Generator().manual_seed(0)
    X, Y, w = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 8, generator=g), torch.rand(8, generator=g)
    Z = bl.block_lstsq(X, Y, w)
    assert torch.allclose(Z, bl.solve_normal_equations(*bl.normal_equations_reference(X, Y, w)), atol=1e-4)
    assert called == ["normal_equations_triton"]
    # float64 inputs are not the kernels' business: the reference serves them
    called.clear()
    bl.normal_equations(X.double(), Y.double(), w.double())
    assert called == []


@pytest.mark.parametrize("n, b, m, K, weighted, layout", [
    (2, 96, 96, 24, True, "contig"),     # 576 / 96 blocks, small K
    (3, 12, 12, 37, True, "contig"),     # ragged 12 (pads to 16), K not a multiple of the K tile
    (2, 16, 8, 5, False, "contig"),      # unweighted (B-step), K < tile
    (2, 12, 12, 40, True, "cols"),       # the B-step's strided view: (n, b, K) with K-stride ≠ 1
    (1, 128, 64, 33, True, "contig"),    # 128-blocks: several output tiles per block
])
def test_normal_equations_match_reference(dev, n, b, m, K, weighted, layout):  # noqa: F811
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


def test_normal_equations_bad_shapes(dev):  # noqa: F811
    X = torch.randn(2, 4, 6, device=dev)
    with pytest.raises(ValueError, match="normal_equations"):
        bl.normal_equations(X, torch.randn(2, 4, 5, device=dev), None, use_triton=True)
    with pytest.raises(ValueError, match="normal_equations"):
        bl.normal_equations(X, X, torch.rand(5, device=dev), use_triton=True)
