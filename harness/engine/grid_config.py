"""What a `harness eval` grid run is: its options, its resolved plan, and the `run.json` that pins its settings.

A run evaluates one model on a fixed, ordered list of images over a list of *cells*. A cell is one (corruption,
severity) pair; ``("none", 0)`` is the clean cell and comes first. Each cell yields one results row per
(post-processor, layer).

Image order and subset rule (``RUN/image_ids.json``): the split's annotated image ids sorted ascending (numbers
before strings). ``--subset N`` keeps the N ids chosen by :func:`harness.corruptions.runner.select_subset` with
``--subset-seed S`` (default 0): sort the ids, permute them with ``numpy.random.default_rng(S).permutation``, take
the first N, sort again. ``harness corrupt --ann ... --subset N --subset-seed S`` applies the same function, so
on-disk COCO-C and the grid select the same images on every machine. ``--subset-file F`` takes the ids listed in
F (a JSON list, a JSON object with ``image_ids`` such as ``harness corrupt``'s ``subset_<N>_<S>.json``, or one id
per line). ``--max-images N`` (kept from the single-cell ``harness eval``) keeps the first N ids in that order.

The settings in ``run.json["settings"]`` decide every number of the run; a second invocation on the same ``--out``
must ask for exactly the same settings (then it resumes) or it is refused (one line, exit 2, nothing touched), unless
``--overwrite`` (``GridOptions.replace``) asks to replace it. The folder is claimed like every command's output
(:mod:`harness.outputs`): its marker ``.psf-harness.json`` holds a digest of the settings, and a folder holding files
that are not a grid run's is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from harness.errors import UserError
from harness.io import JsonReadError, atomic_write_json, read_json_file

log = logging.getLogger(__name__)

__all__ = ["GridOptions", "Cell", "CLEAN_CELL", "cell_name", "parse_corruption_list", "parse_post_processors",
           "parse_layer_list", "row_pairs", "parse_shard", "select_image_ids", "file_sha256", "state_dict_sha256",
           "source_commit", "check_or_write_run_json", "claim_run", "check_run_folder", "clear_run", "settings_sha256",
           "weights_sha256", "RUN_JSON", "RUN_FORMAT"]

RUN_JSON = "run.json"
RUN_FORMAT = "psf-harness/eval-grid/v1"
METHODS = ("m", "p", "p*", "heuristic", "own")


@dataclass(frozen=True)
class Cell:
    """One (corruption, severity) of the grid; ``Cell("none", 0)`` is the clean cell."""

    corruption: str
    severity: int

    @property
    def name(self) -> str:
        """``<corruption>_<severity>`` (``none_0`` for clean): folder and file names of the cell."""
        return cell_name(self.corruption, self.severity)

    @property
    def clean(self) -> bool:
        return self.severity == 0


CLEAN_CELL = Cell("none", 0)


def cell_name(corruption: str, severity: int) -> str:
    """``fog_3``, ``none_0``."""
    return f"{corruption}_{int(severity)}"


@dataclass
class GridOptions:
    """What the caller asks for (the command line of `harness eval`, or `harness.engine.evaluate.evaluate`).

    Attributes:
        weights: weights path (our format, training checkpoint, or a released file); ignored with ``model_object``.
        data: data set root (COCO panoptic layout).
        out: run folder.
        model: model name (required for released files; must match ours when given).
        model_object: an in-memory model instead of ``weights`` (its state dict is hashed for ``weights_sha256``).
        split: split name.
        subset / subset_seed / subset_file / max_images: the image rule (module docstring).
        corruptions: ``none``, ``all``, groups or names (clean is always evaluated).
        severities: ``1-5``, ``3``, ``1,3,5``.
        channel_order: corruption channel order, ``rgb`` (default) or ``bgr`` (`harness.corruptions.corrupt`).
        post_process: methods (``m, p, p*, heuristic, own``); None = the model's default.
        pp_options: per-method keyword overrides of the post-processors.
        layers: ``last``, ``all`` or a comma list of mask layers (``1,last``).
        boundary / ap / thing_preference: extra statistics.
        save_predictions: write COCO panoptic PNG/JSON per cell and row; None = only for a single-cell run.
        save_candidates: write per-image candidates for `harness sweep`.
        batch_size: images per forward (1 = the official protocol; more pads the batch, see docs/robustness.md).
        workers: DataLoader worker processes (decode + corrupt + transform); 0 = in the main process.
        score_workers: post-processing + scoring processes; 0 = in the main process; None = automatic.
        device: torch device.
        shard: ``(i, n)``: evaluate only image positions i, i + n, ... and write partial statistics.
        timing_images: images per cell (and process) on which each truncated decoder is timed.
        warmup: untimed forwards per layer before the first timed one.
        threads: torch CPU threads of the main process (None = torch's default).
        replace: a folder holding a run with other settings is cleared (its grid files only) instead of refused;
            the behaviour of the single-cell `harness.engine.evaluate.evaluate`, which always recomputed.
    """

    weights: str | os.PathLike[str] | None
    data: str | os.PathLike[str]
    out: str | os.PathLike[str]
    model: str | None = None
    model_object: Any = None
    split: str = "val2017"
    subset: int | None = None
    subset_seed: int = 0
    subset_file: str | os.PathLike[str] | None = None
    max_images: int | None = None
    corruptions: str = "none"
    severities: str = "1-5"
    channel_order: str = "rgb"
    post_process: Sequence[str] | str | None = None
    pp_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    layers: str = "last"
    boundary: bool = False
    ap: bool = False
    thing_preference: bool = False
    save_predictions: bool | None = None
    save_candidates: bool = False
    batch_size: int = 1
    workers: int = 2
    score_workers: int | None = None
    device: str = "cpu"
    shard: tuple[int, int] | None = None
    timing_images: int = 8
    warmup: int = 2
    threads: int | None = None
    replace: bool = False


# ----------------------------------------------------------------------------- parsing


def parse_corruption_list(spec: str) -> list[str]:
    """``none`` -> [] (clean only); ``all``, groups and names via `harness.corruptions.parse_corruptions`."""
    from harness.corruptions import parse_corruptions

    tokens = [t.strip() for t in str(spec).split(",") if t.strip()]
    rest = [t for t in tokens if t != "none"]
    if not tokens:
        raise UserError("--corruptions is empty; use none, all, a group (blur, noise, digital, weather) or names")
    return parse_corruptions(",".join(rest)) if rest else []


def parse_post_processors(spec: Sequence[str] | str | None, default: str) -> list[str]:
    """``m,p,p*`` -> ["m", "p", "p*"] (order kept, duplicates dropped); None -> [default]."""
    if spec is None:
        return [default]
    items = [t.strip() for t in spec.split(",")] if isinstance(spec, str) else [str(t).strip() for t in spec]
    out: list[str] = []
    for item in items:
        if not item:
            continue
        if item not in METHODS:
            raise UserError(f"unknown post-processor {item!r} in --post-process; choose from {', '.join(METHODS)}")
        if item not in out:
            out.append(item)
    if not out:
        raise UserError(f"--post-process is empty; choose from {', '.join(METHODS)}")
    return out


def parse_layer_list(spec: str, available: Sequence[str]) -> list[str]:
    """``last`` / ``all`` / ``1,last`` against the model's ``mask_layers()`` (result in the model's order)."""
    tokens = [t.strip() for t in str(spec).split(",") if t.strip()]
    if tokens == ["all"]:
        return list(available)
    bad = [t for t in tokens if t not in available]
    if bad or not tokens:
        raise UserError(f"unknown mask layer {bad[0] if bad else spec!r} in --layers; this model has "
                        f"{', '.join(available)} (or use all)")
    return [layer for layer in available if layer in tokens]


def row_pairs(methods: Sequence[str], layers: Sequence[str]) -> list[tuple[str, str]]:
    """The (post-processor, layer) rows of a run: every method at every layer, ``own`` at ``last`` only."""
    return [(pp, layer) for pp in methods for layer in layers if pp != "own" or layer == "last"]


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """``i/n`` (0-based, e.g. ``$SLURM_ARRAY_TASK_ID/8``) -> (i, n); None stays None."""
    if spec is None:
        return None
    from harness.corruptions.runner import parse_shard as parse

    return parse(spec)


# ----------------------------------------------------------------------------- images


def _sort_key(image_id: Any) -> tuple[int, Any]:
    return (0, image_id) if isinstance(image_id, int) else (1, str(image_id))


def _read_id_file(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read --subset-file {path}: {exc.strerror}") from None
    try:
        doc = json.loads(text)
    except ValueError:
        doc = [line.strip() for line in text.splitlines() if line.strip()]
        doc = [int(t) if t.lstrip("-").isdigit() else t for t in doc]
    if isinstance(doc, dict):
        doc = doc.get("image_ids")
    if not isinstance(doc, list) or not doc:
        raise UserError(f"--subset-file {path}: expected a non-empty list of image ids (a JSON list, "
                        "a JSON object with 'image_ids', or one id per line)")
    return doc


def select_image_ids(all_ids: Sequence[Any], subset: int | None = None, subset_seed: int = 0,
                     subset_file: str | os.PathLike[str] | None = None,
                     max_images: int | None = None) -> tuple[list[Any], dict[str, Any]]:
    """The run's image ids in evaluation order, and the rule that chose them (for ``run.json``).

    Raises:
        UserError: a subset larger than the split, ids of the subset file absent from the split, both rules.
    """
    ids = sorted(all_ids, key=_sort_key)
    if subset is not None and subset_file is not None:
        raise UserError("--subset and --subset-file are exclusive; give one")
    rule: dict[str, Any] = {"rule": "all", "split_images": len(ids)}
    if subset is not None:
        if not 0 < subset <= len(ids):
            raise UserError(f"--subset {subset} must be between 1 and the number of annotated images in the "
                            f"split ({len(ids)})")
        if all(isinstance(i, int) for i in ids):
            from harness.corruptions.runner import SUBSET_RULE, select_subset

            ids = select_subset(ids, subset, subset_seed)
        else:  # string ids (some ADE20K conversions): the same permutation over the sorted strings
            import numpy as np

            from harness.corruptions.runner import SUBSET_RULE

            perm = np.random.default_rng(subset_seed).permutation(len(ids))
            ids = sorted((ids[int(k)] for k in perm[:subset]), key=_sort_key)
        rule = {"rule": SUBSET_RULE, "n": subset, "seed": subset_seed, "split_images": len(all_ids)}
    elif subset_file is not None:
        path = Path(subset_file)
        wanted = _read_id_file(path)
        known = set(ids)
        missing = [i for i in wanted if i not in known]
        if missing:
            raise UserError(f"--subset-file {path}: image id {missing[0]!r} is not in the split "
                            f"({len(missing)} such id(s))")
        ids = sorted(set(wanted), key=_sort_key)
        rule = {"rule": "file", "file": str(path), "n": len(ids), "split_images": len(all_ids)}
    if max_images is not None:
        if max_images < 1:
            raise UserError(f"--max-images must be >= 1, got {max_images}")
        ids = ids[:max_images]
        rule = {**rule, "max_images": max_images}
    return ids, rule


# ----------------------------------------------------------------------------- fingerprints


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def state_dict_sha256(model: Any) -> str:
    """SHA-256 over an in-memory model's state dict (names, dtypes, shapes, bytes; sorted by name)."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weights_file(weights: str | os.PathLike[str]) -> Path:
    """The file whose bytes identify the weights: ``model.safetensors`` inside our folder format, the
    ``checkpoint_last.pt`` of a training folder, else the file itself (every form ``--weights`` accepts)."""
    from models.checkpoint import resolve_weights

    p = resolve_weights(weights)
    if p.is_dir():
        p = p / "model.safetensors"
    return p


def weights_sha256(weights: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of :func:`weights_file` (``results`` column ``weights_sha256``)."""
    return file_sha256(weights_file(weights))


_COMMIT: str | None = None


def source_commit() -> str:
    """The git commit of the harness source tree (``unknown`` outside a git checkout)."""
    global _COMMIT
    if _COMMIT is None:
        root = Path(__file__).resolve().parents[2]
        try:
            out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                 timeout=10, check=False)
            _COMMIT = out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
        except (OSError, subprocess.SubprocessError):
            _COMMIT = "unknown"
    return _COMMIT


# ----------------------------------------------------------------------------- run.json


def first_difference(old: Any, new: Any, path: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            if key not in old or key not in new:
                return f"{path}{key}"
            diff = first_difference(old[key], new[key], f"{path}{key}.")
            if diff is not None:
                return diff
        return None
    return None if old == new else path.rstrip(".")


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _lookup(doc: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(doc, dict) or part not in doc:
            return "(absent)"
        doc = doc[part]
    return doc


RUN_FILES = ("run.json", "image_ids.json", "gt_subset.json", "results.parquet", "results.csv", "per_class.parquet",
             "summary.csv", "thing_preference.parquet", "thing_preference_bins.csv", "pq.json", "pred.json", "pred",
             "cells", "predictions", "candidates")
COMMAND = "eval"


def clear_run(out: Path) -> None:
    """Remove the files a grid run writes (and only those) from ``out``."""
    import shutil

    for name in RUN_FILES:
        p = out / name
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)


def settings_sha256(settings: dict[str, Any]) -> str:
    """Digest of a run's settings as ``run.json`` stores them (key order and tuples do not matter)."""
    text = json.dumps(json.loads(json.dumps(settings)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _marker_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """What the output marker (``RUN/.psf-harness.json``) records: the digest decides, the rest is for people."""
    return {"settings_sha256": settings_sha256(settings), "model": settings.get("model"),
            "dataset": settings.get("dataset"), "split": settings.get("split"),
            "corruptions": settings.get("corruptions"), "severities": settings.get("severities"),
            "post_process": settings.get("post_process"), "layers": settings.get("layers"),
            "shard": settings.get("shard")}


def read_run_json(out: Path) -> dict[str, Any] | None:
    """``out/run.json`` (None when absent); UserError naming the file when it is not a run description."""
    path = out / RUN_JSON
    try:
        doc = read_json_file(path)
    except JsonReadError as exc:
        why = f"not valid JSON: {exc}" if exc.invalid_json else str(exc)
        raise UserError(f"{path} is not a readable run description ({why}); use another --out") from None
    if doc is None:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("settings"), dict):
        raise UserError(f"{path} is not a run description of harness eval (no 'settings' object); use another --out")
    return doc


def legacy_run(out: Path) -> dict[str, Any] | None:
    """Marker settings of a grid run written before output markers existed (it has ``run.json``)."""
    try:
        doc = read_run_json(out)
    except UserError:
        return None
    if doc is None or doc.get("format") != RUN_FORMAT:
        return None
    return {**_marker_settings(doc["settings"]), "status": "complete"}


def check_run_folder(out: Path) -> None:
    """At start, before the model is loaded (writes nothing): ``out`` is new, empty or a run folder of ours.

    Raises:
        UserError / DataError: the folder holds files that are not a grid run's, another command's output, a garbage
            marker or an unreadable ``run.json``.
    """
    from harness.outputs import check_claimable

    check_claimable(out, COMMAND, legacy=legacy_run)
    if out.is_dir():
        read_run_json(out)


def claim_run(out: Path, settings: dict[str, Any], info: dict[str, Any], replace: bool = False) -> tuple[Any, bool]:
    """Claim ``out`` for this run and pin its settings in ``out/run.json``.

    The folder must be new, empty, or a grid run folder (marker ``.psf-harness.json`` of ``harness eval``, or a
    ``run.json`` of a run made before markers existed). A folder holding a run with other settings is refused
    (complete or not: a half-finished grid is hours of work), naming the first setting that differs, unless
    ``replace`` (``--overwrite``): then the grid's own files (:data:`RUN_FILES`) are removed first and nothing else.

    Returns:
        ``(claim, resumed)``: the :class:`harness.outputs.Claim` (call ``claim.complete()`` when every cell and table
        is written) and whether the folder already held this run.

    Raises:
        UserError: see above; DataError: a garbage marker.
    """
    from harness.outputs import check_claimable, claim_output_dir

    check_claimable(out, COMMAND, legacy=legacy_run)
    doc = read_run_json(out) if out.is_dir() else None
    new = json.loads(json.dumps(settings))  # JSON round trip: tuples/lists and int keys compare as stored
    if doc is not None:
        old = doc["settings"]
        diff = first_difference(old, new)
        if diff is not None and not replace:
            raise UserError(f"{out} holds a run with other settings ({diff}: {_short(_lookup(old, diff))} there, "
                            f"{_short(_lookup(new, diff))} now); use another --out, repeat the original command to "
                            "resume it, or add --overwrite to replace it")
        if diff is not None:
            log.info("%s held a run with other settings (%s); replacing it", out, diff)
    claim = claim_output_dir(out, COMMAND, _marker_settings(settings), compare=["settings_sha256"],
                             overwrite=True if replace else False, overwrite_flag="--overwrite", legacy=legacy_run)
    if claim.previous is not None:  # replace: another run's files go, only those
        clear_run(out)
        doc = None
    resumed = doc is not None and claim.resumed
    if not resumed:
        atomic_write_json(out / RUN_JSON, {"format": RUN_FORMAT, "settings": settings, "info": info}, indent=1)
    return claim, resumed


def check_or_write_run_json(out: Path, settings: dict[str, Any], info: dict[str, Any], replace: bool = False) -> bool:
    """:func:`claim_run` for callers that need only whether the run resumes (the claim stays incomplete)."""
    return claim_run(out, settings, info, replace)[1]
