"""The Triton-or-reference switch (armor_kernels/kernels/triton_switch.py) that every dispatch point asks.

Interpreter cases: see tests/triton_testing.py.
"""
import pytest
import torch
from triton_testing import INTERPRETING, interpreter_rerun, needs_interpreter, needs_triton

from armor_kernels.kernels import triton_switch
from armor_kernels.kernels.top2 import top2_mask

pytestmark = needs_triton
test_interpreter_in_subprocess = interpreter_rerun(__file__)


@needs_interpreter
def test_use_triton_switch(monkeypatch):
    x = torch.zeros(4)
    monkeypatch.delenv("ARMOR_TRITON", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not triton_switch.use_triton(x)                         # CPU, automatic: reference
    assert triton_switch.use_triton(x, use_triton=True)            # explicit + interpreter
    monkeypatch.setenv("ARMOR_TRITON", "1")
    assert triton_switch.use_triton(x)                             # env + interpreter
    assert not triton_switch.use_triton(x, use_triton=False)       # explicit beats env
    monkeypatch.setenv("ARMOR_TRITON", "0")
    assert not triton_switch.use_triton(x)
    monkeypatch.setenv("ARMOR_TRITON", "1")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not triton_switch.use_triton(x)                         # CPU without interpreter: reference
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        triton_switch.use_triton(x, use_triton=True)


def test_use_triton_without_interpreter(monkeypatch):
    """In a process whose triton was imported without the interpreter, CPU tensors get the reference,
    whatever TRITON_INTERPRET says now, and an explicit request fails clearly."""
    x = torch.zeros(4)
    monkeypatch.setenv("ARMOR_TRITON", "1")
    if not INTERPRETING:
        monkeypatch.setenv("TRITON_INTERPRET", "1")               # too late to matter: must be ignored
    else:
        monkeypatch.delenv("TRITON_INTERPRET")
    assert not triton_switch.use_triton(x)
    with pytest.raises(RuntimeError, match="before triton is first imported"):
        top2_mask(torch.randn(2, 8), use_triton=True)


def test_next_pow2():
    assert [triton_switch.next_pow2(x) for x in (0, 1, 2, 3, 4, 5, 12, 96, 128, 129)] == \
        [1, 1, 2, 4, 4, 8, 16, 128, 128, 256]
