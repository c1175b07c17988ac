import pytest
import torch

from armor_kernels.kernels.top2 import top2_mask
from armor_kernels.sparse24 import check_24, pack_24, unpack_24


@pytest.mark.parametrize("shape", [(1, 8), (7, 16), (64, 96), (3, 576)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_round_trip_exact(shape, dtype):
    torch.manual_seed(0)
    W = torch.randn(shape)
    S = (W * top2_mask(W.abs())).to(dtype)
    S[0, :4] = 0                      # a group with no kept value
    S[-1, 4] = 0                      # a group with one kept value
    values, idx = pack_24(S)
    assert values.shape == (shape[0], shape[1] // 2) and idx.dtype == torch.uint8
    assert idx.shape == (shape[0], shape[1] // 8)
    assert torch.equal(unpack_24(values, idx), S)


def test_top2_mask_keeps_two_largest_with_ties_to_lower_column():
    score = torch.tensor([[1.0, 3.0, 2.0, 0.0, 5.0, 5.0, 5.0, 1.0]])
    assert top2_mask(score).tolist() == [[False, True, True, False, True, True, False, False]]


def test_check_24_rejects_three_in_a_group():
    with pytest.raises(ValueError, match="2:4"):
        check_24(torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="divisible by 4"):
        check_24(torch.ones(2, 6))


def test_unpack_rejects_mismatched_idx():
    with pytest.raises(ValueError, match="idx"):
        unpack_24(torch.zeros(2, 8), torch.zeros(2, 3, dtype=torch.uint8))
