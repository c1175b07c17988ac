"""Shared fixtures: the real text, the bundled model and tiny models, each built once per session.

Only torch and pytest are needed to collect the tests (the GPU image has neither transformers nor
rdata): the fixtures import the model and data modules when a test asks for them, and skip that
test when they are missing.
"""
import copy

import pytest
import torch


@pytest.fixture(scope="session")
def austen(tmp_path_factory):
    """Title -> text of the six novels, really fetched and extracted into a fresh cache."""
    data = pytest.importorskip("armor_kernels.pipeline.data", reason="needs rdata (pip install '.[models]')")
    return data.austen_novels(tmp_path_factory.mktemp("armor_cache"))


@pytest.fixture(scope="session")
def bundled():
    """(model, tokenizer) of the bundled SmolLM2-135M-Instruct; loading takes ~40 s on 2 cores."""
    model = pytest.importorskip("armor_kernels.pipeline.model", reason="needs transformers")
    return model.load_model()


@pytest.fixture(scope="session")
def tiny_llama():
    """config -> a randomly initialised (seed 0) 2-layer Llama with that config, shrunk.

    Weights are drawn 5x wider than the config's initializer_range (0.02): at 0.02 a 64-wide random
    model predicts an almost uniform distribution, and pruning moves its perplexity by ~1e-7
    relative, below what a float32 sum resolves."""
    transformers = pytest.importorskip("transformers")

    def make(config):
        config = copy.deepcopy(config)
        del config.quantization_config  # describes the GGUF file, not this model
        config.update(dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, initializer_range=0.1))
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).eval()
    return make
