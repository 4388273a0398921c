"""A training run folder as an owned output (``harness.outputs``): what pins a run, and what replaces one.

The folder's marker (``.psf-harness.json``, command ``train``) records the run's settings: model config and its
overrides, data set root (resolved) and split, seed, batch size, learning rate and its scaling, warm-up,
augmentation, thing-query filter rounds and the ``--init`` weights' sha256. The run length (``iters`` / ``epochs``)
is recorded too but not compared: a longer run continues the same one. Any other difference is refused, naming the
first differing setting, whether the run finished or not (its checkpoint is hours of work), unless ``overwrite``
(``--overwrite``): then the files ``harness train`` writes (:data:`RUN_FILES`) are deleted, and nothing else.
``--no-resume`` over a folder holding weights replaces the run too, so it needs ``--overwrite`` as well.

A folder written before markers existed (it holds ``checkpoint_last.pt``, ``checkpoint_prev.pt`` or
``train_run.json`` but no marker) is adopted as a run of the current settings; the checkpoint's own checks (model
architecture, categories) still apply when it is resumed.

Every process of a torchrun job runs :func:`plan_folder` (reads only); rank 0 alone calls :func:`claim_folder`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable

from harness.errors import UserError

log = logging.getLogger(__name__)

COMMAND = "train"
LAST, PREVIOUS = "checkpoint_last.pt", "checkpoint_prev.pt"
WEIGHTS = ("model.safetensors", "model.json")
RUN_FILES = (LAST, PREVIOUS, "train_log.csv", "val_log.csv", "learning_curve.png", *WEIGHTS, "train_run.json")
LENGTH_KEYS = ("iters", "epochs")  # recorded, not compared: a longer run continues the same one


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values (dataclasses as dicts, anything else unknown as its ``str``)."""
    return json.loads(json.dumps(obj, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o)
                                 else str(o)))


def init_sha256(init_weights: str | Path | None) -> str | None:
    """sha256 of the weights file that ``--init`` names (a folder: its ``model.safetensors``), None without it."""
    if init_weights is None:
        return None
    from models.checkpoint import CheckpointError, resolve_weights

    try:
        path = resolve_weights(init_weights)
    except CheckpointError as exc:
        raise CheckpointError(f"--init: {exc}") from None
    if path.is_dir():
        path = path / WEIGHTS[0]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_settings(config_name: str, overrides: dict[str, Any], data_root: str | Path, split: str, train_cfg: Any,
                 init_weights: str | Path | None, iters: int | None, epochs: float | None) -> dict[str, Any]:
    """The marker's settings of a run (see the module docstring); JSON-clean."""
    tc = train_cfg
    overrides = dict(overrides)
    if overrides.get("pretrained_backbone"):
        overrides["pretrained_backbone"] = str(Path(overrides["pretrained_backbone"]).resolve())
    return jsonable({
        "config": config_name, "model_overrides": overrides, "data": str(Path(data_root).resolve()), "split": split,
        "seed": tc.seed, "batch_size": tc.batch_size, "lr": tc.lr, "lr_scaling": tc.lr_scaling,
        "warmup": tc.warmup_iters, "augment": tc.augment if tc.augment is not None else tc.augment_policy,
        "filter_rounds": getattr(tc.matcher, "rounds", None), "init_sha256": init_sha256(init_weights),
        "iters": iters, "epochs": epochs, **({"ema_decay": tc.ema_decay} if tc.ema_decay else {}),
    })


def compared_keys(settings: dict[str, Any]) -> list[str]:
    return [k for k in settings if k not in LENGTH_KEYS]


def _is_training_folder(path: Path) -> bool:
    return any((path / name).is_file() for name in (LAST, PREVIOUS, "train_run.json"))


def legacy_for(settings: dict[str, Any] | None) -> Callable[[Path], dict[str, Any] | None]:
    """``legacy=`` of :func:`harness.outputs.claim_output_dir`: a training folder without a marker is adopted as a
    run of ``settings`` (complete when it holds the final weights)."""

    def legacy(path: Path) -> dict[str, Any] | None:
        if not _is_training_folder(path):
            return None
        status = "complete" if (path / WEIGHTS[0]).is_file() else "incomplete"
        return {**(settings or {}), "status": status}

    return legacy


def check_folder(out: Path) -> None:
    """At start, before the data set and the model (reads only): ``out`` is new, empty or a training folder.

    Raises:
        UserError / DataError: files that harness train did not write, another command's output, a garbage marker.
    """
    from harness.outputs import check_claimable

    check_claimable(out, COMMAND, legacy=legacy_for(None))


def _short(value: Any, limit: int = 70) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def plan_folder(out: Path, settings: dict[str, Any], resume: bool, overwrite: bool) -> str:
    """What this run does with ``out`` (reads only; every process): ``"new"`` (new or empty folder), ``"resume"``
    (a run of equal settings: continue from its checkpoint) or ``"replace"`` (delete the earlier run's files).

    Raises:
        UserError: a run of other settings, or ``--no-resume`` over a run's weights, without ``overwrite``.
    """
    from harness.outputs import check_claimable

    marker = check_claimable(out, COMMAND, legacy=legacy_for(settings))
    if marker is None:
        return "new"
    old = marker["settings"]
    differing = [k for k in compared_keys(settings) if old.get(k, "(absent)") != settings[k]]
    if differing:
        key = differing[0]
        if not overwrite:
            raise UserError(f"--out {out} holds a training run with other settings ({key}: "
                            f"{_short(old.get(key, '(absent)'))} there, {_short(settings[key])} now); use another "
                            "--out, repeat the original command to resume it, or add --overwrite to replace it "
                            "(deleting only the files harness train wrote)")
        log.info("%s holds a training run with other settings (%s); replacing it (--overwrite)", out, key)
        return "replace"
    if not resume:
        held = [name for name in (LAST, PREVIOUS, WEIGHTS[0]) if (out / name).is_file()]
        if held and not overwrite:
            raise UserError(f"--no-resume would replace the training run in {out} ({held[0]}); add --overwrite to "
                            "start it over (deleting only the files harness train wrote), or choose another --out")
        return "replace"
    return "resume"


def remove_run_files(out: Path) -> int:
    """Delete the files ``harness train`` writes (and only those) from ``out``; returns how many."""
    removed = 0
    for name in RUN_FILES:
        p = out / name
        if p.is_file() or p.is_symlink():
            p.unlink()
            removed += 1
    return removed


def claim_folder(out: Path, settings: dict[str, Any], plan: str, more_work: bool) -> Any:
    """Rank 0, after :func:`plan_folder` and the checkpoint checks: claim ``out``, sweep temporaries of killed runs,
    delete the earlier run's files for ``"replace"``. Returns the :class:`harness.outputs.Claim` (call
    ``complete()`` after the final weights).

    Args:
        more_work: the run has steps to do (a complete run continued to a longer schedule is marked incomplete).
    """
    from harness.io import sweep_stale_temporaries
    from harness.outputs import claim_output_dir

    claim = claim_output_dir(out, COMMAND, settings, compare=compared_keys(settings), overwrite=plan == "replace",
                             overwrite_flag="--overwrite", legacy=legacy_for(settings))
    swept = sweep_stale_temporaries(out)
    if swept:
        log.info("removed %d temporary file(s) of an interrupted run from %s", swept, out)
    if plan == "replace":
        removed = remove_run_files(out)
        if removed:
            log.info("replaced the earlier training run in %s (%d of its files deleted)", out, removed)
    if claim.was_complete and (plan == "replace" or more_work):
        claim.was_complete = False
        claim.extra.pop("finished_utc", None)
        claim.update()  # the marker says "incomplete" (and names this run's length) until the new weights exist
    return claim
