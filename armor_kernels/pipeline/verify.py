"""Checking a pruned checkpoint's shards against their sha256 digests before any tensor is built.

Every shard's metadata records the sha256 of each tensor's bytes as stored (SHA256_KEY); the index records
them all. Loaders check the shards against the index (a record outside the file it protects, so a rewritten
shard is caught too); a resumed run checks a finished block against its shard's own record.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_load

from ..errors import InputError

INDEX_FILE = "model.safetensors.index.json"
SHA256_KEY = "sha256"  # shard metadata: JSON {tensor: hex}; index metadata: {shard: {tensor: hex}}
_CHUNK = 16 << 20  # bytes hashed at a time when a shard is checked from the file




class DamagedShard(InputError):
    """A shard that cannot be read or whose bytes differ from their recorded sha256."""


class NoDigestsWarning(UserWarning):
    """A checkpoint (or shard) without recorded digests: it loads, but its tensors are not verified."""


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


def own_digests(path: Path, header: dict) -> dict[str, str] | None:
    """The per-tensor sha256 a shard records in its own metadata (None: it records none)."""
    raw = (header.get("__metadata__") or {}).get(SHA256_KEY)
    if raw is None:
        return None
    try:
        return dict(json.loads(raw))
    except (ValueError, TypeError) as e:
        raise DamagedShard(f"checkpoint shard {str(path)!r}: its {SHA256_KEY} metadata is unreadable: {e}") from e


def verify_shard(path: Path, expected: dict[str, str], record: str, data: bytes | None = None) -> None:
    """Check every tensor of a shard against `expected` ({tensor: sha256}, read from `record`, which the
    errors name): the same tensors, each of the same bytes. The file is read once, in order (or `data`,
    its bytes already read, is used)."""
    n, header = shard_header(path, data)
    keys = {k for k in header if k != "__metadata__"}
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


OWN = "its own metadata"  # read_verified: check a shard against the digests it records itself


def read_verified(path: Path, expected: dict[str, str] | str | None, record: str = INDEX_FILE
                  ) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a shard, its bytes read once and checked before any tensor is built.
    expected: {tensor: sha256} from `record`; OWN: the shard's own record (none there: a NoDigestsWarning);
    None: not checked (the caller has warned why)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DamagedShard(f"checkpoint shard {str(path)!r} is unreadable: {e}") from e
    _, header = shard_header(path, data)
    if expected == OWN:
        expected, record = own_digests(path, header), OWN
        if expected is None:
            warnings.warn(f"checkpoint shard {str(path)!r} records no sha256 of its tensors (written before "
                          "digests existed): not verified", NoDigestsWarning, stacklevel=2)
    if expected is not None:
        verify_shard(path, expected, record, data)
    try:
        tensors = safetensors_load(data)
    except (SafetensorError, ValueError) as e:
        raise DamagedShard(f"checkpoint shard {str(path)!r} is corrupt or truncated: {e}") from e
    return tensors, header.get("__metadata__") or {}


def index_digests(out: Path) -> dict[str, dict[str, str]] | None:
    """{shard: {tensor: sha256}} from a checkpoint's index (None: no index, or one without digests)."""
    index = Path(out) / INDEX_FILE
    if not index.is_file():
        return None
    try:
        return json.loads(index.read_text()).get("metadata", {}).get(SHA256_KEY)
    except (ValueError, AttributeError) as e:
        raise InputError(f"checkpoint file {str(index)!r} is unreadable: {e!r}") from e


def shard_records(out: Path) -> dict[str, dict[str, str]] | None:
    """index_digests(out), with a NoDigestsWarning when the checkpoint has none."""
    digests = index_digests(out)
    if digests is None:
        warnings.warn(f"checkpoint {str(out)!r} records no sha256 of its tensors (written before digests "
                      "existed, or by save_pretrained): its shards are not verified", NoDigestsWarning, stacklevel=3)
    return digests


def expected_digests(out: Path, shard: str, digests: dict | None) -> dict[str, str] | None:
    """The index's record of `shard` (digests: from shard_records); a NoDigestsWarning where the index has
    digests but none for it."""
    if digests is not None and shard not in digests:
        warnings.warn(f"checkpoint {str(out)!r}: {INDEX_FILE} records no sha256 for {shard}: not verified",
                      NoDigestsWarning, stacklevel=3)
    return None if digests is None else digests.get(shard)


def verify_checkpoint(out: Path, shards: list[Path]) -> None:
    """Check the given shards of a finished checkpoint against the index's digests, each file read once."""
    digests = shard_records(out)
    for path in shards:
        expected = expected_digests(out, path.name, digests)
        if expected is not None:
            verify_shard(path, expected, INDEX_FILE)


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


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------
