"""Calibration and evaluation text, offline (docs/DESIGN.md §7).

The default corpus is Jane Austen's six novels as shipped in Debian's ``r-cran-janeaustenr`` package:
on first use the .deb is fetched with ``apt-get download`` (not installed: that would pull in R),
the novels are read from the package's R lazy-load database, and one UTF-8 .txt per novel is cached
under ``$ARMOR_CACHE`` (default ``~/.cache/armor_kernels``). Users may name their own .txt file or
directory of .txt files instead.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import rdata
import torch

from ..atomic import write_text
from ..errors import InputError, MissingFile

DEB_PACKAGE = "r-cran-janeaustenr"
# Variable name in the package's lazy-load database -> title, in publication order.
AUSTEN_NOVELS = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
EVAL_NOVEL = "Pride and Prejudice"
# Default splits: 32 x 512 calibration tokens (enough for the Hessian-style statistics of a 576-wide model
# while keeping one layer-by-layer pass cheap on 2 CPU cores); 20k evaluation tokens, 39 windows of 512
# (docs/DESIGN.md §7), about a minute for a dense 135M model on 2 CPU cores.
N_SAMPLES, SEQ_LEN, EVAL_TOKENS = 32, 512, 20_000
_DB_PATH = "usr/lib/R/site-library/janeaustenr/data/Rdata"
log = logging.getLogger("armor_kernels")


def cache_dir() -> Path:
    """Where extracted text is cached: ``$ARMOR_CACHE``, else ``~/.cache/armor_kernels``."""
    return Path(os.environ.get("ARMOR_CACHE") or Path.home() / ".cache" / "armor_kernels")


def austen_novels(cache: str | os.PathLike | None = None) -> dict[str, str]:
    """Title -> text of the six novels, extracting them into ``cache/janeaustenr`` on first use."""
    folder = Path(cache or cache_dir()) / "janeaustenr"
    files = {title: folder / f"{key}.txt" for key, title in AUSTEN_NOVELS.items()}
    if not all(f.is_file() for f in files.values()):
        folder.mkdir(parents=True, exist_ok=True)
        novels = _read_lazyload_db(*_fetch_database())
        for key, title in AUSTEN_NOVELS.items():
            write_text(files[title], paragraphs(novels[key]))
    return {title: f.read_text(encoding="utf-8") for title, f in files.items()}


def paragraphs(lines: Iterable[str]) -> str:
    """The fixed wrapping rule: lines of a paragraph joined by one space, paragraphs by a blank line.

    Runs of blank lines count as one separator; leading and trailing spaces of each line are dropped.
    """
    stripped = (line.strip() for line in lines)
    paras = (" ".join(group) for nonblank, group in itertools.groupby(stripped, key=bool) if nonblank)
    return "\n\n".join(paras) + "\n"


def _fetch_database() -> tuple[bytes, bytes]:
    """The (.rdx, .rdb) bytes of the novels' lazy-load database, from a freshly downloaded .deb."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            done = subprocess.run(["apt-get", "download", DEB_PACKAGE], cwd=tmp,
                                  capture_output=True, text=True)
            error = done.stderr.strip() if done.returncode else ""
        except FileNotFoundError:
            error = "apt-get not found"
        debs = sorted(Path(tmp).glob(f"{DEB_PACKAGE}_*.deb"))
        if error or not debs:
            raise RuntimeError(
                f"could not download Debian's {DEB_PACKAGE} (the default Jane Austen text): {error}\n"
                "Run `apt-get update` first, or pass your own text file or directory of .txt files.")
        if shutil.which("dpkg-deb"):
            root = Path(tmp) / "root"
            subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True)
            return (root / f"{_DB_PATH}.rdx").read_bytes(), (root / f"{_DB_PATH}.rdb").read_bytes()
        return _members_without_dpkg(debs[0].read_bytes())


def _members_without_dpkg(deb: bytes) -> tuple[bytes, bytes]:
    """Read the database out of a .deb in pure Python: an ar archive whose data.tar.* holds the tree."""
    if not deb.startswith(b"!<arch>\n"):
        raise InputError("not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(deb):
        name, size = deb[pos:pos + 16].strip().decode(), int(deb[pos + 48:pos + 58])
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(deb[pos + 60:pos + 60 + size]), mode="r:*") as tar:
                return tuple(tar.extractfile(f"./{_DB_PATH}{ext}").read() for ext in (".rdx", ".rdb"))
        pos += 60 + size + size % 2  # ar members are padded to an even length
    raise InputError("no data.tar member in the Debian package")


def _read_lazyload_db(rdx: bytes, rdb: bytes) -> dict[str, list[str]]:
    """Variable name -> character vector from an R lazy-load database (``data/Rdata.rdx/.rdb``).

    The .rdx is a gzipped serialised R list whose ``variables`` map each name to (offset, length)
    in the .rdb; there each record is a 4-byte big-endian uncompressed size followed by a zlib
    stream of R's serialisation, which the ``rdata`` package parses.
    """
    index = rdata.conversion.convert(rdata.parser.parse_data(rdx, extension=".rds"))
    if list(index["compressed"]) != [True]:
        raise InputError(f"unsupported lazy-load compression {index['compressed']!r} (only zlib)")
    out = {}
    for name, (offset, length) in index["variables"].items():
        record = rdb[offset:offset + length]
        serialised = zlib.decompress(record[4:])
        if len(serialised) != struct.unpack(">I", record[:4])[0]:
            raise InputError(f"corrupt lazy-load record for {name!r}")
        vector = rdata.conversion.convert(rdata.parser.parse_data(serialised, extension=".rds"))
        out[str(name)] = [str(line) for line in vector]
    return out


def load_corpus(source: str | os.PathLike | None = None) -> dict[str, str]:
    """Name -> text. None: the Austen novels (by title); a .txt file; or a directory of .txt files
    (by file stem, sorted). User text is read as it is, with no re-wrapping."""
    if source is None:
        return austen_novels()
    path = Path(source)
    if not path.exists():
        raise MissingFile(f"text source {str(path)!r} does not exist")
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise InputError(f"text directory {str(path)!r} has no .txt files")
    corpus = {f.stem: f.read_text(encoding="utf-8") for f in files}
    for name, text in corpus.items():
        if not text.strip():
            raise InputError(f"text {name!r} in {str(path)!r} is empty")
    return corpus


def _one_document(path: str | os.PathLike) -> dict[str, str]:
    corpus = load_corpus(path)
    if len(corpus) != 1:
        raise InputError(f"eval_text: expected one .txt file, got {str(path)!r} with {len(corpus)} documents")
    return corpus


def python_reference() -> str:
    """A second text, of another domain: the Python Language Reference's topics as `help()` shows them
    (`pydoc_data.topics`, part of CPython's standard library, so present wherever Python is): technical
    prose with code, far from the novels the calibration comes from. Topics in sorted order."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k].strip() for k in sorted(topics)) + "\n"


class TokenSplits(NamedTuple):
    calibration: torch.Tensor  # int64 [n_samples, seq_len]
    evaluation: torch.Tensor  # int64 [eval_tokens]
    validation: torch.Tensor | None = None  # int64 [n_validation, seq_len], when asked for


def token_splits(tokenizer, source: str | os.PathLike | Mapping[str, str] | None = None, *,
                 n_samples: int = N_SAMPLES, seq_len: int = SEQ_LEN, eval_tokens: int = EVAL_TOKENS, seed: int = 0,
                 eval_doc: str | None = None, n_validation: int = 0,
                 eval_text: str | os.PathLike | None = None) -> TokenSplits:
    """Calibration and evaluation tokens from disjoint parts of a corpus.

    ``source`` is what :func:`load_corpus` takes, or an already loaded name -> text mapping.
    With several documents, evaluation is the first ``eval_tokens`` tokens of ``eval_doc``
    (default: *Pride and Prejudice* if present, else the last document) and calibration comes from
    all the others. A single document is split instead: evaluation is its last ``eval_tokens`` tokens,
    calibration comes from the part before them.

    Calibration is ``n_samples`` distinct non-overlapping windows of ``seq_len`` tokens, drawn at random
    (``seed``) from the calibration documents' windows, none crossing a document boundary. Validation
    (``n_validation`` > 0) is the next ``n_validation`` windows of the same draw: the calibration's domain,
    never calibrated on, for choosing between configurations without looking at the evaluation text (the
    calibration windows are the same with or without it).

    ``eval_text`` (one .txt file) is the evaluation text instead: its first ``eval_tokens`` tokens (0: all
    of it, as the WikiText-2 protocol scores the whole test file), calibration coming from every document
    of ``source``. The evaluated document is logged.

    Defaults: N_SAMPLES, SEQ_LEN and EVAL_TOKENS above.
    """
    for arg, value in (("n_samples", n_samples), ("seq_len", seq_len), ("eval_tokens", eval_tokens)):
        if value < (0 if arg == "eval_tokens" and eval_text is not None else 1):
            raise InputError(f"{arg} must be positive, got {value}")
    if 0 < eval_tokens < seq_len:
        raise InputError(f"eval_tokens={eval_tokens} is less than one window of seq_len={seq_len}")
    corpus = source if isinstance(source, Mapping) else load_corpus(source)
    tokenize = lambda text: torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    ids = {name: tokenize(text) for name, text in corpus.items()}
    if not ids or all(len(t) == 0 for t in ids.values()):
        raise InputError("the text is empty")

    if eval_text is not None:
        if eval_doc is not None:
            raise InputError("eval_doc: names a document of the calibration text; got it with eval_text")
        (name, text), = _one_document(eval_text).items()
        tokens = tokenize(text)
        evaluation, pool = (tokens if eval_tokens == 0 else tokens[:eval_tokens]), list(ids.values())
        if len(evaluation) < max(eval_tokens, seq_len):
            raise InputError(f"evaluation text {str(eval_text)!r} has {len(tokens)} tokens, fewer than "
                             f"{max(eval_tokens, seq_len)}")
    elif len(ids) == 1:
        (name, tokens), = ids.items()
        need = eval_tokens + n_samples * seq_len
        if len(tokens) < need:
            raise InputError(
                f"text {name!r} has {len(tokens)} tokens, too short to split into eval_tokens="
                f"{eval_tokens} plus n_samples={n_samples} x seq_len={seq_len} = {need} tokens")
        evaluation, pool = tokens[-eval_tokens:], [tokens[:-eval_tokens]]
    else:
        name = eval_doc or (EVAL_NOVEL if EVAL_NOVEL in ids else list(ids)[-1])
        if name not in ids:
            raise InputError(f"eval_doc={name!r} is not among the documents {list(ids)}")
        if len(ids[name]) < eval_tokens:
            raise InputError(f"evaluation text {name!r} has {len(ids[name])} tokens, "
                             f"fewer than eval_tokens={eval_tokens}")
        evaluation = ids[name][:eval_tokens]
        pool = [t for n, t in ids.items() if n != name]
    log.info("evaluation: %d tokens of %r; calibration from %d other document(s)", len(evaluation), name, len(pool))

    calibration, validation = calibration_windows(pool, n_samples=n_samples, seq_len=seq_len, seed=seed,
                                                  n_validation=n_validation)
    return TokenSplits(calibration, evaluation, validation)


def calibration_windows(documents: list[torch.Tensor], *, n_samples: int = N_SAMPLES, seq_len: int = SEQ_LEN,
                        seed: int = 0, n_validation: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(calibration, validation): `n_samples` distinct non-overlapping windows of `seq_len` tokens drawn at
    random (`seed`) from the documents' (1-D token tensors) windows, none crossing a document boundary, and
    the next `n_validation` windows of the same draw (None when 0)."""
    windows = torch.cat([t[:len(t) // seq_len * seq_len].view(-1, seq_len) for t in documents])
    if len(windows) < n_samples + n_validation:
        asked = f"n_samples={n_samples}" + (f" + n_validation={n_validation}" if n_validation else "")
        raise InputError(f"calibration text holds {len(windows)} windows of seq_len={seq_len} tokens, "
                         f"fewer than {asked}")
    pick = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    validation = windows[pick[n_samples:n_samples + n_validation]] if n_validation else None
    return windows[pick[:n_samples]], validation
