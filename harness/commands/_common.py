"""Argument checks shared by every command: argparse types with ranges, input and output path checks.

Argparse types (``int_range``, ``float_range``, ``device``, ...) reject a bad value at parse time, before any
work, with one line naming the option (``harness.cli`` prints argparse errors as one line, exit 2). Path checks
raise :class:`harness.errors.UserError` naming the option and the path.

Output rules (docs/errors.md): an output never resolves to one of the command's inputs; its folder must be
creatable and writable; a file output must not be an existing folder and vice versa. Commands call
:func:`check_output` at start, before loading models or data.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path
from typing import Callable, Iterable

from harness.errors import UserError

__all__ = [
    "existing_file",
    "existing_dir",
    "existing_path",
    "check_output",
    "check_distinct_outputs",
    "user_type",
    "int_range",
    "float_range",
    "float_list",
    "device",
    "check_device",
    "image_size",
]


def existing_file(path: str | Path, what: str) -> Path:
    """Return `path` as a Path, or raise UserError naming `what` when it is not a file."""
    p = Path(path)
    if not p.is_file():
        if p.is_dir():
            raise UserError(f"{what} is a folder, expected a file: {p}")
        raise UserError(f"{what} not found: {p}")
    if not os.access(p, os.R_OK):
        raise UserError(f"{what} is not readable: {p}")
    return p


def existing_dir(path: str | Path, what: str) -> Path:
    """Return `path` as a Path, or raise UserError naming `what` when it is not a folder."""
    p = Path(path)
    if not p.is_dir():
        if p.exists():
            raise UserError(f"{what} is a file, expected a folder: {p}")
        raise UserError(f"{what} is not a folder: {p}")
    return p


def existing_path(path: str | Path, what: str) -> Path:
    """Return `path` when it exists (file or folder), else raise UserError naming `what`."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} not found: {p}")
    return p


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_output(path: str | Path, what: str = "--out", kind: str = "file",
                 inputs: Iterable[str | Path | None] = (), input_dirs: Iterable[str | Path | None] = (),
                 suffixes: Iterable[str] | None = None) -> Path:
    """Check an output path before any work; returns it as a Path.

    Args:
        path: the output (file or folder).
        what: the option name for messages.
        kind: ``"file"`` (a file to write) or ``"dir"`` (a folder to create or fill).
        inputs: input files the output must not be.
        input_dirs: input folders the output must not be (e.g. a data set root for a folder output).
        suffixes: accepted file suffixes (lower case, with the dot), e.g. ``(".png",)``.

    Raises:
        UserError: the output is an input, lies under an existing file, is the wrong kind of existing path, has
            the wrong suffix, or its nearest existing folder is not writable.
    """
    p = Path(path)
    if str(path) == "":
        raise UserError(f"{what} is empty; give a path")
    for item in list(inputs) + list(input_dirs):
        if item is not None and _same(p, Path(item)):
            raise UserError(f"{what} {p} is also an input ({item}); choose another output")
    if suffixes is not None:
        allowed = tuple(s.lower() for s in suffixes)
        if p.suffix.lower() not in allowed:
            raise UserError(f"{what} {p} must end in {' or '.join(allowed)}")
    if kind == "file" and p.is_dir():
        raise UserError(f"{what} {p} is a folder, expected a file path")
    if kind == "dir" and p.exists() and not p.is_dir():
        raise UserError(f"{what} {p} is a file, expected a folder")
    # The nearest existing ancestor must be a writable folder (not a file, not read-only).
    anc = p if (kind == "dir" and p.exists()) else p.parent
    while not anc.exists():
        if anc.parent == anc:
            break
        anc = anc.parent
    if anc.exists() and not anc.is_dir():
        raise UserError(f"{what} {p} cannot be created: {anc} is a file")
    if anc.exists() and not os.access(anc, os.W_OK | os.X_OK):
        raise UserError(f"{what} {p} cannot be written: {anc} is not writable")
    return p


def check_distinct_outputs(*outputs: tuple[str, str | Path | None]) -> None:
    """Two outputs of one command must not be the same path: ``check_distinct_outputs(("--out", a), ...)``."""
    seen: list[tuple[str, Path]] = []
    for what, path in outputs:
        if path is None:
            continue
        p = Path(path)
        for other_what, other in seen:
            if _same(p, other):
                raise UserError(f"{what} and {other_what} are the same file ({p}); give two different paths")
        seen.append((what, p))


def user_type(parse: Callable[[str], object], name: str = "value") -> Callable[[str], object]:
    """Wrap a parser that raises UserError (e.g. ``parse_severities``) as an argparse type: a bad value is refused
    at parse time, before any work, with one line naming the option."""

    def wrapped(text: str) -> object:
        try:
            return parse(text)
        except UserError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    wrapped.__name__ = name
    return wrapped


def _number(text: str, cast: Callable[[str], float]) -> float:
    try:
        value = cast(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    return value


def int_range(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in ``[lo, hi]`` (either bound may be None). ``1e3`` and ``2.5`` are refused."""

    def parse(text: str) -> int:
        if not re.fullmatch(r"\s*[+-]?\d+\s*", str(text)):
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
        value = int(text)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{value} is outside {_bounds(lo, hi)}")
        return value

    parse.__name__ = "integer"
    return parse


def float_range(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                hi_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite float in ``[lo, hi]`` (``lo_open``/``hi_open`` exclude the bound); nan/inf refused."""

    def parse(text: str) -> float:
        value = float(_number(text, float))
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise argparse.ArgumentTypeError(f"{value:g} is outside {_bounds(lo, hi, lo_open, hi_open)}")
        if hi is not None and (value > hi or (hi_open and value == hi)):
            raise argparse.ArgumentTypeError(f"{value:g} is outside {_bounds(lo, hi, lo_open, hi_open)}")
        return value

    parse.__name__ = "number"
    return parse


def float_list(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
               max_items: int = 64) -> Callable[[str], list[float]]:
    """argparse type: comma-separated finite floats, each in ``[lo, hi]`` (see :func:`float_range`), at most
    ``max_items`` of them, duplicates dropped (order kept)."""
    one = float_range(lo, hi, lo_open, hi_open)

    def parse(text: str) -> list[float]:
        items = [t.strip() for t in str(text).split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
        if len(items) > max_items:
            raise argparse.ArgumentTypeError(f"{len(items)} values, at most {max_items} are accepted")
        return list(dict.fromkeys(one(t) for t in items))

    parse.__name__ = "numbers"
    return parse


def _bounds(lo: float | None, hi: float | None, lo_open: bool = False, hi_open: bool = False) -> str:
    left = "(" if lo_open or lo is None else "["
    right = ")" if hi_open or hi is None else "]"
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"


_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?|mps|xpu(:\d+)?)$")


def device(text: str) -> str:
    """argparse type: a torch device string (``cpu``, ``cuda``, ``cuda:1``, ``mps``); availability is checked later
    by :func:`check_device` (that needs torch, which the parser never imports)."""
    if not _DEVICE_RE.match(text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (expected cpu, cuda, cuda:N or mps)")
    return text


def check_device(name: str) -> str:
    """UserError when the device is not available on this machine (imports torch)."""
    import torch

    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps: MPS is not available on this machine")
    elif name.startswith("xpu") and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise UserError(f"--device {name}: XPU is not available on this machine")
    return name


def image_size(text: str) -> tuple[int, int]:
    """argparse type: ``HxW`` (e.g. ``800x1333``), each side in 16..8192."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size HxW (e.g. 800x1333)")
    h, w = int(m.group(1)), int(m.group(2))
    if not (16 <= h <= 8192 and 16 <= w <= 8192):
        raise argparse.ArgumentTypeError(f"size {h}x{w} outside 16..8192 per side")
    return h, w
