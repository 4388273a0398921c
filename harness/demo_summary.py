"""The demo's report page: its header (what ran, where, headline numbers, learning curves) and, when `harness
report` (analysis/) is not available, a plain Markdown summary of the results table in the shape of the paper's
Tables 7, 8, 10, 11 and B.6.

Every table says that it was measured on the synthetic data with the tiny models, on which machine. Nothing here
computes a metric: every number is read from the demo's results files (`results.csv`, the grids'
`thing_preference_bins.csv`, the training logs).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.io import atomic_write_text

if TYPE_CHECKING:
    from harness.demo_stages import DemoRun

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


def header(run: "DemoRun") -> list[str]:
    """What ran, on which machine, how long each stage took, the headline numbers and the learning curves."""
    from harness.demo_stages import MODELS, machine, machine_text

    s = run.settings
    where = machine_text(machine())
    lines = [MARK, "## Demo run", "",
             f"Measured on **synthetic data** (`harness synth`, {s.train_images} train / {s.val_images} val images, "
             f"long side {s.size}, seed {s.seed}) with the **tiny models** (`{MODELS['qd']}`, "
             f"`{MODELS['joint']}`; random-init backbones, {s.iters} training steps each) on **{where}**. "
             "These are not COCO numbers and not the paper's models.", ""]
    total = sum(st.seconds for st in run.stages.values())
    lines += _table(["stage", "status", "seconds"],
                    [[st.name, st.status, f"{st.seconds:.0f}"] for st in run.stages.values()]
                    + [["**total**", "", f"**{total:.0f}**"]])
    heads = {}
    for st in run.stages.values():
        heads.update({k: v for k, v in st.metrics.items() if "clean" in k or "mPC" in k or "rPC" in k})
    if heads:
        lines += ["", "**Headline numbers** ((m) post-processing, last layer, percent; rPC = mPC / clean):", ""]
        lines += _table(["model", "number", "value"],
                        [[k.split(": ")[0], k.split(": ")[1], _fmt(v, 3 if "rPC" in k else 1)]
                         for k, v in heads.items()])
    curves = [(key, run.out / f"train_{key}" / "learning_curve.png") for key in MODELS]
    if any(p.is_file() for _, p in curves):
        lines += ["", "Learning curves (loss terms and validation PQ; CSV: `train_*/train_log.csv`, "
                      "`train_*/val_log.csv`):", ""]
        lines += [f"![{key} learning curve]({p.relative_to(run.out)})" for key, p in curves if p.is_file()]
    return lines + [""]


def fallback_tables(out: Path, where: str) -> list[str]:
    """Tables 11, 7, 10, 8 and B.6 in plain Markdown from ``out/results.csv`` and the thing-preference bins."""
    import pandas as pd

    from harness.engine.results import CORRUPTIONS_TABLE11

    path = out / "results.csv"
    if not path.is_file():
        return ["No results table was written (the evaluation stage did not finish)."]
    t = pd.read_csv(path)
    t["layer"] = t["layer"].astype(str)
    caption = f"_Measured on the synthetic data with the tiny models on {where}; not the paper's numbers._"
    lines = ["## Results (plain summary of `results.csv`)", ""]
    m_last = t[(t["post_process"] == "m") & (t["layer"] == "last")]
    # Table 11: clean, mean over corruptions and severities, per corruption.
    rows = []
    for model, g in m_last.groupby("model"):
        clean = g[g["corruption"] == "none"]["pq"].mean()
        per = [g[g["corruption"] == c]["pq"].mean() for c in CORRUPTIONS_TABLE11]
        mean = g[g["corruption"] != "none"]["pq"].mean()
        rows.append([model, clean, mean] + per)
    if rows:
        lines += ["### Table 11 (demo version): PQ under the 16 corruptions, mean over the severities", "", caption,
                  ""] + _table(["model", "clean", "mean"] + CORRUPTIONS_TABLE11, rows) + [""]
    clean = t[t["corruption"] == "none"]
    # Table 7: post-processing methods, Mask PQ and Boundary PQ.
    rows = [[r["model"], r["post_process"], r["pq"], r["sq"], r["rq"], r["bpq"], r["bsq"], r["brq"]]
            for _, r in clean[clean["layer"] == "last"].iterrows()]
    if rows:
        lines += ["### Table 7 (demo version): post-processing, clean images", "", caption, ""]
        lines += _table(["model", "post-process", "PQ", "SQ", "RQ", "Boundary PQ", "Boundary SQ", "Boundary RQ"],
                        rows) + [""]
    # Table 10: masks of every mask-decoder layer.
    rows = [[r["model"], r["layer"], r["pq"], r["pq_th"], r["pq_st"], r["sec_per_image"]]
            for _, r in clean[clean["post_process"] == "m"].iterrows()]
    if rows:
        lines += ["### Table 10 (demo version): PQ of each mask-decoder layer ((m), clean)", "", caption, ""]
        lines += _table(["model", "layer", "PQ", "Things PQ", "Stuff PQ", "s / image"], rows) + [""]
    # Table 8: query decoupling vs joint matching.
    rows = [[r["model"], r["pq"], r["pq_th"], r["pq_st"]] for _, r in clean[(clean["post_process"] == "m")
                                                                            & (clean["layer"] == "last")].iterrows()]
    if len(rows) > 1:
        lines += ["### Table 8 (demo version): query decoupling vs joint matching ((m), clean)", "", caption, ""]
        lines += _table(["model", "PQ", "Things PQ", "Stuff PQ"], rows) + [""]
    for key in ("joint", "qd"):
        bins = out / f"eval_{key}" / "thing_preference_bins.csv"
        if bins.is_file():
            b = pd.read_csv(bins)
            lines += [f"### Table B.6 (demo version): thing preference of the {key} model's queries", "", caption,
                      ""] + _table(list(b.columns), b.values.tolist()) + [""]
    return lines


def write_summary(out: Path, run: "DemoRun", analysis_report: Path | None) -> Path:
    """``out/report.md``: the demo header, then the analysis report (links re-rooted) or the plain tables."""
    from harness.demo_stages import machine, machine_text

    lines = ["# psf-harness demo report", ""] + header(run)
    if analysis_report is not None and analysis_report.is_file():
        prefix = analysis_report.parent.relative_to(out).as_posix()
        body = analysis_report.read_text(encoding="utf-8").splitlines()
        if body and body[0].startswith("# "):
            body = body[1:]
        lines += [f"The tables and figures below are rendered by `harness report` (analysis/); the full report "
                  f"with LaTeX/CSV tables is in `{prefix}/` (`{prefix}/report.html`).", ""]
        lines += [_reroot(line, prefix) for line in body]
    else:
        lines += fallback_tables(out, machine_text(machine()))
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
