"""The table-driven CLI harness of the issue #15 tests (tests/test_cli_errors*.py): run many ``harness`` command
lines in ONE ``python`` subprocess (imports paid once) and report, per case, the exit status, the process's own
stdout/stderr (file-descriptor level, so C-library messages are seen too) and what changed in a guarded folder.

Not a test module (no ``test_`` prefix): the test files import :func:`run_cases` and :class:`Case`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


@dataclass
class Case:
    """One CLI run. `argv` strings may use {ws} (the workspace) and {out} (a fresh scratch folder per case).

    Attributes:
        rc: expected exit status.
        needles: must all appear in stderr (case-insensitive).
        one_line: stderr is exactly one line (error cases).
        midrun: found while processing (after progress log lines): exactly one ERROR line, the last.
        forbid: must not appear in stderr.
        umask: run the case under this umask (its outputs' modes are checked by the test file).
        extra: preparation hints the test file interprets (copies, symlinks, files to write).
    """

    id: str
    argv: list[str]
    rc: int = 2
    needles: tuple[str, ...] = ()
    one_line: bool = True
    midrun: bool = False
    forbid: tuple[str, ...] = ()
    umask: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


RUNNER = r"""
import hashlib, json, os, sys, time, traceback
from pathlib import Path

cases = json.loads(Path(sys.argv[1]).read_text())
from harness.cli import main


_digests = {}  # (path, inode, size, mtime, ctime) -> sha256: a file is re-read only when its inode or times change


def tree(root):
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            out[os.path.relpath(p, root)] = "dir" if not os.path.islink(p) else "link"
        for f in filenames:
            p = os.path.join(dirpath, f)
            st = os.lstat(p)
            key = (p, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            digest = _digests.get(key)
            if digest is None:
                data = open(p, "rb").read() if not os.path.islink(p) else os.readlink(p).encode()
                digest = _digests[key] = hashlib.sha256(data).hexdigest()
            out[os.path.relpath(p, root)] = digest + f":{st.st_mode:o}"
    return out


results = {}
for c in cases:
    before = tree(c["guard"])
    sys.stdout.flush(); sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fo = os.open(c["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    fe = os.open(c["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fo, 1); os.dup2(fe, 2)
    mask = os.umask(c["umask"]) if c.get("umask") is not None else None
    t0 = time.perf_counter()
    try:
        try:
            rc = main(c["argv"])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            rc = -1
    finally:
        if mask is not None:
            os.umask(mask)
        sys.stdout.flush(); sys.stderr.flush()
        os.dup2(saved[0], 1); os.dup2(saved[1], 2)
        for fd in (fo, fe, *saved):
            os.close(fd)
    after = tree(c["guard"])
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    results[c["id"]] = {"rc": rc, "changed": changed, "seconds": time.perf_counter() - t0}
print(json.dumps(results))
"""


def run_cases(cases: Sequence[Case], ws: Path, scratch: Path, logs: Path, timeout: float = 900) -> dict[str, Any]:
    """Run `cases` in order in one subprocess; ``{id: {"rc", "changed", "seconds", "stdout", "stderr", "out"}}``.

    `ws` is the guarded workspace (every case's before/after tree is compared); each case gets ``scratch/<id>`` as
    ``{out}``.
    """
    todo = []
    for case in cases:
        out = scratch / case.id
        out.mkdir(parents=True, exist_ok=True)
        argv = [a.replace("{ws}", str(ws)).replace("{out}", str(out)) for a in case.argv]
        todo.append({"id": case.id, "argv": argv, "guard": str(ws), "umask": case.umask,
                     "stdout": str(logs / f"{case.id}.out"), "stderr": str(logs / f"{case.id}.err")})
    spec = logs / "cases.json"
    spec.write_text(json.dumps(todo))
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(spec)], env=ENV, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for case, item in zip(cases, todo):
        r = results[case.id]
        r["stdout"] = Path(item["stdout"]).read_text(errors="replace")
        r["stderr"] = Path(item["stderr"]).read_text(errors="replace")
        r["out"] = scratch / case.id
    return results


def check_case(r: dict[str, Any], case: Case) -> None:
    """The promise, for one case's result (see :class:`Case`)."""
    err, out = r["stderr"], r["stdout"]
    assert r["rc"] == case.rc, f"exit {r['rc']}, expected {case.rc}; stderr:\n{err}"
    assert "Traceback" not in err and "Traceback" not in out
    if case.rc == 2:
        assert r["changed"] == [], f"a refused run changed {r['changed'][:5]}"
        assert out == "", f"stdout of a refused run: {out!r}"
    if case.one_line and not case.midrun:
        assert err.count("\n") == 1 and err.endswith("\n"), f"expected one line, got:\n{err}"
    if case.midrun:
        lines = err.splitlines()
        assert lines and lines[-1].startswith("ERROR ") and sum(ln.startswith("ERROR") for ln in lines) == 1, err
        assert all(ln.startswith(("INFO ", "WARNING ")) for ln in lines[:-1]), err
    for needle in case.needles:
        assert needle.lower() in err.lower(), f"{needle!r} not in {err!r}"
    for bad in case.forbid:
        assert bad not in err, f"{bad!r} in {err!r}"
    # Every line we print has our own prefix: no bare C-library message, no usage block.
    for line in err.splitlines():
        assert line.startswith(("ERROR ", "WARNING ", "INFO ", "harness")), f"foreign stderr line {line!r}"
