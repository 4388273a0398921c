"""The shared mechanisms behind "every user mistake is one clear line, and no run ever destroys data"."""

from __future__ import annotations

import argparse
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.commands._common import check_output, device, float_range, image_size, int_range
from harness.errors import UserError
from harness.io import atomic_write, atomic_write_text, is_temporary, sweep_stale_temporaries
from models.safe_load import UnsafeCheckpointError, pickle_load, torch_load
from _helpers import Evil as _Evil


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "-1", "abc", "", "1e400"])
def test_float_range_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        float_range(0.0, 10.0)(text)


@pytest.mark.parametrize("text", ["-1", "1e3", "2.5", "x", "1000000001"])
def test_int_range_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        int_range(0, 1_000_000_000)(text)


def test_ranges_accept_and_bound() -> None:
    assert int_range(1, 5)(" 3 ") == 3 and float_range(0, 1, lo_open=True)("0.5") == 0.5
    with pytest.raises(argparse.ArgumentTypeError, match="outside"):
        float_range(0, 1, lo_open=True)("0")
    assert device("cuda:1") == "cuda:1" and image_size("800x1333") == (800, 1333)
    for bad in ("gpu", "cuda:", "tpu"):
        with pytest.raises(argparse.ArgumentTypeError):
            device(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        image_size("800x100000")


def test_check_output(tmp_path: Path) -> None:
    src = tmp_path / "in.png"
    src.write_bytes(b"x")
    with pytest.raises(UserError, match="also an input"):
        check_output(src, "--out", inputs=[src])
    link = tmp_path / "alias.png"
    link.symlink_to(src)
    with pytest.raises(UserError, match="also an input"):
        check_output(link, "--out", inputs=[src])
    with pytest.raises(UserError, match="is a file"):
        check_output(src / "sub" / "out.png", "--out")
    with pytest.raises(UserError, match="is a folder"):
        check_output(tmp_path, "--out", kind="file")
    with pytest.raises(UserError, match="expected a folder"):
        check_output(src, "--out", kind="dir")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # root ignores permissions
            with pytest.raises(UserError, match="not writable"):
                check_output(ro / "x" / "y.json", "--out")
    finally:
        ro.chmod(0o700)
    assert check_output(tmp_path / "new" / "deep" / "r.json", "--out") == tmp_path / "new" / "deep" / "r.json"


def test_atomic_write_applies_umask_and_keeps_old_content(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        p = atomic_write_text(tmp_path / "a.json", "{}")
        assert p.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)

    def boom(path: Path) -> None:
        path.write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "a.json", boom)
    assert (tmp_path / "a.json").read_text() == "{}"
    assert [q.name for q in tmp_path.iterdir()] == ["a.json"]


def test_sweep_removes_only_dead_processes_temporaries(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".img.tmp-{dead.pid}-abc123.png"
    live = tmp_path / f".img.tmp-{os.getppid()}-def456.png"
    for p in (stale, live):
        p.write_bytes(b"")
    assert is_temporary(stale.name) and not is_temporary("img.png") and not is_temporary(".hidden.png")
    assert sweep_stale_temporaries(tmp_path) == 1
    assert not stale.exists() and live.exists()


def test_sigterm_is_handled_like_ctrl_c(tmp_path: Path) -> None:
    """A SIGTERM during a long write leaves no temporary file and exits 143 with one line."""
    script = (
        "import sys, time\n"
        "from harness import cli\n"
        "from harness.io import atomic_write\n"
        "def slow(p):\n"
        "    p.write_text('x'); print('ready', flush=True); time.sleep(30)\n"
        "cli.COMMANDS[:] = []\n"
        "import argparse\n"
        "args = argparse.Namespace(command='x', verbose=0, quiet=0, _run=lambda a: atomic_write(sys.argv[1], slow))\n"
        "cli.OneLineParser.parse_args = lambda self, argv=None: args\n"
        "sys.exit(cli.main([]))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "out.txt")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert err.strip().count("\n") == 0 and "terminated" in err
    assert list(tmp_path.iterdir()) == []


def test_safe_loading_refuses_code_and_garbage(tmp_path: Path) -> None:
    torch.save({"state_dict": {"w": torch.ones(2)}, "meta": {"epoch": np.int64(3), "CLASSES": ("a",)},
                "args": argparse.Namespace(lr=1e-4)}, tmp_path / "ok.pth")
    obj = torch_load(tmp_path / "ok.pth")
    assert torch.equal(obj["state_dict"]["w"], torch.ones(2)) and obj["args"].lr == 1e-4
    torch.save({"x": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match="evil.pth.*could run code.*system"):
        torch_load(tmp_path / "evil.pth")
    (tmp_path / "random.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "text.pth").write_text("hello")
    for name in ("random.pth", "text.pth"):
        with pytest.raises(UnsafeCheckpointError, match=name):
            torch_load(tmp_path / name)
    with open(tmp_path / "ok.pkl", "wb") as fh:
        pickle.dump({"model": {"w": np.ones((2, 3), np.float32)}}, fh)
    assert pickle_load(tmp_path / "ok.pkl")["model"]["w"].shape == (2, 3)
    with open(tmp_path / "evil.pkl", "wb") as fh:
        pickle.dump([_Evil()], fh)
    with pytest.raises(UnsafeCheckpointError, match="could run code"):
        pickle_load(tmp_path / "evil.pkl")


def test_argument_errors_are_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "harness", "synth", "--train", "abc", "--out", "x"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "--train" in proc.stderr


def test_worker_stopped_while_loading_exits_silently() -> None:
    """A pool worker still loading (imports, JIT warm-up) ignores Ctrl-C (the parent handles it) and dies of
    SIGTERM at once, printing nothing: a Python-level exit there would be swallowed by a JIT/ctypes callback and end
    in a library traceback (seen with numba's cache). After loading, SIGTERM is a quiet SystemExit(143)."""
    loading = ("import sys, time\nfrom harness.io import init_worker_signals\n"
               "def load():\n    print('loading', flush=True)\n    time.sleep(60)\n"
               "init_worker_signals(load)\n")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.Popen([sys.executable, "-c", loading], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "loading"
    proc.send_signal(signal.SIGINT)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=1.0)  # still loading: SIGINT ignored
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM and err == ""

    ready = ("import time\nfrom harness.io import init_worker_signals\n"
             "init_worker_signals(lambda: None)\nprint('ready', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", ready], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and "Traceback" not in err


def test_signal_during_exit_callbacks_is_ignored() -> None:
    """A SIGTERM that arrives while a worker runs atexit callbacks registered after ours (a module imported lazily)
    does not raise there ("Exception ignored in atexit callback" + traceback): the worker is exiting anyway."""
    code = ("import atexit, os, signal, time\nfrom harness.io import init_worker_signals\n"
            "init_worker_signals(lambda: None)\n"
            "def late():\n    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(0.2)\n    print('finished', flush=True)\n"
            "atexit.register(late)\n")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(repo)})
    assert proc.returncode == 0 and proc.stdout.strip() == "finished" and proc.stderr == "", proc.stderr
