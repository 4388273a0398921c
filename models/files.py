"""Atomic file writes, the lowest layer of the project (``harness.io`` builds on it; ``models`` writes checkpoints
with it): a killed job never leaves a half-written output behind.

A temporary file in the destination folder (``.<stem>.tmp-<pid>-<random><suffix>``) is written, given the usual
permissions (``0o666 & ~umask``, not the 0600 of a temporary file) and renamed onto the destination with
`os.replace`, which is atomic on POSIX file systems.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write", "file_mode", "TEMPORARY_RE"]

TEMPORARY_RE = re.compile(r"^\..+\.tmp-(\d+)-[A-Za-z0-9_]+")


def _umask() -> int:
    # /proc/self/status has it without changing it (os.umask's set-and-restore races with other threads).
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Permissions a new regular file gets under the current umask (what ``open(path, "w")`` would give)."""
    return 0o666 & ~_umask()


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` then rename the temporary file onto `path`.

    The temporary file keeps the destination's suffix so writers that pick a format from the extension (PIL,
    OpenCV, numpy) behave as for the final name. On any exception (or KeyboardInterrupt / SIGTERM, which the CLI
    turns into one) the temporary file is removed and `path` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-{os.getpid()}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, file_mode())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path
