"""Checking a pruned checkpoint's shards against their sha256 digests before any tensor is built.

Every shard a pruning run writes records the sha256 of each of its tensors' bytes as stored (SHA256_KEY);
the index records them all. Loaders check the shards against the index (a record outside the file it
protects, so a rewritten shard is caught too); a resumed run checks a finished block against its shard's
own record. `save_pretrained` of a loaded pruned model writes transformers' own index, without digests;
its shards each carry the sha256 of the whole state dict (MODEL_SHA256_KEY, the quantizer's metadata),
which covers every tensor it holds under the names it was saved from. A checkpoint that records no
digest anywhere is refused: this package writes none such, and nothing of it could be verified.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_load

from ..errors import InputError

INDEX_FILE = "model.safetensors.index.json"
SHA256_KEY = "sha256"  # shard metadata: JSON {tensor: hex}; index metadata: {shard: {tensor: hex}}
MODEL_SHA256_KEY = "sha256_state_dict"  # save_pretrained's shards: JSON {tensor: hex} of the whole state dict
_CHUNK = 16 << 20  # bytes hashed at a time when a shard is checked from the file


class DamagedShard(InputError):
    """A shard that cannot be read, records no digests, or whose bytes differ from their recorded sha256."""


def _read_shard(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise DamagedShard(f"checkpoint shard {str(path)!r} is corrupt or truncated: {e}") from e


def shard_header(path: Path, data: bytes | None = None) -> tuple[int, dict]:
    """(header length, header) of a safetensors file (from `data`, its bytes, when given)."""
    try:
        if data is None:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n)) if 0 < n < 1 << 28 else None
        else:
            n = int.from_bytes(data[:8], "little")
            header = json.loads(data[8:8 + n]) if 0 < n < 1 << 28 else None
    except (OSError, ValueError) as e:
        raise DamagedShard(f"checkpoint shard {str(path)!r} is corrupt or truncated (header unreadable: {e})") from e
    if not isinstance(header, dict):
        raise DamagedShard(f"checkpoint shard {str(path)!r} is corrupt or truncated (no safetensors header)")
    return n, header


def own_digests(path: Path, header: dict, key: str = SHA256_KEY) -> dict[str, str] | None:
    """The per-tensor sha256 a shard records in its own metadata under `key` (None: it records none)."""
    raw = (header.get("__metadata__") or {}).get(key)
    if raw is None:
        return None
    try:
        return dict(json.loads(raw))
    except (ValueError, TypeError) as e:
        raise DamagedShard(f"checkpoint shard {str(path)!r}: its {key} metadata is unreadable: {e}") from e


def expected_digests(path: Path, header: dict, index: dict | None) -> tuple[dict[str, str], str, bool]:
    """(expected {tensor: sha256}, the record that holds it, partial) for a shard: the index's record of it
    where the index has digests (index: its {shard: {tensor: sha256}}), else the shard's own: a pruning
    run's (exactly its tensors) or save_pretrained's (the state dict it was saved from: partial, the shard
    holds some of them). No record anywhere: DamagedShard."""
    if index is not None:
        if path.name not in index:
            raise DamagedShard(f"checkpoint shard {str(path)!r}: {INDEX_FILE} records no sha256 for it, so it "
                               "cannot be verified (a shard added or renamed after the run)")
        return index[path.name], INDEX_FILE, False
    own = own_digests(path, header)
    if own is not None:
        return own, "its own metadata", False
    saved = own_digests(path, header, MODEL_SHA256_KEY)
    if saved is not None:
        return saved, "its own metadata (save_pretrained's)", True
    raise DamagedShard(f"checkpoint shard {str(path)!r} records no sha256 of its tensors, so nothing of it can "
                       "be verified: every pruning run, convert and save_pretrained of a loaded pruned model "
                       "record them (a directory written otherwise, or with its metadata stripped)")


def verify_shard(path: Path, expected: dict[str, str], record: str, data: bytes | None = None,
                 partial: bool = False) -> None:
    """Check every tensor of a shard against `expected` ({tensor: sha256}, read from `record`, which the
    errors name): the same tensors, each of the same bytes (partial: the shard's tensors that `expected`
    names; a tensor saved under a name the state dict did not have, by a weight conversion, is not
    covered). The file is read once, in order (or `data`, its bytes already read, is used)."""
    n, header = shard_header(path, data)
    keys = {k for k in header if k != "__metadata__"}
    if partial:
        keys &= set(expected)
        expected = {k: expected[k] for k in keys}
        if not keys:
            raise DamagedShard(f"checkpoint shard {str(path)!r} is damaged: none of its tensors is among those "
                               f"{record} records")
    if keys != set(expected):
        extra, lost = sorted(keys - set(expected)), sorted(set(expected) - keys)
        raise DamagedShard(f"checkpoint shard {str(path)!r} is damaged: its tensors differ from those {record} "
                           f"records (not recorded: {extra[:3]}, missing: {lost[:3]})")
    size = path.stat().st_size if data is None else len(data)
    spans = sorted((header[k]["data_offsets"], k) for k in keys)
    f = open(path, "rb") if data is None else None
    try:
        for (lo, hi), k in spans:
            if 8 + n + hi > size:
                raise DamagedShard(f"checkpoint shard {str(path)!r} is corrupt or truncated: tensor {k!r} ends "
                                   "past the file")
            h = hashlib.sha256()
            if f is None:
                h.update(memoryview(data)[8 + n + lo:8 + n + hi])
            else:
                f.seek(8 + n + lo)
                for start in range(lo, hi, _CHUNK):
                    h.update(f.read(min(_CHUNK, hi - start)))
            if h.hexdigest() != expected[k]:
                raise DamagedShard(f"checkpoint shard {str(path)!r} is damaged: tensor {k!r} has sha256 "
                                   f"{h.hexdigest()[:16]}…, {record} records {expected[k][:16]}…")
    finally:
        if f is not None:
            f.close()


def read_verified(path: Path, index: dict | None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a shard, its bytes read once and checked (expected_digests: against `index`,
    the index's digests, or else the shard's own record) before any tensor is built."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DamagedShard(f"checkpoint shard {str(path)!r} is unreadable: {e}") from e
    _, header = shard_header(path, data)
    expected, record, partial = expected_digests(path, header, index)
    verify_shard(path, expected, record, data, partial)
    try:
        tensors = safetensors_load(data)
    except (SafetensorError, ValueError) as e:
        raise DamagedShard(f"checkpoint shard {str(path)!r} is corrupt or truncated: {e}") from e
    return tensors, header.get("__metadata__") or {}


def index_digests(out: Path) -> dict[str, dict[str, str]] | None:
    """{shard: {tensor: sha256}} from a checkpoint's index (None: no index, or one without digests, as
    transformers' own index of a save_pretrained directory)."""
    index = Path(out) / INDEX_FILE
    if not index.is_file():
        return None
    try:
        return json.loads(index.read_text()).get("metadata", {}).get(SHA256_KEY)
    except (ValueError, AttributeError) as e:
        raise InputError(f"checkpoint file {str(index)!r} is unreadable: {e!r}") from e


def verify_checkpoint(out: Path, shards: list[Path]) -> None:
    """Check the given shards of a finished checkpoint against their recorded digests, each file read once."""
    index = index_digests(out)
    for path in shards:
        expected, record, partial = expected_digests(path, shard_header(path)[1], index)
        verify_shard(path, expected, record, partial=partial)


def dtype_itemsize(dtype: str) -> int:
    return {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "U8": 1, "I8": 1, "I32": 4, "I64": 8, "BOOL": 1}[dtype]


def check_shard(path: Path) -> None:
    """The header parses and every tensor's bytes lie inside the file; errors name the file (and the
    tensor), where transformers would fail later with less to go on."""
    n, header = shard_header(path)
    size = path.stat().st_size - 8 - n
    for k, v in header.items():
        if k != "__metadata__" and v["data_offsets"][1] > size:
            raise DamagedShard(f"checkpoint shard {str(path)!r} is corrupt or truncated: tensor {k!r} ends "
                               "past the file")

