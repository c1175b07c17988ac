"""Model loading, the decoder blocks and their linears, and perplexity."""

import math

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from armor_kernels.pipeline.evaluate import perplexity
from armor_kernels.pipeline.model import block_linears, decoder_layers, load_model

LLAMA_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def test_bundled_model(bundled):
    model, tokenizer = bundled
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32 and not model.training
    layers = decoder_layers(model)
    assert layers is model.model.layers and len(layers) == 30
    linears = block_linears(layers[0])
    assert list(linears) == LLAMA_LINEARS
    assert linears["mlp.down_proj"].weight.shape == (576, 1536)
    assert tokenizer("It is a truth", add_special_tokens=False)["input_ids"] == \
        tokenizer("It is a truth")["input_ids"]  # no BOS token is added


def test_perplexity_equals_direct_computation(bundled, austen):
    model, tokenizer = bundled
    text = austen["Pride and Prejudice"][:2000]
    tokens = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:3 * 64 + 50])
    with torch.no_grad():  # the labels loss averages the 63 predicted tokens of each window
        losses = [model(w[None], labels=w[None]).loss.item() for w in tokens[:3 * 64].view(3, 64)]
    expected = math.exp(sum(losses) / len(losses))  # the 50 trailing tokens are left out
    assert perplexity(model, tokens, seq_len=64, batch_size=2) == pytest.approx(expected, rel=1e-5)


def test_tiny_model_from_real_config(bundled, tiny_llama, tmp_path):
    model, tokenizer = bundled
    tiny = tiny_llama(model.config)
    layers = decoder_layers(tiny)
    assert len(layers) == 2
    linears = block_linears(layers[1])
    assert list(linears) == LLAMA_LINEARS
    assert linears["self_attn.k_proj"].weight.shape == (2 * 16, 64)

    # A Hugging Face directory with safetensors weights loads the same way as the bundled model.
    tiny.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_model(tmp_path)
    tokens = torch.tensor(tokenizer("It is a truth universally acknowledged")["input_ids"])
    assert loaded_tokenizer("It is a truth universally acknowledged")["input_ids"] == tokens.tolist()
    assert perplexity(loaded, tokens, seq_len=4) == perplexity(tiny, tokens, seq_len=4)


def test_wrong_model_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_model(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"refusing pickled weights \[.pytorch_model.bin.\]: convert"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_model(tmp_path / "config.json")


def test_decoder_layers_are_the_outermost_list(bundled, tiny_llama):
    tiny = tiny_llama(bundled[0].config)
    tiny.model.layers[0].mlp.parts = nn.ModuleList([nn.Identity()] * 5)  # longer, but nested
    assert decoder_layers(tiny) is tiny.model.layers


def test_models_without_layers_or_linears():
    with pytest.raises(ValueError, match="no decoder layers"):
        decoder_layers(nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10)))
    block = nn.Sequential(nn.LayerNorm(8), nn.GELU())
    model = nn.Sequential(nn.Embedding(10, 8), nn.ModuleList([block, block]))
    with pytest.raises(ValueError, match="Sequential has no nn.Linear layers"):
        block_linears(decoder_layers(model)[0])


def test_perplexity_errors(bundled):
    model = bundled[0]
    with pytest.raises(ValueError, match="tokens has 100 tokens, fewer than one window of seq_len=128"):
        perplexity(model, torch.zeros(100, dtype=torch.long), seq_len=128)
    with pytest.raises(ValueError, match="1-D"):
        perplexity(model, torch.zeros(2, 64, dtype=torch.long), seq_len=32)
