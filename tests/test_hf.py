"""The Hugging Face-native checkpoint: from_pretrained, save_pretrained, generate, stock transformers,
dense export, on a tiny model built from the bundled model's real config."""
import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import cpu_path, prune_interrupted

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from armor_kernels.cli import main as cli_main  # noqa: E402
from armor_kernels.integrations import hf  # noqa: E402
from armor_kernels.nn import ArmorLinear, Sparse24Linear, paths, prepare  # noqa: E402
from armor_kernels.optim import ArmorOptions  # noqa: E402
from armor_kernels.pipeline import checkpoint as ckpt  # noqa: E402
from armor_kernels.pipeline import verify  # noqa: E402
from armor_kernels.pipeline.config import METHODS, PruneConfig  # noqa: E402
from armor_kernels.pipeline.model import decoder_layers  # noqa: E402
from armor_kernels.pipeline.prune import prune_model  # noqa: E402

PRUNED = [m for m in METHODS if m != "dense"]


@pytest.fixture(scope="module")
def tiny(bundled, tiny_llama):
    model, tok = bundled
    calib = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    return tok, calib, tokens, lambda: tiny_llama(model.config)


@pytest.fixture(scope="module")
def pruned_dirs(tiny, tmp_path_factory):
    """method -> (directory, the pruned model in memory), every method pruned once."""
    tok, calib, _, fresh = tiny
    out = {}
    for method in PRUNED:
        d = tmp_path_factory.mktemp(method)
        model = fresh()
        opts = ArmorOptions(block_size=16, iters=2) if method == "armor" else None
        prune_model(model, tok, calib, PruneConfig(method, options=opts), d)
        out[method] = d, model
    return out


def cast_like_from_pretrained(model, dtype):
    """A copy in `dtype` as from_pretrained(dtype=...) builds it: parameters and saved buffers cast; the
    buffers a module computes itself (rotary frequencies) as built, each pruned layer prepared."""
    model = copy.deepcopy(model)
    for mod in model.modules():
        for name, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is not None and t.is_floating_point() and name not in mod._non_persistent_buffers_set:
                t.data = t.data.to(dtype)
    prepare(model)
    return model


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", PRUNED)
def test_from_pretrained_gives_the_pruned_model_bit_identically(pruned_dirs, tiny, method, dtype):
    _, _, tokens, _ = tiny
    d, in_memory = pruned_dirs[method]
    loaded = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()
    kind = ArmorLinear if method == "armor" else Sparse24Linear
    mods = [m for m in loaded.modules() if isinstance(m, kind)]
    assert len(mods) == 14
    # packed, nothing dense: no tensor of a pruned layer is as large as its dense weight
    assert all(m.dense_weight is None and m.fused is None and m.semi is None for m in mods)
    assert all(t.numel() < m.in_features * m.out_features for m in mods for t in m.state_dict().values())
    assert set(paths(loaded).values()) == {cpu_path()} and len(paths(loaded)) == 14
    assert not any(type(m) is torch.nn.Linear for b in decoder_layers(loaded) for m in b.modules())
    assert torch.equal(logits(loaded, tokens), logits(cast_like_from_pretrained(in_memory, dtype), tokens))


def test_quantization_config_and_run_metadata(pruned_dirs):
    d, _ = pruned_dirs["armor"]
    config = json.loads((d / "config.json").read_text())
    q = config["quantization_config"]
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert q["quant_method"] == "armor" and q["format_version"] == 2 and q["method"] == "armor"
    assert q["modules"]["model.layers.1.mlp.down_proj"] == {"kind": "armor", "block": [16, 16]}
    assert len(q["modules"]) == 14
    run = json.loads((d / ckpt.RUN_FILE).read_text())
    assert run["world_size"] == 1 and run["config_hash"] == ckpt.config_hash(run["run"])
    names = [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]
    assert set(run["reports"]) == {f"{i}.{n}" for i in range(2) for n in names}
    assert all(r["loss"] <= r["start_loss"] for r in run["reports"].values())
    index = json.loads((d / ckpt.INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == {ckpt.REST_SHARD, "model-block-00000.safetensors",
                                                  "model-block-00001.safetensors"}
    assert index["weight_map"]["model.layers.0.self_attn.q_proj.A"] == "model-block-00000.safetensors"
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for f in set(index["weight_map"].values()) for t in load_file(d / f).values())


def test_save_pretrained_round_trip_sharded(pruned_dirs, tiny, tmp_path):
    _, _, tokens, _ = tiny
    d, _ = pruned_dirs["armor"]
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(again, tokens), logits(model, tokens))
    # every shard records the saved state dict's digests, and a reload checks them
    shards = sorted(tmp_path.glob("*.safetensors"))
    records = [verify.own_digests(f, verify.shard_header(f)[1], verify.MODEL_SHA256_KEY) for f in shards]
    assert all(r is not None and set(load_file(f)) <= set(r) for f, r in zip(shards, records))
    key = "model.layers.1.mlp.up_proj.S_values"
    shard = next(f for f in shards if key in load_file(f))
    tensors, meta = load_file(shard), verify.shard_header(shard)[1]["__metadata__"]
    tensors[key] = tensors[key].flip(0).contiguous()  # same shape, other values
    save_file(tensors, shard, metadata=meta)
    with pytest.raises(ValueError, match=rf"{shard.name}' is damaged: tensor '{key}' has sha256 .* its own metadata "
                                         r"\(save_pretrained's\) records"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_generate_gives_the_same_tokens(pruned_dirs, tiny):
    _, _, tokens, _ = tiny
    d, in_memory = pruned_dirs["sparsegpt"]
    loaded = AutoModelForCausalLM.from_pretrained(d).eval()
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    a, b = in_memory.generate(tokens[:1, :8], **kw), loaded.generate(tokens[:1, :8], **kw)
    assert a.shape == (1, 16) and torch.equal(a, b)


def test_registering_twice_is_harmless():
    hf.register()
    hf.register()
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
    assert AUTO_QUANTIZER_MAPPING["armor"] is hf.ArmorQuantizer


def _stock(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter that never imports armor_kernels."""
    guard = "import sys\nsys.modules['armor_kernels'] = None  # any import of the package would fail\n"
    return subprocess.run([sys.executable, "-c", guard + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)


def test_stock_transformers_refuses_a_pruned_directory(pruned_dirs):
    d, _ = pruned_dirs["armor"]
    done = _stock(f"""
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained({str(d)!r})
        print("LOADED")
    """)
    assert done.returncode != 0 and "LOADED" not in done.stdout
    # refused by name, before any weight is read (not by a shape mismatch deep in the loading)
    assert "Unknown quantization type, got armor" in done.stderr, done.stderr[-2000:]


def test_partial_run_refuses_to_load_and_resumes(tiny, tmp_path):
    tok, calib, tokens, fresh = tiny
    assert prune_interrupted(fresh(), tok, calib, "wanda", tmp_path) == [0]
    assert not (tmp_path / ckpt.INDEX_FILE).exists()
    with pytest.raises(OSError):  # transformers finds no weight index: never a half-random model
        AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="incomplete: block 1"):
        hf.load_pruned_model(tmp_path)
    model = fresh()
    prune_model(model, tok, calib, "wanda", tmp_path)
    prepare(model)  # the path from_pretrained's model takes
    assert torch.equal(logits(hf.load_pruned_model(tmp_path)[0], tokens), logits(model, tokens))


def test_export_dense_loads_in_stock_transformers_to_the_same_logits(pruned_dirs, tiny, tmp_path):
    _, _, tokens, _ = tiny
    d, in_memory = pruned_dirs["armor"]
    assert cli_main(["export-dense", str(d), str(tmp_path / "dense")]) == 0
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in config
    save_file({"tokens": tokens}, tmp_path / "tokens.safetensors")
    done = _stock(f"""
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'dense')!r}).eval()
        assert all(type(x).__name__ != "ArmorLinear" for x in m.modules())
        with torch.no_grad():
            y = m(load_file({str(tmp_path / 'tokens.safetensors')!r})["tokens"]).logits
        save_file({{"logits": y}}, {str(tmp_path / 'logits.safetensors')!r})
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.equal(load_file(tmp_path / "logits.safetensors")["logits"], logits(in_memory, tokens))


def test_errors_name_the_file_and_the_tensor(pruned_dirs, tmp_path):
    import shutil
    d, _ = pruned_dirs["magnitude"]
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    shard = bad / "model-block-00001.safetensors"
    tensors = load_file(shard)
    key = "model.layers.1.mlp.up_proj.S_values"
    tensors[key] = tensors[key][:, :-4].contiguous()  # wrong shape
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"model-block-00001.safetensors' is damaged: tensor '{key}' has sha256"):
        hf.load_pruned_model(bad)
    ckpt.save_shard(shard, tensors, {"format": "pt"})  # its digests recorded anew: the shape check names it
    index = json.loads((bad / ckpt.INDEX_FILE).read_text())
    index["metadata"][ckpt.SHA256_KEY][shard.name] = verify.own_digests(shard, verify.shard_header(shard)[1])
    (bad / ckpt.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"model-block-00001.safetensors: tensor '{key}' has shape"):
        hf.load_pruned_model(bad)
    shard.write_bytes(shard.read_bytes()[:-64])  # truncated
    with pytest.raises(ValueError, match=r"model-block-00001.safetensors.*corrupt or truncated.*tensor"):
        hf.load_pruned_model(bad)


def test_cli_mistakes_are_one_line_errors(tmp_path, capsys):
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("armor-kernels: error:") and "nowhere" in err[0]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"pickle")
    argv = ["prune", "--method", "magnitude", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing pickled weights" in err[0]
    with pytest.raises(SystemExit) as e:
        cli_main(["prune", "--method", "magnitude", "--out", str(tmp_path / "o"), "--no-such-option"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("armor-kernels: error:") and "--no-such-option" in err[0]
