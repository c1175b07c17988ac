"""Loading the package's compiled extensions: one rule for all of them.

Not built (no file): None and a reason, the reference paths serve. Built but failing to load (a missing
symbol, a torch it was not built against): a RuntimeWarning naming the error, then the same fallback, so
that the package still imports; `broken()` lists such extensions, and the test suite fails on any.
"""
from __future__ import annotations

import importlib
import importlib.util
import warnings
from types import ModuleType

EXTENSIONS = ("_armor_cpu", "_armor_cuda")
_FAILED: dict[str, str] = {}


def load(name: str, not_built: str) -> tuple[ModuleType | None, str | None]:
    """(module, None), or (None, why): `not_built` when the extension has no file, else its load error."""
    full = f"{__package__}.{name}"
    try:
        if importlib.util.find_spec(full) is None:
            return None, f"the extension {full} is not built ({not_built})"
        return importlib.import_module(full), None
    except Exception as e:  # noqa: BLE001 - any failure of a built file is reported, never swallowed
        why = _FAILED[full] = f"the extension {full} is built but failed to load: {type(e).__name__}: {e}"
        warnings.warn(why, RuntimeWarning, stacklevel=2)
        return None, why


def broken() -> dict[str, str]:
    """Extensions that are built but failed to load in this process: name -> error (each tried once more
    here, so one never imported, e.g. under ARMOR_CPU_EXT=0, is checked too)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the failures are the return value
        for name in EXTENSIONS:
            if f"{__package__}.{name}" not in _FAILED:
                load(name, "")
    return dict(_FAILED)
