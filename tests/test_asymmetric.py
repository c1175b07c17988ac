"""Asymmetric calibration: stats.asymmetric_weight, the paired StatsRecorder, model.sublayers and
prune_model(asymmetric=damp), which prunes a block one sublayer at a time.

Each linear is fitted, on the pruned model's inputs x, to the dense model's output on the dense model's
inputs x': the pipeline records the cross term C = Σ x' xᵀ beside H (a paired recording) and prunes
W̃ = W (C + λI)(H + λI)⁻¹ instead of W (the fit shrunk toward W).
"""
from __future__ import annotations

import json

import pytest
import torch
from architectures import VOCAB, tiny_model, tiny_tokenizer
from helpers import prune_interrupted
from safetensors.torch import load_file

from armor_kernels.optim import ArmorOptions
from armor_kernels.pipeline import prune
from armor_kernels.pipeline.config import PruneConfig, run_config
from armor_kernels.pipeline.distributed import Dist
from armor_kernels.pipeline.model import sublayers
from armor_kernels.pipeline.recorder import StatsRecorder, combine_stats
from armor_kernels.stats import ActivationStats, asymmetric_weight

CALIB = torch.randint(0, VOCAB, (8, 48), generator=torch.Generator().manual_seed(0))
OPTS = ArmorOptions(block_size=16, iters=1)
DAMP = 0.1


def paired_stats(x: torch.Tensor, x2: torch.Tensor) -> ActivationStats:
    """What the paired recorder gives for one linear fed x on the first stream and x2 on the second."""
    lin = torch.nn.Linear(x.shape[-1], 3, bias=False, dtype=x.dtype)
    with StatsRecorder({"lin": lin}, False, Dist(), paired=True) as rec:
        for b in range(x.shape[0]):
            rec.partners(lambda b=b: lin(x2[b]))
            with rec.batch(b):
                lin(x[b])
    return ActivationStats.from_paired(combine_stats(Dist(), rec)["lin"])


def test_paired_recording_holds_h_and_the_cross_term():
    g = torch.Generator().manual_seed(1)
    x, x2 = torch.randn(3, 10, 8, generator=g), torch.randn(3, 10, 8, generator=g)
    s = paired_stats(x, x2)
    X, X2 = x.reshape(-1, 8).double(), x2.reshape(-1, 8).double()
    plain = ActivationStats(8, full=True)
    plain.update(x)
    assert s.n_tokens == 30 and torch.allclose(s.sq, plain.sq) and torch.allclose(s.xx, plain.xx)
    assert torch.allclose(s.cross, X2.T @ X, rtol=1e-12, atol=1e-12)


def test_paired_recorder_refuses_unmatched_streams():
    lin = torch.nn.Linear(4, 2)
    x = torch.randn(5, 4)
    with StatsRecorder({"lin": lin}, False, Dist(), paired=True) as rec:
        with pytest.raises(ValueError, match="needs partners"):
            with rec.batch(0):
                lin(x)
        rec.partners(lambda: lin(x))
        with pytest.raises(ValueError, match="called more times than on the second stream"):
            with rec.batch(1):
                lin(x), lin(x)
        rec.partners(lambda: (lin(x), lin(x)))
        with pytest.raises(ValueError, match="second stream called"):
            with rec.batch(2):
                lin(x)
    with StatsRecorder({"lin": lin}, False, Dist()) as rec, pytest.raises(ValueError, match="for a paired recorder"):
        rec.partners(lambda: lin(x))


@pytest.mark.parametrize("damp", [0.0, 0.01, 0.3])
def test_asymmetric_weight_is_the_least_squares_fit_shrunk_toward_w(damp):
    """W̃ minimises Σ‖W x' − W̃ x‖² + λ‖W̃ − W‖², λ = damp · mean diag H: lstsq of the augmented system."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 64, 12, generator=g, dtype=torch.float64)
    x2 = x + 0.3 * torch.randn(1, 64, 12, generator=g, dtype=torch.float64)
    W = torch.randn(5, 12, generator=g, dtype=torch.float64)
    s = paired_stats(x, x2)
    X, X2 = x[0], x2[0]
    lam = damp * float((X.T @ X).diagonal().mean())
    A = torch.cat([X, lam ** 0.5 * torch.eye(12, dtype=torch.float64)])
    B = torch.cat([X2 @ W.T, lam ** 0.5 * W.T])
    expected = torch.linalg.lstsq(A, B).solution.T
    Wt = asymmetric_weight(W, s, damp)
    assert torch.allclose(Wt, expected, rtol=1e-8, atol=1e-9)
    # it fits the dense output at least as well as W itself does, from the same inputs
    fit = lambda V: float(((X2 @ W.T - X @ V.T) ** 2).sum())  # noqa: E731
    assert fit(Wt) + lam * float(((Wt - W) ** 2).sum()) <= fit(W) * (1 + 1e-12)


def test_a_strong_damp_gives_back_w():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 40, 8, generator=g)
    W = torch.randn(4, 8, generator=g)
    s = paired_stats(x, x + torch.randn(2, 40, 8, generator=g))
    assert torch.allclose(asymmetric_weight(W, s, 1e9), W, atol=1e-5)
    assert not torch.allclose(asymmetric_weight(W, s, 0.01), W, atol=1e-2)
    with pytest.raises(ValueError, match="damp: expected a non-negative strength, got -1"):
        asymmetric_weight(W, s, -1)


def test_same_streams_give_back_w():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, 8, generator=g)
    W = torch.randn(4, 8, generator=g)
    for damp in (0.0, 0.1):
        assert torch.allclose(asymmetric_weight(W, paired_stats(x, x), damp), W, atol=1e-4)


def test_asymmetric_weight_refuses_statistics_without_the_cross_term():
    s = ActivationStats(8, full=True)
    s.update(torch.randn(10, 8))
    with pytest.raises(ValueError, match="paired recording"):
        asymmetric_weight(torch.randn(3, 8), s, 0.01)
    with pytest.raises(ValueError, match="expected statistics of 4 inputs, got \\(8, 8\\)"):
        asymmetric_weight(torch.randn(3, 4), paired_stats(torch.randn(1, 5, 8), torch.randn(1, 5, 8)), 0.01)


def test_run_config_records_it_and_refuses_what_it_cannot_take():
    model, _ = tiny_model("llama")
    plain = run_config(PruneConfig("armor", options=OPTS), CALIB, model, None)
    on = run_config(PruneConfig("armor", options=OPTS, asymmetric=DAMP), CALIB, model, None)
    assert on == {**plain, "asymmetric": {"damp": DAMP}}
    with pytest.raises(ValueError, match="protocol 'sequential', got method 'armor', protocol 'dense'"):
        run_config(PruneConfig("armor", options=OPTS, protocol="dense", asymmetric=DAMP), CALIB, model, None)
    with pytest.raises(ValueError, match="got method 'dense'"):
        run_config(PruneConfig("dense", asymmetric=DAMP), CALIB, model, None)


@pytest.fixture(scope="module")
def asym_run(tmp_path_factory):
    """A tiny Llama pruned with asymmetric calibration: (out, the statistics each linear was pruned from)."""
    model, _ = tiny_model("llama")
    out = tmp_path_factory.mktemp("asym") / "run"
    seen, real = [], prune.asymmetric_weight
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prune, "asymmetric_weight", lambda W, stats, damp: seen.append(stats) or real(W, stats, damp))
        prune.prune_model(model, tiny_tokenizer(), CALIB, PruneConfig("armor", options=OPTS, asymmetric=DAMP), out)
    return out, seen


def test_the_first_sublayer_sees_one_stream_and_later_ones_two(asym_run):
    """Block 0's q/k/v read the embeddings on both streams, so their cross term is H; every later sublayer
    (o after the pruned q/k/v, the MLP after the pruned attention, block 1 after block 0) sees the streams
    part, and the checkpoint records the damp."""
    out, seen = asym_run
    assert len(seen) == 14  # 2 blocks x 7 linears
    for s in seen[:3]:
        assert torch.allclose(s.cross, s.xx, rtol=1e-10, atol=1e-8)
    assert all(not torch.allclose(s.cross, s.xx, rtol=1e-3) for s in seen[3:])
    assert json.loads((out / "armor_run.json").read_text())["run"]["asymmetric"] == {"damp": DAMP}


@pytest.mark.parametrize("arch, expected", [
    ("llama", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
               ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]),
    ("phi3", [["self_attn.qkv_proj"], ["self_attn.o_proj"], ["mlp.gate_up_proj"], ["mlp.down_proj"]]),
])
def test_sublayers_are_the_linears_that_share_an_input_in_call_order(arch, expected):
    model, _ = tiny_model(arch)
    with torch.no_grad():
        assert sublayers(model.model.layers[0], lambda: model(CALIB[:1])) == expected


def test_resume_after_an_interrupt_gives_the_uninterrupted_checkpoint(asym_run, tmp_path):
    """The dense stream is carried past a resumed block exactly as past a pruned one."""
    out, _ = asym_run
    run = tmp_path / "run"
    model, _ = tiny_model("llama")
    assert prune_interrupted(model, tiny_tokenizer(), CALIB, PruneConfig("armor", options=OPTS, asymmetric=DAMP),
                             run) == [0]
    model, _ = tiny_model("llama")
    prune.prune_model(model, tiny_tokenizer(), CALIB, PruneConfig("armor", options=OPTS, asymmetric=DAMP), run)
    files = sorted(out.glob("model-block-*.safetensors"))
    assert len(files) == 2  # the tiny model's blocks, each compared below
    for f in files:
        a, b = load_file(f), load_file(run / f.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
