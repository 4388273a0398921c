"""Training checkpoints: atomic writes, the previous checkpoint kept, corrupt files refused, compatibility checks.

Files in the run folder:

- ``checkpoint_last.pt``: the newest checkpoint (model, optimiser, grad scaler, step, loss history, model config,
  model family, categories, train settings). Written atomically (temporary file + rename), so a crash or SIGKILL
  while writing leaves the previous file intact.
- ``checkpoint_prev.pt``: the checkpoint before it. Before a new ``checkpoint_last.pt`` replaces a valid one, the
  valid one becomes ``checkpoint_prev.pt``; a corrupt or partial ``checkpoint_last.pt`` (a truncated copy, a disk
  error) is refused with its path and never rotated over the previous one.

Data order and augmentation are functions of (seed, step) (``harness.engine.data.SampleStream``) and per-step
torch seeds are derived the same way, so a checkpoint needs no RNG state to resume exactly.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from harness.errors import UserError
from harness.io import atomic_write

log = logging.getLogger(__name__)

LAST = "checkpoint_last.pt"
PREVIOUS = "checkpoint_prev.pt"
FORMAT = "psf-harness/train-checkpoint/v2"
REQUIRED_KEYS = ("format", "model", "optimizer", "step", "config", "family", "history")


class CorruptCheckpointError(UserError):
    """A checkpoint file that cannot be read or lacks required entries (the message names the file)."""


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load and check one training checkpoint.

    Raises:
        CorruptCheckpointError: unreadable, truncated, or missing entries (naming ``path``).
    """
    from models.safe_load import UnsafeCheckpointError, torch_load

    try:
        state = torch_load(path)  # weights_only=True + the allowlist: never runs code from the file
    except UnsafeCheckpointError as exc:  # truncated zip, pickle errors, objects that could run code
        reason = str(exc).removeprefix(f"{path}: ")
        kind = "checkpoint" if "could run code" in reason else "corrupt or partial checkpoint"
        raise CorruptCheckpointError(f"refusing {kind} {path}: {reason}") from None
    except OSError as exc:
        raise CorruptCheckpointError(f"refusing corrupt or partial checkpoint {path}: {exc.strerror or exc}") \
            from None
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"refusing checkpoint {path}: not a training checkpoint of harness train (it "
                                     f"holds a {type(state).__name__})")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if "model" not in state or "optimizer" not in state:  # a plain state dict, exported weights, another tool's file
        raise CorruptCheckpointError(f"refusing checkpoint {path}: not a training checkpoint of harness train (no "
                                     f"{', '.join(repr(k) for k in missing[:4])} entries: a plain state dict or "
                                     "another tool's file?); move it aside or use another --out")
    if missing:
        raise CorruptCheckpointError(f"refusing checkpoint {path}: missing entries {', '.join(missing)} "
                                     "(not written by this version of `harness train`?)")
    return state


def find_resume_checkpoint(out_dir: Path) -> tuple[dict[str, Any] | None, bool]:
    """The newest readable checkpoint of a run folder.

    Returns:
        ``(state or None, last_is_valid)``. When ``checkpoint_last.pt`` is corrupt, it is refused with a warning
        naming it and ``checkpoint_prev.pt`` is used (``last_is_valid`` is False, so the corrupt file is
        overwritten, not rotated over the good previous one).

    Raises:
        CorruptCheckpointError: every checkpoint present is unreadable (names them all).
    """
    last, prev = out_dir / LAST, out_dir / PREVIOUS
    errors = []
    for path in (last, prev):
        if not path.is_file():
            continue
        try:
            state = read_checkpoint(path)
        except CorruptCheckpointError as exc:
            errors.append(str(exc))
            continue
        if path == prev:  # the refusal of the last one is a warning only when the run goes on
            for error in errors:
                log.warning("%s", error)
            log.warning("resuming from the previous checkpoint %s", prev)
        return state, path == last
    if errors:  # one line
        raise CorruptCheckpointError("; ".join(errors) + "; use a new --out, or --no-resume --overwrite to start over")
    return None, True


def save_checkpoint(out_dir: Path, state: dict[str, Any], last_is_valid: bool) -> None:
    """Write ``state`` as ``checkpoint_last.pt`` atomically, keeping a valid older one as ``checkpoint_prev.pt``."""
    last, prev = out_dir / LAST, out_dir / PREVIOUS
    state = {"format": FORMAT, **state}
    if last.is_file() and last_is_valid:
        os.replace(last, prev)

    def write(tmp: Path) -> None:
        torch.save(state, tmp)

    atomic_write(last, write)


def check_compatible(state: dict[str, Any], path: Path, family: str, config: dict[str, Any],
                     categories: list[dict[str, Any]]) -> None:
    """Refuse to resume from a checkpoint of another architecture or with other categories (one clear line).

    Args:
        state: the checkpoint.
        path: its file (for the message).
        family / config: this run's model family and config dict.
        categories: this run's data set categories (contiguous order).
    """
    if state.get("family") != family:
        raise UserError(f"{path} holds a {state.get('family')!r} model, this run trains a {family!r} one; "
                        "use a new --out, or --no-resume --overwrite")
    old = state["config"]
    diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
    if diff:
        shown = ", ".join(f"{k} ({old.get(k)!r} vs {config.get(k)!r})" for k in diff[:4])
        raise UserError(f"{path} was written for another model architecture: {shown}"
                        f"{' ...' if len(diff) > 4 else ''}; use a new --out, or --no-resume --overwrite")
    old_cats = state.get("categories")
    if old_cats is not None:
        key = [(c["id"], c["name"], int(c.get("isthing", 0))) for c in old_cats]
        new = [(c["id"], c["name"], int(c.get("isthing", 0))) for c in categories]
        if key != new:
            changed = sorted({c[1] for c in set(key) ^ set(new)})[:5]
            raise UserError(f"{path} was trained on other categories than this data set (differ: "
                            f"{', '.join(changed) or 'order'}); use a new --out, or --no-resume --overwrite")
