"""Atomic file writes: a killed job never leaves a half-written output behind.

Every writer goes through a temporary file in the destination folder followed by `os.replace`, which is atomic
on POSIX file systems. Temporary names carry the writing process's id (``.<stem>.tmp-<pid>-<random><suffix>``):
:func:`sweep_stale_temporaries` removes those whose process is gone (a SIGKILL'd run, a killed worker), never
another live run's. Finished files get the usual permissions (``0o666 & ~umask``), not the 0600 of a temporary file.

Reading: :func:`read_json_file` parses a JSON file and tells "absent" (None) from "present but unreadable or not
JSON" (:class:`JsonReadError`), so every reader words its own refusal around one parse.

Inputs: :func:`visible_files` lists a folder's files without hidden names, so a temporary file (or any dot-file
such as ``.DS_Store`` or our ``.psf-harness.json`` marker) is never taken for an input image.

Worker processes (multiprocessing pools) call :func:`init_worker_signals` so that SIGTERM / Ctrl-C end them
quietly (no traceback per worker) after their atomic writers have dropped their temporary files.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any, Callable, Collection, Iterable

from models.files import TEMPORARY_RE, atomic_write, file_mode, temporary_parts

__all__ = [
    "JsonReadError",
    "atomic_link_or_copy",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_write_npz",
    "file_mode",
    "init_worker_signals",
    "is_hidden",
    "is_temporary",
    "read_json_file",
    "stop_process_pool",
    "sweep_stale_temporaries",
    "temporary_parts",
    "visible_files",
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


def atomic_link_or_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Make `dst` a hard link to `src` (a copy across file systems), atomically: `dst` is replaced, never half
    written. A link keeps `src`'s permissions (its inode is shared and left alone); a copy gets the umask's."""
    import shutil

    from models.files import temporary_name

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = temporary_name(dst)  # known before anything exists: a signal at any point leaves nothing behind
    try:
        try:
            os.link(src, tmp_path)
        except OSError:  # another file system, or links not supported
            shutil.copyfile(src, tmp_path)
            os.chmod(tmp_path, file_mode())
        os.replace(tmp_path, dst)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return dst


def atomic_write_npz(path: str | os.PathLike[str], arrays: dict[str, Any], compressed: bool = False) -> Path:
    """Write arrays as an ``.npz`` archive (what ``numpy.savez[_compressed]`` writes, ``numpy.load`` reads)
    atomically and reproducibly: the zip entries carry a fixed date, so equal arrays give equal bytes (numpy's
    own writer stamps the current time, and a re-run would change files it only rewrote)."""
    import zipfile

    import numpy as np

    def write(p: Path) -> None:
        method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
        with zipfile.ZipFile(p, "w", compression=method, allowZip64=True) as zf:
            for name, value in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = method
                info.external_attr = 0o644 << 16
                with zf.open(info, "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.asanyarray(value), allow_pickle=False)

    return atomic_write(path, write)


class JsonReadError(ValueError):
    """A JSON file that exists but cannot be used: ``cause`` is the OS / decoding error or the JSON parse error
    (``invalid_json`` tells which)."""

    def __init__(self, cause: Exception, invalid_json: bool) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.invalid_json = invalid_json


def read_json_file(path: str | os.PathLike[str]) -> Any | None:
    """The parsed JSON of ``path`` (UTF-8), or None when the file does not exist.

    Raises:
        JsonReadError: the file exists but cannot be read or decoded, or is not valid JSON.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise JsonReadError(exc, invalid_json=False) from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise JsonReadError(exc, invalid_json=True) from None


def is_temporary(name: str) -> bool:
    """True for a file name written by :func:`atomic_write` while in progress (never an input or an output)."""
    return bool(TEMPORARY_RE.match(name))


def is_hidden(name: str) -> bool:
    """True for dot-files (temporaries, markers, ``.DS_Store`` ...): never inputs."""
    return name.startswith(".")


def visible_files(folder: str | os.PathLike[str], suffixes: Iterable[str] | None = None) -> list[Path]:
    """Regular files of `folder` (not recursive), sorted by name, without hidden files.

    Args:
        folder: the folder to list.
        suffixes: keep only these (lower-case, with the dot: ``(".jpg", ".png")``); None keeps every file.
    """
    keep = None if suffixes is None else {s.lower() for s in suffixes}
    out = []
    with os.scandir(folder) as it:
        for entry in it:
            if is_hidden(entry.name) or not entry.is_file():
                continue
            if keep is not None and os.path.splitext(entry.name)[1].lower() not in keep:
                continue
            out.append(Path(entry.path))
    return sorted(out, key=lambda p: p.name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def sweep_stale_temporaries(folder: str | os.PathLike[str], recursive: bool = False,
                            targets: Collection[str] | None = None) -> int:
    """Remove temporary files of :func:`atomic_write` left in `folder` by processes that no longer run.

    Args:
        folder: where to look (a missing folder is fine).
        recursive: also look in sub-folders.
        targets: only temporaries of these final file names (e.g. the outputs of one shard of a sharded run,
            whose other shards may run on other machines sharing the folder, where their pid means nothing).

    Returns:
        The number of files removed. Files of live processes (a concurrent run) are left alone.
    """
    root = Path(folder)
    if not root.is_dir():
        return 0
    removed = 0
    paths = root.rglob(".*") if recursive else root.glob(".*")
    for p in paths:
        parts = temporary_parts(p.name)
        if parts is None or (targets is not None and parts[0] not in targets):
            continue
        name, pid = parts
        if pid != os.getpid() and not _alive(pid) and p.is_file():
            p.unlink(missing_ok=True)
            removed += 1
    return removed


_EXITING: float | None = None  # monotonic time the worker started exiting (first signal, or atexit)
_EXIT_GRACE = 5.0


def _mark_exiting() -> None:
    global _EXITING
    if _EXITING is None:
        import time

        _EXITING = time.monotonic()


def _in_exit_callbacks(frame: Any) -> bool:
    """True while the interpreter runs its atexit callbacks: they are called from C, so the outermost Python frame
    is a callback (``weakref._exitfunc`` ...), not the ``<module>`` frame under which all of a worker's work runs."""
    outer = frame
    while outer is not None and outer.f_back is not None:
        outer = outer.f_back
    return outer is not None and outer.f_code.co_name != "<module>"


def _worker_exit(signum: int, frame: Any) -> None:
    # SystemExit (not KeyboardInterrupt): atomic writers drop their temporary file (they catch BaseException),
    # pool workers do not catch it, and multiprocessing exits with this status without printing a traceback.
    # A signal that arrives while the worker is already exiting (atexit callbacks running, or the clean-up of a
    # first signal, e.g. Ctrl-C to the group followed by the parent's SIGTERM) is ignored for a few seconds: raising
    # again would interrupt that clean-up (a temporary file left) or print "Exception ignored in atexit callback".
    # Later, it ends the process at once (something swallowed the first exit).
    import time

    if _EXITING is None and _in_exit_callbacks(frame):  # callbacks registered after ours (lazy imports)
        _mark_exiting()
        return
    if _EXITING is not None:
        if time.monotonic() - _EXITING < _EXIT_GRACE:
            return
        os._exit(128 + signum)
    _mark_exiting()
    raise SystemExit(128 + signum)


def stop_process_pool(pool: Any, grace: float = 10.0) -> None:
    """Stop a worker pool now (after an error, Ctrl-C or SIGTERM in the parent), without waiting for queued work.

    Works for ``concurrent.futures.ProcessPoolExecutor`` and ``multiprocessing.Pool``. The workers get SIGTERM
    (those started with :func:`init_worker_signals` drop their temporary files and exit quietly); one still alive
    after `grace` seconds (a library swallowed the exit) is killed, so stopping never hangs and no worker outlives
    the command.
    """
    import time

    if pool is None:
        return
    mp_pool = hasattr(pool, "terminate")  # multiprocessing.Pool (else concurrent.futures.ProcessPoolExecutor)
    if mp_pool:
        handler = getattr(pool, "_worker_handler", None)
        if handler is not None:  # no new workers in place of the ones stopped below
            handler._state = "TERMINATE"
        procs = list(getattr(pool, "_pool", None) or [])
    else:
        procs = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        try:
            if p.is_alive():
                p.terminate()
        except (OSError, ValueError, AttributeError):
            pass
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        except (OSError, ValueError, AttributeError, AssertionError):
            pass
    if mp_pool:
        # A worker stopped while it held the task queue's read lock (an idle worker holds it while it waits for a
        # task) never releases it, and Pool.terminate() would wait for it forever: every worker is gone now, so a
        # held lock is an orphan.
        try:
            pool._inqueue._rlock.release()
        except (AttributeError, ValueError, OSError):  # not held (ValueError), or another implementation
            pass
    try:
        if mp_pool:
            pool.terminate()
            pool.join()
        else:
            pool.shutdown(wait=True)
    except Exception:  # noqa: BLE001 - a broken pool (its workers were just stopped) has nothing left to wait for
        pass


def init_worker_signals(load: Callable[[], None] | None = None) -> None:
    """Pool initializer part: SIGTERM and SIGINT end a worker quietly, its temporary files removed.

    `load` (imports, compiled-kernel warm-up, JIT compilation) runs first, with SIGTERM at its default action and
    SIGINT ignored: the worker has written nothing yet, so being killed outright loses nothing, whereas a Python-level
    exit raised inside a JIT or ctypes callback is swallowed there and ends in a library traceback. The parent (the
    CLI) turns its own SIGTERM/SIGINT into one log line and stops the pool.
    """
    if load is not None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        load()
    import atexit

    atexit.register(_mark_exiting)  # LIFO: runs before the callbacks of the modules imported earlier (torch ...)
    signal.signal(signal.SIGTERM, _worker_exit)
    signal.signal(signal.SIGINT, _worker_exit)
