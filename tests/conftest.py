"""Shared fixtures: the real text and the bundled model, each loaded once per session."""

import pytest

from armor_kernels.pipeline.data import austen_novels
from armor_kernels.pipeline.model import load_model


@pytest.fixture(scope="session")
def austen(tmp_path_factory):
    """Title -> text of the six novels, really fetched and extracted into a fresh cache."""
    return austen_novels(tmp_path_factory.mktemp("armor_cache"))


@pytest.fixture(scope="session")
def bundled():
    """(model, tokenizer) of the bundled SmolLM2-135M-Instruct; loading takes ~40 s on 2 cores."""
    return load_model()
