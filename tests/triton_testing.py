"""How the Triton kernels are tested (shared by tests/test_<kernel>.py; importable as `triton_testing`).

On a CPU-only machine the kernels run under Triton's interpreter at small shapes; on a machine
with CUDA the same tests also run the compiled kernels on the GPU (those cases carry
`pytest.mark.gpu`).

How triton (3.x, checked on 3.9) reads TRITON_INTERPRET: `@triton.jit` returns an
InterpretedFunction or a JITFunction depending on the variable at decoration time, and triton's
own language library (tl.sum, tl.zeros, ...) is decorated when triton is imported. So the
variable must be set before the process first imports triton, which in a pytest session has
already happened (conftest imports the package) by the time a test module is collected. Hence:
  - run as `TRITON_INTERPRET=1 python -m pytest tests/test_top2.py ...`, the interpreter tests
    run in-process;
  - in a plain session they are skipped in-process and each module's
    `test_interpreter_in_subprocess` (made by `interpreter_rerun`) runs that module in a fresh
    interpreter with TRITON_INTERPRET=1 (and --noconftest: no model or text fixtures are needed
    there), reporting its result.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from armor_kernels.kernels import triton_switch

HAS_TRITON = triton_switch.triton is not None
INTERPRETING = triton_switch.interpreting()
# compiled CUDA kernels when a GPU is present (not under the interpreter: that would be slow)
DEVICES = ["interpret"] + ([pytest.param("cuda", marks=pytest.mark.gpu)]
                           if torch.cuda.is_available() and not INTERPRETING else [])
NOT_INTERPRETING = ("Triton's interpreter is not active in this process (TRITON_INTERPRET=1 must precede "
                    "the first triton import); covered by test_interpreter_in_subprocess")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable: the Triton kernels "
                                  "cannot be tested")
needs_interpreter = pytest.mark.skipif(not INTERPRETING, reason=NOT_INTERPRETING)


@pytest.fixture(params=DEVICES)
def dev(request, monkeypatch):
    """'interpret': CPU tensors through Triton's interpreter; 'cuda': the compiled kernels."""
    if not HAS_TRITON:
        pytest.skip("triton is not importable: the Triton kernels cannot be tested")
    if request.param == "interpret":
        if not INTERPRETING:
            pytest.skip(NOT_INTERPRETING)
        monkeypatch.setenv("ARMOR_TRITON", "1")
        return torch.device("cpu")
    monkeypatch.delenv("ARMOR_TRITON", raising=False)
    return torch.device("cuda")


def record_calls(monkeypatch, module, name: str) -> list[str]:
    """Dispatch to the Triton kernels (ARMOR_TRITON=1) and wrap `module.name` so that every call of it
    appends `name` to the returned list (the call itself still runs)."""
    monkeypatch.setenv("ARMOR_TRITON", "1")
    called, orig = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        called.append(name)
        return orig(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)
    return called


def interpreter_rerun(test_file: str, allowed_skips: tuple[str, ...] = ()):
    """The test `test_interpreter_in_subprocess` of `test_file`: the module again, in a fresh process
    with TRITON_INTERPRET=1, where nothing may skip except for one of the `allowed_skips` reasons
    (substrings of the skip reason: causes that have nothing to do with the interpreter)."""

    @needs_triton
    @pytest.mark.skipif(INTERPRETING, reason="the interpreter is active: the tests run in this process")
    def test_interpreter_in_subprocess():
        root = Path(__file__).resolve().parents[1]
        env = dict(os.environ, TRITON_INTERPRET="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                               "--noconftest", "-k", "not test_interpreter_in_subprocess",
                               str(Path(test_file).resolve())],
                              cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"interpreter tests failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
        lines = proc.stdout.splitlines()
        bad = [ln for ln in lines if ln.startswith("SKIPPED") and not any(a in ln for a in allowed_skips)]
        assert " passed" in proc.stdout and not bad, proc.stdout[-3000:]
        assert allowed_skips or "skipped" not in lines[-1], proc.stdout[-3000:]

    return test_interpreter_in_subprocess
