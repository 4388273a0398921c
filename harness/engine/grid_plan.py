"""Set-up of a grid run: load the model and data, check they fit, choose the images, pin the settings.

Everything here happens before the first image is read, so every user mistake (unknown corruption, severity
outside 1-5, a subset larger than the split, weights for other categories, a model name that does not match the
weights, an output folder holding a run with other settings) stops the run with one line and exit status 2,
without touching any file.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from harness.data.coco_panoptic import PanopticDataset
from harness.data.format import CategoryMap
from harness.engine.distributed import DistInfo, broadcast_object
from harness.engine.grid_config import (
    CLEAN_CELL,
    Cell,
    GridOptions,
    check_run_folder,
    claim_run,
    file_sha256,
    parse_corruption_list,
    parse_layer_list,
    parse_post_processors,
    row_pairs,
    select_image_ids,
    source_commit,
    state_dict_sha256,
    weights_sha256,
)
from harness.engine.grid_data import ImageRef
from harness.engine.grid_results import TableMeta
from harness.errors import UserError
from harness.io import atomic_write_json, sweep_stale_temporaries
from models.inference import LAST_LAYER

log = logging.getLogger(__name__)

__all__ = ["GridPlan", "plan_run", "on_main", "utc_now", "thing_preference_settings"]

T = TypeVar("T")


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def on_main(dist: DistInfo, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 and hand its result (or its `UserError`) to every rank, so all ranks stop together."""
    if not dist.distributed:
        return fn()
    result: Any = None
    error: str | None = None
    if dist.is_main:
        try:
            result = fn()
        except UserError as exc:
            error = str(exc)
    result, error = broadcast_object(dist, (result, error))
    if error is not None:
        raise UserError(error)
    return result


@dataclass
class GridPlan:
    """A resolved run (see `plan_run`). ``settings`` is what ``run.json`` pins."""

    opts: GridOptions
    out: Path
    dist: DistInfo
    model: torch.nn.Module
    cfg: Any
    dataset: PanopticDataset
    categories: CategoryMap
    refs: list[ImageRef]
    cells: list[Cell]
    layers: list[str]
    rows: list[tuple[str, str]]
    pp_options: dict[str, dict[str, Any]]
    settings: dict[str, Any]
    meta: TableMeta
    save_predictions: bool
    resumed: bool
    claim: Any = None  # rank 0: the output folder's claim (harness.outputs.Claim), completed at the end

    @property
    def shard_name(self) -> str | None:
        return None if self.opts.shard is None else f"{self.opts.shard[0]}/{self.opts.shard[1]}"

    @property
    def single_cell(self) -> bool:
        return self.cells == [CLEAN_CELL] and len(self.rows) == 1


def _load(opts: GridOptions, dataset: PanopticDataset) -> tuple[torch.nn.Module, Any, str, dict[str, Any]]:
    """(model, config, weights sha256, meta stored with the weights)."""
    from harness.engine.loading import load_model

    cats = dataset.categories
    if opts.model_object is not None:
        model = opts.model_object
        return model, model.cfg, state_dict_sha256(model), {}
    if opts.weights is None:
        raise UserError("no --weights given")
    from models.checkpoint import read_meta, resolve_weights

    path = resolve_weights(opts.weights)  # a folder (ours, or a training run's), a file; CheckpointError otherwise
    model = load_model(path, opts.model, cats.num_things, cats.num_stuff, "cpu")
    meta = read_meta(path)  # {} for released files; our files carry the training data set's categories
    return model, model.cfg, weights_sha256(path), meta


def _check_categories(cfg: Any, meta: dict[str, Any], dataset: PanopticDataset, weights: Any) -> None:
    cats = dataset.categories
    if (cfg.num_things, cfg.num_stuff) != (cats.num_things, cats.num_stuff):
        raise UserError(f"the model ({weights}) has {cfg.num_things} thing + {cfg.num_stuff} stuff classes but "
                        f"{dataset.json_path} has {cats.num_things} + {cats.num_stuff}")
    stored = meta.get("categories")
    if not stored:
        return
    try:
        theirs = CategoryMap.from_categories(stored)
    except ValueError as exc:
        raise UserError(f"categories stored with {weights} are invalid: {exc}") from None
    for k, (a, b) in enumerate(zip(theirs.categories, cats.categories)):
        if int(a["id"]) != int(b["id"]) or bool(a["isthing"]) != bool(b["isthing"]) or (
                "name" in a and "name" in b and a["name"] != b["name"]):
            raise UserError(f"{weights} were trained on other categories than {dataset.json_path}: class {k} is "
                            f"{a.get('name', a['id'])!r} (id {a['id']}) there and {b.get('name', b['id'])!r} "
                            f"(id {b['id']}) here")


def thing_preference_settings(model: Any, pp_options: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Constructor arguments of ``ThingPreferenceStats`` for this model (its queries; the run's (m) options)."""
    from harness.metrics.thing_preference import MergeOptions, ThingPreferenceStats

    kwargs: dict[str, Any] = {}
    if "m" in pp_options:  # count what the run's (m) paints (user overrides included)
        known = set(MergeOptions.__dataclass_fields__)
        kwargs["merge_options"] = {k: v for k, v in pp_options["m"].items() if k in known}
    try:
        return ThingPreferenceStats.for_model(model, **kwargs).settings()
    except ValueError as exc:
        raise UserError(f"--thing-preference: {exc}") from None


def _device_type(device: str) -> str:
    return "cuda" if str(device).startswith("cuda") else str(device).split(":")[0]


def plan_run(opts: GridOptions, dist: DistInfo) -> GridPlan:
    """Resolve the options into a plan; rank 0 writes ``run.json``, ``image_ids.json``, ``gt_subset.json``.

    Raises:
        UserError: any of the bad inputs listed in the module docstring.
    """
    from harness.corruptions import CHANNEL_ORDERS, SEED_RULE, parse_severities

    out = Path(opts.out)
    corruptions = parse_corruption_list(opts.corruptions)
    severities = parse_severities(opts.severities) if corruptions else []
    if opts.channel_order not in CHANNEL_ORDERS:
        raise UserError(f"invalid --channel-order {opts.channel_order!r}; valid: {', '.join(CHANNEL_ORDERS)}")
    if opts.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {opts.batch_size}")
    if opts.workers < 0 or (opts.score_workers is not None and opts.score_workers < 0):
        raise UserError("--workers and --score-workers must be >= 0")
    on_main(dist, lambda: check_run_folder(out))  # a folder that is not a run of ours: refused before any work
    dataset = PanopticDataset(opts.data, split=opts.split)
    ids, rule = select_image_ids(dataset.image_ids, opts.subset, opts.subset_seed, opts.subset_file, opts.max_images)
    model, cfg, sha, meta = _load(opts, dataset)
    weights_label = opts.weights if opts.model_object is None else "the model"
    _check_categories(cfg, meta, dataset, weights_label)
    model = model.to(dist.device).eval()

    default_pp = str(getattr(model, "default_post_process", "m"))
    methods = parse_post_processors(opts.post_process, default_pp)
    layers = parse_layer_list(opts.layers, model.mask_layers())
    rows = row_pairs(methods, layers)
    if not rows:
        raise UserError("--post-process own applies to layer 'last' only; add last to --layers")
    unknown = [m for m in opts.pp_options if m not in methods]
    if unknown:
        raise UserError(f"options given for post-processor {unknown[0]!r}, which the run does not use")
    pp_options = {m: {**model.post_process_options(m), **opts.pp_options.get(m, {})} for m in methods if m != "own"}

    cells = [CLEAN_CELL] + [Cell(c, s) for c in corruptions for s in severities]
    single = cells == [CLEAN_CELL] and len(rows) == 1
    save_predictions = single if opts.save_predictions is None else bool(opts.save_predictions)
    tp_settings = None
    if opts.thing_preference:
        if LAST_LAYER not in layers:
            raise UserError("--thing-preference counts the masks of layer 'last'; add last to --layers")
        tp_settings = thing_preference_settings(model, pp_options)
    cats = dataset.categories
    refs = [ImageRef(k, iid, str(dataset.image_info(iid)["file_name"]), str(dataset.image_path(iid)))
            for k, iid in enumerate(ids)]
    dataset_name = Path(opts.data).resolve().name
    settings = {
        "model": cfg.name, "model_config": cfg.to_dict(), "weights_sha256": sha,
        "dataset": dataset_name, "split": opts.split, "gt_json_sha256": file_sha256(dataset.json_path),
        "categories": [[int(c["id"]), int(bool(c["isthing"])), str(c.get("name", ""))] for c in cats.categories],
        "images": {**rule, "count": len(ids)},
        "corruptions": corruptions, "severities": severities, "seed_rule": SEED_RULE,
        "channel_order": opts.channel_order,
        "post_process": methods, "post_process_options": pp_options, "layers": layers,
        "boundary": bool(opts.boundary), "ap": bool(opts.ap), "thing_preference": tp_settings,
        "save_predictions": save_predictions, "save_candidates": bool(opts.save_candidates),
        "batch_size": int(opts.batch_size), "device_type": _device_type(dist.device),
        "shard": None if opts.shard is None else f"{opts.shard[0]}/{opts.shard[1]}",
        "test_transform": _as_json(model.test_transform()),
    }
    info = {"weights": str(opts.weights) if opts.model_object is None else "(in-memory model)",
            "data": str(Path(opts.data).resolve()), "created_at": utc_now(), "commit": source_commit()}

    claims: list[Any] = []

    def write_headers() -> bool:
        claim, resumed = claim_run(out, settings, info, opts.replace)
        claims.append(claim)
        # Temporary files of a killed run (never those of a live one).
        removed = sweep_stale_temporaries(out, recursive=True)
        if removed:
            log.info("removed %d temporary file(s) left by an interrupted run in %s", removed, out)
        if not resumed:
            atomic_write_json(out / "image_ids.json", ids)
            _write_gt_subset(dataset, ids, out / "gt_subset.json")
            if opts.save_candidates:
                _write_candidates_meta(out, cfg, cats, layers, pp_options, opts)
        return resumed

    resumed = on_main(dist, write_headers)
    meta_tables = TableMeta(cfg.name, sha, dataset_name, opts.split, len(ids), tuple(rows),
                            tuple(dict(c) for c in dataset.raw_categories),
                            {int(c["id"]): str(c.get("name", c["id"])) for c in dataset.raw_categories})
    return GridPlan(opts, out, dist, model, cfg, dataset, cats, refs, cells, layers, rows, pp_options, settings,
                    meta_tables, save_predictions, resumed, claims[0] if claims else None)


def _as_json(spec: Any) -> dict[str, Any]:
    import dataclasses

    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(spec).items()}


def _write_gt_subset(dataset: PanopticDataset, ids: list[Any], path: Path) -> None:
    """The split's GT restricted to the run's images, in run order (panopticapi's ``gt_json_file``)."""
    import json

    data = json.loads(dataset.json_path.read_text(encoding="utf-8"))
    order = {iid: k for k, iid in enumerate(ids)}
    data["images"] = sorted((im for im in data["images"] if im["id"] in order), key=lambda im: order[im["id"]])
    data["annotations"] = sorted((a for a in data["annotations"] if a["image_id"] in order),
                                 key=lambda a: order[a["image_id"]])
    atomic_write_json(path, data)


def _write_candidates_meta(out: Path, cfg: Any, cats: CategoryMap, layers: list[str],
                           pp_options: dict[str, dict[str, Any]], opts: GridOptions) -> None:
    from harness.engine.candidates_io import write_meta

    write_meta(out / "candidates" / cfg.name, {
        "model": cfg.name, "num_things": int(cfg.num_things), "num_stuff": int(cfg.num_stuff),
        "categories": [dict(c) for c in cats.categories], "layers": layers, "post_process_options": pp_options,
        "data": str(Path(opts.data).resolve()), "split": opts.split})
