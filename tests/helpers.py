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
