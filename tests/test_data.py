"""The Austen loader, user text, and the calibration / evaluation split (all text is Austen's)."""

import re
import shutil
import subprocess

import pytest
import torch

from armor_kernels.pipeline.data import austen_novels, load_corpus, python_reference, token_splits


def contains_window(tokens, window):
    """Whether ``window`` occurs as a contiguous run in ``tokens``."""
    return bool((tokens.unfold(0, len(window), 1) == window).all(1).any())


def ids(tokenizer, text):
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_austen_novels_are_extracted(austen):
    assert list(austen) == ["Sense and Sensibility", "Pride and Prejudice", "Mansfield Park", "Emma",
                            "Northanger Abbey", "Persuasion"]
    pride = austen["Pride and Prejudice"]
    assert pride.startswith("PRIDE AND PREJUDICE\n\nBy Jane Austen\n\nChapter 1\n\n"
                            "It is a truth universally acknowledged, that a single man in possession "
                            "of a good fortune, must be in want of a wife.\n\n")
    assert "Emma Woodhouse, handsome, clever, and rich" in austen["Emma"][:300]
    assert "The family of Dashwood had long been settled in Sussex." in austen["Sense and Sensibility"]
    for title, text in austen.items():
        assert 400_000 < len(text) < 900_000, title
        assert not re.search(r"[^\n]\n[^\n]", text), f"a line break left inside a paragraph of {title}"


def test_extraction_without_dpkg_and_the_cache(austen, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert austen_novels(tmp_path) == austen

    def no_download(*args, **kwargs):
        raise AssertionError("the cached novels should be read without downloading")
    monkeypatch.setattr(subprocess, "run", no_download)
    monkeypatch.setenv("ARMOR_CACHE", str(tmp_path))
    assert load_corpus() == austen


def test_failed_download_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 100, "", "E: Unable to locate package r-cran-janeaustenr"))
    with pytest.raises(RuntimeError, match=r"apt-get update.*own text"):
        austen_novels(tmp_path)


def test_default_splits_calibrate_on_other_novels(austen, bundled):
    tokenizer = bundled[1]
    splits = token_splits(tokenizer, austen)
    assert splits.calibration.shape == (32, 512) and splits.calibration.dtype == torch.long
    assert torch.equal(splits.evaluation, ids(tokenizer, austen["Pride and Prejudice"])[:20_000])
    # Disjoint by construction; check it on shorter pieces, where a full search is cheap.
    corpus = {title: text[:20_000] for title, text in austen.items()}
    small = token_splits(tokenizer, corpus, n_samples=8, seq_len=64, eval_tokens=1000, seed=1)
    pride = ids(tokenizer, corpus["Pride and Prejudice"])
    others = [ids(tokenizer, text) for title, text in corpus.items() if title != "Pride and Prejudice"]
    for window in small.calibration:
        assert not contains_window(pride, window)
        assert any(contains_window(novel, window) for novel in others)
    again = token_splits(tokenizer, corpus, n_samples=8, seq_len=64, eval_tokens=1000, seed=1)
    assert torch.equal(again.calibration, small.calibration)
    assert len({tuple(w.tolist()) for w in small.calibration}) == 8


def test_validation_windows_are_the_calibration_domain_never_calibrated_on(austen, bundled):
    """The next windows of the calibration's draw: the calibration itself is unchanged by asking for them."""
    tokenizer = bundled[1]
    corpus = {title: text[:20_000] for title, text in austen.items()}
    plain = token_splits(tokenizer, corpus, n_samples=8, seq_len=64, eval_tokens=1000, seed=1)
    both = token_splits(tokenizer, corpus, n_samples=8, seq_len=64, eval_tokens=1000, seed=1, n_validation=5)
    assert plain.validation is None and both.validation.shape == (5, 64)
    assert torch.equal(both.calibration, plain.calibration) and torch.equal(both.evaluation, plain.evaluation)
    calibrated = {tuple(w.tolist()) for w in both.calibration}
    pride = ids(tokenizer, corpus["Pride and Prejudice"])
    others = [ids(tokenizer, text) for title, text in corpus.items() if title != "Pride and Prejudice"]
    for window in both.validation:
        assert tuple(window.tolist()) not in calibrated and not contains_window(pride, window)
        assert any(contains_window(novel, window) for novel in others)
    with pytest.raises(ValueError, match=r"fewer than n_samples=8 \+ n_validation=100000"):
        token_splits(tokenizer, corpus, n_samples=8, seq_len=64, eval_tokens=1000, n_validation=100_000)


def test_user_text_file_is_split_into_disjoint_parts(austen, bundled, tmp_path):
    tokenizer = bundled[1]
    path = tmp_path / "persuasion.txt"
    path.write_text(austen["Persuasion"][:20_000], encoding="utf-8")
    assert load_corpus(path) == {"persuasion": austen["Persuasion"][:20_000]}
    splits = token_splits(tokenizer, path, n_samples=6, seq_len=64, eval_tokens=500)
    tokens = ids(tokenizer, path.read_text(encoding="utf-8"))
    assert torch.equal(splits.evaluation, tokens[-500:])
    for window in splits.calibration:
        assert contains_window(tokens[:-500], window)


def test_user_directory(austen, tmp_path):
    for name in ("b", "a"):
        (tmp_path / f"{name}.txt").write_text(austen["Emma"][:1000], encoding="utf-8")
    (tmp_path / "notes.md").write_text(austen["Emma"][:10], encoding="utf-8")
    assert list(load_corpus(tmp_path)) == ["a", "b"]


def test_errors(austen, bundled, tmp_path):
    tokenizer = bundled[1]
    with pytest.raises(FileNotFoundError, match="no_such.txt"):
        load_corpus(tmp_path / "no_such.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt files"):
        load_corpus(tmp_path / "empty")
    (tmp_path / "empty" / "blank.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match="'blank'.* is empty"):
        load_corpus(tmp_path / "empty")
    with pytest.raises(ValueError, match="text is empty"):
        token_splits(tokenizer, {"a": "", "b": ""})

    short = {"emma": austen["Emma"][:5000]}  # about 1,200 tokens
    with pytest.raises(ValueError, match=r"'emma' has \d+ tokens.*eval_tokens=1000.*n_samples=4.*=512"):
        token_splits(tokenizer, short, n_samples=4, seq_len=512, eval_tokens=1000)
    emma, pride = austen["Emma"], austen["Pride and Prejudice"]
    with pytest.raises(ValueError, match=r"'Pride and Prejudice' has \d+ tokens.*eval_tokens=20000"):
        token_splits(tokenizer, {"Emma": emma, "Pride and Prejudice": pride[:5000]})
    with pytest.raises(ValueError, match=r"holds 2 windows of seq_len=512.*n_samples=32"):
        token_splits(tokenizer, {"Emma": emma[:5000], "Pride and Prejudice": pride})
    with pytest.raises(ValueError, match="eval_tokens=100 is less than one window of seq_len=512"):
        token_splits(tokenizer, short, eval_tokens=100)
    with pytest.raises(ValueError, match="eval_doc='Mansfield Park' is not among"):
        token_splits(tokenizer, {**short, "persuasion": austen["Persuasion"]}, eval_doc="Mansfield Park")


def test_python_reference_is_the_stdlib_topics_in_sorted_order():
    """The frontier's second text: every topic of pydoc_data, sorted, enough for 20 000 evaluation tokens."""
    from pydoc_data.topics import topics
    text = python_reference()
    assert text == python_reference()
    pos = 0
    for k in sorted(topics):  # each topic follows the one before it
        pos = text.index(topics[k].strip(), pos)
    assert len(text) > 200_000


def test_an_evaluation_text_is_scored_whole_and_calibration_uses_every_document(austen, bundled, tmp_path, caplog):
    """--eval-text: the WikiText-2 protocol's shape (a separate test file, all of it) from a local file."""
    tokenizer = bundled[1]
    corpus = {title: text[:20_000] for title, text in austen.items()}
    path = tmp_path / "test.txt"
    path.write_text(austen["Persuasion"][-8_000:], encoding="utf-8")
    with caplog.at_level("INFO", logger="armor_kernels"):
        splits = token_splits(tokenizer, corpus, n_samples=8, seq_len=64, eval_tokens=0, eval_text=path)
    assert torch.equal(splits.evaluation, ids(tokenizer, path.read_text(encoding="utf-8")))
    assert any(f"evaluation: {len(splits.evaluation)} tokens of 'test'" in m for m in caplog.messages)
    pride = ids(tokenizer, corpus["Pride and Prejudice"])
    assert any(contains_window(pride, w) for w in
               token_splits(tokenizer, corpus, n_samples=60, seq_len=64, eval_tokens=0, eval_text=path).calibration)
    first = token_splits(tokenizer, corpus, n_samples=8, seq_len=64, eval_tokens=100, eval_text=path)
    assert torch.equal(first.evaluation, splits.evaluation[:100])
    path.with_name("second.txt").write_text("more text")
    with pytest.raises(ValueError, match="eval_text: expected one .txt file"):
        token_splits(tokenizer, corpus, eval_text=tmp_path)
