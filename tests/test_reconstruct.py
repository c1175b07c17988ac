"""armor_kernels.pipeline.reconstruct: block-wise reconstruction through the streaming pipeline.

Tiny random models of tests/architectures.py, 8 calibration windows of 48 tokens, the last 2 held back.
The module is also the torchrun workers' script: `python -m torch.distributed.run --nproc_per_node 2
tests/test_reconstruct.py SRC OUT` prunes SRC into OUT in each process (and without torchrun, the same
run in one process).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from architectures import VOCAB, save_sharded, tiny_model, tiny_tokenizer
from safetensors.torch import load_file
from test_distributed import free_port

from armor_kernels.integrations.hf import load_pruned_model
from armor_kernels.optim import ArmorOptions
from armor_kernels.pipeline import blocks, prune
from armor_kernels.pipeline.config import PruneConfig, run_config
from armor_kernels.pipeline.model import decoder_layers
from armor_kernels.pipeline.reconstruct import ReconOptions, Reconstruction
from armor_kernels.pipeline.source import ModelSource
from armor_kernels.sparse24 import unpack_24

HERE = Path(__file__).resolve()
SEQ, HOLDOUT = 48, 2
CALIB = torch.randint(0, VOCAB, (8, SEQ), generator=torch.Generator().manual_seed(0))
OPTS = ArmorOptions(block_size=16, iters=1)
RECON = ReconOptions(steps=12, lr=1e-2, batch=2, holdout=HOLDOUT, check=2, patience=3)


def shards(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every block shard of a finished run of the tiny 2-block model (never none: two empty sets compare equal)."""
    found = {f.name: load_file(f) for f in sorted(out.glob("model-block-*.safetensors"))}
    assert len(found) == 2 and all(found.values()), f"{out}: {sorted(found)}"
    return found


def recon_reports(out: Path) -> dict[str, dict]:
    reports = json.loads((out / "armor_run.json").read_text())["reports"]
    return {k: v for k, v in reports.items() if k.endswith(".reconstruction")}


@contextmanager
def capturing():
    """Record, per call of Reconstruction.tune, the pruned modules' tensors before and after tuning and the
    block's reconstruction report."""
    calls, real = [], Reconstruction.tune

    def tune(self, block, pruned, report):
        before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in pruned.items()}
        pruned, report = real(self, block, pruned, report)
        calls.append((before, {n: dict(m.state_dict()) for n, m in pruned.items()}, report["reconstruction"]))
        return pruned, report

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Reconstruction, "tune", tune)
        yield calls


def check_tuned(calls: list, n_blocks: int) -> None:
    """Every block: the 2:4 positions kept, held-back loss never above the layer-wise one, training loss
    lowered, and where a tuned state was kept, its values differ from the layer-wise ones."""
    assert len(calls) == n_blocks
    for i, (before, after, rep) in enumerate(calls):
        for name in before:
            assert torch.equal(before[name]["S_idx"], after[name]["S_idx"]), f"block {i} {name}: mask changed"
            S = unpack_24(after[name]["S_values"], after[name]["S_idx"])
            assert ((S != 0).reshape(S.shape[0], -1, 4).sum(-1) <= 2).all(), f"block {i} {name}: not 2:4"
            assert after[name]["S_values"].dtype == before[name]["S_values"].dtype == torch.bfloat16
        assert rep["heldout_after"] <= rep["heldout_before"], f"block {i}: {rep}"
        assert rep["train_after"] < 0.95 * rep["train_before"], f"block {i}: training loss barely moved: {rep}"
        changed = any(not torch.equal(before[n][k], after[n][k]) for n in before for k in ("A", "S_values", "B")
                      if k in before[n])
        assert changed == (rep["kept_step"] > 0), f"block {i}: kept step {rep['kept_step']}, values changed {changed}"
    assert any(rep["kept_step"] > 0 for _, _, rep in calls), "no block kept a tuned state"


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """A tiny Llama pruned with reconstruction (target dense, sequential), in memory: (out, tune's calls)."""
    model, _ = tiny_model("llama")
    out = tmp_path_factory.mktemp("recon") / "dense-target"
    with capturing() as calls:
        prune.prune_model(model, tiny_tokenizer(), CALIB, PruneConfig("armor", options=OPTS, recon=RECON), out)
    return out, calls


def test_options_refuse_bad_values(tmp_path):
    with pytest.raises(ValueError, match=r"target: expected one of \('dense', 'local'\), got 'global'"):
        ReconOptions(steps=1, target="global")
    with pytest.raises(ValueError, match=r"steps: expected an int ≥ 0, got -1"):
        ReconOptions(steps=-1)
    with pytest.raises(ValueError, match=r"lr: expected a positive learning rate, got 0"):
        ReconOptions(steps=1, lr=0)
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match=r"holdout: expected fewer windows than the calibration's 8, got 8"):
        prune.prune_model(model, tiny_tokenizer(), CALIB, PruneConfig("armor", options=OPTS,
                          recon=ReconOptions(steps=1, holdout=8)), tmp_path / "x")


def test_off_by_default_keeps_the_config_hash():
    model, _ = tiny_model("llama")
    plain = run_config(PruneConfig("armor", options=OPTS), CALIB, model, None)
    assert run_config(PruneConfig("armor", options=OPTS, recon=ReconOptions()), CALIB, model, None) == plain
    on = run_config(PruneConfig("armor", options=OPTS, recon=RECON), CALIB, model, None)
    assert on["reconstruction"] == asdict(RECON) and {k: v for k, v in on.items() if k != "reconstruction"} == plain


def test_tuning_lowers_the_block_loss_and_keeps_the_mask(llama_run):
    out, calls = llama_run
    check_tuned(calls, 2)
    assert [r for _, _, r in calls] == list(recon_reports(out).values())  # the run's per-block report


def test_a_baselines_kept_values_are_tuned(tmp_path):
    """Method magnitude: Sparse24Linear, whose only continuous parameters are its kept values."""
    model, _ = tiny_model("llama")
    with capturing() as calls:
        prune.prune_model(model, tiny_tokenizer(), CALIB, PruneConfig("magnitude", recon=RECON), tmp_path / "out")
    check_tuned(calls, 2)
    assert all(set(m) == {"S_values", "S_idx", "weight"} for before, _, _ in calls for m in before.values())


def test_stored_values_are_the_tuned_ones_and_give_the_reported_loss(llama_run):
    """The checkpoint holds the tuned (rounded) tensors, and the held-back loss recomputed from it — block 0
    on the dense model's embeddings of the held-back windows, against the dense block 0 — is the reported one."""
    out, calls = llama_run
    stored = shards(out)["model-block-00000.safetensors"]
    _, after, rep = calls[0]
    for name, tensors in after.items():
        for k, v in tensors.items():
            if v.numel():
                assert torch.equal(stored[f"model.layers.0.{name}.{k}"], v), f"{name}.{k}"
    dense, _ = tiny_model("llama")
    pruned, _ = load_pruned_model(out)
    with torch.no_grad():
        hidden, extra = blocks.calibration_inputs(dense, CALIB[-HOLDOUT:], 2, "cpu")
        t = blocks.run_block(decoder_layers(dense)[0], hidden, extra[0])[0]
        y = blocks.run_block(decoder_layers(pruned)[0], hidden, extra[0])[0]
    loss = float(((y - t) ** 2).sum() / (t ** 2).sum())
    assert loss == pytest.approx(rep["heldout_after"], rel=1e-4)
    assert loss < rep["heldout_before"]


def test_a_diverging_descent_keeps_the_layer_wise_result(tmp_path):
    """Steps of the size of every tensor's RMS ruin the held-back loss: no tuned state is kept, and the run
    stores, bit for bit, what it stores without reconstruction."""
    model, _ = tiny_model("llama")
    plain = tmp_path / "plain"
    prune.prune_model(model, tiny_tokenizer(), CALIB, PruneConfig("armor", options=OPTS), plain)
    model, _ = tiny_model("llama")
    wild = tmp_path / "wild"
    prune.prune_model(model, tiny_tokenizer(), CALIB, PruneConfig("armor", options=OPTS, recon=replace(RECON, lr=1.0,
                      steps=4, patience=1)), wild)
    reports = recon_reports(wild)
    assert len(reports) == 2 and all(r["kept_step"] == 0 and r["heldout_after"] == r["heldout_before"]
                                     for r in reports.values()), reports
    a, b = shards(plain), shards(wild)
    assert a.keys() == b.keys() and all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])


def test_local_target_equals_dense_on_the_first_block_only(llama_run, tmp_path):
    """Block 0's inputs are the dense model's either way, so both targets coincide there; block 1 gets the
    pruned block 0's outputs, and 'dense' aims at the dense model's block 1 output, 'local' at the dense
    block 1 on those same inputs."""
    out, _ = llama_run
    model, _ = tiny_model("llama")
    local = tmp_path / "local"
    prune.prune_model(model, tiny_tokenizer(), CALIB, PruneConfig("armor", options=OPTS, recon=replace(RECON,
                      target="local")), local)
    a, b = shards(out), shards(local)
    first = "model-block-00000.safetensors"
    assert all(torch.equal(a[first][k], b[first][k]) for k in a[first])
    second = "model-block-00001.safetensors"
    assert any(not torch.equal(a[second][k], b[second][k]) for k in a[second])
    ra, rb = recon_reports(out), recon_reports(local)
    assert ra["0.reconstruction"] == rb["0.reconstruction"] and ra["1.reconstruction"] != rb["1.reconstruction"]


def test_resume_after_an_interrupt_gives_the_uninterrupted_checkpoint(llama_run, tmp_path):
    from helpers import prune_interrupted
    out, _ = llama_run
    model, _ = tiny_model("llama")
    run = tmp_path / "run"
    assert prune_interrupted(model, tiny_tokenizer(), CALIB, PruneConfig("armor", options=OPTS, recon=RECON),
                             run) == [0]
    model, _ = tiny_model("llama")
    prune.prune_model(model, tiny_tokenizer(), CALIB, PruneConfig("armor", options=OPTS, recon=RECON), run)
    a, b = shards(out), shards(run)
    assert a.keys() == b.keys() and all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])
    assert recon_reports(out) == recon_reports(run)


@pytest.mark.parametrize("arch", ["gemma2", "phi3"])
def test_streamed_architectures(arch, tmp_path):
    """Gemma 2 (sliding and full attention alternating: per-block masks) and Phi-3 (fused qkv and gate_up
    projections), streamed from their shards; the tuned checkpoint reloads and runs."""
    model, _ = tiny_model(arch)
    src = save_sharded(model, tmp_path / "src")
    out = tmp_path / "out"
    with capturing() as calls:
        prune.prune_model(ModelSource(src), tiny_tokenizer(), CALIB, PruneConfig("armor", options=OPTS, recon=RECON),
                          out, source=arch)
    check_tuned(calls, len(decoder_layers(model)))
    pruned, _ = load_pruned_model(out)
    with torch.no_grad():
        logits = pruned(CALIB[:2], use_cache=False).logits
    assert torch.isfinite(logits).all()


def _launch(src: Path, out: Path, nproc: int, script: Path = HERE) -> subprocess.CompletedProcess:
    """`script SRC OUT` in one process, or under torchrun in `nproc`."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", ARMOR_DIST_TIMEOUT="60", HF_HUB_OFFLINE="1")
    launch = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
        "127.0.0.1", "--master_port", str(free_port())]
    return subprocess.run(launch + [str(script), str(src), str(out)], env=env, capture_output=True, text=True,
                          timeout=300)


def test_torchrun_two_processes_give_the_one_process_checkpoint(tmp_path):
    model, _ = tiny_model("llama")
    src = save_sharded(model, tmp_path / "src")
    for name, nproc in (("one", 1), ("two", 2)):
        proc = _launch(src, tmp_path / name, nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = shards(tmp_path / "one"), shards(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) == 2
    assert all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])
    one, two = (json.loads((tmp_path / n / "armor_run.json").read_text()) for n in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["reports"] == two["reports"]
    assert any(r["kept_step"] > 0 for r in recon_reports(tmp_path / "one").values())


def worker(src: str, out: str) -> None:
    """One process of the torchrun test (or the one-process run): 4 calibration batches of 2 windows, split
    2 / 2 over 2 ranks; the writer tunes every block on all 8 windows."""
    prune.prune_model(ModelSource(src), tiny_tokenizer(), CALIB, PruneConfig("armor", options=OPTS, batch_size=2,
                      recon=RECON), out, source="llama")


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
