"""Builders the tests share (importable as `helpers`: pytest puts tests/ on sys.path)."""
from __future__ import annotations

from contextlib import contextmanager

import torch


def mask_24(*shape: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random boolean mask with exactly 2 True in every group of 4 along the last dimension."""
    *lead, d = shape
    keep = torch.rand(*lead, d // 4, 4, generator=generator).argsort(-1)[..., :2]
    return torch.zeros(*lead, d // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(shape)


def random_24(*shape: int, dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None
              ) -> torch.Tensor:
    """Standard-normal values on a random 2:4 mask (exactly 2 non-zeros per group of 4)."""
    values = torch.randn(*shape, generator=generator)
    return (values * mask_24(*shape, generator=generator)).to(dtype)


def prune_interrupted(*args, **kwargs) -> list[int]:
    """prune_model(*args, **kwargs), interrupted (KeyboardInterrupt) right after its first block is
    written; returns the blocks written. The pipeline is left as it was."""
    import pytest

    from armor_kernels.pipeline import prune
    real, written = prune.save_block, []

    def save_then_die(out, i, *a):
        real(out, i, *a)
        written.append(i)
        raise KeyboardInterrupt

    prune.save_block = save_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            prune.prune_model(*args, **kwargs)
    finally:
        prune.save_block = real
    return written


def cpu_path() -> str:
    """The path `prepare` picks for a pruned layer on the CPU: the packed kernels where the C++ extension is
    built, else the reference."""
    from armor_kernels import ops
    return "cpu_packed" if ops.cpu_unavailable_reason() is None else "reference"


@contextmanager
def launched(**expected: int):
    """Assert that the block makes exactly these native launches (ops.LAUNCHES' counts by family, e.g.
    sparse_gemm=1) and no other: a kernel test must prove its kernel ran, not just agree with the reference
    the op falls back to."""
    from armor_kernels import ops
    before = ops.LAUNCHES.copy()
    yield
    got = {k: n - before.get(k, 0) for k, n in ops.LAUNCHES.items() if n != before.get(k, 0)}
    assert got == expected, f"native launches {got}, expected {expected}"


def rounded_reference(x, A, S, B, bias=None) -> torch.Tensor:
    """ops.reference computed exactly (float64) with the fused kernels' rounding points, in x's dtype:
    xb = x B'ᵀ and z = xb Sᵀ rounded to it, then A' z + bias rounded once (the kernels add the bias in
    float32 before their one rounding; torch's reference rounds A' z first, then the sum)."""
    from armor_kernels import ops
    dtype = x.dtype
    xb = ops.block_diag_apply(x.double(), None if B is None else B.double()).to(dtype)
    z = torch.nn.functional.linear(xb.double(), S.double()).to(dtype)
    y = ops.block_diag_apply(z.double(), None if A is None else A.double())
    return (y if bias is None else y + bias.double()).to(dtype)


def assert_within_ulps(y: torch.Tensor, want: torch.Tensor, ulps: int = 2) -> None:
    """|y - want| ≤ `ulps` units in the last place (of want's dtype) of each token's largest |want|.

    Why per token and not per element: the kernels round xb and xb Sᵀ as the reference does, but sum in
    float32 in another order, so a rare intermediate lands one ulp off and moves the outputs that read it
    by an ulp of the intermediate, which near a cancelled (small) output is many of that output's ulps.
    Bounded at the token's scale, an fp32 emulation of that arithmetic stays within 1 ulp on every shape
    of these tests (bf16 and fp16, 1 to 300 tokens); 2 leaves a factor of two for other summation orders."""
    dtype = want.dtype
    scale = want.double().abs().amax(-1, keepdim=True).to(dtype)
    ulp = torch.nextafter(scale, torch.full_like(scale, float("inf"))).double() - scale.double()
    err = (y.double() - want.double()).abs()
    worst = (err / ulp).max().item() if err.numel() else 0.0
    assert worst <= ulps, f"off by {worst:.2f} ulps of the token's largest output (at most {ulps})"
