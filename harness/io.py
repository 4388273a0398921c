"""Atomic file writes: a killed job never leaves a half-written output behind.

Every writer goes through a temporary file in the destination folder followed by `os.replace`, which is atomic
on POSIX file systems. Temporary names carry the writing process's id (``.<stem>.tmp-<pid>-<random><suffix>``):
:func:`sweep_stale_temporaries` removes those whose process is gone (a SIGKILL'd run), never another live run's.
Finished files get the usual permissions (``0o666 & ~umask``), not the 0600 of a temporary file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from models.files import TEMPORARY_RE, atomic_write, file_mode

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "file_mode",
    "is_temporary",
    "sweep_stale_temporaries",
]


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = None) -> Path:
    """Serialise `obj` as JSON to `path` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent))


def is_temporary(name: str) -> bool:
    """True for a file name written by :func:`atomic_write` while in progress (never an input or an output)."""
    return bool(TEMPORARY_RE.match(name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def sweep_stale_temporaries(folder: str | os.PathLike[str], recursive: bool = False) -> int:
    """Remove temporary files of :func:`atomic_write` left in `folder` by processes that no longer run.

    Returns the number of files removed. Files of live processes (a concurrent run) are left alone.
    """
    root = Path(folder)
    if not root.is_dir():
        return 0
    removed = 0
    paths = root.rglob(".*") if recursive else root.glob(".*")
    for p in paths:
        m = TEMPORARY_RE.match(p.name)
        if m and p.is_file() and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed += 1
    return removed
