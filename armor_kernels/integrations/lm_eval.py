"""lm-evaluation-harness on ARMOR checkpoints, offline (``pip install '.[eval]'``: lm-eval[hf] 0.4.13).

The task: ``python -m armor_kernels.integrations.lm_eval runs/lm_eval_task --model runs/demo/quality`` writes it
(:func:`write_evaluation_task`; the model only lends its tokenizer). Command line
(``python -m armor_kernels lm-eval …`` calls :func:`main`): registers the "armor" transformers
quantizer, then runs lm-eval's own CLI with the arguments as given::

    python -m armor_kernels lm-eval --model hf --model_args pretrained=runs/demo/quality \\
        --tasks armor_austen --include_path runs/lm_eval_task --device cpu

Python, on a model already in memory::

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from armor_kernels.integrations import hf
    hf.register()
    model = AutoModelForCausalLM.from_pretrained("runs/demo/quality")
    tok = AutoTokenizer.from_pretrained("runs/demo/quality")
    results = lm_eval.simple_evaluate(HFLM(pretrained=model, tokenizer=tok), tasks=["armor_austen"],
                                      task_manager=TaskManager(include_path="runs/lm_eval_task"))

The task ``armor_austen`` (:func:`write_evaluation_task`) is a local JSON-lines file of
``loglikelihood_rolling`` documents, one per window that ``armor_kernels eval`` scores: the 39
non-overlapping 512-token windows of the first 20 000 tokens of *Pride and Prejudice*, each decoded
back to text (every one re-encodes to the same token ids, which :func:`window_documents` checks).

What lm-eval computes on such a document differs from ``eval`` in one way only. HFLM puts a prefix
token in front of each document (the tokenizer's BOS, else EOS; for SmolLM2 BOS is ``<|im_start|>``)
and sums the log-probabilities of *all* its tokens, the first one included, each conditioned on the
prefix and the tokens before it; ``eval`` feeds the window as it is and sums the log-probabilities of
the tokens after the first. :func:`rolling_loglikelihoods` computes both with the same code, the
prefix token being its only switch: with the prefix it reproduces lm-eval's per-document numbers
(lm-eval sums in float32: ~1e-7 relative), without it ``eval``'s perplexity. lm-eval reports word and byte
perplexities and bits per byte; :func:`loglikelihood_from_results` recovers the total
log-likelihood from bits per byte, and :func:`token_perplexity` turns it into a per-token perplexity.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from ..atomic import write_text
from ..errors import InputError
from ..pipeline.data import EVAL_TOKENS, SEQ_LEN

TASK_NAME = "armor_austen"
_OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m armor_kernels lm-eval <lm_eval arguments…>``: lm-eval's own CLI, with the "armor"
    quantizer registered (so ``--model hf --model_args pretrained=CKPT`` opens an ARMOR directory)
    and the Hugging Face hub and datasets offline unless the environment says otherwise.
    Returns the exit status lm-eval's CLI ends with (0 when it returns)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _offline_defaults()
    # Imported after the offline defaults: huggingface_hub and datasets read them on import.
    from . import hf

    hf.register()
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]  # lm-eval's HarnessCLI parses sys.argv (and inserts `run` if needed)
    try:
        cli_evaluate()
    except SystemExit as stop:  # argparse errors (2), `--help` (0)
        code = stop.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
    return 0


def _offline_defaults() -> None:
    """HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 unless set. huggingface_hub and datasets read these
    once, on import: when they were imported already (the CLI imports transformers first), their
    flags are set too, so the environment is what they follow."""
    for var in _OFFLINE:
        os.environ.setdefault(var, "1")
    hub_offline = os.environ["HF_HUB_OFFLINE"].upper() in ("1", "ON", "YES", "TRUE")
    datasets_offline = os.environ["HF_DATASETS_OFFLINE"].upper() in ("1", "ON", "YES", "TRUE")
    if "huggingface_hub.constants" in sys.modules:
        sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = hub_offline
    if "datasets.config" in sys.modules:
        config = sys.modules["datasets.config"]
        config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = datasets_offline


# --- the task --------------------------------------------------------------------------------------

def write_rolling_task(folder: str | os.PathLike, name: str, documents: Sequence[str]) -> Path:
    """An offline lm-eval task ``name`` in ``folder`` (pass it as ``--include_path``): the documents as
    JSON lines (``name.jsonl``, one ``{"text": …}`` each) and ``name.yaml``, a
    ``loglikelihood_rolling`` task over them with wikitext's metrics (word_perplexity,
    byte_perplexity, bits_per_byte). Returns the YAML's path; both files are written atomically."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise InputError(f"task name {name!r}: use letters, digits, '_', '.' and '-'")
    if not documents:
        raise InputError("no documents for the task")
    for i, doc in enumerate(documents):
        if not isinstance(doc, str) or not doc:
            raise InputError(f"document {i} is {doc!r}: each document must be a non-empty string")
    folder = Path(folder).resolve()
    data = folder / f"{name}.jsonl"
    write_text(data, "".join(json.dumps({"text": doc}) + "\n" for doc in documents))
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},  # absolute: datasets resolves from the cwd
        "output_type": "loglikelihood_rolling",
        "test_split": "test",
        "doc_to_text": "",
        # The column itself, not the template "{{text}}": lm-eval passes a feature's value through as it
        # is, while a rendered template that looks like a list ("[...]") would be literal_eval'd.
        "doc_to_target": "text",
        "metric_list": [{"metric": metric, "aggregation": aggregation, "higher_is_better": False}
                        for metric, aggregation in (("word_perplexity", "weighted_perplexity"),
                                                    ("byte_perplexity", "weighted_perplexity"),
                                                    ("bits_per_byte", "bits_per_byte"))],
        "metadata": {"version": 1.0},
    }
    task = folder / f"{name}.yaml"
    write_text(task, yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return task


def evaluation_windows(tokenizer, text: str | os.PathLike | Mapping[str, str] | None = None, *,
                       seq_len: int = SEQ_LEN, eval_tokens: int = EVAL_TOKENS) -> torch.Tensor:
    """The windows ``armor_kernels eval`` scores, ``[n_windows, seq_len]`` token ids: the evaluation
    tokens of :func:`~armor_kernels.pipeline.data.token_splits` (as ``eval`` asks for them), cut into
    non-overlapping windows with the trailing part shorter than one left out."""
    from ..pipeline.data import token_splits

    tokens = token_splits(tokenizer, text, n_samples=1, seq_len=seq_len, eval_tokens=eval_tokens).evaluation
    n_windows = len(tokens) // seq_len
    return tokens[:n_windows * seq_len].view(n_windows, seq_len)


def window_documents(tokenizer, windows: torch.Tensor, *, strict: bool = True) -> list[str]:
    """Each window's token ids decoded to text, one document per window.

    lm-eval tokenizes documents again (as :func:`hflm_encode` does); with ``strict`` a window whose
    text does not re-encode to its own ids (a cut through a multi-byte character, a merge across the
    cut) raises ValueError, so the documents hold exactly ``eval``'s tokens."""
    docs = []
    for i, window in enumerate(windows.tolist()):
        doc = tokenizer.decode(window, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if strict and hflm_encode(tokenizer, doc) != window:
            raise InputError(f"window {i} does not survive decode/encode: its text re-encodes to "
                             f"{len(hflm_encode(tokenizer, doc))} other tokens, not its {len(window)}")
        docs.append(doc)
    return docs


def write_evaluation_task(folder: str | os.PathLike, tokenizer,
                          text: str | os.PathLike | Mapping[str, str] | None = None, *,
                          name: str = TASK_NAME, seq_len: int = SEQ_LEN, eval_tokens: int = EVAL_TOKENS) -> Path:
    """The task of ``eval``'s windows (default: Pride and Prejudice, 39 x 512 tokens) in ``folder``."""
    return write_rolling_task(folder, name, window_documents(
        tokenizer, evaluation_windows(tokenizer, text, seq_len=seq_len, eval_tokens=eval_tokens)))


def load_tokenizer(model: str | os.PathLike | None = None):
    """The tokenizer of a model as :func:`~armor_kernels.pipeline.model.load_model` finds it (None: the
    bundled SmolLM2 GGUF; a .gguf file; a Hugging Face or ARMOR checkpoint directory), without the model."""
    from transformers import AutoTokenizer

    from ..pipeline.model import resolve_model

    path = resolve_model(model)
    if path.is_file():
        if path.suffix != ".gguf":
            raise InputError(f"model file {str(path)!r} is not a .gguf file")
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(path)


def write_task_main(argv: Sequence[str] | None = None) -> int:
    """``python -m armor_kernels.integrations.lm_eval DIR [--model M] [--text T] …``: write the task of ``eval``'s
    windows into DIR (then ``lm-eval … --tasks armor_austen --include_path DIR``)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m armor_kernels.integrations.lm_eval",
                                 description=write_task_main.__doc__)
    ap.add_argument("folder", help="where the task goes (lm-eval's --include_path)")
    ap.add_argument("--model", default=None, help="model whose tokenizer cuts the windows; default: bundled")
    ap.add_argument("--text", default=None, help=".txt file or directory of .txt; default: Jane Austen's novels")
    ap.add_argument("--seq-len", type=int, default=SEQ_LEN, help=f"tokens per window (default {SEQ_LEN})")
    ap.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS, help=f"default {EVAL_TOKENS}")
    ap.add_argument("--name", default=TASK_NAME, help=f"task name (default {TASK_NAME})")
    args = ap.parse_args(argv)
    task = write_evaluation_task(args.folder, load_tokenizer(args.model), args.text, name=args.name,
                                 seq_len=args.seq_len, eval_tokens=args.eval_tokens)
    print(task)
    return 0


# --- scoring the same way here ---------------------------------------------------------------------

def hflm_prefix_token_id(tokenizer) -> int:
    """The token lm-eval's HFLM puts before a rolling document (unless given ``prefix_token_id``):
    BOS if the tokenizer has one (SmolLM2: ``<|im_start|>``, though it never adds it), else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def hflm_encode(tokenizer, text: str) -> list[int]:
    """How HFLM (``add_bos_token`` unset) tokenizes a document: the tokenizer's default special
    tokens, none when the text already starts with the prefix token."""
    prefix = tokenizer.decode(hflm_prefix_token_id(tokenizer))
    return tokenizer.encode(text, **({"add_special_tokens": False} if text.startswith(prefix) else {}))


_HFLM = object()


@torch.inference_mode()
def rolling_loglikelihoods(model, tokenizer, documents: Sequence[str], *, prefix_token_id=_HFLM) -> list[float]:
    """Total log-probability of each document's tokens (as :func:`hflm_encode` makes them), one
    forward pass per document, in float64 sums of the model's float32 log-softmax.

    ``prefix_token_id`` (default: :func:`hflm_prefix_token_id`) goes in front and every token is
    predicted: what lm-eval's ``loglikelihood_rolling`` returns for a document of at most the model's
    length. ``None``: no prefix; the first token only conditions the others, which is how
    ``armor_kernels eval`` scores a window (its perplexity is exp(-sum / (n_windows x (seq_len-1))))."""
    prefix = hflm_prefix_token_id(tokenizer) if prefix_token_id is _HFLM else prefix_token_id
    limit = getattr(model.config, "max_position_embeddings", None)
    device = next(model.parameters()).device
    out = []
    for i, doc in enumerate(documents):
        ids = torch.tensor(hflm_encode(tokenizer, doc), device=device)
        inputs = ids if prefix is None else torch.cat([ids.new_tensor([prefix]), ids])
        if limit is not None and len(inputs) - 1 > limit:
            raise InputError(f"document {i} has {len(ids)} tokens, more than the model's {limit}: lm-eval "
                             "would score it in several rolling windows, which this does not reproduce")
        targets = inputs[1:]
        logits = model(inputs[None, :-1], use_cache=False).logits[0].float()
        logp = F.log_softmax(logits, dim=-1).gather(-1, targets[:, None])
        out.append(logp.double().sum().item())
    return out


def loglikelihood_from_results(task_results: Mapping, documents: Sequence[str]) -> float:
    """Total log-likelihood of the documents from lm-eval's results for the task (``results[task]``
    of ``simple_evaluate``'s output or of the CLI's results JSON): bits_per_byte x ln 2 x their bytes."""
    bpb = task_results.get("bits_per_byte,none", task_results.get("bits_per_byte"))
    if bpb is None:
        raise KeyError(f"no bits_per_byte among the results {sorted(task_results)}")
    return -bpb * math.log(2) * sum(len(doc.encode("utf-8")) for doc in documents)


def token_perplexity(total_loglikelihood: float, n_tokens: int) -> float:
    """exp(-log-likelihood / tokens), the perplexity ``eval`` reports, of a total over ``n_tokens``."""
    return math.exp(-total_loglikelihood / n_tokens)


def samples_loglikelihoods(samples: Sequence[Mapping]) -> list[float]:
    """Per-document log-likelihoods from lm-eval's logged samples (``simple_evaluate(…,
    log_samples=True)["samples"][task]`` or the CLI's ``samples_<task>_*.jsonl`` with
    ``--log_samples``), in document order."""
    by_doc = {}
    for s in samples:
        resp = s["filtered_resps"]
        while isinstance(resp, (list, tuple)):
            resp = resp[0]
        by_doc[int(s["doc_id"])] = float(resp)
    return [by_doc[i] for i in sorted(by_doc)]


if __name__ == "__main__":
    sys.exit(write_task_main())
