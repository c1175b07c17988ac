"""lm-eval (0.4.13) on a model directory, offline: a local loglikelihood_rolling task of `eval`'s windows.

lm-eval puts a prefix token before each document and scores all its tokens; `eval` scores a window's
tokens after the first, with no prefix. `rolling_loglikelihoods` computes both, the prefix token its
only switch: with it, it must match what lm-eval reports, per document and in total; without it, it
must match `eval`'s perplexity. Together: lm-eval and `eval` agree on the same windows up to exactly
that prefix. `DIRECTORIES` lists how a directory is made (dense here; ARMOR-pruned ones join it).
"""
import copy
import json
import os

import pytest
import torch
import yaml

lm_eval = pytest.importorskip("lm_eval", reason="needs lm-eval (pip install '.[eval]')")
pytest.importorskip("lm_eval.models.huggingface", reason="needs lm-eval[hf]")

from armor_kernels.integrations import lm_eval as ak_lm_eval  # noqa: E402
from armor_kernels.pipeline.config import PruneConfig  # noqa: E402
from armor_kernels.pipeline.evaluate import perplexity  # noqa: E402

SEQ_LEN, N_WINDOWS = 512, 3  # eval's window length; 3 windows keep a run within seconds on 2 cores
TASK = "armor_austen_test"
TOL = 1e-5  # lm-eval sums a document's 512 float32 log-probabilities in float32: ~1e-7 relative


def dense_directory(model, tokenizer, path):
    """A plain Hugging Face directory of the model; returns the model the directory must evaluate as."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def armor_directory(model, tokenizer, path):
    """An ARMOR-pruned checkpoint (format v2) of a copy of the model; returns the pruned model in memory."""
    from armor_kernels.optim import ArmorOptions
    from armor_kernels.pipeline.prune import prune_model
    model = copy.deepcopy(model)
    calib = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    prune_model(model, tokenizer, calib, PruneConfig("armor", options=ArmorOptions(block_size=16, iters=1)), path)
    return model


DIRECTORIES = {"dense": dense_directory, "armor": armor_directory}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")  # keep the json loader's cache out of ~/.cache
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))


@pytest.fixture(scope="module")
def windows(bundled, austen):
    """eval's first windows of Pride and Prejudice (the other novel only stands in for calibration)."""
    _, tokenizer = bundled
    text = {t: austen[t] for t in ("Pride and Prejudice", "Persuasion")}
    return ak_lm_eval.evaluation_windows(tokenizer, text, seq_len=SEQ_LEN, eval_tokens=N_WINDOWS * SEQ_LEN + 100)


@pytest.fixture(scope="module")
def documents(bundled, windows):
    return ak_lm_eval.window_documents(bundled[1], windows)


@pytest.fixture(scope="module")
def tiny(bundled, tiny_llama):
    return tiny_llama(bundled[0].config)


def _check_against_ours(lm_lls, task_results, model, tokenizer, documents, windows):
    """lm-eval's per-document log-likelihoods and bits per byte against ours, and ours against eval."""
    ours = ak_lm_eval.rolling_loglikelihoods(model, tokenizer, documents)
    assert lm_lls == pytest.approx(ours, rel=TOL)
    n_tokens = windows.numel()  # lm-eval predicts every token of a window: the first after the prefix
    lm_ppl = ak_lm_eval.token_perplexity(ak_lm_eval.loglikelihood_from_results(task_results, documents), n_tokens)
    assert lm_ppl == pytest.approx(ak_lm_eval.token_perplexity(sum(ours), n_tokens), rel=TOL)

    # Without the prefix the same computation is eval's (which predicts seq_len - 1 tokens a window)...
    no_prefix = ak_lm_eval.rolling_loglikelihoods(model, tokenizer, documents, prefix_token_id=None)
    eval_ppl = perplexity(model, windows.flatten(), seq_len=SEQ_LEN)
    eval_style = ak_lm_eval.token_perplexity(sum(no_prefix), len(windows) * (SEQ_LEN - 1))
    assert eval_style == pytest.approx(eval_ppl, rel=1e-6)
    # ... and the tolerance above tells the two apart: the prefix changes every document's number.
    assert all(abs(a - b) > 10 * TOL * abs(b) for a, b in zip(lm_lls, no_prefix))
    return ours


def test_documents_are_evals_windows(bundled, windows, documents):
    _, tokenizer = bundled
    assert windows.shape == (N_WINDOWS, SEQ_LEN)  # the 100 trailing tokens are left out, as eval does
    assert [ak_lm_eval.hflm_encode(tokenizer, d) for d in documents] == windows.tolist()
    assert documents[0].startswith("PRIDE AND PREJUDICE")
    assert ak_lm_eval.hflm_prefix_token_id(tokenizer) == tokenizer.bos_token_id  # SmolLM2 has one: <|im_start|>


@pytest.mark.parametrize("make_directory", DIRECTORIES.values(), ids=DIRECTORIES.keys())
def test_cli_agrees_with_eval(make_directory, bundled, tiny, windows, documents, tmp_path, capsys):
    _, tokenizer = bundled
    model = make_directory(tiny, tokenizer, tmp_path / "model")
    task = ak_lm_eval.write_rolling_task(tmp_path / "tasks", TASK, documents)
    out = tmp_path / "out"
    rc = ak_lm_eval.main(["--model", "hf", "--model_args", f"pretrained={tmp_path / 'model'},dtype=float32",
                          "--tasks", TASK, "--include_path", str(task.parent), "--device", "cpu",
                          "--batch_size", "4", "--output_path", str(out), "--log_samples"])
    assert rc == 0
    assert "bits_per_byte" in capsys.readouterr().out  # lm-eval's own table
    (results,) = out.glob("*/results_*.json")
    (samples,) = out.glob(f"*/samples_{TASK}_*.jsonl")
    lm_lls = ak_lm_eval.samples_loglikelihoods([json.loads(line) for line in samples.read_text().splitlines()])
    task_results = json.loads(results.read_text())["results"][TASK]
    ours = _check_against_ours(lm_lls, task_results, model, tokenizer, documents, windows)

    # Another model gives numbers the tolerance does not confuse with these.
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.norm.weight.mul_(0.5)  # the final norm: there in dense and pruned models alike
    theirs = ak_lm_eval.rolling_loglikelihoods(other, tokenizer, documents)
    assert all(abs(a - b) > 10 * TOL * abs(b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("make_directory", DIRECTORIES.values(), ids=DIRECTORIES.keys())
def test_python_route_agrees_with_eval(make_directory, bundled, tiny, windows, documents, tmp_path):
    """HFLM(pretrained=model, tokenizer=tokenizer) on the model loaded from the directory."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from armor_kernels.integrations import hf

    hf.register()  # what `main` does for the CLI route: from_pretrained then opens ARMOR directories
    make_directory(tiny, bundled[1], tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    task = ak_lm_eval.write_rolling_task(tmp_path / "tasks", TASK, documents)
    res = lm_eval.simple_evaluate(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4), tasks=[TASK],
                                  task_manager=TaskManager(include_path=str(task.parent), include_defaults=False),
                                  log_samples=True)
    lm_lls = ak_lm_eval.samples_loglikelihoods(res["samples"][TASK])
    _check_against_ours(lm_lls, res["results"][TASK], model, tokenizer, documents, windows)


def test_write_rolling_task(tmp_path):
    docs = ["It is a truth universally acknowledged,\n", '[1, 2] "quoted" é\n\n', "ends without newline"]
    task = ak_lm_eval.write_rolling_task(tmp_path / "t", "my_task", docs)
    assert task == (tmp_path / "t" / "my_task.yaml").resolve()
    data = tmp_path / "t" / "my_task.jsonl"
    assert [json.loads(line) for line in data.read_text().splitlines()] == [{"text": d} for d in docs]
    config = yaml.safe_load(task.read_text())
    assert config["output_type"] == "loglikelihood_rolling"
    assert config["dataset_kwargs"] == {"data_files": {"test": str(data.resolve())}}
    assert [m["metric"] for m in config["metric_list"]] == ["word_perplexity", "byte_perplexity", "bits_per_byte"]
    assert sorted(p.name for p in task.parent.iterdir()) == ["my_task.jsonl", "my_task.yaml"]  # no temp files left

    # lm-eval reads the documents back as they are: doc_to_target names the column, no template renders it.
    from lm_eval.tasks import TaskManager
    manager = TaskManager(include_path=str(task.parent), include_defaults=False)
    loaded = manager.load(["my_task"])["tasks"]["my_task"]
    assert [loaded.doc_to_target(d) for d in loaded.test_docs()] == docs

    with pytest.raises(ValueError, match="task name"):
        ak_lm_eval.write_rolling_task(tmp_path, "../escape", docs)
    with pytest.raises(ValueError, match="document 1"):
        ak_lm_eval.write_rolling_task(tmp_path, "empty", ["a", ""])


def test_window_that_does_not_round_trip(bundled):
    _, tokenizer = bundled
    emoji = tokenizer.encode("🙂", add_special_tokens=False)
    assert len(emoji) > 1  # byte-level pieces
    ids = tokenizer.encode("Hi", add_special_tokens=False) + emoji[:1]  # a window ending inside its bytes
    with pytest.raises(ValueError, match="window 0 does not survive decode/encode"):
        ak_lm_eval.window_documents(tokenizer, torch.tensor([ids]))
    assert ak_lm_eval.window_documents(tokenizer, torch.tensor([ids]), strict=False)[0].endswith("\ufffd")


def test_main_passes_lm_eval_exit_status_and_sets_offline(monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    assert ak_lm_eval.main(["run", "--no_such_option"]) == 2
    assert "unrecognized arguments: --no_such_option" in capsys.readouterr().err
    assert (os.environ["HF_HUB_OFFLINE"], os.environ["HF_DATASETS_OFFLINE"]) == ("1", "1")
    huggingface_hub = pytest.importorskip("huggingface_hub")
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True  # imported before main: its flag follows too
