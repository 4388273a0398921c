"""`harness demo` end to end on a tiny synthetic set (every stage, a few training iterations)."""

from __future__ import annotations

import json
from pathlib import Path

from harness.cli import main


def test_demo_runs_every_stage_and_reports(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--train", "4", "--val", "2", "--size", "96", "--train-iters", "3", "-q"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert str((out / "report.md").resolve()) in printed
    stages = {s["name"]: s for s in json.loads((out / "stages.json").read_text())}
    assert all(s["status"] == "ok" for s in stages.values()), stages
    oracle = stages["oracle Mask PQ / Boundary PQ"]["metrics"]
    assert oracle["exact Mask PQ"] == 100.0 and oracle["exact Boundary PQ"] == 100.0
    # Losing a 2-px rim costs more boundary quality than mask quality.
    assert oracle["eroded_2px Boundary PQ"] < oracle["eroded_2px Mask PQ"] < 100.0
    for stage in stages.values():
        for path in stage["outputs"].values():
            assert Path(path).exists(), path
    report = (out / "report.md").read_text()
    assert "## Not built yet" in report and "baselines" in report
    assert "tiny model Mask PQ (All)" in report
