"""Output folders a command owns: it only ever replaces what it wrote itself.

A command that fills a folder (``synth``, ``corrupt``, ``eval``, ``predict``, ``sweep``, ``report``, ``train``,
``demo``) claims it first with :func:`claim_output_dir`, which writes a marker ``DIR/.psf-harness.json``::

    {"tool": "psf-harness", "version": "0.1.0", "command": "synth",
     "settings": {...what decides the bytes of the outputs...},
     "status": "incomplete" | "complete", "started_utc": "...", "finished_utc": "..."}

and refuses, with one line, to write into

* a folder holding files that carry no marker (not ours: a real COCO copy, a home folder ...);
* a folder whose marker names another command;
* a folder holding a **complete** output of the same command made with other settings (that would mix two runs
  or destroy a finished one), unless the command offers ``--overwrite`` and the user gave it;
* a folder whose marker cannot be read (garbage: we cannot tell what is ours).

Equal settings are a resume (or a byte-identical regeneration). A folder whose marker says ``incomplete`` holds
an interrupted run: nothing complete can be lost, so a run with other settings may replace it; the command is told
(``Claim.previous``) so that it can remove the files of the previous settings that it wrote itself. Commands
without a notion of completion (``corrupt``: every output file is complete on its own) pass
``track_status=False``: then other settings are always refused.

Marker writes are atomic, so concurrent runs with equal settings (shards of one ``corrupt`` run) agree.
Readers may check :func:`read_marker` (``PanopticDataset`` refuses a data set whose ``synth`` run is incomplete).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from harness.errors import DataError, UserError
from harness.io import JsonReadError, atomic_write_json, is_temporary, read_json_file

__all__ = ["MARKER_NAME", "Claim", "claim_output_dir", "check_claimable", "read_marker", "marker_path",
           "describe_settings"]

MARKER_NAME = ".psf-harness.json"
TOOL = "psf-harness"


def marker_path(folder: str | os.PathLike[str]) -> Path:
    return Path(folder) / MARKER_NAME


def read_marker(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The marker of `folder`, or None when it has none.

    Raises:
        DataError: the marker exists but is not a psf-harness marker (we cannot tell what the folder holds).
    """
    path = marker_path(folder)
    try:
        doc = read_json_file(path)
    except JsonReadError as exc:
        if exc.invalid_json:
            raise DataError(f"{path}: output marker is not valid JSON ({exc}); refusing to write into {folder} "
                            "(move the folder aside, or delete the marker if the folder is yours)") from None
        raise DataError(f"{path}: unreadable output marker ({_reason(exc.cause)}); refusing to write into "
                        f"{folder}") from None
    if doc is None:
        return None
    if (not isinstance(doc, dict) or doc.get("tool") != TOOL or not isinstance(doc.get("command"), str)
            or not isinstance(doc.get("settings"), dict)):
        raise DataError(f"{path}: not a psf-harness output marker (expected tool, command, settings); refusing to "
                        f"write into {folder}")
    return doc


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def describe_settings(settings: Mapping[str, Any], keys: Iterable[str] | None = None) -> str:
    """``--seed 0 --train 200`` style text of (some) settings, for messages."""
    keys = list(settings) if keys is None else list(keys)
    return " ".join(f"--{k.replace('_', '-')} {settings.get(k)}" for k in keys)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _json_clean(settings: Mapping[str, Any]) -> dict[str, Any]:
    # Round-trip through JSON so comparisons see what the marker file will hold (tuples -> lists, Paths -> str).
    return json.loads(json.dumps(dict(settings), default=str))


@dataclass
class Claim:
    """A claimed output folder.

    Attributes:
        folder: the folder.
        command: the command that claimed it.
        settings: this run's settings (as stored in the marker).
        previous: settings of the run that wrote the folder before, when they differ (the command removes that
            run's files which this run will not rewrite); None for a new folder or equal settings.
        resumed: the folder already holds (part of) an output of equal settings.
        was_complete: ... and it was complete (its marker is left untouched).
    """

    folder: Path
    command: str
    settings: dict[str, Any]
    track_status: bool = True
    previous: dict[str, Any] | None = None
    resumed: bool = False
    was_complete: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def _write(self, status: str | None, **more: Any) -> None:
        doc: dict[str, Any] = {"tool": TOOL, "version": _version(), "command": self.command,
                               "settings": self.settings}
        if status is not None:
            doc["status"] = status
        doc.update(self.extra)
        doc.update(more)
        path = marker_path(self.folder)
        try:  # an unchanged marker is not rewritten (a resumed run changes nothing it need not)
            if json.loads(path.read_text(encoding="utf-8")) == _json_clean(doc):
                return
        except (OSError, ValueError):
            pass
        atomic_write_json(path, doc, indent=1)

    def complete(self, **info: Any) -> None:
        """Record that the output is complete (call after the last file is written)."""
        if self.track_status and not self.was_complete:
            self.extra.update(info)
            self._write("complete", finished_utc=_now())
        elif info:
            self.update(**info)

    def update(self, **info: Any) -> None:
        """Record more about the output in the marker (e.g. the files written), keeping its status."""
        self.extra.update(info)
        status = None
        if self.track_status:
            status = "complete" if self.was_complete else "incomplete"
        self._write(status)


def _version() -> str:
    from harness import __version__

    return __version__


def _foreign_entry(folder: Path, ignore: Iterable[str]) -> str | None:
    """A name in `folder` that is neither a temporary file nor in `ignore` (None when there is none)."""
    skip = set(ignore) | {MARKER_NAME}
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name in skip or is_temporary(entry.name):
                continue
            return entry.name
    return None


def check_claimable(folder: str | os.PathLike[str], command: str, *, what: str = "--out",
                    legacy: Callable[[Path], dict[str, Any] | None] | None = None) -> dict[str, Any] | None:
    """The checks of :func:`claim_output_dir` that need no settings, writing nothing: call it at start, before
    loading models, so that a folder that is not ours, another command's output or a garbage marker is refused
    before any expensive work. Returns the folder's marker (or the legacy settings' stand-in), None when the
    folder is new or empty.

    Raises:
        UserError / DataError: as :func:`claim_output_dir`.
    """
    path = Path(folder)
    if not path.is_dir():
        return None
    marker = read_marker(path)
    if marker is None and legacy is not None:
        old = legacy(path)
        if old is not None:  # a marker stand-in: the legacy output's settings and status (no marker file yet)
            status = old.pop("status", "complete")
            return {"command": command, "settings": _json_clean(old), "status": status}
    if marker is None:
        foreign = _foreign_entry(path, ())
        if foreign is not None:
            raise UserError(f"{what} {path} already holds files that harness {command} did not write (e.g. "
                            f"{foreign!r}); choose a new or empty folder (a command only replaces its own outputs)")
        return None
    if marker["command"] != command:
        raise UserError(f"{what} {path} holds the output of 'harness {marker['command']}', not of "
                        f"'harness {command}'; choose another folder")
    return marker


def claim_output_dir(
    folder: str | os.PathLike[str],
    command: str,
    settings: Mapping[str, Any],
    *,
    what: str = "--out",
    compare: Iterable[str] | None = None,
    track_status: bool = True,
    overwrite: bool = False,
    overwrite_flag: str | None = None,
    legacy: Callable[[Path], dict[str, Any] | None] | None = None,
) -> Claim:
    """Claim `folder` for `command` (see module docstring), creating it when missing.

    Args:
        folder: the output folder (check it first with ``harness.commands._common.check_output(kind="dir")``).
        command: the command name (``synth``, ``corrupt``, ...).
        settings: JSON-able settings that decide the outputs' bytes.
        what: the option name, for messages.
        compare: the settings keys that must agree for a resume (default: all); others are informative.
        track_status: the output has a "complete" state (see module docstring).
        overwrite: the user asked to replace a complete output of the same command with other settings.
        overwrite_flag: the command's flag for that (named in the refusal), None when it has none.
        legacy: recognises an output written by this command before markers existed: returns its settings
            (plus ``"status"`` when known) or None.

    Returns:
        The :class:`Claim`; the marker now says ``incomplete`` (with `track_status`) and names this run.

    Raises:
        UserError: the folder is not ours, holds another command's output, or a complete output of other settings.
        DataError: the folder's marker is garbage.
    """
    path = Path(folder)
    new = _json_clean(settings)
    keys = list(new) if compare is None else list(compare)
    claim = Claim(path, command, new, track_status)
    claim.extra["started_utc"] = _now()
    if not path.exists():
        path.mkdir(parents=True, exist_ok=True)
        claim._write("incomplete" if track_status else None)
        return claim
    marker = check_claimable(path, command, what=what, legacy=legacy)
    if marker is None:  # an empty folder (or one holding only temporaries)
        claim._write("incomplete" if track_status else None)
        return claim
    old = marker["settings"]
    differing = [k for k in keys if old.get(k) != new.get(k)]
    if not differing:
        claim.resumed = True
        claim.was_complete = marker.get("status") == "complete"
        # Equal settings rewrite identical bytes: a complete output stays valid (and marked so) throughout, and the
        # marker is left as it is (a run refused later for another reason changes nothing).
        if not marker_path(path).is_file():  # adopted from a legacy output: write the marker now
            claim._write((marker.get("status") or "incomplete") if track_status else None)
        else:  # keep what the marker records (times, file lists): a resume rewrites it only when that changes
            core = {"tool", "version", "command", "settings", "status"}
            claim.extra.update({k: v for k, v in marker.items() if k not in core})
        return claim
    was = describe_settings(old, differing)
    now = describe_settings(new, differing)
    complete = (not track_status) or marker.get("status") == "complete"
    if complete and not (overwrite and track_status):  # without a status there is nothing safe to replace
        hint = f", or add {overwrite_flag} to replace it" if (overwrite_flag and track_status) else ""
        kind = "a complete output" if track_status else "outputs"
        raise UserError(f"{what} {path} holds {kind} of 'harness {command}' made with {was}; this run asks for "
                        f"{now}: refusing to mix or replace them (choose another folder{hint})")
    claim.previous = old
    claim._write("incomplete" if track_status else None)
    return claim
