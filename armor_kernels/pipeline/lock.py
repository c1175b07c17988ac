"""One writer per output directory: `prune` holds `OUT/armor_run.lock` while it runs.

The lock file is created with O_CREAT | O_EXCL (atomic, also on NFS) and holds the holder's pid, host,
start time and (Linux) its process start tick, so that a reused pid is not taken for the holder. A second
run on the same directory stops at once with an error naming that process. A lock whose process is gone
(same host) is stale and taken over; one from another host cannot be checked from here, so the error
says which host and pid hold it and that the file may be deleted once that process is gone. The lock is
released (the file removed, if it is still ours) when the run ends, by an error too; a killed run
leaves it behind, stale.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

LOCK_FILE = "armor_run.lock"
_READ_TRIES = 40  # x 25 ms: how long a lock file may stay empty while its creator writes it

log = logging.getLogger("armor_kernels")


class RunLocked(OSError):
    """Another process holds the output directory's lock (or the lock cannot be taken)."""


def _proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None off Linux or
    if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _proc_start(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def _read(path: Path) -> dict | None:
    """The holder recorded in the lock file; None if the file is gone. A file still being written (empty
    or partial just after its O_EXCL creation) is read again for a moment before it is called unreadable."""
    text = ""
    for _ in range(_READ_TRIES):
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
            if isinstance(holder, dict) and isinstance(holder.get("pid"), int):
                return holder
        except ValueError:
            pass
        time.sleep(0.025)
    raise RunLocked(f"lock file {str(path)!r} is unreadable ({text[:80]!r}, expected the JSON of the process "
                    "holding it); if no prune runs on this directory, delete it")


def _alive(holder: dict) -> bool:
    """Whether the holder may still run: always for another host (it cannot be checked from here)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        pass
    started = _proc_start(holder["pid"])
    return holder.get("proc_start") is None or started is None or started == holder["proc_start"]


def _describe(holder: dict) -> str:
    return f"process {holder['pid']} on host {holder.get('host')!r}, started {holder.get('started')}"


class RunLock:
    """The output directory's lock, held by this process: `acquire(out)`, then `release()`."""

    def __init__(self, path: Path, me: dict, made_dir: bool):
        self.path, self.me, self.made_dir = path, me, made_dir

    @classmethod
    def acquire(cls, out: str | Path) -> RunLock:
        out = Path(out)
        made_dir = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        path, me = out / LOCK_FILE, _me()
        for _ in range(3):  # a stale lock is taken over, or the holder just released it: try again
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(path)
                if holder is None:
                    continue
                if _alive(holder):
                    remote = holder.get("host") != me["host"]
                    raise RunLocked(f"output directory {str(out)!r} is in use by another run: {_describe(holder)} "
                                    f"holds {str(path)!r}"
                                    + ("; if that process is gone, delete the file" if remote else
                                       "; wait for it to finish or stop it")) from None
                cls._take_over(path, holder)
                log.warning("output directory %s: took over the stale lock of %s (that process is gone)",
                            out, _describe(holder))
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            return cls(path, me, made_dir)
        raise RunLocked(f"output directory {str(out)!r}: could not take {str(path)!r} (other processes keep "
                        "taking it)")

    @staticmethod
    def _take_over(path: Path, holder: dict) -> None:
        """Remove a stale lock, and only it: it is renamed away first, then checked; a live lock another
        process created meanwhile is put back (os.link never overwrites) and refused."""
        aside = path.with_name(f".{path.name}.stale-{os.getpid()}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return
        current = _read(aside)
        if current is None or current == holder:
            aside.unlink(missing_ok=True)
            return
        try:
            os.link(aside, path)
        finally:
            aside.unlink()
        raise RunLocked(f"{str(path)!r} was just taken by {_describe(current)}")

    def release(self) -> None:
        """Remove the lock file if it is still this process's (gone or someone else's: left as it is), and
        the directory if acquire made it and the run wrote nothing (it stopped before writing)."""
        try:
            if json.loads(self.path.read_text()) == self.me:
                self.path.unlink()
            if self.made_dir and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()
        except (OSError, ValueError):
            pass
