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

__all__ = ["atomic_write", "file_mode", "InputError", "TEMPORARY_RE", "temporary_parts"]

# ``.<stem>.tmp-<pid>-<random><suffix>``: group 1 = pid (kept first for older callers), ``stem``, ``suffix``.
TEMPORARY_RE = re.compile(r"^\.(?P<stem>.+)\.tmp-(\d+)-[A-Za-z0-9_]+?(?P<suffix>\.[^./]*)?$")


class InputError(Exception):
    """Base of every "the user's input is wrong" error (``harness.errors.UserError``, ``models.checkpoint.
    CheckpointError``, ``models.safe_load.UnsafeCheckpointError``): the CLI prints the message as one line and exits
    with status 2. It lives here, in the lowest layer, so ``models`` can raise it without importing ``harness``.
    """


def temporary_parts(name: str) -> tuple[str, int] | None:
    """``(final file name, writer pid)`` of a temporary file name of :func:`atomic_write`, else None."""
    m = TEMPORARY_RE.match(name)
    if not m:
        return None
    return m.group("stem") + (m.group("suffix") or ""), int(m.group(2))


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
