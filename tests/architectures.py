"""Tiny random decoder-only causal LMs built from the real transformers config classes, offline.

    model, config = tiny_model("gemma2")          # seeded, eval mode, float32
    save_sharded(model, path)                     # ≥ 2 safetensors shards + a tiny tokenizer

Each entry of ARCHITECTURES keeps its config class's defaults (the real model's settings: activations,
norms, soft-capping, rope, GQA, …) and shrinks only the sizes, plus a few settings chosen so that the
architecture's peculiarities show in a 48-token calibration:

- Gemma 2 / Gemma 3: sliding_window 16 (< the calibration length) and layer types that alternate, so
  the blocks get different attention masks (and, in Gemma 3, different rotary embeddings: local
  rope_theta 1e4, global 1e6); q/k norms in Gemma 3; tied embeddings.
- Qwen2: biases on q/k/v (set non-zero here; transformers initialises them to zero).
- Qwen3: q/k norms, head_dim independent of hidden_size / heads.
- Mistral: a sliding window of 16 on every layer (Mistral-7B-v0.1 style), widths of 120 so that the
  block-size rule gives uneven blocks (15 on the output side, 12 on the input side at b = 16).
- Phi-3: fused qkv_proj and gate_up_proj, grouped-query attention (Phi-3-medium style).
- Tied (Qwen2, Qwen3, Gemma 2/3) and untied (Llama, Mistral, Phi-3) embeddings.

Weights are drawn with initializer_range 0.1 (at the default 0.02 a tiny random model is almost
uniform and pruning barely moves it); every 1-D parameter (norm weights, biases) gets N(0, 0.1²)
noise added, so a norm or bias lost on the way through save → load shows in the logits.

MOE_ARCHITECTURES holds tiny Qwen2-MoE and Mixtral models. In transformers 5 their experts are fused
3-D parameters (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), not nn.Linear, and the router is
a module with a bare `weight` parameter.
"""
from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from torch import nn

VOCAB = 512
SLIDING_WINDOW = 16  # < the tests' calibration length (48): sliding and full attention differ

_SMALL = dict(vocab_size=VOCAB, initializer_range=0.1, max_position_embeddings=256)

# name -> (config class, model class, config overrides). Everything not named keeps the class default.
ARCHITECTURES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        num_hidden_layers=2, hidden_size=64, intermediate_size=176, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        num_hidden_layers=2, hidden_size=120, intermediate_size=240, num_attention_heads=4,
        num_key_value_heads=2, head_dim=30, sliding_window=SLIDING_WINDOW)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        num_hidden_layers=3, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=SLIDING_WINDOW,
        pad_token_id=0, bos_token_id=2, eos_token_id=1)),  # layer_types default: sliding, full, sliding
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_hidden_layers=3, hidden_size=80, intermediate_size=160, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=SLIDING_WINDOW,
        # the real 5:1 pattern would make all 3 layers sliding; a full layer in the middle instead
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        pad_token_id=0, bos_token_id=2, eos_token_id=1)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        num_hidden_layers=2, hidden_size=96, intermediate_size=192, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=1, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)),
}

MOE_ARCHITECTURES: dict[str, tuple[str, str, dict]] = {
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2, num_attention_heads=4,
        num_key_value_heads=2)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        num_hidden_layers=2, hidden_size=64, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
}


def tiny_config(arch: str) -> transformers.PretrainedConfig:
    config_cls, _, overrides = {**ARCHITECTURES, **MOE_ARCHITECTURES}[arch]
    return getattr(transformers, config_cls)(**_SMALL, **overrides)


def tiny_model(arch: str, seed: int = 0) -> tuple[nn.Module, transformers.PretrainedConfig]:
    """(model, config): a randomly initialised (torch.manual_seed(seed)) float32 model in eval mode."""
    _, model_cls, _ = {**ARCHITECTURES, **MOE_ARCHITECTURES}[arch]
    config = tiny_config(arch)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model, config


def tiny_tokenizer(vocab_size: int = VOCAB) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer with `vocab_size` entries ("<unk>", "<s>", "</s>", "t3", "t4", …), offline."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")


def save_sharded(model: nn.Module, path: str | Path, tokenizer=None, n_shards: int = 3) -> Path:
    """`save_pretrained` in about `n_shards` safetensors shards (always ≥ 2), with a tokenizer (the tiny
    one by default) so that the directory loads like a hub model. Returns the path."""
    path = Path(path)
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    model.save_pretrained(path, max_shard_size=max(total // n_shards, 1))
    (tokenizer or tiny_tokenizer(model.config.vocab_size)).save_pretrained(path)
    shards = list(path.glob("*.safetensors"))
    if len(shards) < 2:
        raise AssertionError(f"save_sharded: expected ≥ 2 shards in {path}, got {[s.name for s in shards]}")
    return path


def linear_names(model: nn.Module) -> dict[str, nn.Module]:
    """Full name -> module of every nn.Linear inside the decoder blocks (model.model.layers.*)."""
    from armor_kernels.pipeline.model import decoder_layers, layers_prefix

    prefix = layers_prefix(model)
    return {f"{prefix}.{i}.{n}": m for i, block in enumerate(decoder_layers(model))
            for n, m in block.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def make_fixed_point(model: nn.Module) -> nn.Module:
    """Make `model` a fixed point of magnitude pruning as the pipeline stores it: every decoder-block
    linear's weight gets its own magnitude 2:4 pattern (2 largest |w| of each group of 4 kept) and, with
    its bias, is rounded to bfloat16. Pruning it with method "magnitude" then changes nothing, so every
    block sees the dense model's activations whatever the calibration protocol."""
    for lin in linear_names(model).values():
        W = lin.weight.to(torch.bfloat16).float()
        groups = W.reshape(W.shape[0], -1, 4)
        keep = groups.abs().topk(2, dim=-1).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
        lin.weight.copy_((groups * mask).reshape(W.shape))
        if lin.bias is not None:
            lin.bias.copy_(lin.bias.to(torch.bfloat16).float())
    return model
