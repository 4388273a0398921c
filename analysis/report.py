"""The report: ``DIR/report.md`` and one self-contained ``DIR/report.html`` from run folders.

Contents: headline numbers (clean PQ, mPC, rPC per model), every paper table whose rows are present (measured /
paper / difference; ``DIR/tables/table_<id>.{md,tex,csv,json}``), every figure the data allow (``DIR/figures/``)
and provenance (inputs, commits, run settings, weights checksums, devices, the machine that wrote the report).

    from analysis.report import write_report
    write_report(["runs/demo/eval_qd", "runs/demo/eval_joint"], "runs/demo/report")

``harness report`` calls this and adds Fig. 5 pictures re-merged from saved candidates (a harness job, since it
runs post-processing); :class:`Picture` is how such pictures come in.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from analysis import figures
from analysis.model_names import default_post_process, is_demo_model
from analysis.paper import paper_table
from analysis.runs import RunData, load_runs, unique_values
from analysis.tables import RenderedTable, build_tables, write_table
from analysis.thing_preference import bins_from_queries, regression
from harness.engine.results import CLEAN
from harness.io import atomic_write_text

__all__ = ["Picture", "Figure", "write_report", "headline", "make_figures", "Report"]

log = logging.getLogger(__name__)


@dataclass
class Picture:
    """A Fig. 5-style comparison on one image: the image and one panoptic map per method.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        panels: (method title, (H, W) segment-id map, COCO ``segments_info``).
        categories: COCO categories of the data set.
        title: e.g. the model, image id and cell.
    """

    image: np.ndarray
    panels: list[tuple[str, np.ndarray, list[dict[str, Any]]]]
    categories: list[dict[str, Any]]
    title: str = ""


@dataclass
class Figure:
    """A written figure and its caption."""

    path: Path
    caption: str


@dataclass
class Report:
    """What :func:`write_report` wrote."""

    markdown: Path
    html: Path
    tables: list[RenderedTable] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)  # every file written


def headline(data: RunData) -> pd.DataFrame:
    """Per (model, variant, post-processor) at the last layer: clean PQ / PQ^th / PQ^st, mPC, rPC, images,
    dataset, device. mPC = mean over the corruptions and severities measured; rPC = mPC / clean."""
    rows = []
    df = data.eval_rows
    df = df[df["layer"] == "last"]
    for (model, variant, pp), g in df.groupby(["model", "variant", "post_process"], sort=False):
        clean = g[g["corruption"] == CLEAN]
        if clean.empty:
            continue
        c = clean.iloc[-1]
        corr = g[(g["corruption"] != CLEAN) & (g["severity"] > 0)]
        mpc = float(corr.groupby("corruption")["pq"].mean().mean()) if len(corr) else math.nan
        rows.append({"model": model, "variant": variant, "post_process": pp, "PQ": c["pq"], "PQ_th": c["pq_th"],
                     "PQ_st": c["pq_st"], "mPC": mpc, "rPC": mpc / c["pq"] if c["pq"] else math.nan,
                     "corruptions": int(corr["corruption"].nunique()), "images": c["images"],
                     "dataset": c["dataset"], "device": c["device"], "demo": is_demo_model(model)})
    return pd.DataFrame(rows)


def _title_suffix(df: pd.DataFrame) -> str:
    demo = bool(len(df)) and all(is_demo_model(m) for m in df["model"].unique())
    where = ", ".join(unique_values(df["dataset"])) if len(df) else ""
    return f" — {'demo: tiny models, ' if demo else ''}{where}" if where else ""


def make_figures(data: RunData, out_dir: str | Path, pictures: Sequence[Picture] = ()) -> list[Figure]:
    """Every figure the data allow, written to ``out_dir``."""
    out = Path(out_dir)
    figs: list[Figure] = []
    ev = data.eval_rows

    def add(name: str, caption: str, fn: Callable[[Path], Path]) -> None:
        try:
            figs.append(Figure(fn(out / name), caption))
        except (ValueError, KeyError) as exc:  # a figure the data cannot support is skipped, not fatal
            log.warning("figure %s skipped: %s", name, exc)

    corr = ev[ev["corruption"] != CLEAN]
    if len(corr):
        sub = ev[ev["model"].isin(corr["model"].unique())]
        sfx = _title_suffix(sub)
        add("robustness_heatmap.png", "Table 11 as a heat map: PQ per corruption (mean over severities).",
            lambda p: figures.robustness_heatmap(sub, p, title=f"PQ under corruption{sfx}"))
        add("corruption_families.png", "Clean vs mean under corruption, and per corruption family.",
            lambda p: figures.corruption_family_bars(sub, p, title=f"Clean vs corrupted{sfx}"))
        add("severity_curves.png", "PQ vs severity for each corruption (0 = clean).",
            lambda p: figures.severity_curves(sub, p, title=f"PQ vs severity{sfx}"))
    layered = ev.groupby("model")["layer"].nunique()
    if (layered > 1).any():
        sub = ev[ev["model"].isin(layered[layered > 1].index)]
        add("per_layer.png", "Table 10: PQ and speed per mask-decoder layer.",
            lambda p: figures.per_layer(sub, p, title=f"Per-layer results{_title_suffix(sub)}"))
    tp = data.thing_preference
    if len(tp):
        add("thing_preference.png", "Fig. 7: stuff precision vs thing preference per query, with the fit.",
            lambda p: figures.thing_preference_scatter(tp, p))
        for model, g in tp.groupby("model", sort=False):
            if (g["kind"] == "shared").any():
                paper = pd.DataFrame(paper_table("B6").rows)
                add(f"thing_preference_bins_{model}.png",
                    f"Table B.6 bins of {model} (markers: the paper's precisions, R50 on COCO).",
                    lambda p, g=g, paper=paper: figures.thing_preference_bins(bins_from_queries(g), p, paper=paper))
    sw = data.sweep_rows
    if len(sw):
        if sw["alpha"].nunique() > 1 or sw["beta"].nunique() > 1:
            add("alpha_beta.png", "Table B.3: PQ over alpha x beta (harness sweep).",
                lambda p: figures.alpha_beta_heatmap(sw, p))
        if sw["t_cnf"].nunique() > 1 or sw["t_keep"].nunique() > 1:
            add("thresholds.png", "Table B.4: PQ over t_cnf x t_keep (harness sweep).",
                lambda p: figures.threshold_heatmap(sw, p))
    for i, pic in enumerate(pictures):
        add(f"merge_vs_argmax_{i}.png", f"Fig. 5 style: {pic.title or 'post-processing methods on one image'}.",
            lambda p, pic=pic: figures.merge_comparison(pic.image, pic.panels, pic.categories, p, title=pic.title))
    for i, npz in enumerate(data.attention[:2]):
        add(f"attention_{i}.png", f"Fig. 6 / B.6: mask-decoder attention per layer and head ({npz.name}).",
            lambda p, npz=npz: figures.attention_maps(npz, p))
    return figs


def _machine() -> dict[str, str]:
    from importlib import metadata

    info = {"platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine()}
    for pkg in ("torch", "numpy", "pandas", "matplotlib", "psf-harness"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return info


def _provenance(data: RunData) -> dict[str, Any]:
    res = data.results
    runs = {}
    for run_dir, meta in data.runs.items():
        sel = res[res["run_dir"] == run_dir] if len(res) else res
        runs[run_dir] = {
            "settings": {k: v for k, v in meta.items() if not isinstance(v, (list, dict)) or len(json.dumps(v)) < 400},
            "models": unique_values(sel["model"]) if len(sel) else [],
            "rows": int(len(sel)),
        }
    weights = {}
    if len(res):
        for m, g in res.groupby("model"):
            weights[str(m)] = unique_values(g["weights_sha256"])
    return {"inputs": data.inputs, "commits": unique_values(res["commit"]) if len(res) else [],
            "devices": unique_values(res["device"]) if len(res) else [],
            "datasets": unique_values(res["dataset"]) if len(res) else [], "weights_sha256": weights,
            "runs": runs, "report_machine": _machine(),
            "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _fmt(v: Any, nd: int = 1) -> str:
    if isinstance(v, (float, np.floating)):
        return "" if math.isnan(v) else (f"{int(v)}" if nd == 0 else f"{v:.{nd}f}")
    return str(v)


def _headline_md(h: pd.DataFrame) -> list[str]:
    if h.empty:
        return ["No clean rows in the inputs."]
    cols = ["model", "variant", "post_process", "PQ", "PQ_th", "PQ_st", "mPC", "rPC", "corruptions", "images",
            "dataset", "device"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in h.to_dict("records"):
        lines.append("| " + " | ".join(_fmt(r[c], {"rPC": 3, "images": 0}.get(c, 1)) for c in cols) + " |")
    if h["demo"].any():
        lines += ["", "Rows of tiny models (`*_tiny*`) are demo measurements on synthetic data, not paper models."]
    return lines


def _summary_lines(data: RunData) -> list[str]:
    """A few sentences a reader wants first."""
    lines = []
    h = headline(data)
    main = h[[pp == default_post_process(m) for m, pp in zip(h["model"], h["post_process"])]] if len(h) else h
    for r in main.to_dict("records"):
        s = f"- **{r['model']}**{'' if r['variant'] == 'default' else ' [' + r['variant'] + ']'} " \
            f"({r['post_process']}): clean PQ {r['PQ']:.1f} (things {r['PQ_th']:.1f}, stuff {r['PQ_st']:.1f})"
        if not math.isnan(r["mPC"]):
            s += f"; mPC {r['mPC']:.1f} over {r['corruptions']} corruption(s), rPC {r['rPC']:.3f}"
        lines.append(s + f" — {r['dataset']}, {int(r['images']) if not math.isnan(r['images']) else '?'} images, "
                     f"{r['device']}.")
    tp = data.thing_preference
    for model, g in tp.groupby("model", sort=False) if len(tp) else []:
        if (g["kind"] == "shared").any():
            fit = regression(g)
            if math.isnan(fit["slope"]):  # < 2 queries with stuff masks, or all at one P_t (e.g. every one at 0)
                why = (f"only {int(fit['n'])} quer{'y' if int(fit['n']) == 1 else 'ies'} with stuff masks"
                       if fit["n"] < 2 else f"the {int(fit['n'])} queries with stuff masks all have the same P_t")
                lines.append(f"- Thing preference of **{model}**: no stuff precision vs P_t line: {why} (see the "
                             "P_t bins).")
                continue
            lines.append(f"- Thing preference of **{model}**: stuff precision vs P_t slope {fit['slope']:.2f} "
                         f"(r {fit['r']:.2f}, p {fit['p']:.2g}, {int(fit['n'])} queries).")
    return lines


def write_report(results: Sequence[str | Path] | RunData, out_dir: str | Path, tables: Sequence[str] | None = None,
                 pictures: Sequence[Picture] = (), title: str = "psf-harness report") -> Report:
    """Render tables, figures, ``report.md`` and a self-contained ``report.html`` into ``out_dir``.

    Args:
        results: run folders / results files (see :func:`analysis.runs.load_runs`), or loaded :class:`RunData`.
        out_dir: output folder (``tables/``, ``figures/``, ``report.md``, ``report.html``).
        tables: table ids to render (default: every table with measured rows).
        pictures: Fig. 5-style pictures to include (``harness report`` makes them from saved candidates).
        title: the report's title.
    """
    data = results if isinstance(results, RunData) else load_runs(results)
    out = Path(out_dir)
    rendered = build_tables(data, tables)
    files: list[Path] = []
    for t in rendered:
        files += write_table(t, out / "tables").values()
    figs = make_figures(data, out / "figures", pictures)
    files += [f.path for f in figs]
    prov = _provenance(data)
    md = _markdown(title, data, rendered, figs, prov, out)
    md_path = atomic_write_text(out / "report.md", md)
    html_path = atomic_write_text(out / "report.html", _html(title, data, rendered, figs, prov))
    log.info("report: %s (%d tables, %d figures)", md_path, len(rendered), len(figs))
    return Report(md_path, html_path, rendered, figs, files + [md_path, html_path])


def _markdown(title: str, data: RunData, tables: list[RenderedTable], figs: list[Figure], prov: dict[str, Any],
              out: Path) -> str:
    lines = [f"# {title}", "", f"Written {prov['written_at']} from: " + ", ".join(f"`{p}`" for p in data.inputs),
             "", "## Headline numbers", ""] + _summary_lines(data) + [""] + _headline_md(headline(data))
    lines += ["", "## Paper tables", ""]
    if not tables:
        lines.append("No paper table has measured rows in these inputs (`harness report --recipes --table N`).")
    for t in tables:
        lines += [t.markdown(), f"Files: `tables/table_{t.id}.csv` (long form), `tables/table_{t.id}.tex`.", ""]
    lines += ["## Figures", ""]
    for f in figs:
        lines += [f"![{f.caption}]({f.path.relative_to(out).as_posix()})", "", f"*{f.caption}*", ""]
    lines += ["## Provenance", "", "```json", json.dumps(prov, indent=1, default=str), "```", ""]
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #bbb;padding:3px 6px;text-align:right}
td:first-child,td:nth-child(2),th:first-child{text-align:left}th{background:#eee}.demo{background:#fff3cd;padding:6px}
img{max-width:100%;border:1px solid #ddd}pre{background:#f6f6f6;padding:8px;overflow:auto;font-size:12px}
.caption{font-size:13px;color:#444}"""


def _html_table(t: RenderedTable) -> str:
    rows, cols, cells = t._grid()
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["Row", "Measured with"] + cols)
    body = []
    for r in rows:
        tds = "".join(f"<td>{html.escape(t._text(cells[(r, c)]))}</td>" for c in cols)
        body.append(f"<tr><td>{html.escape(r)}</td><td>{html.escape(t.measured_with.get(r, ''))}</td>{tds}</tr>")
    demo = f"<p class='demo'>{html.escape(t.caption())}</p>" if t.demo else \
        f"<p class='caption'>{html.escape(t.caption())}</p>"
    return f"<h3>{html.escape(t.title())}</h3>{demo}<table><tr>{head}</tr>{''.join(body)}</table>"


def _html(title: str, data: RunData, tables: list[RenderedTable], figs: list[Figure], prov: dict[str, Any]) -> str:
    h = headline(data)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p>Written {html.escape(prov['written_at'])} from {html.escape(', '.join(data.inputs))}.</p>",
             "<h2>Headline numbers</h2><ul>"]
    parts += [f"<li>{html.escape(s[2:]).replace('**', '')}</li>" for s in _summary_lines(data)]
    parts.append("</ul>")
    if len(h):
        parts.append(h.drop(columns="demo").to_html(index=False, float_format=lambda v: f"{v:.2f}", na_rep=""))
    parts.append("<h2>Paper tables</h2>")
    parts += [_html_table(t) for t in tables] or ["<p>No paper table has measured rows in these inputs.</p>"]
    parts.append("<h2>Figures</h2>")
    for f in figs:
        b64 = base64.b64encode(f.path.read_bytes()).decode("ascii")
        parts.append(f"<figure><img alt='{html.escape(f.caption)}' src='data:image/png;base64,{b64}'>"
                     f"<figcaption class='caption'>{html.escape(f.caption)}</figcaption></figure>")
    parts.append("<h2>Provenance</h2><pre>" + html.escape(json.dumps(prov, indent=1, default=str)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)

