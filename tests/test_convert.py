"""convert (pipeline/convert.py): a dense checkpoint with 2:4 zeros, as llm-compressor's
2:4 modifiers save it, becomes a packed format-v2 directory with the same logits; a linear that is not
exactly 2:4 is named and kept dense, or refused with --strict."""
import json

import pytest
import torch
from architectures import linear_names, make_fixed_point, save_sharded, tiny_model
from helpers import cpu_path

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from armor_kernels import Sparse24Linear, prepare  # noqa: E402
from armor_kernels.cli import main  # noqa: E402
from armor_kernels.integrations.hf import load_pruned_model  # noqa: E402
from armor_kernels.layout import identity_block, layer_layout  # noqa: E402
from armor_kernels.pipeline.convert import from_dense_24  # noqa: E402
from armor_kernels.pipeline.summary import inspect_checkpoint  # noqa: E402


def dense_24_dir(path, arch="qwen2", dtype=torch.bfloat16):
    """A tiny model (Qwen2: biases on q/k/v) whose block linears are 2:4 but one, saved dense in `dtype`;
    returns (directory, the name of the linear that is not 2:4)."""
    model, _ = tiny_model(arch)
    make_fixed_point(model)
    names = linear_names(model)
    odd = sorted(names)[-1]
    with torch.no_grad():
        names[odd].weight[0, :4] = 0.5  # one group of 4 with four non-zeros
    return save_sharded(model.to(dtype), path), odd


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    src, odd = dense_24_dir(tmp_path_factory.mktemp("dense24"))
    dst = tmp_path_factory.mktemp("packed") / "out"
    return src, dst, odd, from_dense_24(src, dst)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_same_logits_as_the_dense_source(converted, dtype):
    src, dst, odd, _ = converted
    tokens = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    dense = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
    want = logits(dense, tokens)
    model, _ = load_pruned_model(dst, dtype=dtype)
    prepare(model, keep_dense=True)  # the unpacked 2:4 weights: the dense model's own matmuls
    pruned = {n for n, m in model.named_modules() if isinstance(m, Sparse24Linear)}
    assert pruned | {odd} == set(linear_names(dense)) and odd not in pruned
    assert type(model.get_submodule(odd)) is torch.nn.Linear
    assert torch.equal(logits(model, tokens), want)


def test_report_names_the_linear_kept_dense(converted):
    src, dst, odd, report = converted
    assert list(report["kept_dense"]) == [odd] and "1 of" in report["kept_dense"][odd]
    assert report["rounded_to_bf16"] == [] and report["packed"] > 0
    run = json.loads((dst / "armor_run.json").read_text())
    assert run["reports"]["conversion"]["kept_dense"] == report["kept_dense"]
    assert run["run"]["method"] == "from_dense_24" and run["run"]["model_source"] == str(src)


def test_packed_linears_store_nine_sixteenths_and_inspect_says_how_they_run(converted):
    _, dst, odd, _ = converted
    report = inspect_checkpoint(dst)
    rows = {r["name"]: r for r in report["layers"]}
    assert rows[odd]["kind"] == "dense" and rows[odd]["path"] == "dense"
    for r in rows.values():
        if r["kind"] == "sparse24":  # values (bf16) + 2-bit positions, bias in bf16
            d_out, d_in = r["d_out"], r["d_in"]
            bias = r["dense_bf16_bytes"] - 2 * d_out * d_in
            assert r["stored_bytes"] == d_out * d_in + d_out * d_in // 8 + bias
            # the tiny model's 32- and 64-wide layers pad to 128 on the kernels: past break-even, refused
            layout = layer_layout(d_out, d_in, identity_block(d_out), identity_block(d_in))
            fused = not isinstance(layout, str)
            assert r["path"] == ("fused" if fused else "reference")
            assert ("sparse GEMM" if fused else "at least the dense layer's work") in r["detail"]
            assert torch.cuda.is_available() or r["here"] == cpu_path()
    pure = [r for r in rows.values() if r["kind"] == "sparse24" and r["dense_bf16_bytes"] == 2 * r["d_out"] * r["d_in"]]
    assert pure and all(r["stored_bytes"] / r["dense_bf16_bytes"] == 0.5625 for r in pure)
    assert report["method"] == "from_dense_24" and report["totals"]["paths"]["dense"] == 1
    assert report["totals"]["paths_here"]["dense"] == 1


def test_strict_refuses_by_name_and_leaves_nothing(tmp_path):
    src, odd = dense_24_dir(tmp_path / "src")
    with pytest.raises(ValueError, match=f"--strict: {odd} is not exactly 2:4 \\(1 of"):
        from_dense_24(src, tmp_path / "dst", strict=True)
    assert not (tmp_path / "dst").exists()


def test_float32_source_reports_bf16_rounding(tmp_path):
    model, _ = tiny_model("llama")
    make_fixed_point(model)  # values already bf16-exact: nothing is rounded
    src = save_sharded(model, tmp_path / "src")
    assert from_dense_24(src, tmp_path / "a")["rounded_to_bf16"] == []
    with torch.no_grad():
        lin = next(iter(linear_names(model).values()))
        lin.weight.mul_(1 + 2 ** -12)  # not representable in bf16, zeros stay zeros
    src = save_sharded(model, tmp_path / "src2")
    report = from_dense_24(src, tmp_path / "b")
    assert len(report["rounded_to_bf16"]) == 1 and report["kept_dense"] == {}


def test_refusals(converted, tmp_path):
    src, dst, _, _ = converted
    with pytest.raises(ValueError, match="already a pruned checkpoint"):
        from_dense_24(dst, tmp_path / "x")
    with pytest.raises(ValueError, match="is not empty"):
        from_dense_24(src, dst)
    quantized, _ = dense_24_dir(tmp_path / "q")
    cfg = json.loads((quantized / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "config_groups": {"group_0": {}}}
    (quantized / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="holds quantized weights"):
        from_dense_24(quantized, tmp_path / "y")


def test_cli(converted, tmp_path, capsys):
    src, dst, odd, _ = converted
    assert main(["convert", str(src), str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert f"kept dense: {odd}: 1 of" in out and "linears packed 2:4, 1 kept dense" in out
    assert main(["convert", "--strict", str(src), str(tmp_path / "d")]) == 2
    assert f"--strict: {odd}" in capsys.readouterr().err
    assert main(["inspect", str(dst), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["paths"]["dense"] == 1
    assert main(["inspect", str(dst)]) == 0
    table = capsys.readouterr().out
    assert odd in table and "from_dense_24" in table and "on an sm_90 GPU (extension built), and here" in table


def test_streamed_evaluation_of_the_converted_directory(converted):
    """prune/eval's streamed perplexity reads the converted shards (the kept-dense linear too) and gives
    what the dense source gives in memory."""
    from armor_kernels.pipeline.evaluate import perplexity, streamed_perplexity
    from armor_kernels.pipeline.source import checkpoint_source

    src, dst, _, _ = converted
    tokens = torch.randint(3, 500, (96,), generator=torch.Generator().manual_seed(2))
    want = perplexity(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), tokens, seq_len=32)
    source, dtype = checkpoint_source(dst)
    assert dtype == torch.bfloat16
    got = streamed_perplexity(source, tokens, seq_len=32, dtype=torch.float32)
    assert got == pytest.approx(want, rel=1e-6)
