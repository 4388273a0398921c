"""The demo's report page: its header (what ran, where, stage times, headline numbers, learning curves) above the
report that `harness report` (analysis/) renders from the grids and sweeps (demo versions of Tables 7, 8, 10, 11,
B.2, B.3, B.4, B.6 and Fig. 7).

Nothing here computes a metric: every number is read from the demo's records (`demo.json`, the training logs).
"""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path
from typing import Any

from harness.io import atomic_write_text

MARK = "<!-- demo header -->"


def _fmt(v: Any, digits: int = 1) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "" if math.isnan(f) else f"{f:.{digits}f}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return lines


def header(run: Any, models: dict[str, str]) -> list[str]:
    """What ran, on which machine, how long each stage took, the headline numbers and the learning curves.

    Args:
        run: the demo's `harness.demo_stages.DemoRun` (``out``, ``settings``, ``stages``).
        models: run key (``qd``, ``joint``, ``baseline``) -> model name.
    """
    s = run.settings
    where = machine_text(machine())
    lines = [MARK, "## Demo run", "",
             f"Measured on **synthetic data** (`harness synth`, {s.train_images} train / {s.val_images} val images, "
             f"long side {s.size}, seed {s.seed}) with the **tiny models** (`{models['qd']}`, "
             f"`{models['joint']}` and the baseline `{models['baseline']}`; random-init backbones, {s.iters} "
             f"training steps each) on **{where}**. "
             "These are not COCO numbers and not the paper's models.", ""]
    total = sum(st.seconds for st in run.stages.values())
    lines += _table(["stage", "status", "seconds"],
                    [[st.name, st.status, f"{st.seconds:.0f}"] for st in run.stages.values()]
                    + [["**total**", "", f"**{total:.0f}**"]])
    heads = {}
    for st in run.stages.values():
        heads.update({k: v for k, v in st.metrics.items() if "clean" in k or "mPC" in k or "rPC" in k})
    if heads:
        lines += ["", "**Headline numbers** ((m) post-processing, the baseline's own inference; last layer; percent; "
                      "rPC = mPC / clean):", ""]
        lines += _table(["model", "number", "value"],
                        [[k.split(": ")[0], k.split(": ")[1], _fmt(v, 3 if "rPC" in k else 1)]
                         for k, v in heads.items()])
    curves = [(key, run.out / f"train_{key}" / "learning_curve.png") for key in models]
    if any(p.is_file() for _, p in curves):
        lines += ["", "Learning curves (loss terms and validation PQ; CSV: `train_*/train_log.csv`, "
                      "`train_*/val_log.csv`):", ""]
        lines += [f"![{key} learning curve]({p.relative_to(run.out)})" for key, p in curves if p.is_file()]
    return lines + [""]


def write_summary(out: Path, run: Any, models: dict[str, str], analysis_report: Path) -> Path:
    """``out/report.md``: the demo header (:func:`header`), then the analysis report (links re-rooted)."""
    lines = ["# psf-harness demo report", ""] + header(run, models)
    if analysis_report.is_file():
        prefix = analysis_report.parent.relative_to(out).as_posix()
        body = analysis_report.read_text(encoding="utf-8").splitlines()
        if body and body[0].startswith("# "):
            body = body[1:]
        lines += [f"The tables and figures below are rendered by `harness report` (analysis/); the full report "
                  f"with LaTeX/CSV tables is in `{prefix}/` (`{prefix}/report.html`).", ""]
        lines += [_reroot(line, prefix) for line in body]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _reroot(line: str, prefix: str) -> str:
    """Markdown image/link targets relative to the analysis report folder -> relative to the demo folder."""
    import re

    def fix(m: re.Match[str]) -> str:
        target = m.group(2)
        if "://" in target or target.startswith(("/", "#")):
            return m.group(0)
        return f"{m.group(1)}({prefix}/{target})"

    return re.sub(r"(!?\[[^\]]*\])\(([^)\s]+)\)", fix, line)


def machine() -> dict[str, Any]:
    """Where the numbers were measured: CPU, core count, load average, GPU (if any), torch."""
    import torch

    from harness.logging_utils import cpu_name

    cpu = cpu_name()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version(), "load_avg_1_5_15": [round(x, 2) for x in load]}


def machine_text(info: dict[str, Any]) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    load = info.get("load_avg_1_5_15", ["?"])
    return f"{info['cpu']}, {info['cores']} cores{gpu}, torch {info['torch']} (load average {load[0]} at the end)"
