"""The stages of `harness demo` (kept apart from the command so each stays short).

Each stage fills a `Stage` record (status, outputs, metrics) that `write_report` renders as
Markdown. Stages call the same functions as the subcommands; nothing here is demo-only maths.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.io import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from harness.commands.demo import Stage


def stage_synth(stage: "Stage", args: argparse.Namespace, data: Path) -> None:
    """Generate the synthetic dataset (COCO panoptic layout) and its preview sheet."""
    from harness.data.synthetic import generate_dataset

    generate_dataset(data, num_train=args.train, num_val=args.val, seed=args.seed, size=args.size, workers=2)
    stage.outputs = {"dataset": str(data), "preview": str(data / "preview_val.png")}
    stage.note = f"{args.train} train + {args.val} val images, long side {args.size}, seed {args.seed}"


def _eroded_oracle(gt_json: dict[str, Any], gt_dir: Path, pred_dir: Path, pixels: int) -> dict[str, Any]:
    """Copy of the GT where every segment loses a `pixels`-wide rim to VOID (a sloppy predictor)."""
    import cv2

    from harness.data.format import id2rgb
    from harness.metrics.pngio import read_id_map

    pred_dir.mkdir(parents=True, exist_ok=True)
    kernel = np.ones((2 * pixels + 1, 2 * pixels + 1), np.uint8)
    annotations = []
    for ann in gt_json["annotations"]:
        ids = read_id_map(gt_dir / ann["file_name"])
        # A pixel keeps its id only if its whole neighbourhood has the same id.
        hi = cv2.dilate(ids.astype(np.float32), kernel)
        lo = cv2.erode(ids.astype(np.float32), kernel)
        eroded = np.where(hi == lo, ids, 0).astype(np.uint32)
        cv2.imwrite(str(pred_dir / ann["file_name"]), id2rgb(eroded)[..., ::-1])
        kept = set(np.unique(eroded).tolist())  # segments thinner than the rim vanish entirely
        segments = [{"id": s["id"], "category_id": s["category_id"]} for s in ann["segments_info"] if s["id"] in kept]
        annotations.append({"image_id": ann["image_id"], "file_name": ann["file_name"], "segments_info": segments})
    return {"images": gt_json["images"], "categories": gt_json["categories"], "annotations": annotations}


def stage_oracle_eval(stage: "Stage", data: Path, out: Path) -> None:
    """Score an exact oracle (PQ must be 100) and an eroded oracle with Mask PQ and Boundary PQ."""
    from harness.metrics.pq import PQOptions
    from harness.metrics.pq_files import evaluate_pq_files
    from harness.metrics.report import format_pq_table

    gt_json_path = data / "annotations" / "panoptic_val2017.json"
    gt_dir = data / "annotations" / "panoptic_val2017"
    gt_json = json.loads(gt_json_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    tables = []
    for name, rim in (("exact", 0), ("eroded_2px", 2)):
        pred_dir = out / f"{name}_pred"
        pred_json_path = out / f"{name}_pred.json"
        if rim == 0:
            shutil.copytree(gt_dir, pred_dir, dirs_exist_ok=True)
            atomic_write_json(pred_json_path, gt_json)
        else:
            atomic_write_json(pred_json_path, _eroded_oracle(gt_json, gt_dir, pred_dir, rim))
        result = evaluate_pq_files(gt_json_path, pred_json_path, gt_dir, pred_dir,
                                   options=PQOptions(boundary=True), workers=2, auto_workers=True)
        atomic_write_json(out / f"{name}_pq.json", result, indent=2)
        stage.outputs[f"{name} R.json"] = str(out / f"{name}_pq.json")
        for key, label in (("pq", "Mask PQ"), ("boundary_pq", "Boundary PQ")):
            value = result[key]["All"]["pq"]
            stage.metrics[f"{name} {label}"] = round(100 * value, 2) if value is not None else float("nan")
        tables.append(format_pq_table(result["pq"], title=f"{name} oracle, Mask PQ"))
        tables.append(format_pq_table(result["boundary_pq"], title=f"{name} oracle, Boundary PQ"))
    atomic_write_text(out / "tables.txt", "\n\n".join(tables) + "\n")
    stage.note = "exact oracle = GT copied as prediction; eroded oracle = every segment loses a 2-px rim to VOID"
    if abs(stage.metrics["exact Mask PQ"] - 100.0) > 1e-9:
        stage.status = "FAILED: exact oracle does not score PQ 100"


def stage_corruptions(stage: "Stage", data: Path, out: Path) -> None:
    """Render the 16 x 5 COCO-C sheet of the first validation image."""
    from harness.corruptions.preview import write_sheet

    gt_json = json.loads((data / "annotations" / "panoptic_val2017.json").read_text())
    first = sorted(gt_json["images"], key=lambda im: im["id"])[0]["file_name"]
    sheet = write_sheet(data / "val2017" / first, out / "coco_c_preview.png")
    stage.outputs = {"sheet": str(sheet)}
    stage.note = f"16 corruptions x 5 severities of {first}"


def stage_train_eval(stage: "Stage", args: argparse.Namespace, data: Path, out: Path) -> None:
    """Train the tiny Panoptic SegFormer on CPU, then evaluate it on the validation split."""
    from harness.engine.evaluate import evaluate
    from harness.engine.train import train

    weights = train("panoptic_segformer_tiny", data, out, iters=args.train_iters)
    result = evaluate(weights, data, out / "eval", boundary=True)
    stage.outputs = {"weights": str(weights), "eval": str(out / "eval"),
                     "loss curve": str(_loss_plot(out / "train_log.csv", out / "loss.png")),
                     "predictions vs GT": str(_prediction_sheet(data, out / "eval", out / "predictions.png"))}
    for key, label in (("pq", "Mask PQ"), ("boundary_pq", "Boundary PQ")):
        for split in ("All", "Things", "Stuff"):
            value = result.get(key, {}).get(split, {}).get("pq")
            if value is not None:
                stage.metrics[f"tiny model {label} ({split})"] = round(100 * value, 2)
    stage.note = f"{args.train_iters} iterations on CPU, evaluated on the {args.val} validation images"


def _loss_plot(log_csv: Path, out_png: Path) -> Path:
    """Training loss per iteration (raw and smoothed) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    log = pd.read_csv(log_csv)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(log["iter"], log["loss"], lw=0.5, alpha=0.4, label="loss")
    ax.plot(log["iter"], log["loss"].rolling(25, min_periods=1).mean(), lw=1.5, label="moving mean (25)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("total loss")
    ax.set_title("tiny Panoptic SegFormer on the synthetic dataset (CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def _prediction_sheet(data: Path, eval_dir: Path, out_png: Path, count: int = 6) -> Path:
    """Sheet of the first validation images: ground truth (top row) and prediction (bottom row)."""
    from harness.data.coco_panoptic import read_id_png, read_image_rgb
    from harness.viz import make_grid, render_panoptic, write_png

    gt = json.loads((data / "annotations" / "panoptic_val2017.json").read_text())
    pred = json.loads((eval_dir / "pred.json").read_text())
    cats = {c["id"]: c for c in gt["categories"]}
    pred_by_id = {a["image_id"]: a for a in pred["annotations"]}
    file_by_id = {im["id"]: im["file_name"] for im in gt["images"]}
    gt_anns = [a for a in sorted(gt["annotations"], key=lambda a: a["image_id"]) if a["image_id"] in pred_by_id]
    rows: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    for ann in gt_anns[:count]:
        image = read_image_rgb(data / "val2017" / file_by_id[ann["image_id"]])
        p = pred_by_id[ann["image_id"]]
        for row, a, folder, title in ((rows[0], ann, data / "annotations" / "panoptic_val2017", "GT"),
                                      (rows[1], p, eval_dir / "pred", "prediction")):
            ids = read_id_png(folder / a["file_name"])
            row.append(render_panoptic(image, ids, a["segments_info"], cats, legend=False, title=title))
    write_png(out_png, make_grid(rows[0] + rows[1], ncols=len(rows[0])))
    return out_png


def write_report(out: Path, stages: list["Stage"], not_built: list[str] | None = None) -> Path:
    """Markdown report of every stage (status, time, metrics, outputs) and of the parts not built yet."""
    lines = ["# psf-harness demo report", "", "Data: the embedded synthetic dataset (not COCO). Numbers are measured here.",
             "", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} |" for s in stages]
    for s in stages:
        lines += ["", f"## {s.name}", "", f"Status: {s.status}."]
        if s.note:
            lines.append(f"{s.note}.")
        if s.metrics:
            lines += ["", "| metric | value (%) |", "|---|---|"]
            lines += [f"| {k} | {v:.2f} |" for k, v in s.metrics.items()]
        if s.outputs:
            lines += [""] + [f"- {k}: `{v}`" for k, v in s.outputs.items()]
    if not_built:
        lines += ["", "## Not built yet", ""] + [f"- {item}" for item in not_built]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    return report
