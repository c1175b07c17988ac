"""prune → save → load → eval on a tiny model built from the real SmolLM2 config, every method."""
import csv
import json

import pytest
import torch
from helpers import cpu_path, prune_interrupted
from safetensors.torch import load_file, save_file

import armor_kernels
from armor_kernels.factors import block_overhead, block_size_under_overhead, block_sizes
from armor_kernels.integrations.hf import load_pruned_model
from armor_kernels.nn import ArmorLinear, paths, prepare
from armor_kernels.optim import ArmorOptions
from armor_kernels.optim import options as options_mod
from armor_kernels.pipeline import config as config_mod
from armor_kernels.pipeline import prune as prune_mod
from armor_kernels.pipeline.blocks import calibration_inputs
from armor_kernels.pipeline.checkpoint import block_shard
from armor_kernels.pipeline.config import METHODS, PruneConfig, run_config
from armor_kernels.pipeline.evaluate import perplexity
from armor_kernels.pipeline.model import block_linears, decoder_layers
from armor_kernels.pipeline.prune import collect_stats, prune_block_linears, prune_model
from armor_kernels.pipeline.source import ModelSource
from armor_kernels.sparse24 import unpack_24

ARMOR_OPTS = ArmorOptions(block_size=16, iters=2)


@pytest.fixture(scope="module")
def tiny(bundled, tiny_llama):
    """(config, tokenizer, calibration tokens, factory of fresh tiny models)."""
    model, tok = bundled
    calib = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    return model.config, tok, calib, lambda: tiny_llama(model.config)


@pytest.mark.parametrize("method", METHODS)
def test_prune_save_load_eval(tiny, tmp_path, method):
    config, tok, calib, fresh = tiny
    model = fresh()
    tokens = torch.randint(0, config.vocab_size, (96,), generator=torch.Generator().manual_seed(1))
    dense_ppl = perplexity(model, tokens, seq_len=32)
    prune_model(model, tok, calib, PruneConfig(method, options=ARMOR_OPTS if method == "armor" else None), tmp_path)
    with torch.no_grad():
        before = model(tokens[None, :32]).logits
    loaded, _ = load_pruned_model(tmp_path)
    assert set(paths(loaded).values()) <= {cpu_path()}  # loaded packed
    with torch.no_grad():
        packed = loaded(tokens[None, :32]).logits
        prepare(loaded, keep_dense=True)  # the dense product the in-memory model evaluates with
        after = loaded(tokens[None, :32]).logits
    assert torch.equal(before, after), "logits after save → load differ"
    torch.testing.assert_close(packed, before, rtol=1e-4, atol=1e-4)
    ppl = perplexity(loaded, tokens, seq_len=32)
    assert ppl > 0 and (ppl == dense_ppl) == (method == "dense")
    if method == "dense":
        return
    for i in range(2):
        tensors = load_file(block_shard(tmp_path, i))
        names = {k.rsplit(".", 1)[0] for k in tensors}
        assert len(names) == 7
        for name in names:
            S = unpack_24(tensors[f"{name}.S_values"], tensors[f"{name}.S_idx"])
            assert ((S != 0).reshape(S.shape[0], -1, 4).sum(-1) <= 2).all(), f"2:4 broken in {name}"
            assert S.dtype == torch.bfloat16  # stored like the dense bf16 model it is measured against
        if method != "armor":  # kept values + 2-bit positions: 9/16 of the dense bf16 bytes
            dense_bytes = sum(2 * lin.weight.numel() for lin in block_linears(decoder_layers(fresh())[i]).values())
            assert sum(t.numel() * t.element_size() for t in tensors.values()) == dense_bytes * 9 // 16
    q = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(q, ArmorLinear) == (method == "armor")



def test_layers_pruned_in_parallel_equal_layers_pruned_one_by_one(tiny):
    """Two CPU workers, one thread each, give bit-identical factors to the sequential single-thread run."""
    _, _, calib, fresh = tiny
    model = fresh()
    block = decoder_layers(model)[0]
    with torch.no_grad():
        hidden, extra = calibration_inputs(model, calib, 8, "cpu")
        stats = collect_stats(block, hidden, extra[0], full=False)
    linears = block_linears(block)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(prune_block_linears(linears, stats, "armor", ARMOR_OPTS, torch.device("cpu")))
    finally:
        torch.set_num_threads(threads)
    (one, rep1), (two, rep2) = results
    assert list(two) == list(linears) and rep1 == rep2
    for name in linears:
        sd1, sd2 = one[name].state_dict(), two[name].state_dict()
        assert list(sd1) == list(sd2) and all(torch.equal(sd1[k], sd2[k]) for k in sd1), name

def test_resume_after_interruption_gives_the_same_files(tiny, tmp_path, monkeypatch):
    _, tok, calib, fresh = tiny
    straight = prune_model(fresh(), tok, calib, PruneConfig("armor", options=ARMOR_OPTS), tmp_path / "straight")

    calls = prune_interrupted(fresh(), tok, calib, PruneConfig("armor", options=ARMOR_OPTS), tmp_path / "resumed")
    assert calls == [0] and not block_shard(tmp_path / "resumed", 1).exists()
    resumed = prune_model(fresh(), tok, calib, PruneConfig("armor", options=ARMOR_OPTS), tmp_path / "resumed")
    assert resumed["layers"] == straight["layers"]  # block 0's losses come back from its file
    for i in range(2):
        a, b = load_file(block_shard(tmp_path / "straight", i)), load_file(block_shard(tmp_path / "resumed", i))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_refuses_to_mix_configurations(tiny, tmp_path):
    _, tok, calib, fresh = tiny
    prune_model(fresh(), tok, calib, "magnitude", tmp_path)
    with pytest.raises(ValueError, match="different configuration"):
        prune_model(fresh(), tok, calib, "wanda", tmp_path)


@pytest.mark.parametrize("change", ["optimizer default", "package version", "sparsegpt damping"])
def test_refuses_to_resume_after_a_default_changed(tiny, tmp_path, monkeypatch, change):
    """What decides the output but was not given explicitly (a default, the package version) is in the
    run's hash: a resumed run after it changed must not append blocks computed differently."""
    _, tok, calib, fresh = tiny
    method, opts = ("sparsegpt", None) if change == "sparsegpt damping" else ("armor", ArmorOptions(block_size=16))
    prune_interrupted(fresh(), tok, calib, PruneConfig(method, options=opts), tmp_path)
    if change == "optimizer default":
        monkeypatch.setitem(options_mod.OPTIMIZER_DEFAULTS, "fast", {"iters": 81, "tol": 1e-4})
    elif change == "package version":
        monkeypatch.setattr(config_mod, "__version__", armor_kernels.__version__ + ".post1")
    else:
        monkeypatch.setattr(config_mod, "SPARSEGPT_DAMP", 0.02)
    with pytest.raises(ValueError, match="different configuration"):
        prune_model(fresh(), tok, calib, PruneConfig(method, options=opts), tmp_path)


def test_run_config_records_every_option_with_its_default(tiny):
    config_, _, calib, fresh = tiny
    config = run_config(PruneConfig("armor"), calib, fresh(), None)
    assert config["options"] == {"optimizer": "fast", "block_size": 128, "overhead": None, "seed": 0,
                                 "objective": "proxy", "start": "nowag_p", "iters": 80,
                                 "tol": 1e-4,
                                 "passes": 1, "extrapolation": True, "time_budget": None}
    assert config["package_version"] == armor_kernels.__version__ and config["format_version"] >= 1
    ref = run_config(PruneConfig("armor", options=ArmorOptions(optimizer="reference")), calib, fresh(),
                               None)["options"]
    assert ref == {"optimizer": "reference", "block_size": 128, "overhead": None, "seed": 0,
                   "objective": "proxy", "start": "nowag_p", "iters": 20_000,
                   "tol": 1e-6,
                   "lr": 1e-4, "patience": 100, "time_budget": None}


def test_corrupt_or_incomplete_checkpoint_errors(tiny, tmp_path):
    _, tok, calib, fresh = tiny
    prune_model(fresh(), tok, calib, "magnitude", tmp_path)
    path = block_shard(tmp_path, 1)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_pruned_model(tmp_path)
    path.unlink()
    with pytest.raises(ValueError, match="incomplete: block 1"):
        load_pruned_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pruned_model(tmp_path / "nowhere")


def test_model_without_linear_layers_is_refused(tiny, tmp_path):
    _, tok, calib, fresh = tiny
    model = fresh()
    for block in model.model.layers:
        block.self_attn = torch.nn.Identity()
        block.mlp = torch.nn.Identity()
    with pytest.raises(ValueError, match="no nn.Linear"):
        prune_model(model, tok, calib, "magnitude", tmp_path)


def cli_inputs(tiny, tmp_path, austen):
    """(model directory, text file) for the CLI: the tiny model saved, and 20 000 characters of Emma."""
    _, tok, _, fresh = tiny
    model_dir, text = tmp_path / "tiny", tmp_path / "emma.txt"
    fresh().save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    text.write_text(austen["Emma"][:20_000])
    return model_dir, text


def test_cli_compare_writes_table_and_resumes(tiny, tmp_path, austen, capsys):
    from armor_kernels.cli import main
    fresh = tiny[3]
    model_dir, text = cli_inputs(tiny, tmp_path, austen)
    argv = ["compare", "--model", str(model_dir), "--text", str(text), "--out", str(tmp_path / "cmp"),
            "--methods", "dense", "magnitude", "armor", "--n-samples", "2", "--seq-len", "32",
            "--eval-tokens", "96", "--block-size", "16", "--iters", "1"]
    main(argv)
    rows = (tmp_path / "cmp" / "results.csv").read_text().splitlines()
    assert rows[0].startswith("method,perplexity")
    assert [r.split(",")[0] for r in rows[1:]] == ["dense", "magnitude", "armor"]
    assert "| armor |" in (tmp_path / "cmp" / "results.md").read_text()
    first = (tmp_path / "cmp" / "armor" / "result.json").read_text()
    blocks = json.loads(first)["per_block_bytes"]
    assert [b["block"] for b in blocks] == [0, 1] and all(b["bytes"] > 0 for b in blocks)
    dense_block = block_linears(decoder_layers(fresh())[0]).values()
    assert blocks[0]["dense_bf16_bytes"] == sum(2 * lin.weight.numel() for lin in dense_block)
    main(argv)  # everything finished: the re-run only reads the results back
    assert (tmp_path / "cmp" / "armor" / "result.json").read_text() == first


def test_cli_demo_puts_quality_size_and_speed_in_one_table(tiny, tmp_path, austen, capsys, monkeypatch):
    """The preset (a small one of the same shape here) and SparseGPT beside dense: perplexity from the written
    checkpoints, then memory and decode speed of each loaded as a user loads it (packed, prepared)."""
    from armor_kernels.cli import main
    from armor_kernels.pipeline.budget import BudgetOptions
    from armor_kernels.pipeline.config import PRESETS
    from armor_kernels.pipeline.reconstruct import ReconOptions
    monkeypatch.setitem(PRESETS, "quality", PruneConfig(
        options=ArmorOptions(block_size=16, iters=1), budget=BudgetOptions(0.3, probe_iters=1),
        recon=ReconOptions(steps=2, batch=2, holdout=1, check=1)))
    model_dir, text = cli_inputs(tiny, tmp_path, austen)
    argv = ["demo", "--model", str(model_dir), "--text", str(text), "--out", str(tmp_path / "demo"),
            "--n-samples", "4", "--seq-len", "32", "--eval-tokens", "96", "--device", "cpu"]
    assert main(argv) == 0
    with open(tmp_path / "demo" / "demo.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["dense", "quality", "sparsegpt"]
    assert rows["dense"]["paths"] == "dense" and float(rows["dense"]["memory_vs_dense"]) == 1.0
    for run in ("quality", "sparsegpt"):
        assert rows[run]["paths"] == f"{cpu_path()}:14"  # 2 blocks x 7 linears, from the packed form
        assert float(rows[run]["memory_mib"]) < float(rows["dense"]["memory_mib"])
        assert float(rows[run]["perplexity"]) > 0 and float(rows[run]["decode_tok_s"]) > 0
    run = json.loads((tmp_path / "demo" / "quality" / "armor_run.json").read_text())["run"]
    assert "budget" in run and "reconstruction" in run  # the preset, not plain ARMOR
    assert "| quality |" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    """The tiny model saved as a sharded safetensors directory (what users point --model at)."""
    _, tok, _, fresh = tiny
    d = tmp_path_factory.mktemp("tiny_model")
    fresh().save_pretrained(d, max_shard_size="2MB")
    tok.save_pretrained(d)
    assert len(list(d.glob("*.safetensors"))) >= 2
    return d


def _shards(d):
    return {f.name: load_file(f) for f in sorted(d.glob("model-*.safetensors"))}


@pytest.mark.parametrize("method", ["armor", "sparsegpt"])
def test_streaming_and_in_memory_runs_give_identical_checkpoints(tiny, tiny_dir, tmp_path, method):
    _, tok, calib, fresh = tiny
    opts = ARMOR_OPTS if method == "armor" else None
    prune_model(fresh(), tok, calib, PruneConfig(method, options=opts), tmp_path / "memory", source="tiny")
    prune_model(ModelSource(tiny_dir), tok, calib, PruneConfig(method, options=opts), tmp_path / "stream",
                source="tiny")
    a, b = _shards(tmp_path / "memory"), _shards(tmp_path / "stream")
    assert a.keys() == b.keys() and len(a) == 3
    for name in a:
        assert a[name].keys() == b[name].keys() and all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name
    assert json.loads((tmp_path / "memory" / "armor_run.json").read_text()) == \
        json.loads((tmp_path / "stream" / "armor_run.json").read_text())


def test_dense_protocol_calibrates_every_block_on_the_dense_model(tiny, tiny_dir, tmp_path, monkeypatch):
    """protocol="dense": block i's statistics are those of the dense model's block-i inputs, whatever was
    pruned before it; "sequential" sees the pruned prefix. Both are recorded in the run configuration."""
    _, tok, calib, fresh = tiny
    seen = {}
    real = prune_mod.collect_stats

    def spy(*args, **kwargs):
        stats = real(*args, **kwargs)
        seen.setdefault(protocol, []).append(stats["self_attn.q_proj"].sq.clone())
        return stats

    monkeypatch.setattr(prune_mod, "collect_stats", spy)
    for protocol in ("sequential", "dense"):
        prune_model(ModelSource(tiny_dir), tok, calib, PruneConfig("magnitude", protocol=protocol), tmp_path / protocol)
        assert json.loads((tmp_path / protocol / "armor_run.json").read_text())["run"]["protocol"] == protocol
    model = fresh()
    with torch.no_grad():
        states = model(calib, output_hidden_states=True).hidden_states
    for i in range(2):  # the dense model's input to block i, through block i's first norm
        x = decoder_layers(model)[i].input_layernorm(states[i]).double()
        assert torch.allclose(seen["dense"][i], (x * x).sum((0, 1)), rtol=1e-5)
    assert torch.equal(seen["dense"][0], seen["sequential"][0])
    assert not torch.allclose(seen["dense"][1], seen["sequential"][1], rtol=1e-3)


def test_model_source_errors_name_the_tensor_and_the_shards(tiny_dir, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    shard = sorted(bad.glob("model-*.safetensors"))[-1]
    tensors = load_file(shard)
    key = sorted(k for k in tensors if ".layers." in k and k.endswith("proj.weight"))[0]
    del tensors[key]
    save_file(tensors, shard, metadata={"format": "pt"})
    src = ModelSource(bad)
    model = src.skeleton()
    src.load_rest(model, "cpu", torch.float32)
    block = int(key.split(".")[2])
    with pytest.raises(ValueError, match=rf"tensor '{key}'.*in none of its shards"):
        src.load_block(model, block, "cpu", torch.float32)
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] *= 2
    (bad / "config.json").write_text(json.dumps(config))
    src = ModelSource(bad)
    with pytest.raises(ValueError, match=r"has shape .* its config.json implies"):
        m = src.skeleton()
        src.load_rest(m, "cpu", torch.float32)
        for i in range(2):
            src.load_block(m, i, "cpu", torch.float32)


def test_parameter_budget_picks_each_layers_largest_block_within_it(tiny, tmp_path):
    """--overhead F: every layer gets the largest block (under the divisibility rule) whose A and B add at
    most F of its parameters; the choice is in the run configuration and in the stored shapes."""
    _, tok, calib, fresh = tiny
    opts = ArmorOptions(overhead=0.3, iters=1)
    prune_model(fresh(), tok, calib, PruneConfig("armor", options=opts), tmp_path)
    run = json.loads((tmp_path / "armor_run.json").read_text())["run"]
    assert run["options"]["overhead"] == 0.3
    specs = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["modules"]
    model = fresh()
    for name, spec in specs.items():
        lin = model.get_submodule(name)
        shape = (lin.out_features, lin.in_features)
        bA, bB = spec["block"]
        assert block_overhead(shape, (bA, bB)) <= 0.3
        b = block_size_under_overhead(shape, 0.3)
        assert (bA, bB) == block_sizes(shape, b)
        assert b == 128 or block_overhead(shape, block_sizes(shape, b + 1)) > 0.3  # the largest that fits
        i, local = name.split(".")[2], name.split(".", 3)[3]
        A = load_file(block_shard(tmp_path, int(i)))[f"{name}.A"]
        assert A.shape[1:] == (bA, bA), local
    with pytest.raises(ValueError, match="overhead"):
        ArmorOptions(overhead=0.0)


@pytest.mark.parametrize("start", ["nowag_p", "best"])
def test_output_objective_prunes_from_full_statistics_and_reloads(tiny, tmp_path, start):
    """--objective output: each linear is optimised on its full H (a layer's loss is its relative output
    error, which the report's start and final values show falling), and the directory reloads to the
    pruned model's logits."""
    _, tok, calib, fresh = tiny
    model = fresh()
    prune_model(model, tok, calib, PruneConfig("armor", options=ArmorOptions(objective="output", start=start,
                iters=3)), tmp_path)
    reports = json.loads((tmp_path / "armor_run.json").read_text())["reports"]
    assert reports and all(r["loss"] <= r["start_loss"] for r in reports.values())
    assert {r["start"] for r in reports.values()} <= ({"nowag_p"} if start == "nowag_p" else {"nowag_p", "sparsegpt"})
    loaded, _ = load_pruned_model(tmp_path)
    prepare(loaded, keep_dense=True)  # the dense product, as in memory
    x = calib[:2]
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
