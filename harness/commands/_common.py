"""Small helpers shared by command modules (argument checks that raise UserError)."""

from __future__ import annotations

from pathlib import Path

from harness.errors import UserError


def existing_file(path: str | Path, what: str) -> Path:
    """Return `path` as a Path, or raise UserError naming `what` when it is not a file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} not found: {p}")
    return p


def existing_dir(path: str | Path, what: str) -> Path:
    """Return `path` as a Path, or raise UserError naming `what` when it is not a folder."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{what} is not a folder: {p}")
    return p
