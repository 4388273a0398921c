"""`harness report`: the paper's tables and figures from run folders, measured beside the paper's numbers."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from analysis.report import Picture, Report

HELP = "render the paper's tables (measured / paper / difference) and figures from results; print recipes"
DESCRIPTION = """Read run folders of `harness eval` / `harness sweep` (results.parquet or .csv, thing_preference.parquet,
profile CSVs, attention dumps; a folder of run folders is searched two levels deep) and write DIR/report.md,
a self-contained DIR/report.html, DIR/tables/table_<id>.{md,tex,csv,json} and DIR/figures/*.png.

Every table whose rows are present is rendered with the measured value, the paper's value (shipped copy of the
paper's tables) and their difference per cell; cells without a measurement stay empty. Runs of the tiny demo
models render labelled demo versions of Tables 7, 8, 10, 11, B.2, B.3, B.4 and B.6. RUN=LABEL gives a run's rows
a training variant (joint, 1x, loc0, heads1, ...; see docs/analysis.md).

--recipes prints the exact commands that produce the missing rows of the chosen tables on COCO with the
released weights (all rows when no --results is given).

examples:
  harness report --results runs/demo/eval_qd runs/demo/eval_joint --out runs/demo/report
  harness report --results runs/paper --out runs/paper/report --tables 7,10,11
  harness report --recipes --table 11
  harness report --recipes --results runs/paper --tables 7,8
"""

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", nargs="+", default=[], metavar="RUN",
                        help="run folders, folders of runs, or results files (RUN=LABEL sets a variant)")
    parser.add_argument("--out", default=None,
                        help="report folder (required unless --recipes): new, empty, or an earlier report, which is "
                             "replaced")
    from harness.commands._common import user_type

    parser.add_argument("--tables", "--table", dest="tables", default=None, type=user_type(_table_ids, "tables"),
                        help="comma-separated table ids, e.g. 7,10,11,B3 (default: all)")
    parser.add_argument("--recipes", action="store_true",
                        help="print the commands that produce the tables' missing rows and exit")
    parser.add_argument("--no-pictures", action="store_true",
                        help="skip Fig. 5 pictures re-merged from saved predictions / candidates")
    parser.add_argument("--title", default="psf-harness report", help="report title")


def _table_ids(text: str | list[str] | None) -> list[str] | None:
    from analysis.paper import normalise_table_id
    from harness.errors import UserError

    if not text:
        return None
    if isinstance(text, list):  # already parsed (argparse type)
        return text
    try:
        ids = [normalise_table_id(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return list(dict.fromkeys(ids)) or None


def recipes_text(table_ids: Sequence[str] | None, results: Sequence[str] = ()) -> str:
    """Commands for the missing rows of ``table_ids`` (all tables when None), as printed by ``--recipes``."""
    from analysis.paper_specs import TABLE_SPECS
    from analysis.recipes import PREAMBLE, table_commands
    from analysis.runs import load_runs
    from analysis.tables import missing_rows

    data = load_runs(results) if results else None
    ids = list(table_ids or TABLE_SPECS)
    lines = [PREAMBLE]
    for tid in ids:
        spec = TABLE_SPECS[tid]
        rows = missing_rows(spec, data)
        lost = [r for r in spec.rows if r.select is None or r.recipe is None]
        lines.append(f"# ---- Table {tid}: {len(rows)} missing row(s)" + (" (given the results)" if data else ""))
        for r in lost:
            lines.append(f"#   {r.label}: {r.note or 'no recipe'}")
        if rows:
            lines.append("#   rows: " + "; ".join(r.label for r in rows))
            lines.extend(table_commands([r.recipe for r in rows], [tid], report_out=f"runs/paper/report_{tid}"))
        lines.append("")
    return "\n".join(lines)


def _picture_from_candidates(run_dir: Path) -> "Picture | None":
    """Mask-wise merging vs pixel-wise argmax on the first clean image of the first model with candidates."""
    import numpy as np

    from analysis.report import Picture
    from harness.data.coco_panoptic import PanopticDataset, read_image_rgb
    from harness.engine.candidates_io import read_meta
    from harness.engine.sweep import remerge_file
    from harness.metrics.pq import panoptic_from_semantic

    root = run_dir / "candidates"
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        cell = model_dir / "none_0"
        files = sorted(cell.glob("*.npz")) if cell.is_dir() else []
        if not files:
            continue
        meta = read_meta(model_dir)
        data_root = Path(str(meta.get("data", "")))
        if not data_root.is_dir():
            log.info("pictures: data set %s of %s not found; skipped", data_root, model_dir)
            return None
        dataset = PanopticDataset(data_root, split=str(meta.get("split", "val2017")), validate=False)
        panels = []
        image_id = None
        for method, name in (("m", "mask-wise merging (m)"), ("p", "pixel-wise argmax (p)")):
            image_id, res = remerge_file(files[0], meta, method)
            ids, segs = panoptic_from_semantic(res.category, res.instance, dataset.categories.ids)
            panels.append((name, ids.astype(np.int64), segs))
        image = read_image_rgb(dataset.image_path(image_id))
        return Picture(image, panels, list(dataset.raw_categories),
                       f"{meta.get('model', model_dir.name)}, image {image_id}, clean, last layer")
    return None


def _picture_from_predictions(run_dir: Path) -> "Picture | None":
    """The same from saved predictions (``RUN/predictions/<model>/none_0/{m,p}_last/``) when present."""
    from analysis.report import Picture
    from harness.data.coco_panoptic import PanopticDataset, read_id_png, read_image_rgb

    root = run_dir / "predictions"
    run_json = run_dir / "run.json"
    doc = json.loads(run_json.read_text(encoding="utf-8")) if run_json.is_file() else {}
    meta = dict(doc) if isinstance(doc, dict) else {}
    for key in ("settings", "info"):  # harness eval nests its run description under these
        if isinstance(meta.get(key), dict):
            meta = {**meta, **meta[key]}
    data_root = Path(str(meta.get("data") or meta.get("data_root") or ""))
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        dirs = {pp: model_dir / "none_0" / f"{pp}_last" for pp in ("m", "p")}
        if not all((d / "panoptic.json").is_file() for d in dirs.values()) or not data_root.is_dir():
            continue
        dataset = PanopticDataset(data_root, split=str(meta.get("split", "val2017")), validate=False)
        panels = []
        image_id = None
        for pp, d in dirs.items():
            pred = json.loads((d / "panoptic.json").read_text(encoding="utf-8"))
            ann = pred["annotations"][0] if image_id is None else next(
                a for a in pred["annotations"] if a["image_id"] == image_id)
            image_id = ann["image_id"]
            panels.append((f"{'mask-wise merging' if pp == 'm' else 'pixel-wise argmax'} ({pp})",
                           read_id_png(d / ann["file_name"]).astype("int64"), ann["segments_info"]))
        image = read_image_rgb(dataset.image_path(image_id))
        return Picture(image, panels, list(dataset.raw_categories), f"{model_dir.name}, image {image_id}, clean")
    return None


def pictures_for(results: Sequence[str | Path]) -> list["Picture"]:
    """Fig. 5 pictures for every run folder under ``results`` that saved predictions or candidates."""
    from analysis.runs import split_label, find_files
    from harness.errors import UserError

    pics = []
    for arg in results:
        path, _ = split_label(arg)
        for d in find_files(path) if path.is_dir() else []:
            try:
                pic = _picture_from_predictions(d) or _picture_from_candidates(d)
            except (UserError, OSError, KeyError, ValueError, StopIteration) as exc:
                log.warning("pictures of %s skipped: %s", d, exc)
                continue
            if pic is not None:
                pics.append(pic)
    return pics


COMMAND = "report"


def _legacy_report(folder: Path) -> dict[str, Any] | None:
    """A report folder written before output markers existed: ``report.md`` + ``report.html`` of ours."""
    md = folder / "report.md"
    try:
        ours = (folder / "report.html").is_file() and "## Headline numbers" in md.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return {"status": "complete"} if ours else None


def _report_files(folder: Path) -> list[str]:
    """The files a report writes, as found in `folder` (a legacy report's, which recorded nothing)."""
    found = [p for p in (folder / "report.md", folder / "report.html") if p.is_file()]
    found += sorted((folder / "tables").glob("table_*.*")) + sorted((folder / "figures").glob("*.png"))
    return [str(p.relative_to(folder)) for p in found]


def make_report(results: Sequence[str | Path], out: str | Path, tables: Sequence[str] | None = None,
                pictures: bool = True, title: str = "psf-harness report") -> "Report":
    """Python entry point of ``harness report`` (the demo calls this): tables, figures, report.md / .html.

    ``out`` must be new, empty, or a report folder (marker ``.psf-harness.json`` of ``harness report``): a report
    replaces its own earlier report (a view of the results, cheap to redo), deleting the files of that report
    that this one does not rewrite, and nothing else.
    """
    from analysis.report import write_report
    from harness.io import sweep_stale_temporaries
    from harness.outputs import check_claimable, claim_output_dir

    folder = Path(out)
    marker = check_claimable(folder, COMMAND, legacy=_legacy_report)
    earlier = [str(f) for f in (marker or {}).get("files", []) if isinstance(f, str)] if marker else []
    if marker is not None and "files" not in marker:
        earlier = _report_files(folder)
    settings = {"results": [str(r) for r in results], "tables": list(tables) if tables else None,
                "pictures": bool(pictures), "title": title}
    pics = pictures_for(results) if pictures else []
    claim = claim_output_dir(folder, COMMAND, settings, overwrite=True, legacy=_legacy_report)
    sweep_stale_temporaries(folder, recursive=True)
    claim.update(files=earlier)  # an interrupted report still names what it may have replaced
    rep = write_report(list(results), folder, tables=tables, pictures=pics, title=title)
    written = sorted({str(Path(f).relative_to(folder)) for f in rep.files})
    for name in set(earlier) - set(written):  # the earlier report's tables / figures this one does not have
        p = folder / name
        if ".." not in Path(name).parts and p.is_file() and not p.is_symlink():
            p.unlink()
    claim.complete(files=written)
    return rep


def run(args: argparse.Namespace) -> int:
    from harness.errors import UserError

    tables = _table_ids(args.tables)
    if args.recipes:
        print(recipes_text(tables, args.results))
        return 0
    if not args.results:
        raise UserError("--results RUN [RUN ...] is required (or --recipes)")
    if not args.out:
        raise UserError("--out DIR is required")
    from analysis.runs import split_label
    from harness.commands._common import check_output, existing_path
    from harness.outputs import check_claimable

    inputs = [existing_path(split_label(r)[0], "--results") for r in args.results]
    out = check_output(args.out, "--out", kind="dir", inputs=[p for p in inputs if p.is_file()],
                       input_dirs=[p for p in inputs if p.is_dir()])
    check_claimable(out, COMMAND, legacy=_legacy_report)
    rep = make_report(args.results, out, tables, pictures=not args.no_pictures, title=args.title)
    print(f"{len(rep.tables)} table(s): {', '.join(t.id + (' (demo)' if t.demo else '') for t in rep.tables) or '-'}")
    print(f"{len(rep.figures)} figure(s)")
    print(f"report: {rep.markdown}  {rep.html}")
    return 0


