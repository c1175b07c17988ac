"""Streamed perplexity (one block resident, read from the written shards or the source model) against the
in-memory perplexity of the model from_pretrained builds, on tiny models built from the bundled model's
real config."""
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from armor_kernels.integrations.hf import load_pruned_model  # noqa: E402
from armor_kernels.nn import PRUNED_LINEARS, prepare  # noqa: E402
from armor_kernels.optim import ArmorOptions  # noqa: E402
from armor_kernels.pipeline.config import PruneConfig  # noqa: E402
from armor_kernels.pipeline.evaluate import perplexity, streamed_perplexity  # noqa: E402
from armor_kernels.pipeline.model import decoder_layers, load_model  # noqa: E402
from armor_kernels.pipeline.prune import prune_model  # noqa: E402
from armor_kernels.pipeline.source import CheckpointSource, ModelSource  # noqa: E402


@pytest.fixture(scope="module")
def tiny(bundled, tiny_llama, tmp_path_factory):
    """(tokenizer, calibration tokens, evaluation tokens, the tiny model's directory, factory of fresh ones)."""
    model, tok = bundled
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, model.config.vocab_size, (4, 32), generator=g)
    tokens = torch.randint(0, model.config.vocab_size, (7 * 32 + 5,), generator=g)  # 7 windows, a partial one
    d = tmp_path_factory.mktemp("tiny")
    tiny_llama(model.config).save_pretrained(d)
    tok.save_pretrained(d)
    return tok, calib, tokens, d, lambda: tiny_llama(model.config)


@pytest.mark.parametrize("method", ["magnitude", "armor"])
def test_streamed_equals_in_memory_perplexity_of_the_checkpoint(tiny, tmp_path, method):
    tok, calib, tokens, _, fresh = tiny
    opts = ArmorOptions(block_size=16, iters=2) if method == "armor" else None
    prune_model(fresh(), tok, calib, PruneConfig(method, options=opts), tmp_path)
    loaded, _ = load_pruned_model(tmp_path)
    prepare(loaded, keep_dense=True)  # what the streamed evaluator runs (source.py)
    for batch_size in (1, 3):  # a last batch smaller than the others
        expected = perplexity(loaded, tokens, seq_len=32, batch_size=batch_size)
        got = streamed_perplexity(CheckpointSource(tmp_path), tokens, seq_len=32, batch_size=batch_size)
        assert got == expected, (batch_size, got, expected)


def test_streamed_equals_in_memory_perplexity_of_the_dense_model(tiny):
    _, _, tokens, d, _ = tiny
    model, _ = load_model(d)
    assert streamed_perplexity(ModelSource(d), tokens, seq_len=32, batch_size=3) == \
        perplexity(model, tokens, seq_len=32, batch_size=3)


def test_one_block_is_resident_at_a_time(tiny, tmp_path, monkeypatch):
    tok, calib, tokens, _, fresh = tiny
    prune_model(fresh(), tok, calib, "magnitude", tmp_path)
    src, seen = CheckpointSource(tmp_path), []
    real_load = src.load_block

    def load(model, i, device, dtype):
        block = real_load(model, i, device, dtype)
        resident = [j for j, b in enumerate(decoder_layers(model))  # blocks holding linears' weights
                    if any(t.device.type != "meta" for m in b.modules() if isinstance(m, (nn.Linear, *PRUNED_LINEARS))
                           for t in m.state_dict().values())]
        seen.append(resident)
        return block

    monkeypatch.setattr(src, "load_block", load)
    streamed_perplexity(src, tokens, seq_len=32)
    assert seen == [[0], [1]]


def test_a_damaged_block_stops_the_streamed_evaluation(tiny, tmp_path):
    tok, calib, tokens, _, fresh = tiny
    prune_model(fresh(), tok, calib, "magnitude", tmp_path)
    path = tmp_path / "model-block-00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 1  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model-block-00001\.safetensors' is damaged: tensor 'model\.layers\.1\."):
        streamed_perplexity(CheckpointSource(tmp_path), tokens, seq_len=32)


def test_the_logits_never_exceed_their_budget(tiny, monkeypatch):
    """The head and the loss run on chunks of positions: with room for 15 positions' logits, no head call
    makes more, and the perplexity is the one the whole logits give (the same terms, summed by
    chunk in float64; it agrees with torch's own mean loss of the unchunked logits)."""
    from armor_kernels.pipeline import evaluate
    _, _, tokens, d, _ = tiny
    model, _ = load_model(d)
    vocab = model.get_output_embeddings().out_features
    windows = tokens[:7 * 32].view(7, 32)
    with torch.no_grad():
        logits = model(windows, use_cache=False).logits
    whole = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten()).item()
    made = []
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: made.append(o[..., 0].numel()))
    monkeypatch.setattr(evaluate, "LOGITS_BYTES", 3 * 5 * vocab * 4)
    got = perplexity(model, tokens, seq_len=32, batch_size=3)
    assert max(made) == 15 and len(made) == 7 + 7 + 3  # 31 positions: chunks of 5 for 3 windows, of 15 for 1
    assert abs(got - torch.tensor(whole).exp().item()) < 1e-5 * got
    assert streamed_perplexity(ModelSource(d), tokens, seq_len=32, batch_size=3) == got
