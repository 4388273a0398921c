"""The stages of `harness demo` and their bookkeeping (settings, resumable stage records).

Every stage calls what a user would call (`harness synth`, `harness train`, `harness eval`, `harness report`), so
the demo doubles as an integration check; nothing here is demo-only maths. The run folder keeps:

- ``demo.json``: the settings (a re-run with other settings is refused unless ``--fresh``) and one record per stage
  (status, seconds, outputs, metrics); a finished stage is skipped on the next run, an unfinished one resumes
  (training from its checkpoint, the evaluation grid from its finished cells);
- ``data/`` (synthetic data set), ``train_qd/`` and ``train_joint/`` (the two tiny models, learning curves),
  ``eval_qd/`` and ``eval_joint/`` (`harness eval` grids), ``results.csv`` / ``results.parquet`` (both grids'
  rows), ``report.md`` (+ tables and figures).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import UserError
from harness.io import atomic_write_json

log = logging.getLogger(__name__)

DEMO_JSON = "demo.json"
QD, JOINT = "panoptic_segformer_tiny", "panoptic_segformer_tiny_joint"
MODELS = {"qd": QD, "joint": JOINT}


@dataclass(frozen=True)
class DemoSettings:
    """What the demo does; every number is in the report.

    Attributes:
        seed: data set seed.
        train_images / val_images: synthetic split sizes.
        size: long side of the synthetic images (the tiny configs' test scale).
        iters: training steps of each tiny model.
        val_every: steps between validations during training (the learning curve).
        eval_images: validation images of the robustness grid (the deterministic `--subset` rule).
        corruptions / severities: the grid (`harness eval` syntax).
        post_process: post-processors of the grid.
        quick: the smoke version.
    """

    seed: int = 0
    train_images: int = 500
    val_images: int = 64
    size: int = 128
    iters: int = 2000
    val_every: int = 250
    eval_images: int = 32
    corruptions: str = "all"
    severities: str = "1-5"
    post_process: str = "m,p,p*"
    quick: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


QUICK = DemoSettings(train_images=12, val_images=4, size=64, iters=12, val_every=6, eval_images=2,
                     severities="3", quick=True)


@dataclass
class Stage:
    """One demo stage and its outcome."""

    name: str
    status: str = "not run"
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def done(self) -> bool:
        """Finished completely (a stage that could only do part of its job, e.g. "ok (clean only)", runs again)."""
        return self.status == "ok"


class DemoRun:
    """The run folder: settings and stage records in ``demo.json``, written after every stage."""

    def __init__(self, out: Path, settings: DemoSettings, fresh: bool = False) -> None:
        self.out = out
        self.settings = settings
        path = out / DEMO_JSON
        if fresh and out.exists():
            if not path.is_file() and any(out.iterdir()):
                raise UserError(f"--fresh would delete {out}, which is not a demo folder (no {DEMO_JSON}); "
                                "choose another --out")
            shutil.rmtree(out)
        self.stages: dict[str, Stage] = {}
        if path.is_file():
            doc = json.loads(path.read_text(encoding="utf-8"))
            if doc.get("settings") != settings.to_dict():
                old = doc.get("settings", {})
                diff = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in settings.to_dict().items() if old.get(k) != v]
                raise UserError(f"{out} holds a demo with other settings ({', '.join(diff[:4])}); re-run with "
                                "--fresh to start over, or choose another --out")
            self.stages = {s["name"]: Stage(**s) for s in doc.get("stages", [])}
        out.mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        atomic_write_json(self.out / DEMO_JSON, {"settings": self.settings.to_dict(),
                                                  "machine": machine(), "stages": [s.__dict__ for s in
                                                                                   self.stages.values()]}, indent=2)

    def run(self, name: str, fn: Any, *args: Any) -> Stage:
        """Run ``fn(stage, *args)`` unless the stage finished before; record it either way."""
        old = self.stages.get(name)
        if old is not None and old.done and all(Path(p).exists() for p in old.outputs.values()):
            log.info("stage '%s': done before (%.0f s), reused", name, old.seconds)
            return old
        stage = Stage(name)
        self.stages[name] = stage
        log.info("stage '%s' ...", name)
        t0 = time.perf_counter()
        try:
            fn(stage, *args)
        except BaseException:
            stage.status = "failed"
            stage.seconds = round(time.perf_counter() - t0, 1)
            self.save()
            raise
        stage.seconds = round(time.perf_counter() - t0, 1)
        if stage.status == "not run":
            stage.status = "ok"
        self.save()
        log.info("stage '%s': %s in %.1f s", name, stage.status, stage.seconds)
        return stage


def machine() -> dict[str, Any]:
    """Where the numbers were measured: CPU, core count, load average, GPU (if any), torch."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version(), "load_avg_1_5_15": [round(x, 2) for x in load]}


def machine_text(info: dict[str, Any]) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    load = info.get("load_avg_1_5_15", ["?"])
    return f"{info['cpu']}, {info['cores']} cores{gpu}, torch {info['torch']} (load average {load[0]} at the end)"


def _harness_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness", *args]


def _env(threads: int) -> dict[str, str]:
    import harness

    root = str(Path(harness.__file__).resolve().parents[1])
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads)}


def _run_cli(argv: list[str]) -> None:
    from harness.cli import main

    rc = main(argv)
    if rc != 0:
        raise UserError(f"demo stage failed: harness {' '.join(argv)} exited with {rc}")


# ---------------------------------------------------------------------------------------------------- stages
def stage_synth(stage: Stage, s: DemoSettings, data: Path) -> None:
    """The synthetic data set (COCO panoptic layout) and its preview sheet."""
    from harness.data.synthetic import generate_dataset

    generate_dataset(data, num_train=s.train_images, num_val=s.val_images, seed=s.seed, size=s.size,
                     workers=min(2, os.cpu_count() or 1))
    stage.outputs = {"dataset": str(data), "preview": str(data / "preview_val.png")}
    stage.note = (f"{s.train_images} train + {s.val_images} val images, long side {s.size}, seed {s.seed} "
                  f"(`harness synth --train {s.train_images} --val {s.val_images} --size {s.size} --seed {s.seed}`)")


def stage_corruption_preview(stage: Stage, data: Path, out: Path) -> None:
    """The 16 x 5 COCO-C sheet of the first validation image."""
    from harness.corruptions.preview import write_sheet

    gt_json = json.loads((data / "annotations" / "panoptic_val2017.json").read_text())
    first = sorted(gt_json["images"], key=lambda im: im["id"])[0]["file_name"]
    sheet = write_sheet(data / "val2017" / first, out / "coco_c_preview.png")
    stage.outputs = {"sheet": str(sheet)}
    stage.note = f"16 corruptions x 5 severities of {first}"


def stage_train(stage: Stage, s: DemoSettings, data: Path, out: Path) -> None:
    """Train the tiny query-decoupled and joint-matching models at the same time (one process and core each;
    `harness train`, resumable)."""
    cores = os.cpu_count() or 1
    threads = max(1, cores // len(MODELS))
    procs = {}
    for key, model in MODELS.items():
        run_dir = out / f"train_{key}"
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = _harness_cmd("train", "-q", "--config", model, "--data", str(data), "--out", str(run_dir),
                           "--iters", str(s.iters), "--val-every", str(s.val_every),
                           "--val-images", str(min(s.val_images, 32)), "--checkpoint-every",
                           str(max(1, s.val_every)), "--seed", str(s.seed))
        log_file = open(run_dir / "train_stdout.txt", "a", encoding="utf-8")  # noqa: SIM115 (closed below)
        log.info("training %s: %s", model, " ".join(cmd[1:]))
        procs[key] = (subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=_env(threads)), log_file)
    failed = []
    for key, (proc, log_file) in procs.items():
        rc = proc.wait()
        log_file.close()
        if rc != 0:
            tail = (out / f"train_{key}" / "train_stdout.txt").read_text(errors="replace").strip().splitlines()[-3:]
            failed.append(f"{MODELS[key]} exited with {rc}: {' | '.join(tail)}")
    if failed:
        raise UserError("demo training failed: " + "; ".join(failed))
    for key, model in MODELS.items():
        run_dir = out / f"train_{key}"
        stage.outputs[f"{key} weights"] = str(run_dir / "model.safetensors")
        stage.outputs[f"{key} learning curve"] = str(run_dir / "learning_curve.png")
        stage.outputs[f"{key} validation log"] = str(run_dir / "val_log.csv")
        rows = _read_csv(run_dir / "val_log.csv")
        if rows:
            last = rows[-1]
            for col, label in (("pq", "PQ"), ("pq_th", "Things PQ"), ("pq_st", "Stuff PQ")):
                stage.metrics[f"{key}: val {label} (step {last['step']}, {last['images']} images)"] = float(last[col])
        log_rows = _read_csv(run_dir / "train_log.csv")
        stage.metrics[f"{key}: training seconds"] = round(sum(float(r["sec"]) for r in log_rows), 1)
    stage.note = (f"{s.iters} steps each, both at once ({threads} thread(s) each on {cores} cores); validation PQ "
                  f"every {s.val_every} steps on the first {min(s.val_images, 32)} val images")


def stage_eval(stage: Stage, s: DemoSettings, data: Path, out: Path) -> None:
    """`harness eval` of both tiny models: clean + corruptions x severities, post-processors, all mask layers,
    Boundary PQ, thing-preference statistics."""
    if not _available("harness.engine.grid"):
        _clean_eval_only(stage, s, data, out)
        return
    for key, model in MODELS.items():
        run_dir = out / f"eval_{key}"
        argv = ["eval", "-q", "--weights", str(out / f"train_{key}" / "model.safetensors"), "--data", str(data),
                "--out", str(run_dir), "--subset", str(s.eval_images), "--corruptions", s.corruptions,
                "--severities", s.severities, "--post-process", s.post_process, "--layers", "all", "--boundary",
                "--thing-preference", "--workers", "1"]
        log.info("evaluating %s: harness %s", model, " ".join(argv))
        _run_cli(argv)
        stage.outputs[f"{key} results"] = str(run_dir / "results.csv")
    stage.note = (f"{s.eval_images} validation images (deterministic `--subset`), corruptions {s.corruptions}, "
                  f"severities {s.severities}, post-processing {s.post_process}, every mask layer, Boundary PQ")


def _clean_eval_only(stage: Stage, s: DemoSettings, data: Path, out: Path) -> None:
    """Before the robustness grid exists: clean images only, one `harness.engine.evaluate` run per post-processor,
    written as results-table rows (corruption "none", layer "last")."""
    import pandas as pd

    from harness.engine.evaluate import evaluate
    from harness.engine.results import RESULT_COLUMNS, pq_columns

    for key, model in MODELS.items():
        run_dir = out / f"eval_{key}"
        rows = []
        for method in s.post_process.split(","):
            t0 = time.perf_counter()
            res = evaluate(out / f"train_{key}" / "model.safetensors", data, run_dir / method.replace("*", "star"),
                           post_process_method=method, max_images=s.eval_images, boundary=True)
            rows.append({"model": model, "dataset": data.name, "split": "val2017", "subset": s.eval_images,
                         "corruption": "none", "severity": 0, "post_process": method, "layer": "last",
                         **pq_columns(res), "images": res.get("num_images", s.eval_images),
                         "sec_per_image": (time.perf_counter() - t0) / s.eval_images, "device": "cpu"})
        table = pd.DataFrame(rows).reindex(columns=RESULT_COLUMNS)
        run_dir.mkdir(parents=True, exist_ok=True)
        table.to_csv(run_dir / "results.csv", index=False)
        stage.outputs[f"{key} results"] = str(run_dir / "results.csv")
    stage.status = "ok (clean only)"
    stage.note = (f"`harness eval` with corruptions is not built yet: clean images only ({s.eval_images} images, "
                  f"{s.post_process}, last layer)")


def stage_results(stage: Stage, out: Path) -> None:
    """One results table of both models: ``results.csv`` and ``results.parquet`` (the grids' rows, as they are)."""
    import pandas as pd

    frames = [pd.read_csv(out / f"eval_{key}" / "results.csv") for key in MODELS]
    table = pd.concat(frames, ignore_index=True)
    from harness.io import atomic_write

    atomic_write(out / "results.csv", lambda p: table.to_csv(p, index=False))
    atomic_write(out / "results.parquet", lambda p: table.to_parquet(p, index=False))
    stage.outputs = {"results.csv": str(out / "results.csv"), "results.parquet": str(out / "results.parquet")}
    stage.metrics = headline_numbers(table)


def stage_report(stage: Stage, s: DemoSettings, run: DemoRun) -> None:
    """The report: `harness report` (analysis/) when available, else a plain Markdown summary of the results."""
    from harness.demo_summary import write_summary

    out = run.out
    runs = [str(out / f"eval_{key}") for key in MODELS]
    report_dir = out / "report"
    if _available("harness.commands.report"):
        _run_cli(["report", "-q", "--results", *runs, "--out", str(report_dir),
                  "--title", "psf-harness demo: tiny models on synthetic data"])
        stage.outputs["analysis report"] = str(report_dir / "report.md")
    else:
        stage.note = "`harness report` (analysis/) is not built yet: plain Markdown summary of the results table"
    path = write_summary(out, run, report_dir / "report.md" if "analysis report" in stage.outputs else None)
    stage.outputs["report"] = str(path)


# ---------------------------------------------------------------------------------------------------- helpers
def headline_numbers(table: Any) -> dict[str, float]:
    """Clean PQ / Things / Stuff, mPC and rPC of each model ((m) post-processing, last layer), in percent."""
    out: dict[str, float] = {}
    rows = table[(table["post_process"] == "m") & (table["layer"].astype(str) == "last")]
    for model, group in rows.groupby("model"):
        clean = group[group["corruption"] == "none"]
        corrupted = group[group["corruption"] != "none"]
        if clean.empty:
            continue
        c = clean.iloc[0]
        out[f"{model}: clean PQ"] = round(float(c["pq"]), 2)
        out[f"{model}: clean Things PQ"] = round(float(c["pq_th"]), 2)
        out[f"{model}: clean Stuff PQ"] = round(float(c["pq_st"]), 2)
        if not corrupted.empty:
            mpc = float(corrupted["pq"].mean())
            out[f"{model}: mPC"] = round(mpc, 2)
            out[f"{model}: rPC"] = round(mpc / float(c["pq"]), 3) if float(c["pq"]) > 0 else float("nan")
    return out


def _read_csv(path: Path) -> list[dict[str, str]]:
    import csv

    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _available(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False
