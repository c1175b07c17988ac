"""armor_kernels.prune: a model in memory pruned by the pipeline the command line runs, with one PruneConfig."""
import os

import pytest
import torch
from helpers import cpu_path

import armor_kernels
from armor_kernels.api import calibration_tokens
from armor_kernels.integrations.hf import load_pruned_model
from armor_kernels.nn import PRUNED_LINEARS, paths
from armor_kernels.optim import ArmorOptions
from armor_kernels.pipeline.budget import BudgetOptions
from armor_kernels.pipeline.config import PRESETS, PruneConfig, prune_config
from armor_kernels.pipeline.data import calibration_windows, python_reference
from armor_kernels.pipeline.prune import prune_model
from armor_kernels.pipeline.reconstruct import ReconOptions

# The preset's shape at a tiny size: ARMOR under a budget, then block-wise reconstruction.
SMALL = PruneConfig(options=ArmorOptions(block_size=16, iters=2), budget=BudgetOptions(0.3, probe_iters=1),
                    recon=ReconOptions(steps=2, batch=2, holdout=1, check=1))


@pytest.fixture(scope="module")
def tiny(bundled, tiny_llama):
    """(tokenizer, documents: real text in four parts, factory of fresh tiny models)."""
    model, tok = bundled
    text = python_reference()
    docs = [text[k * len(text) // 4:(k + 1) * len(text) // 4] for k in range(4)]
    return tok, docs, lambda: tiny_llama(model.config)


def _pruned_tensors(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": t for n, m in model.named_modules() if isinstance(m, PRUNED_LINEARS)
            for k, t in m.state_dict().items() if k != "weight"}


def test_prune_in_memory_is_the_pipelines_run_bit_for_bit(tiny, tmp_path, monkeypatch):
    tok, docs, fresh = tiny
    monkeypatch.chdir(tmp_path)
    model = armor_kernels.prune(fresh(), docs, SMALL, tokenizer=tok, n_samples=4, seq_len=32)
    assert os.listdir(tmp_path) == []  # nothing written without out
    ids = [torch.tensor(tok(d, add_special_tokens=False)["input_ids"]) for d in docs]
    calib = calibration_windows(ids, n_samples=4, seq_len=32)[0]  # the command line's draw
    run = fresh()
    prune_model(run, tok, calib, SMALL, tmp_path / "run")
    a, b = _pruned_tensors(model), _pruned_tensors(run)
    assert len(a) == 2 * 7 * 4 and a.keys() == b.keys()  # 2 blocks x 7 linears x (A, B, S_values, S_idx)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert set(paths(model).values()) == {cpu_path()}  # ready to run from the packed form
    assert all(m.weight.numel() == 0 for m in model.modules() if isinstance(m, PRUNED_LINEARS))  # no dense copy
    x = calib[:2]
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, run(x).logits, rtol=1e-4, atol=1e-4)


def test_prune_writes_a_checkpoint_only_when_asked(tiny, tmp_path):
    tok, _, fresh = tiny
    calib = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    model = armor_kernels.prune(fresh(), calib, "magnitude", tokenizer=tok, out=tmp_path / "ckpt")
    loaded, _ = load_pruned_model(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(calib[:1]).logits, model(calib[:1]).logits)
    with pytest.raises(ValueError, match="tokenizer: a checkpoint directory"):
        armor_kernels.prune(fresh(), calib, "magnitude", out=tmp_path / "other")


def test_calibration_in_every_form_gives_the_same_windows(tiny):
    tok, docs, _ = tiny
    calib = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    assert torch.equal(calibration_tokens(calib), calib)
    batches = [{"input_ids": calib[:2], "attention_mask": torch.ones(2, 32)}, calib[2:].int()]
    assert torch.equal(calibration_tokens(batches), calib)
    texts = calibration_tokens(docs, tok, n_samples=3, seq_len=16, seed=1)
    assert texts.shape == (3, 16) and texts.dtype == torch.long
    assert torch.equal(texts, calibration_tokens(docs, tok, n_samples=3, seq_len=16, seed=1))


@pytest.mark.parametrize("calibration,message", [
    ([{"input_ids": torch.ones(2, 8, dtype=torch.long), "attention_mask": torch.tensor([[1] * 8, [1] * 7 + [0]])}],
     "calibration batch 0: attention_mask has zeros"),
    (["some text"], "tokenizer: calibration texts need the model's tokenizer"),
    (torch.zeros(2, 8), r"calibration: expected token ids, an int tensor \(n_windows, seq_len\), got torch.float32"),
    (torch.ones(8, dtype=torch.long), r"got torch.int64 \(8,\)"),
    ([torch.ones(1, 8, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], "one window length"),
    ([], "empty sequence"),
])
def test_bad_calibration_is_refused_by_name(calibration, message):
    with pytest.raises(ValueError, match=message):
        calibration_tokens(calibration)


def test_configs_by_name():
    assert prune_config("quality") is PRESETS["quality"] and armor_kernels.PRESETS is PRESETS
    assert prune_config("sparsegpt") == PruneConfig("sparsegpt")
    assert armor_kernels.PruneConfig is PruneConfig
    with pytest.raises(ValueError, match="config: expected a PruneConfig, a preset in"):
        prune_config("qualty")
    with pytest.raises(ValueError, match="budget: allocates ARMOR's block sizes"):
        PruneConfig("wanda", budget=BudgetOptions(0.05))


def test_armor_leaves_torchs_global_generator_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    W = torch.randn(32, 32, generator=torch.Generator().manual_seed(0))
    armor_kernels.armor(W, torch.ones(32), ArmorOptions(block_size=8, iters=2, seed=7))
    assert torch.equal(torch.get_rng_state(), state)
