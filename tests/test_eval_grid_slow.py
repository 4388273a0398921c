"""`harness eval` grid across processes: SIGKILL + resume, torchrun with 2 gloo processes, worker processes.

Each compares the metric columns of the results table with one uninterrupted single-process run, to the last bit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from test_eval_grid import grid, metrics, trained_tiny

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ["--corruptions", "fog,gaussian_noise", "--severities", "1", "--post-process", "m,p", "--boundary",
            "--thing-preference"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory, synth_root: Path) -> Path:
    return trained_tiny(tmp_path_factory, synth_root)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, weights: Path, synth_root: Path) -> Path:
    """The uninterrupted single-process run, inline scoring."""
    out = tmp_path_factory.mktemp("single") / "run"
    grid(weights, synth_root, out, corruptions="fog,gaussian_noise", severities="1", post_process="m,p",
         boundary=True, thing_preference=True)
    return out


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _args(weights: Path, data: Path, out: Path) -> list[str]:
    return ["--weights", str(weights), "--data", str(data), "--out", str(out), "--warmup", "0",
            "--timing-images", "1", "-q", *SETTINGS]


def _same_run(a: Path, b: Path) -> None:
    pd.testing.assert_frame_equal(metrics(pd.read_parquet(a / "results.parquet")),
                                  metrics(pd.read_parquet(b / "results.parquet")))
    pd.testing.assert_frame_equal(pd.read_parquet(a / "per_class.parquet"), pd.read_parquet(b / "per_class.parquet"))
    pd.testing.assert_frame_equal(pd.read_parquet(a / "thing_preference.parquet"),
                                  pd.read_parquet(b / "thing_preference.parquet"))


def test_sigkill_then_resume_equals_uninterrupted(single: Path, weights: Path, synth_root: Path,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "harness", "eval", *_args(weights, synth_root, out), "--workers", "0",
           "--score-workers", "0"]
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    first = out / "cells" / "none_0.json"
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its worker processes, mid-way through the grid
    _, err = proc.communicate()
    assert first.exists(), err.decode()[-2000:]
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "cells" / "fog_1.json").exists(), "killed too late to test resumption"
    done = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    _same_run(out, single)


def test_two_gloo_processes_equal_one(single: Path, weights: Path, synth_root: Path,
                                      tmp_path: Path) -> None:
    out = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    cmd = [*launcher, "--standalone", "--nproc-per-node", "2", "-m", "harness", "eval",
           *_args(weights, synth_root, out), "--workers", "0", "--score-workers", "0"]
    done = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    _same_run(out, single)
    assert pd.read_parquet(out / "results.parquet")["device"].str.startswith("2 x cpu").all()


def test_worker_processes_equal_inline(single: Path, weights: Path, synth_root: Path, tmp_path: Path) -> None:
    grid(weights, synth_root, tmp_path / "run", corruptions="fog,gaussian_noise", severities="1", post_process="m,p",
         boundary=True, thing_preference=True, workers=1, score_workers=1)
    _same_run(tmp_path / "run", single)
