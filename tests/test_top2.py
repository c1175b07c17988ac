"""top2_mask (armor_kernels/kernels/top2.py): the Triton kernel against `top2_mask_reference`.

Interpreter and GPU cases: see tests/triton_testing.py.
"""
import pytest
import torch
from triton_testing import dev, interpreter_rerun, needs_interpreter, needs_triton, record_calls  # noqa: F401

from armor_kernels.kernels import top2

pytestmark = needs_triton
test_interpreter_in_subprocess = interpreter_rerun(__file__)


@needs_interpreter
def test_dispatch_reaches_the_kernel(monkeypatch):
    """With ARMOR_TRITON=1 (+ the interpreter) `top2_mask` calls the kernel."""
    called = record_calls(monkeypatch, top2, "top2_mask_triton")
    top2.top2_mask(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)))
    assert called == ["top2_mask_triton"]


@pytest.mark.parametrize("shape", [(7, 12), (3, 5, 16), (24, 576), (192, 4)])
def test_top2_matches_reference_random(dev, shape):  # noqa: F811
    g = torch.Generator().manual_seed(sum(shape))
    score = torch.randn(shape, generator=g).to(dev)
    assert torch.equal(top2.top2_mask(score, use_triton=True), top2.top2_mask_reference(score))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_top2_ties_and_specials(dev, dtype):  # noqa: F811
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
    mask = top2.top2_mask(score, use_triton=True)
    assert torch.equal(mask, top2.top2_mask_reference(score))
    assert (mask.reshape(-1, 4).sum(-1) == 2).all()
    assert mask[4, :4].tolist() == [True, True, False, False]
    assert mask[2, :4].tolist() == [False, True, False, True]


def test_top2_bad_shape(dev):  # noqa: F811
    with pytest.raises(ValueError, match="divisible by 4"):
        top2.top2_mask(torch.randn(3, 6, device=dev), use_triton=True)
