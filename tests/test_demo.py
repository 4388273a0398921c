"""`harness demo --quick` end to end (every stage, a few training steps), resuming, --fresh and bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest

from harness.cli import main


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, float]:
    out = tmp_path_factory.mktemp("demo") / "demo"
    t0 = time.perf_counter()
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["demo", "--quick", "--out", str(out), "-q"]) == 0
    return out, buf.getvalue(), time.perf_counter() - t0


def test_quick_demo_runs_every_stage_and_reports(quick_demo: tuple[Path, str, float]) -> None:
    out, printed, _ = quick_demo
    assert str((out / "report.md").resolve()) in printed and "clean PQ" in printed
    doc = json.loads((out / "demo.json").read_text())
    stages = {s["name"]: s for s in doc["stages"]}
    assert all(s["status"].startswith("ok") for s in stages.values()), stages
    for stage in stages.values():
        for path in stage["outputs"].values():
            assert Path(path).exists(), path
    for key in ("qd", "joint"):
        assert (out / f"train_{key}" / "learning_curve.png").is_file()
        assert (out / f"train_{key}" / "val_log.csv").is_file()
    table = pd.read_csv(out / "results.csv")
    from harness.demo_stages import MODELS

    assert set(table["model"]) == set(MODELS.values())
    # The folder and every stage's sub-folder are claimed outputs, complete; the training logs lie beside them.
    claimed = {".": "demo", "data": "synth", "report": "report",
               **{f"{kind}_{key}": kind for key in MODELS for kind in ("train", "eval")}}
    for name, command in claimed.items():
        marker = json.loads((out / name / ".psf-harness.json").read_text())
        assert (marker["command"], marker["status"]) == (command, "complete"), name
    assert all((out / f"train_{key}.log").is_file() for key in MODELS)
    assert {"m", "p", "p*"} <= set(table["post_process"])
    report = (out / "report.md").read_text()
    assert "synthetic data" in report and "tiny models" in report and "cores" in report
    assert "learning_curve.png" in report


def test_rerun_reuses_finished_stages(quick_demo: tuple[Path, str, float]) -> None:
    out, _, first = quick_demo
    before = json.loads((out / "demo.json").read_text())["stages"]
    t0 = time.perf_counter()
    assert main(["demo", "--quick", "--out", str(out), "-q"]) == 0
    assert time.perf_counter() - t0 < max(20.0, first / 3)
    after = json.loads((out / "demo.json").read_text())["stages"]
    done = [s["name"] for s in before if s["status"] == "ok"]
    assert done and all(a["seconds"] == b["seconds"] for a, b in zip(after, before) if a["name"] in done)


def test_other_settings_are_refused_and_fresh_starts_over(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from harness.demo_stages import QUICK, DemoRun

    out = tmp_path / "demo"
    run = DemoRun(out, QUICK)
    run.save()
    (out / "leftover.txt").write_text("x")
    assert main(["demo", "--quick", "--iters", "99", "--out", str(out), "-q"]) == 2
    assert "other settings" in capsys.readouterr().err and (out / "leftover.txt").exists()
    DemoRun(out, QUICK, fresh=True)  # deletes the demo's own files, and only those
    assert not (out / "demo.json").exists() and (out / "leftover.txt").exists()
    # --fresh never deletes a folder that is not a demo's.
    other = tmp_path / "precious"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    assert main(["demo", "--quick", "--fresh", "--out", str(other), "-q"]) == 2
    assert (other / "thesis.tex").exists()
    assert main(["demo", "--quick", "--eval-images", "99", "--out", str(tmp_path / "x"), "-q"]) == 2
