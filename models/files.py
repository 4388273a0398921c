"""Atomic file writes, the lowest layer of the project (``harness.io`` builds on it; ``models`` writes checkpoints
with it): a killed job never leaves a half-written output behind.

A temporary file in the destination folder (``.<stem>.tmp-<pid>-<random><suffix>``) is written, given the usual
permissions (``0o666 & ~umask``, not the 0600 of a temporary file) and renamed onto the destination with
`os.replace`, which is atomic on POSIX file systems.
"""

from __future__ import annotations

import os
import random
import re
import string
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write", "file_mode", "reserve_temporary", "temporary_name", "InputError", "TEMPORARY_RE",
           "temporary_parts"]

_RNG = random.SystemRandom()
_ALPHABET = string.ascii_letters + string.digits + "_"

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
    # The name is drawn before the file exists and the `try` starts before it is created, so a signal at any point
    # leaves no file behind (tempfile.mkstemp returns the name only after creating the file).
    tmp_path = temporary_name(path)
    try:
        tmp_path = reserve_temporary(path, tmp_path)
        write(tmp_path)
        os.chmod(tmp_path, file_mode())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def temporary_name(path: Path) -> Path:
    """A fresh temporary name beside `path`: ``.<stem>.tmp-<pid>-<random><suffix>`` (not created)."""
    token = "".join(_RNG.choice(_ALPHABET) for _ in range(10))
    return path.parent / f".{path.stem}.tmp-{os.getpid()}-{token}{path.suffix}"


def reserve_temporary(path: Path, first: Path | None = None) -> Path:
    """Create an empty, private temporary file beside `path` (named `first` when given and free) and return it.

    Names carry this process's id, so a name that exists already is one of this process's own or a dead process's
    leftover: another is drawn. A caller that drew `first` itself (:func:`temporary_name`) before its ``try`` block
    and removes that name on any exception never leaves a file behind, whenever a signal arrives.
    """
    tmp = first if first is not None else temporary_name(path)
    while True:
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            tmp = temporary_name(path)
            continue
        return tmp
