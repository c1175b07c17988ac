"""Atomic file writes: a reader (or a resumed run) sees the old file or the complete new one, never
a partial one. Every file the package, its CLI and its benchmarks write goes through here."""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call `write(tmp)` on a temporary path in the same folder, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; outputs are plain readable data
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_csv(path: str | os.PathLike, rows: list[dict], fieldnames: list[str]) -> None:
    """Rows as a CSV with these columns (keys outside them ignored, missing ones empty)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fieldnames, restval="", extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())
