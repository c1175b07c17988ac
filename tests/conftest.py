"""Shared fixtures: the real text and the bundled model, each loaded once per session."""
import copy

import pytest
import torch
from transformers import LlamaForCausalLM

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


@pytest.fixture(scope="session")
def tiny_llama():
    """config -> a randomly initialised (seed 0) 2-layer Llama with that config, shrunk."""
    def make(config):
        config = copy.deepcopy(config)
        del config.quantization_config  # describes the GGUF file, not this model
        config.update(dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16))
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()
    return make
