"""Every decoder-only architecture of tests/architectures.py: a tiny random model built
from the real config class, saved as sharded safetensors, pruned, reloaded through `from_pretrained`
(armor_kernels.integrations.hf) and evaluated; the calibration feeds every block the activations the model itself
computes; mixture-of-experts blocks are refused by name rather than pruned from empty statistics.

What the tests use of the pipeline (tell whoever changes prune.py):
- `prune_model(model_or_ModelSource, tokenizer, calib, method, out, options=, protocol=, source=)`;
  `ModelSource(dir)` (pipeline/source.py) for the streamed runs;
- `prune.collect_stats(...)` (recorder.py's, imported by prune.py) is looked up in prune's namespace at call
  time, once per decoder block in block order, and returns {name within the block ("self_attn.q_proj") ->
  ActivationStats} with `.sq` (float64 sum of x² per input channel)
  and `.n_tokens` — only test_calibration_sees_the_models_own_activations.
Everything else goes through load_model, load_pruned_model, the checkpoint files and config.json.
"""
import json
import math

import pytest
import torch
from architectures import (
    ARCHITECTURES,
    MOE_ARCHITECTURES,
    VOCAB,
    linear_names,
    make_fixed_point,
    save_sharded,
    tiny_model,
)
from helpers import cpu_path
from safetensors import safe_open
from torch import nn

from armor_kernels.factors import block_sizes
from armor_kernels.integrations.hf import load_pruned_model
from armor_kernels.nn import ArmorLinear, Sparse24Linear, paths, prepare
from armor_kernels.optim import ArmorOptions
from armor_kernels.pipeline import prune
from armor_kernels.pipeline.checkpoint import INDEX_FILE
from armor_kernels.pipeline.config import PruneConfig
from armor_kernels.pipeline.evaluate import perplexity
from armor_kernels.pipeline.model import decoder_layers, layers_prefix, load_model
from armor_kernels.pipeline.source import ModelSource
from armor_kernels.sparse24 import unpack_24
from armor_kernels.stats import ActivationStats

BLOCK = 16
ARMOR_OPTS = ArmorOptions(block_size=BLOCK, iters=1)
SEQ = 48  # > architectures.SLIDING_WINDOW: sliding and full attention layers see different masks
CALIB = torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(0))
EVAL = torch.randint(0, VOCAB, (2 * SEQ,), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """arch -> a sharded safetensors directory of tiny_model(arch) (built once per module)."""
    made = {}

    def get(arch):
        if arch not in made:
            model, _ = tiny_model(arch)
            made[arch] = save_sharded(model, tmp_path_factory.mktemp(f"src-{arch}"))
        return made[arch]
    return get


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens.reshape(-1, SEQ), use_cache=False).logits


def pruned_modules(model) -> tuple[dict[str, nn.Module], list[str]]:
    """(full name -> pruned linear, names of nn.Linear left) inside the decoder blocks."""
    prefix, pruned, left = layers_prefix(model), {}, []
    for i, block in enumerate(decoder_layers(model)):
        for name, mod in block.named_modules():
            if isinstance(mod, (ArmorLinear, Sparse24Linear)):
                pruned[f"{prefix}.{i}.{name}"] = mod
            elif isinstance(mod, nn.Linear):
                left.append(f"{prefix}.{i}.{name}")
    return pruned, left


def stored(out) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, read from the shards its index names."""
    weight_map = json.loads((out / INDEX_FILE).read_text())["weight_map"]
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(out / shard, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    assert set(tensors) == set(weight_map)
    return tensors


@pytest.mark.parametrize("method", ["magnitude", "armor"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_prune_save_reload_evaluate(source, tmp_path, arch, method):
    model, tok = load_model(source(arch))
    dense = {n: (m.out_features, m.in_features, m.bias is not None) for n, m in linear_names(model).items()}
    dense_ppl = perplexity(model, EVAL, seq_len=SEQ)
    out = tmp_path / "out"
    prune.prune_model(model, tok, CALIB, PruneConfig(method, options=ARMOR_OPTS if method == "armor" else None), out)

    # the checkpoint loads through from_pretrained packed (no dense copy), and, given the same dense
    # product the pruning run evaluates with, into the model pruned in memory bit for bit
    loaded, _ = load_pruned_model(out)
    assert set(paths(loaded).values()) == {cpu_path()}, f"{arch}: {paths(loaded)}"
    packed_logits = logits(loaded, EVAL)
    prepare(loaded, keep_dense=True)
    assert torch.equal(logits(model, EVAL), logits(loaded, EVAL)), f"{arch}: logits after save → reload differ"
    torch.testing.assert_close(packed_logits, logits(model, EVAL), rtol=1e-4, atol=1e-4)

    # every linear of every decoder block was replaced, by the method's kind, in memory and reloaded
    kind = ArmorLinear if method == "armor" else Sparse24Linear
    for where, m in (("in memory", model), ("reloaded", loaded)):
        pruned, left = pruned_modules(m)
        assert not left, f"{arch} {where}: nn.Linear left unpruned in the decoder blocks: {left}"
        assert set(pruned) == set(dense), f"{arch} {where}: pruned {sorted(pruned)}, expected {sorted(dense)}"
        wrong = [n for n, mod in pruned.items() if type(mod) is not kind]
        assert not wrong, f"{arch} {where}: not {kind.__name__}: {wrong}"

    # the stored tensors: 2:4 in every group, bias kept where the dense layer had one, block-size rule
    tensors = stored(out)
    specs = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert set(specs) == set(dense)
    for name, (d_out, d_in, has_bias) in dense.items():
        S = unpack_24(tensors[f"{name}.S_values"], tensors[f"{name}.S_idx"])
        assert S.shape == (d_out, d_in), name
        assert ((S != 0).reshape(d_out, -1, 4).sum(-1) <= 2).all(), f"{arch}: 2:4 broken in {name}"
        assert (f"{name}.bias" in tensors) == has_bias, f"{arch}: bias of {name}"
        if method == "armor":
            bA, bB = block_sizes((d_out, d_in), BLOCK)
            assert tuple(tensors[f"{name}.A"].shape) == (d_out // bA, bA, bA), name
            assert tuple(tensors[f"{name}.B"].shape) == (d_in // bB, bB, bB), name
            assert specs[name] == {"kind": "armor", "block": [bA, bB]}, name
        else:
            assert specs[name] == {"kind": "sparse24"}, name

    ppl = perplexity(loaded, EVAL, seq_len=SEQ)
    assert math.isfinite(ppl) and ppl != dense_ppl, f"{arch}: perplexity {ppl} (dense {dense_ppl})"


@pytest.mark.parametrize("method", ["magnitude", "armor"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_streamed_run_gives_the_in_memory_checkpoint(source, tmp_path, arch, method):
    """ModelSource (one block read from the shards at a time) against the model loaded whole: the same
    tensors in the same shards, bit for bit, and the same run metadata."""
    opts = ARMOR_OPTS if method == "armor" else None
    model, tok = load_model(source(arch))
    prune.prune_model(model, tok, CALIB, PruneConfig(method, options=opts), tmp_path / "memory", source=arch)
    prune.prune_model(ModelSource(source(arch)), tok, CALIB, PruneConfig(method, options=opts), tmp_path / "stream",
                      source=arch)
    a, b = stored(tmp_path / "memory"), stored(tmp_path / "stream")
    assert a.keys() == b.keys()
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, f"{arch}: streamed tensors differ from in-memory ones: {differ[:5]}"
    for name in (INDEX_FILE, "config.json", "armor_run.json"):
        assert json.loads((tmp_path / "memory" / name).read_text()) == \
            json.loads((tmp_path / "stream" / name).read_text()), name


def reference_stats(model) -> tuple[dict[str, ActivationStats], torch.Tensor]:
    """(full name -> statistics of that linear's inputs, logits) of a plain forward of `model` on CALIB."""
    linears = linear_names(model)
    reference = {n: ActivationStats(m.in_features) for n, m in linears.items()}
    hooks = [m.register_forward_pre_hook(lambda _, a, s=reference[n]: s.update(a[0])) for n, m in linears.items()]
    try:
        return reference, logits(model, CALIB)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("protocol", ["sequential", "dense"])
@pytest.mark.parametrize("how", ["memory", "streamed"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_calibration_sees_the_models_own_activations(tmp_path, monkeypatch, arch, how, protocol):
    """The statistics the pipeline collects for every linear of every block equal those of the same
    linear's inputs in a plain forward of the model: a wrong attention mask or rotary embedding for one
    block (e.g. the first block's reused by all, while Gemma's sliding and full layers alternate) shows in
    that block's o_proj and in every later block's statistics.

    The model is a fixed point of magnitude pruning (architectures.make_fixed_point), so pruning changes
    nothing and the check holds for either calibration protocol; and the pruned checkpoint reloads to the
    dense model's logits exactly."""
    model, _ = tiny_model(arch)
    src = save_sharded(make_fixed_point(model), tmp_path / "src")
    model, tok = load_model(src)
    reference, dense_logits = reference_stats(model)

    seen, real = [], prune.collect_stats

    def recording(*args, **kwargs):
        stats = real(*args, **kwargs)
        seen.append(stats)
        return stats

    monkeypatch.setattr(prune, "collect_stats", recording)
    prefix, n_blocks = layers_prefix(model), len(decoder_layers(model))
    prune.prune_model(model if how == "memory" else ModelSource(src), tok, CALIB, PruneConfig("magnitude",
                      protocol=protocol), tmp_path / "out")

    assert len(seen) == n_blocks, f"collect_stats ran {len(seen)} times for {n_blocks} blocks"
    wrong = []
    for i, stats in enumerate(seen):
        assert {f"{prefix}.{i}.{n}" for n in stats} == {n for n in reference if n.startswith(f"{prefix}.{i}.")}
        for name, s in stats.items():
            ref = reference[f"{prefix}.{i}.{name}"]
            assert s.n_tokens == ref.n_tokens == CALIB.numel(), f"block {i} {name}: tokens"
            if not torch.allclose(s.sq, ref.sq, rtol=1e-6, atol=0):
                wrong.append(f"block {i} {name} (relative error {float(((s.sq - ref.sq) / ref.sq).abs().max()):.2g})")
    assert not wrong, f"{arch}: calibration inputs differ from the model's own activations in " + ", ".join(wrong)

    loaded, _ = load_pruned_model(tmp_path / "out")
    prepare(loaded, keep_dense=True)  # the dense product: the same matmul as the dense model's
    assert torch.equal(logits(loaded, CALIB), dense_logits), f"{arch}: the fixed point did not survive pruning"


@pytest.mark.parametrize("how", ["memory", "streamed"])
def test_each_protocol_calibrates_on_its_own_stream(tmp_path, monkeypatch, how):
    """On a model pruning changes (not a fixed point): protocol "dense" gives every block the dense model's
    activations, "sequential" the pruned blocks' before it. Block 0 sees the model's input under both; every
    later block's statistics match the dense forward's under "dense" and differ from them under
    "sequential" (the fixed-point test above cannot tell the two protocols apart)."""
    model, _ = tiny_model("llama")
    src = save_sharded(model, tmp_path / "src")
    model, tok = load_model(src)
    reference, _ = reference_stats(model)
    prefix = layers_prefix(model)
    seen, real = {}, prune.collect_stats
    for protocol in ("dense", "sequential"):
        runs = seen[protocol] = []
        monkeypatch.setattr(prune, "collect_stats", lambda *a, runs=runs, **k: runs.append(real(*a, **k)) or runs[-1])
        fresh, _ = load_model(src)
        prune.prune_model(fresh if how == "memory" else ModelSource(src), tok, CALIB,
                          PruneConfig("magnitude", protocol=protocol), tmp_path / protocol)
    for protocol, runs in seen.items():
        assert len(runs) == len(decoder_layers(model)) >= 2
        for i, stats in enumerate(runs):
            same = all(torch.allclose(s.sq, reference[f"{prefix}.{i}.{n}"].sq, rtol=1e-6, atol=0)
                       for n, s in stats.items())
            assert same == (i == 0 or protocol == "dense"), f"{protocol}, block {i}: dense statistics {same}"


@pytest.mark.parametrize("how", ["memory", "streamed"])
@pytest.mark.parametrize("arch", list(MOE_ARCHITECTURES))
def test_mixture_of_experts_is_refused_by_module_name(tmp_path, arch, how):
    """transformers 5 keeps the experts of Qwen2-MoE and Mixtral as fused 3-D parameters
    (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`) and the router as a bare `weight` — no nn.Linear
    the pipeline would see — and save_pretrained writes them unfused, under the hub's per-expert names.
    Until per-expert statistics from the routed tokens exist, pruning such a model must fail naming the
    module (`model.layers.0.mlp.experts`, not one of its tensors), not prune the attention and silently
    leave (or mis-prune) the experts, nor claim a tensor is missing from the shards.
    (If per-expert pruning is implemented, this test becomes: every expert pruned, from its own tokens.)"""
    model, _ = tiny_model(arch)
    src = save_sharded(model, tmp_path / "src")
    model, tok = load_model(src)
    with pytest.raises(ValueError, match=r"mlp\.experts(?![.\w])"):
        prune.prune_model(model if how == "memory" else ModelSource(src), tok, CALIB, "magnitude", tmp_path / "out")
