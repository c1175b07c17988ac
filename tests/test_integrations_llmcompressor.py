"""ArmorModifier in llm-compressor's oneshot: fields, refusals, the saved directory, YAML, and `prune`.

Needs llm-compressor (.venv-llmc, scripts/setup_llmcompressor.sh); elsewhere every test skips, and with
ARMOR_REQUIRE_LLMCOMPRESSOR=1 a skip fails (conftest.py). Tiny random Llamas (tests/architectures.py),
calibrated on random token windows built in memory: nothing is downloaded.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields

import pytest
import torch

pytestmark = pytest.mark.llmcompressor

BLOCK, ITERS = 16, 5          # small blocks and few iterations: the tiny model prunes in about a second
N_SAMPLES, SEQ_LEN = 16, 48
ONESHOT_KW = dict(batch_size=8, shuffle_calibration_samples=False)


@pytest.fixture(scope="module")
def integ():
    pytest.importorskip("llmcompressor", reason="needs llm-compressor (scripts/setup_llmcompressor.sh)")
    from armor_kernels.integrations import llmcompressor as integ
    return integ


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from architectures import save_sharded, tiny_model
    return save_sharded(tiny_model("llama")[0], tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def text_and_calib(model_dir, tmp_path_factory):
    """A text of random tiny-tokenizer words and the calibration windows `prune` draws from it."""
    from transformers import AutoTokenizer

    from armor_kernels.pipeline.data import token_splits
    g = torch.Generator().manual_seed(1)
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(" ".join(f"t{i}" for i in torch.randint(3, 512, (4000,), generator=g).tolist()))
    calib = token_splits(AutoTokenizer.from_pretrained(model_dir), path, n_samples=N_SAMPLES, seq_len=SEQ_LEN,
                         eval_tokens=200).calibration
    return path, calib


def dataset(calib):
    from datasets import Dataset
    return Dataset.from_dict({"input_ids": calib.tolist()})


def run_oneshot(model_dir, calib, recipe, **kw):
    from llmcompressor import oneshot
    return oneshot(model=str(model_dir), dataset=dataset(calib), recipe=recipe, num_calibration_samples=len(calib),
                   **ONESHOT_KW, **kw)


def test_fields_are_armor_options_with_the_library_defaults(integ):
    from armor_kernels.optim import ArmorOptions
    mod = integ.ArmorModifier()
    for f in fields(ArmorOptions):
        assert getattr(mod, integ.RENAMED.get(f.name, f.name)) == f.default, f.name
    assert mod.options == ArmorOptions()
    assert (mod.sparsity, mod.mask_structure, mod.targets, mod.ignore) == (0.5, "2:4", None, [])
    assert integ.ArmorModifier(armor_start="best", overhead=0.05, iters=3).options == \
        ArmorOptions(start="best", overhead=0.05, iters=3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(itres=3), r"unknown option\(s\) \['itres'\]; expected ArmorOptions' \[.*'iters'"),
    (dict(mask_structure="4:8"), r"mask_structure\n.*expected '2:4'.*got '4:8'"),
    (dict(sparsity=0.7), r"sparsity\n.*expected 0.5.*got 0.7"),
    (dict(sparsity=[0.5, 0.5]), r"sparsity\n.*expected 0.5.*got \[0.5, 0.5\]"),
    (dict(sparsity_profile="owl", owl_m=5, owl_lmbda=0.08), r"sparsity_profile\n.*expected None.*got 'owl'"),
    (dict(objective="outptu"), r"objective: expected one of \('proxy', 'output'\), got 'outptu'"),
    (dict(armor_start="dense"), r"armor_start: expected one of \('nowag_p', 'sparsegpt', 'best'\), got 'dense'"),
    (dict(start="best"), r"start: .*lifecycle step.*`armor_start`, got start='best'"),
    (dict(shrink=0.5), r"shrink: applies to objective 'output' only"),
    (dict(block_size=2), r"block_size: expected an int ≥ 4, got 2"),
])
def test_wrong_options_are_refused_by_name(integ, kwargs, message):
    with pytest.raises(ValueError, match=message):
        integ.ArmorModifier(**kwargs)


def test_targets_outside_the_decoder_blocks_are_refused(integ, model_dir, text_and_calib):
    with pytest.raises(ValueError, match=r"targets: ArmorModifier prunes nn.Linear layers inside the decoder "
                                         r"blocks \(model.layers.\*.*got \['lm_head'\]"):
        run_oneshot(model_dir, text_and_calib[1], integ.ArmorModifier(targets=["Linear"], block_size=BLOCK,
                                                                     iters=ITERS))


@pytest.fixture(scope="module")
def pruned(integ, model_dir, text_and_calib, tmp_path_factory):
    """(in-memory model after oneshot, modifier, saved directory), ARMOR through oneshot(model=DIR)."""
    modifier = integ.ArmorModifier(block_size=BLOCK, iters=ITERS)
    model = run_oneshot(model_dir, text_and_calib[1], modifier)
    out = tmp_path_factory.mktemp("saved") / "armor"
    integ.save_armor(model, modifier, out)
    return model, modifier, out


def test_saved_directory_loads_to_the_in_memory_logits_and_generates(pruned, model_dir):
    from transformers import AutoModelForCausalLM

    import armor_kernels.integrations.hf  # noqa: F401  (registers "armor")
    from armor_kernels.nn import ArmorLinear, prepare
    from armor_kernels.pipeline.checkpoint import check_complete
    from armor_kernels.pipeline.verify import index_digests
    from armor_kernels.sparse24 import violations_24
    model, modifier, out = pruned
    check_complete(out)
    assert index_digests(out) is not None  # the shards' digests are in the index, as in a pruning run's
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    prepare(loaded, keep_dense=True)  # the product oneshot left in the model, one matmul each
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "armor" and len(config["modules"]) == 14  # 2 blocks x 7 linears
    for name, spec in config["modules"].items():
        assert spec == {"kind": "armor", "block": [BLOCK, BLOCK]}
        lin, layer = model.get_submodule(name), loaded.get_submodule(name)
        assert type(lin) is torch.nn.Linear and isinstance(layer, ArmorLinear)
        assert torch.equal(lin.weight, layer.dense_weight), name  # oneshot left exactly the loaded product
        assert violations_24(layer.sparse_core()) == 0
        assert not torch.equal(lin.weight, dense.get_submodule(name).weight)
    x = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
        assert not torch.allclose(model(x).logits, dense(x).logits, atol=1e-3)
        ids = loaded.generate(x[:1], max_new_tokens=8, do_sample=False)
        assert torch.equal(ids, model.generate(x[:1], max_new_tokens=8, do_sample=False)) and ids.shape == (1, 32)
    run = json.loads((out / "armor_run.json").read_text())
    assert run["run"]["options"] == modifier.options.to_config()
    assert sorted(run["reports"]) == sorted(f"{i}.{n}" for i in range(2) for n in
                                            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                             "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    assert all(r["loss"] <= r["start_loss"] for r in run["reports"].values())


def test_save_refuses_a_modifier_that_pruned_nothing_and_a_used_directory(integ, pruned, tmp_path):
    model, modifier, out = pruned
    with pytest.raises(ValueError, match="modifier: it has pruned nothing"):
        integ.save_armor(model, integ.ArmorModifier(), tmp_path / "new")
    with pytest.raises(ValueError, match="out: expected a new or empty directory"):
        integ.save_armor(model, modifier, out)
    with pytest.raises(TypeError, match="modifier: expected the ArmorModifier oneshot ran, got dict"):
        integ.save_armor(model, {}, tmp_path / "new")


def test_yaml_recipe_with_ignore_and_the_output_objective(integ, model_dir, text_and_calib, tmp_path):
    """A YAML recipe after ModifierFactory.register; `ignore` keeps down_proj dense; objective output needs
    the full H (ActivationStats(full=True)); save_armor finds the modifier in oneshot's session."""
    from llmcompressor.modifiers.factory import ModifierFactory
    from transformers import AutoModelForCausalLM

    import armor_kernels.integrations.hf  # noqa: F401
    ModifierFactory.register("ArmorModifier", integ.ArmorModifier)
    recipe = f"""
armor_stage:
  pruning_modifiers:
    ArmorModifier:
      block_size: {BLOCK}
      iters: 2
      objective: output
      armor_start: best
      ignore: ["re:.*down_proj"]
"""
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = run_oneshot(model_dir, text_and_calib[1], recipe)
    out = integ.save_armor(model, None, tmp_path / "armor")
    run = json.loads((out / "armor_run.json").read_text())
    assert (run["run"]["options"]["objective"], run["run"]["options"]["start"]) == ("output", "best")
    assert run["run"]["producer"]["ignore"] == ["re:.*down_proj"]
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert len(modules) == 12 and not any(n.endswith("down_proj") for n in modules)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for i in range(2):
        name = f"model.layers.{i}.mlp.down_proj"
        W = dense.get_submodule(name).weight
        assert torch.equal(model.get_submodule(name).weight, W)  # left alone in memory
        # stored dense in the format's bf16
        assert torch.equal(loaded.get_submodule(name).weight, W.to(torch.bfloat16).float())
    assert all(r["start"] in ("nowag_p", "sparsegpt") and r["loss"] <= r["start_loss"] for r in run["reports"].values())


def cli_layers(model_dir, text, out, protocol):
    """The ArmorLinear of every pruned linear of a `python -m armor_kernels prune` run, and its reports."""
    from safetensors.torch import load_file

    from armor_kernels.pipeline.checkpoint import modules_from_tensors
    cmd = [sys.executable, "-m", "armor_kernels", "prune", "--method", "armor", "--model", str(model_dir),
           "--text", str(text), "--out", str(out), "--no-eval", "--protocol", protocol, "--n-samples",
           str(N_SAMPLES), "--seq-len", str(SEQ_LEN), "--eval-tokens", "200", "--block-size", str(BLOCK),
           "--iters", str(ITERS)]
    subprocess.run(cmd, check=True, capture_output=True)
    tensors = {}
    for shard in sorted(out.glob("model-block-*.safetensors")):
        tensors.update(load_file(shard))
    return modules_from_tensors(tensors, str(out)), json.loads((out / "armor_run.json").read_text())["reports"]


@pytest.mark.parametrize("protocol", ["dense", "sequential"])
def test_same_factors_as_the_cli(integ, model_dir, text_and_calib, tmp_path, protocol):
    """Same calibration tokens, batches and order as `prune`: block 0's q/k/v (their inputs come before any
    attention) get identical factors; the rest differ only through the float32 rounding of the masked
    attention llm-compressor's traced model runs (module docstring), by bf16 ulps of the factors."""
    text, calib = text_and_calib
    ref, reports = cli_layers(model_dir, text, tmp_path / "cli", protocol)
    modifier = integ.ArmorModifier(block_size=BLOCK, iters=ITERS)
    run_oneshot(model_dir, calib, modifier, propagate_error=protocol == "sequential")
    assert sorted(modifier._pruned) == sorted(ref)
    for name, layer in modifier._pruned.items():
        r, i, local = ref[name], name.split(".")[2], name.split(".", 3)[3]
        if name in {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"}:
            for k, v in r.state_dict().items():
                assert torch.equal(v, layer.state_dict()[k]), f"{name}.{k}"
            assert modifier._reports[name] == reports[f"{i}.{local}"]
            continue
        W, W_mod = r.to_dense(torch.float32), layer.to_dense(torch.float32)
        # a few flipped mask choices move a layer's factors visibly: block 1's down_proj (sequential) on a
        # 2-core AVX2 EPYC, at the commit before this bound too: factors 0.017 apart, loss 4e-4 relative, the
        # same layer below 0.01 and 1e-4 on other CPUs
        assert ((W - W_mod).norm() / W.norm()).item() < 3e-2, name
        assert ((r.sparse_core() != 0) != (layer.sparse_core() != 0)).float().mean().item() < 0.01, name
        loss, loss_mod = reports[f"{i}.{local}"]["loss"], modifier._reports[name]["loss"]
        assert abs(loss_mod - loss) <= 1e-3 * loss, name


def test_a_config_prunes_with_the_package_pipeline_bit_for_bit(integ, model_dir, text_and_calib, tmp_path):
    """`config` (budget and reconstruction included) runs the pipeline `armor_kernels.prune` runs, on oneshot's
    calibration windows: the same stored tensors, the model left holding their loaded products, and a saved
    directory that loads to the in-memory logits and records the configuration as a `prune` run does. 32
    windows, as `prune` takes by default: oneshot's loader yields so many of one length permuted
    (integrations.llmcompressor.dataset_order), and the modifier puts them back in the dataset's order."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import armor_kernels
    import armor_kernels.integrations.hf  # noqa: F401  (registers "armor")
    from armor_kernels.nn import ArmorLinear
    from armor_kernels.optim import ArmorOptions
    from armor_kernels.pipeline.budget import BudgetOptions
    from armor_kernels.pipeline.config import PruneConfig, run_config
    from armor_kernels.pipeline.data import token_splits
    from armor_kernels.pipeline.reconstruct import ReconOptions
    config = PruneConfig(options=ArmorOptions(block_size=BLOCK, iters=2), budget=BudgetOptions(0.3, probe_iters=1),
                         recon=ReconOptions(steps=2, batch=2, holdout=1, check=1))
    path = text_and_calib[0]
    calib = token_splits(AutoTokenizer.from_pretrained(model_dir), path, n_samples=32, seq_len=SEQ_LEN,
                         eval_tokens=200).calibration
    modifier = integ.ArmorModifier(config=config)
    model = run_oneshot(model_dir, calib, modifier)
    ref = armor_kernels.prune(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), calib, config)
    layers = {n: m for n, m in ref.named_modules() if isinstance(m, ArmorLinear)}
    assert sorted(modifier._pruned) == sorted(layers) and len(layers) == 14
    for name, layer in layers.items():
        stored = modifier._pruned[name]
        for k, v in layer.state_dict().items():
            if k != "weight":
                assert torch.equal(v.to(torch.bfloat16), stored.state_dict()[k]), f"{name}.{k}"
        assert type(model.get_submodule(name)) is torch.nn.Linear
        assert torch.equal(model.get_submodule(name).weight, layer.to_dense(torch.float32)), name
    assert {m.A.shape[1] for m in layers.values()} != {BLOCK}  # the budget moved some block sizes
    out = integ.save_armor(model, modifier, tmp_path / "armor")
    run = json.loads((out / "armor_run.json").read_text())["run"]
    expected = run_config(config, calib, model, str(model_dir))
    assert {k: v for k, v in run.items() if k != "producer"} == expected
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    x = calib[:2, :24]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(config="qualty"), r"config: expected a PruneConfig, a preset in \['quality'\]"),
    (dict(config="wanda"), r"config: ArmorModifier prunes with ARMOR, got a config of method 'wanda'"),
    (dict(config="quality", iters=3), r"config: holds ARMOR's options .* got it with \['iters'\]"),
    (dict(config="quality", ignore=["re:.*down_proj"]), r"got it with \['ignore'\]"),
])
def test_a_config_beside_other_options_is_refused(integ, kwargs, message):
    with pytest.raises(ValueError, match=message):
        integ.ArmorModifier(**kwargs)


def test_the_preset_by_name(integ):
    from armor_kernels.pipeline.config import PRESETS
    mod = integ.ArmorModifier(config="quality")
    assert mod.config is PRESETS["quality"] and mod.options == PRESETS["quality"].options
