"""The stages of `harness demo` and their bookkeeping (settings, resumable stage records).

Every stage calls what a user would call (`harness synth`, `harness train`, `harness eval`, `harness report`), so
the demo doubles as an integration check; nothing here is demo-only maths. The run folder keeps:

- ``.psf-harness.json``: the folder's output marker (command ``demo``, the settings, complete or not; see
  :class:`DemoRun`);
- ``demo.json``: the settings (a re-run with other settings is refused unless ``--fresh``) and one record per stage
  (status, seconds, outputs, metrics); a finished stage is skipped on the next run, an unfinished one resumes
  (training from its checkpoint, the evaluation grid from its finished cells);
- ``data/`` (synthetic data set), ``corruptions/`` (the COCO-C sheet), ``train_qd/``, ``train_joint/`` and
  ``train_baseline/`` (the three tiny models, learning curves; ``train_<key>.log`` beside them: the training
  processes' output), ``eval_qd/``, ``eval_joint/`` and ``eval_baseline/`` (`harness eval` grids), ``results.csv`` /
  ``results.parquet`` (all grids' rows), ``report.md`` (+ ``report/``: the analysis report's tables and figures).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.demo_summary import machine
from harness.errors import UserError
from harness.io import atomic_write_json

log = logging.getLogger(__name__)

DEMO_JSON = "demo.json"
COMMAND = "demo"
QD, JOINT = "panoptic_segformer_tiny", "panoptic_segformer_tiny_joint"
# The paper's fastest-converging baseline from scratch here (Table 11): after 1,500 steps maskformer_tiny scored
# PQ 4.2 on the demo data (its 0.8 object-mask threshold keeps nothing early on), panoptic_fcn_tiny 6.4 after 500.
BASELINE = "panoptic_fcn_tiny"
MODELS = {"qd": QD, "joint": JOINT, "baseline": BASELINE}


@dataclass(frozen=True)
class DemoSettings:
    """What the demo does; every number is in the report.

    Attributes:
        seed: data set seed.
        train_images / val_images: synthetic split sizes.
        size: long side of the synthetic images (the tiny configs' test scale).
        iters: training steps of each tiny Panoptic SegFormer.
        baseline_iters: training steps of the tiny baseline.
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
    iters: int = 3500
    baseline_iters: int = 600
    val_every: int = 500
    eval_images: int = 12
    corruptions: str = "all"
    severities: str = "1-5"
    post_process: str = "m,p,p*"
    quick: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


QUICK = DemoSettings(train_images=12, val_images=4, size=64, iters=12, baseline_iters=6, val_every=6,
                     eval_images=2, severities="3", quick=True)


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
    """The run folder: claimed as the demo's output (``.psf-harness.json``, the settings), settings and stage records
    in ``demo.json``, written after every stage.

    The folder must be new, empty or a demo's (one made before output markers existed is recognised from its
    ``demo.json``). A demo of other settings is refused, finished or not, unless ``fresh`` (``--fresh``), which
    deletes the demo's own files and sub-outputs (:func:`demo_files`, :func:`sub_outputs`) and nothing else.
    Stages write into sub-folders that the commands they run claim themselves (``data/`` by synth, ``train_*/`` by
    train, ``eval_*/`` by eval, ``report/`` by report).
    """

    def __init__(self, out: Path, settings: DemoSettings, fresh: bool = False) -> None:
        from harness.io import sweep_stale_temporaries
        from harness.outputs import check_claimable, claim_output_dir

        self.out = out
        self.settings = settings
        new = settings.to_dict()
        marker = check_claimable(out, COMMAND, legacy=_legacy_demo)  # not ours / another command's: refused
        if marker is not None and not fresh:
            old = marker["settings"]
            diff = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in list(new) + [k for k in old if k not in new]
                    if old.get(k) != new.get(k)]
            if diff:
                raise UserError(f"--out {out} holds a demo with other settings ({', '.join(diff[:4])}); re-run "
                                "with --fresh to start over (deleting only the demo's files), or choose another "
                                "--out")
        if fresh and marker is not None:
            check_removable(out)
        self.claim = claim_output_dir(out, COMMAND, new, overwrite=fresh, overwrite_flag="--fresh",
                                      legacy=_legacy_demo)
        swept = sweep_stale_temporaries(out, recursive=True)
        if swept:
            log.info("removed %d temporary file(s) of an interrupted run from %s", swept, out)
        if fresh:
            removed = remove_demo_entries(out)
            if removed:
                log.info("--fresh: deleted %d file(s) and folder(s) of the earlier demo in %s", removed, out)
            if self.claim.was_complete:
                self.claim.was_complete = False
                self.claim.extra.pop("finished_utc", None)
                self.claim.update()
        self.stages: dict[str, Stage] = _read_stages(out / DEMO_JSON)

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


def _harness_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness", *args]


def _env(threads: int) -> dict[str, str]:
    import harness

    root = str(Path(harness.__file__).resolve().parents[1])
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads)}


def _run_cli(argv: list[str]) -> None:
    """Run ``harness <argv>`` in this process, as a user would. Its mistake (one line) is raised as the demo's own
    error, naming the command; Ctrl-C and SIGTERM reach the demo unchanged (exit 130 / 143)."""
    from harness.cli import build_parser
    from models.files import InputError

    args = build_parser(argv[0]).parse_args(argv)
    root = logging.getLogger()
    level = root.level
    if args.quiet > args.verbose:
        root.setLevel(max(level, logging.WARNING))
    try:
        rc = int(args._run(args) or 0)
    except InputError as exc:
        if len(exc.args) == 1 and isinstance(exc.args[0], str):
            exc.args = (f"demo stage failed: harness {argv[0]}: {exc.args[0]}",)
        raise
    finally:
        root.setLevel(level)
    if rc != 0:
        raise UserError(f"demo stage failed: harness {' '.join(argv)} exited with {rc}")


PREVIEW_SHEET = Path("corruptions") / "coco_c_preview.png"


def demo_files() -> list[str]:
    """The files a demo writes into its folder itself (``--fresh`` deletes these, and :func:`sub_outputs`)."""
    return [DEMO_JSON, *[f"train_{key}.log" for key in MODELS], "results.csv", "results.parquet", "report.md",
            str(PREVIEW_SHEET)]


def sub_outputs() -> dict[str, tuple[str, Any, set[str]]]:
    """``{sub-folder: (command that claims it, its legacy-output recogniser, the names it writes there)}``."""
    from harness.commands.report import _legacy_report
    from harness.commands.synth import _legacy_settings
    from harness.engine import grid_config
    from harness.engine.train_outputs import RUN_FILES, legacy_for

    subs: dict[str, tuple[str, Any, set[str]]] = {
        "data": ("synth", _legacy_settings, {"train2017", "val2017", "annotations", "preview_val.png"}),
        "report": ("report", _legacy_report, {"report.md", "report.html", "tables", "figures"})}
    for key in MODELS:  # train_stdout.txt: the training log of demos made before output markers
        subs[f"train_{key}"] = ("train", legacy_for(None), {*RUN_FILES, "train_stdout.txt"})
        subs[f"eval_{key}"] = ("eval", grid_config.legacy_run, set(grid_config.RUN_FILES))
    return subs


def check_removable(out: Path) -> None:
    """Before ``--fresh`` deletes anything: every sub-folder it would delete is the output of the command the demo
    runs there and holds only names that command writes (a user's file there is refused, naming it)."""
    from harness.io import is_temporary
    from harness.outputs import MARKER_NAME, check_claimable
    from models.files import InputError

    for name, (command, legacy, own) in sub_outputs().items():
        p = out / name
        if p.is_symlink() or (p.exists() and not p.is_dir()):
            raise UserError(f"--fresh: not deleting {p}: the demo writes a folder there, this is not one")
        try:
            check_claimable(p, command, legacy=legacy)
        except InputError as exc:
            raise UserError(f"--fresh: not deleting {p}: {' '.join(str(exc).split())}") from None
        if p.is_dir():
            foreign = sorted(e.name for e in p.iterdir() if e.name not in own and e.name != MARKER_NAME
                             and not is_temporary(e.name))
            if foreign:
                raise UserError(f"--fresh: not deleting {p}: it holds {foreign[0]!r}, which harness {command} does "
                                "not write; move it away first")


def remove_demo_entries(out: Path) -> int:
    """Delete the demo's files and sub-outputs from ``out`` (call :func:`check_removable` first); returns how many."""
    removed = 0
    for name in sub_outputs():
        if (out / name).is_dir():
            shutil.rmtree(out / name)
            removed += 1
    for name in demo_files():
        p = out / name
        if p.is_file() or p.is_symlink():
            p.unlink()
            removed += 1
    try:
        (out / PREVIEW_SHEET.parent).rmdir()  # only when nothing else is in it
    except OSError:
        pass
    return removed


def _legacy_demo(out: Path) -> dict[str, Any] | None:
    """Settings of a demo folder made before output markers existed (from its ``demo.json``), or None."""
    try:
        doc = json.loads((out / DEMO_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("settings"), dict):
        return None
    stages = doc.get("stages") if isinstance(doc.get("stages"), list) else []
    done = any(isinstance(st, dict) and st.get("name") == "report" and st.get("status") == "ok" for st in stages)
    return {**doc["settings"], "status": "complete" if done else "incomplete"}


def _read_stages(path: Path) -> dict[str, Stage]:
    """The stage records of ``demo.json`` (none when it is absent); one line naming the file when it is damaged."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: unreadable demo record ({exc}); re-run with --fresh to start over") from None
    try:
        doc = json.loads(text)
        return {st["name"]: Stage(**st) for st in doc.get("stages", [])}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise UserError(f"{path}: not a demo record ({type(exc).__name__}: {exc}); re-run with --fresh to start "
                        "over") from None


# ---------------------------------------------------------------------------------------------------- stages
def stage_synth(stage: Stage, s: DemoSettings, data: Path) -> None:
    """The synthetic data set (COCO panoptic layout) and its preview sheet."""
    _run_cli(["synth", "-q", "--out", str(data), "--train", str(s.train_images), "--val", str(s.val_images),
              "--size", str(s.size), "--seed", str(s.seed), "--workers", str(min(2, os.cpu_count() or 1))])
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
    """Train the tiny query-decoupled, joint-matching and baseline models at the same time (one process and thread
    each, so the cores stay busy until the last one ends; `harness train`, resumable)."""
    cores = os.cpu_count() or 1
    threads = max(1, cores // 2)
    procs: dict[str, tuple[subprocess.Popen[bytes], Any]] = {}
    try:
        for key, model in MODELS.items():
            run_dir = out / f"train_{key}"
            run_dir.mkdir(parents=True, exist_ok=True)
            iters = s.baseline_iters if key == "baseline" else s.iters
            cmd = _harness_cmd("train", "-q", "--config", model, "--data", str(data), "--out", str(run_dir),
                               "--iters", str(iters), "--val-every", str(s.val_every),
                               "--val-images", str(min(s.val_images, 32)), "--checkpoint-every",
                               str(max(1, s.val_every)), "--seed", str(s.seed))
            # The log lies beside the training folder: `harness train` owns train_<key>/ (only its own files).
            log_file = open(out / f"train_{key}.log", "a", encoding="utf-8")  # noqa: SIM115 (closed below)
            log.info("training %s: %s", model, " ".join(cmd[1:]))
            procs[key] = (subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=_env(threads)),
                          log_file)
        failed = []
        for key, (proc, log_file) in procs.items():
            rc = proc.wait()
            if rc != 0:
                tail = (out / f"train_{key}.log").read_text(errors="replace").strip().splitlines()
                failed.append(f"{MODELS[key]} exited with {rc}: {' | '.join(tail[-3:])}")
        if failed:
            raise UserError("demo training failed: " + "; ".join(failed))
    finally:  # Ctrl-C / SIGTERM / an error: no training outlives the demo (each keeps its last checkpoint)
        for proc, _ in procs.values():  # all signalled first: a second Ctrl-C while waiting leaves no orphan
            if proc.poll() is None:
                proc.terminate()
        for proc, log_file in procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            log_file.close()
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
    stage.note = (f"{s.iters} steps each ({MODELS['baseline']}: {s.baseline_iters}), all at once ({threads} "
                  f"thread(s) each on {cores} cores); validation PQ "
                  f"every {s.val_every} steps on the first {min(s.val_images, 32)} val images")


def stage_eval(stage: Stage, s: DemoSettings, data: Path, out: Path) -> None:
    """`harness eval` of the tiny models: clean + corruptions x severities, post-processors, all mask layers,
    Boundary PQ, thing-preference statistics (the baseline: its own post-processing, last layer)."""
    for key, model in MODELS.items():
        run_dir = out / f"eval_{key}"
        argv = ["eval", "-q", "--weights", str(out / f"train_{key}" / "model.safetensors"), "--data", str(data),
                "--out", str(run_dir), "--subset", str(s.eval_images), "--corruptions", s.corruptions,
                "--severities", s.severities, "--boundary", "--workers", "1"]
        if key != "baseline":  # post-processors and per-layer masks are Panoptic SegFormer's
            argv += ["--post-process", s.post_process, "--layers", "all", "--thing-preference"]
        log.info("evaluating %s: harness %s", model, " ".join(argv))
        _run_cli(argv)
        stage.outputs[f"{key} results"] = str(run_dir / "results.csv")
    stage.note = (f"{s.eval_images} validation images (deterministic `--subset`), corruptions {s.corruptions}, "
                  f"severities {s.severities}, post-processing {s.post_process}, every mask layer, Boundary PQ; "
                  f"baseline {MODELS['baseline']}: its own inference, last layer")


def stage_sweeps(stage: Stage, s: DemoSettings, data: Path, out: Path) -> None:
    """Tables B.3 / B.4: the query-decoupled model's clean candidates saved once (`harness eval --save-candidates`),
    then re-merged over alpha/beta and t_cnf/t_keep grids without new inference (`harness sweep`)."""
    cand = out / "candidates_qd"
    _run_cli(["eval", "-q", "--weights", str(out / "train_qd" / "model.safetensors"), "--data", str(data),
              "--out", str(cand), "--subset", str(s.eval_images), "--post-process", "m", "--save-candidates",
              "--workers", "1"])
    grids = {"sweep_ab": ["--alpha", "0,1", "--beta", "0,1,2,3"],
             "sweep_thresholds": ["--t-cnf", "0.2,0.25,0.3,0.35,0.4", "--t-keep", "0.9,0.8,0.7,0.6,0.5"]}
    for name, values in grids.items():
        _run_cli(["sweep", "-q", "--candidates", str(cand), "--cells", "none_0", *values, "--out", str(out / name)])
        stage.outputs[name] = str(out / name / "results.csv")
    stage.note = (f"{s.eval_images} clean images, (m) on the saved candidates of {MODELS['qd']}: alpha x beta "
                  "(Table B.3) and t_cnf x t_keep (Table B.4)")


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
    """The report: `harness report` (analysis/) over the grids, under the demo's header (`harness.demo_summary`)."""
    from harness.demo_summary import write_summary

    out = run.out
    report_dir = out / "report"
    runs = [out / f"eval_{key}" for key in MODELS] + [out / name for name in ("sweep_ab", "sweep_thresholds")]
    _run_cli(["report", "-q", "--results", *[str(r) for r in runs if r.is_dir()], "--out", str(report_dir),
              "--title", "psf-harness demo: tiny models on synthetic data"])
    stage.outputs["analysis report"] = str(report_dir / "report.md")
    stage.outputs["report"] = str(write_summary(out, run, MODELS, report_dir / "report.md"))


# ---------------------------------------------------------------------------------------------------- helpers
def headline_numbers(table: Any) -> dict[str, float]:
    """Clean PQ / Things / Stuff, mPC and rPC of each model, in percent: (m) post-processing for Panoptic SegFormer,
    the model's own inference for a baseline; last layer."""
    out: dict[str, float] = {}
    last = table[table["layer"].astype(str) == "last"]
    for model, group in last.groupby("model"):
        methods = set(group["post_process"])
        group = group[group["post_process"] == ("m" if "m" in methods else sorted(methods)[0])]
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
