"""The Triton switch every kernel module of this package asks: run the Triton kernel, or the reference?

`use_triton(*tensors, use_triton=...)` is the one decision (precedence and cases in its docstring);
`interpreting()` says whether Triton's CPU interpreter is active in this process. `triton` and `tl`
are the guarded imports (None without triton), `jit` is `triton.jit` or, without triton, the identity
(the kernels then stay plain, never-called functions), and `next_pow2` sizes the masked aranges.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

IMPORT_ERROR: str | None = None  # why an installed triton failed to import (tests fail on it)
try:  # triton is optional: without it every dispatch point runs its reference
    import triton
    import triton.language as tl
except Exception as e:  # noqa: BLE001 - any failure of an installed triton is reported, never swallowed
    triton = None
    tl = None
    if importlib.util.find_spec("triton") is not None:
        IMPORT_ERROR = f"triton is installed but failed to import: {type(e).__name__}: {e}"
        warnings.warn(IMPORT_ERROR, RuntimeWarning, stacklevel=1)

__all__ = ["interpreting", "jit", "next_pow2", "tl", "triton", "use_triton"]


def interpreting() -> bool:
    """Triton's CPU interpreter is on: TRITON_INTERPRET=1, and it already was when triton was imported.

    Triton (3.x) picks interpreter or compiler when a function is decorated with @triton.jit, and
    its own language library (tl.sum, tl.zeros, ...) is decorated when triton is imported; so the
    variable must be set before the first `import triton` in the process. Setting it later does
    not switch the interpreter on, which is checked here rather than failing inside a launch.
    """
    if triton is None or os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # pragma: no cover
        return False
    return isinstance(tl.standard.sum, InterpretedFunction)


def use_triton(*tensors: torch.Tensor, use_triton: bool | None = None) -> bool:
    """The one switch every dispatch point asks: run the Triton kernel on these tensors?

    Precedence: the explicit argument `use_triton`, else the environment variable ARMOR_TRITON
    ("0" = never, "1" = also on CPU tensors under TRITON_INTERPRET=1, unset = automatic).
      - False / ARMOR_TRITON=0            -> reference (also on CUDA: a debugging escape hatch)
      - triton not importable             -> reference (use_triton=True raises)
      - all tensors on CUDA               -> Triton
      - CPU tensors, True / ARMOR_TRITON=1, TRITON_INTERPRET=1 -> Triton through the interpreter
      - CPU tensors otherwise             -> reference (use_triton=True without the interpreter raises)
    Each dispatch point adds its own dtype condition (these kernels take float32).
    For the interpreter path, TRITON_INTERPRET=1 must be set before triton is imported (see
    `interpreting`).
    """
    env = os.environ.get("ARMOR_TRITON", "").strip()
    want = use_triton if use_triton is not None else {"0": False, "1": True}.get(env)
    if want is False:
        return False
    if triton is None:
        if use_triton:
            raise RuntimeError("use_triton=True but triton is not importable")
        return False
    if all(t.is_cuda for t in tensors):
        return True
    if want and interpreting():
        return True
    if use_triton:
        raise RuntimeError("use_triton=True with CPU tensors needs Triton's CPU interpreter: set "
                           "TRITON_INTERPRET=1 before triton is first imported; or pass CUDA tensors")
    return False


# @triton.jit when triton is importable; otherwise the kernels stay plain, never-called functions
# (the kernel modules use postponed annotations, so `tl.constexpr` is not evaluated without triton).
jit = triton.jit if triton is not None else (lambda fn: fn)


def next_pow2(x: int) -> int:
    """The smallest power of two ≥ x (1 for x ≤ 1): the size of a masked `tl.arange` over x entries."""
    return 1 << max(0, int(x) - 1).bit_length()
