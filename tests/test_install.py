"""What is installed works: a built extension or an installed Triton that fails to import fails here,
instead of turning its tests into skips."""
import importlib

import pytest

from armor_kernels import extensions
from armor_kernels.kernels import triton_switch


def test_no_built_extension_fails_to_load():
    assert extensions.broken() == {}


def test_an_installed_triton_imports():
    assert triton_switch.IMPORT_ERROR is None


def test_a_built_extension_that_fails_to_load_is_reported_not_hidden(monkeypatch):
    """A stand-in for a .so built against another torch: found, but its import raises."""
    real_find, real_import = importlib.util.find_spec, importlib.import_module
    name = "armor_kernels._armor_cpu"
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == name else real_find(n, *a))

    def fail(n, *a):
        if n == name:
            raise ImportError("undefined symbol: _ZN3c10")
        return real_import(n, *a)
    monkeypatch.setattr(importlib, "import_module", fail)
    monkeypatch.setattr(extensions, "_FAILED", {})
    with pytest.warns(RuntimeWarning, match="_armor_cpu is built but failed to load: ImportError: undefined symbol"):
        module, why = extensions.load("_armor_cpu", "never shown")
    assert module is None and "undefined symbol" in why
    assert "undefined symbol" in extensions.broken()[name]
