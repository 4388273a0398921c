"""Figures from results files (matplotlib, Agg): robustness, per-layer, sweeps, thing preference, pictures.

Every function takes data frames or arrays (as :mod:`analysis.runs` reads them), writes one PNG atomically and
returns its path. Sizes are fixed (inches x :data:`DPI`; stated per function) so reports lay out predictably.
Colours: the Okabe-Ito palette for lines and bars, ``cividis`` for heat maps (both readable with colour-vision
deficiencies); fonts 11 pt and up.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from harness.engine.results import CLEAN, CORRUPTION_FAMILIES, CORRUPTIONS_TABLE11
from harness.io import atomic_write

__all__ = ["DPI", "OKABE_ITO", "robustness_heatmap", "corruption_family_bars", "severity_curves",
           "thing_preference_scatter", "thing_preference_bins", "per_layer", "alpha_beta_heatmap",
           "threshold_heatmap", "merge_comparison", "attention_maps", "series_label", "SIZES"]

DPI = 100
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
HEATMAP_CMAP = "cividis"
# Figure sizes in inches (pixels = inches x DPI); merge_comparison and attention_maps depend on their input.
SIZES = {"robustness_heatmap": (13.0, 5.0), "corruption_family_bars": (10.0, 5.0), "severity_curves": (14.0, 11.0),
         "thing_preference_scatter": (8.0, 6.0), "thing_preference_bins": (11.0, 5.0), "per_layer": (11.0, 4.5),
         "alpha_beta_heatmap": (6.5, 4.5), "threshold_heatmap": (7.5, 5.0)}
SHORT = {"motion_blur": "Motion", "defocus_blur": "Defoc", "glass_blur": "Glass", "gaussian_blur": "Gauss (blur)",
         "gaussian_noise": "Gauss (noise)", "impulse_noise": "Impul", "shot_noise": "Shot",
         "speckle_noise": "Speck", "brightness": "Bright", "contrast": "Contr", "saturate": "Satur",
         "jpeg_compression": "JPEG", "snow": "Snow", "spatter": "Spatt", "fog": "Fog", "frost": "Frost"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10,
                         "xtick.labelsize": 10, "ytick.labelsize": 10, "axes.prop_cycle":
                         matplotlib.cycler(color=OKABE_ITO), "figure.dpi": DPI, "savefig.dpi": DPI})
    return plt


def _figure(size: tuple[float, float], **kw: Any) -> tuple[Any, Any]:
    plt = _plt()
    fig, ax = plt.subplots(figsize=size, dpi=DPI, layout="constrained", **kw)
    return fig, ax


def _save(fig: Any, out: str | Path) -> Path:
    plt = _plt()
    try:
        return atomic_write(out, lambda p: fig.savefig(p, dpi=DPI, format="png"))
    finally:
        plt.close(fig)


def series_label(row: Mapping[str, Any]) -> str:
    """``model [variant] (post_process) layer`` for legends; parts at their defaults are left out."""
    label = str(row["model"])
    variant = str(row.get("variant", "default"))
    if variant not in ("default", "") and variant not in label:
        label += f" [{variant}]"
    label += f" ({row['post_process']})"
    if str(row.get("layer", "last")) != "last":
        label += f" layer {row['layer']}"
    return label


def _series(results: pd.DataFrame) -> pd.DataFrame:
    df = results[results["alpha"].isna()] if "alpha" in results.columns else results
    df = df.copy()
    if "variant" not in df.columns:
        df["variant"] = "default"
    df["series"] = [series_label(r) for r in df.to_dict("records")]
    return df


def _robustness_table(results: pd.DataFrame, metric: str = "pq") -> pd.DataFrame:
    """series x (Clean, 16 corruptions (severity mean), Mean over those present) for series with corruptions."""
    df = _series(results)
    df = df[df["layer"] == "last"]
    out = {}
    for series, g in df.groupby("series", sort=False):
        corr = g[(g["corruption"] != CLEAN) & (g["severity"] > 0)]
        if corr.empty:
            continue
        means = corr.groupby("corruption")[metric].mean()
        clean = g[g["corruption"] == CLEAN][metric]
        row = {"Clean": float(clean.iloc[-1]) if len(clean) else math.nan}
        row.update({SHORT[c]: float(means[c]) if c in means else math.nan for c in CORRUPTIONS_TABLE11})
        present = [means[c] for c in CORRUPTIONS_TABLE11 if c in means]
        row["Mean"] = float(np.mean(present)) if present else math.nan
        for fam, names in CORRUPTION_FAMILIES.items():
            vals = [means[c] for c in names if c in means]
            row[fam] = float(np.mean(vals)) if vals else math.nan
        out[series] = row
    return pd.DataFrame.from_dict(out, orient="index")


def _annotate(ax: Any, values: np.ndarray, fmt: str = "{:.1f}") -> None:
    finite = values[np.isfinite(values)]
    mid = (finite.min() + finite.max()) / 2 if len(finite) else 0
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=9,
                    color="white" if v < mid else "black")


def robustness_heatmap(results: pd.DataFrame, out: str | Path, metric: str = "pq", title: str = "") -> Path:
    """Table 11 as a heat map: one row per (model, post-processor), columns Clean, the 16 corruptions (mean over
    severities) and Mean. 1300 x 500 px."""
    table = _robustness_table(results, metric)
    cols = ["Clean"] + [SHORT[c] for c in CORRUPTIONS_TABLE11] + ["Mean"]
    fig, ax = _figure(SIZES["robustness_heatmap"])
    if table.empty:
        ax.text(0.5, 0.5, "no corruption rows", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _save(fig, out)
    values = table[cols].to_numpy(float)
    im = ax.imshow(np.ma.masked_invalid(values), cmap=HEATMAP_CMAP, aspect="auto")
    _annotate(ax, values)
    ax.set_xticks(range(len(cols)), cols, rotation=40, ha="right")
    ax.set_yticks(range(len(table)), table.index)
    ax.set_title(title or f"{metric.upper()} under corruption (mean over severities)")
    fig.colorbar(im, ax=ax, label=metric.upper(), shrink=0.9)
    return _save(fig, out)


def corruption_family_bars(results: pd.DataFrame, out: str | Path, metric: str = "pq", title: str = "") -> Path:
    """Clean vs mean under corruption, and the mean per family (blur, noise, digital, weather), per model.
    1000 x 500 px."""
    table = _robustness_table(results, metric)
    groups = ["Clean", "Mean", "blur", "noise", "digital", "weather"]
    fig, ax = _figure(SIZES["corruption_family_bars"])
    n = max(len(table), 1)
    width = 0.8 / n
    x = np.arange(len(groups))
    for k, (series, row) in enumerate(table.iterrows()):
        ax.bar(x + (k - (n - 1) / 2) * width, [row.get(g, math.nan) for g in groups], width,
               label=series, color=OKABE_ITO[k % len(OKABE_ITO)], edgecolor="black", linewidth=0.5)
    ax.set_xticks(x, ["Clean", "Mean (16)", "Blur", "Noise", "Digital", "Weather"])
    ax.set_ylabel(metric.upper())
    ax.set_title(title or f"{metric.upper()}: clean vs corrupted, by corruption family")
    if len(table):
        ax.legend(loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)


def severity_curves(results: pd.DataFrame, out: str | Path, metric: str = "pq", title: str = "") -> Path:
    """PQ vs severity (0 = clean) for each of the 16 corruptions, one line per model. 1400 x 1100 px."""
    plt = _plt()
    df = _series(results)
    df = df[df["layer"] == "last"]
    fig, axes = plt.subplots(4, 4, figsize=SIZES["severity_curves"], dpi=DPI, layout="constrained",
                             sharex=True, sharey=True)
    series = [s for s, g in df.groupby("series", sort=False) if (g["corruption"] != CLEAN).any()]
    for ax, corruption in zip(axes.flat, CORRUPTIONS_TABLE11):
        for k, s in enumerate(series):
            g = df[df["series"] == s]
            clean = g[g["corruption"] == CLEAN]
            c = g[g["corruption"] == corruption].groupby("severity")[metric].mean()
            xs = ([0] if len(clean) else []) + list(c.index)
            ys = ([float(clean[metric].iloc[-1])] if len(clean) else []) + list(c.values)
            ax.plot(xs, ys, marker="o", ms=4, color=OKABE_ITO[k % len(OKABE_ITO)], label=s)
        ax.set_title(corruption)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("severity (0 = clean)")
    for ax in axes[:, 0]:
        ax.set_ylabel(metric.upper())
    if series:
        fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="outside lower center", ncols=min(4, len(series)))
    fig.suptitle(title or f"{metric.upper()} vs corruption severity")
    return _save(fig, out)


def thing_preference_scatter(queries: pd.DataFrame, out: str | Path, title: str = "") -> Path:
    """Fig. 7: stuff precision vs P_t per query, with the least-squares line, for each model in ``queries``
    (``model``/``variant`` columns; joint matching = shared queries, query decoupling = its stuff queries).
    800 x 600 px."""
    from analysis.thing_preference import regression

    fig, ax = _figure(SIZES["thing_preference_scatter"])
    q = queries.copy()
    if "model" not in q.columns:
        q["model"] = "model"
    markers = ["o", "s", "^", "D"]
    for k, (model, g) in enumerate(q.groupby("model", sort=False)):
        colour = OKABE_ITO[k % len(OKABE_ITO)]
        g = g[g["n_stuff"] > 0]
        joint = (g["kind"] == "shared").any()
        label = f"{model} ({'joint matching' if joint else 'query decoupling, stuff queries'})"
        sizes = 15 + 60 * np.sqrt(g["n_stuff"] / max(float(g["n_stuff"].max()), 1.0))
        ax.scatter(g["p_t"], g["stuff_precision"], s=sizes, color=colour, alpha=0.7, edgecolor="black",
                   linewidth=0.4, marker=markers[k % len(markers)], label=label)
        fit = regression(g)
        if np.isfinite(fit["slope"]):
            xs = np.linspace(0, 1, 50)
            ax.plot(xs, fit["intercept"] + fit["slope"] * xs, color=colour, linewidth=2,
                    label=f"fit: slope {fit['slope']:.2f}, r {fit['r']:.2f}, p {fit['p']:.2g}, n {int(fit['n'])}")
        total = g["stuff_tp"].sum() / max(g["n_stuff"].sum(), 1)
        ax.axhline(total, color=colour, linestyle="--", linewidth=1, label=f"overall stuff precision {total:.2f}")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("thing preference P_t = N_things / (N_things + N_stuff)")
    ax.set_ylabel("stuff precision (TP / predicted stuff masks)")
    ax.set_title(title or "Thing preference vs stuff precision per query (Fig. 7)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=9)
    return _save(fig, out)


def thing_preference_bins(bins: pd.DataFrame, out: str | Path, paper: pd.DataFrame | None = None,
                          title: str = "") -> Path:
    """Table B.6 as bars: stuff and thing precision per P_t bin (query counts on top), the paper's precisions
    as markers when ``paper`` is given. 1100 x 500 px."""
    fig, ax = _figure(SIZES["thing_preference_bins"])
    b = bins[bins["P_t_bin"] != "Total"].reset_index(drop=True)
    x = np.arange(len(b))
    ax.bar(x - 0.2, b["stuff_precision"], 0.4, label="stuff precision (measured)", color=OKABE_ITO[0],
           edgecolor="black", linewidth=0.5)
    ax.bar(x + 0.2, b["things_precision"], 0.4, label="thing precision (measured)", color=OKABE_ITO[1],
           edgecolor="black", linewidth=0.5, hatch="//")
    for i, n in enumerate(b["num_queries"]):
        ax.text(i, 1.02, f"{int(n)} q", ha="center", va="bottom", fontsize=9)
    if paper is not None:
        p = paper.set_index("P_t_bin").reindex(b["P_t_bin"])
        ax.plot(x - 0.2, p["stuff_precision"], "k_", ms=18, mew=2, label="paper stuff precision (R50, COCO)")
        ax.plot(x + 0.2, p["things_precision"], "kx", ms=8, mew=2, label="paper thing precision (R50, COCO)")
    ax.set_xticks(x, b["P_t_bin"], rotation=20)
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("P_t bin")
    ax.set_ylabel("precision")
    ax.set_title(title or "Precision by thing-preference bin (Table B.6)")
    fig.legend(loc="outside right upper", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)


def _layer_key(layer: str) -> float:
    return math.inf if layer == "last" else float(layer)


def per_layer(results: pd.DataFrame, out: str | Path, title: str = "") -> Path:
    """Table 10: PQ, PQ^th, PQ^st and images/s per mask-decoder layer (clean rows, each model's default
    post-processor), one colour per model. 1100 x 450 px."""
    from analysis.model_names import default_post_process

    plt = _plt()
    df = _series(results)
    df = df[(df["corruption"] == CLEAN)]
    df = df[[pp == default_post_process(m) for m, pp in zip(df["model"], df["post_process"])]]
    df = df.assign(base=[s.split(" layer ")[0] for s in df["series"]])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=SIZES["per_layer"], dpi=DPI, layout="constrained")
    styles = {"pq": "-", "pq_th": "--", "pq_st": ":"}
    shown = [b for b, g in df.groupby("base", sort=False) if g["layer"].nunique() > 1] or list(df["base"].unique())
    layers = sorted(set(df[df["base"].isin(shown)]["layer"]), key=_layer_key)
    width = 0.8 / max(len(shown), 1)
    for k, base in enumerate(shown):
        g = df[df["base"] == base].copy()
        g = g.iloc[np.argsort([_layer_key(v) for v in g["layer"]], kind="stable")]
        colour = OKABE_ITO[k % len(OKABE_ITO)]
        xs = [layers.index(v) for v in g["layer"]]
        for metric, ls in styles.items():
            ax1.plot(xs, g[metric], ls, marker="o", color=colour, label=f"{base}: {metric.upper()}")
        ax2.bar(np.array(xs) + (k - (len(shown) - 1) / 2) * width, 1.0 / g["sec_per_image"], width,
                color=colour, edgecolor="black", linewidth=0.5, label=base)
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(layers)), layers)
        ax.set_xlabel("mask-decoder layer")
        ax.grid(alpha=0.3)
    ax1.set_ylabel("PQ")
    ax1.legend(fontsize=9)
    ax2.set_ylabel("images / s (1 / sec_per_image)")
    ax2.legend(fontsize=9)
    fig.suptitle(title or "Per-layer results of the mask decoder (Table 10)")
    return _save(fig, out)


def _sweep_heatmap(rows: pd.DataFrame, index: str, columns: str, out: str | Path, size: tuple[float, float],
                   title: str, metric: str = "pq", fmt: str = "{:g}") -> Path:
    fig, ax = _figure(size)
    if rows.empty:
        ax.text(0.5, 0.5, "no sweep rows", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _save(fig, out)
    table = rows.pivot_table(index=index, columns=columns, values=metric, aggfunc="mean")
    table = table.sort_index().sort_index(axis=1, ascending=columns != "t_keep")
    values = table.to_numpy(float)
    im = ax.imshow(np.ma.masked_invalid(values), cmap=HEATMAP_CMAP, aspect="auto")
    _annotate(ax, values, "{:.2f}")
    ax.set_xticks(range(table.shape[1]), [fmt.format(v) for v in table.columns])
    ax.set_yticks(range(table.shape[0]), [fmt.format(v) for v in table.index])
    ax.set_xlabel(columns)
    ax.set_ylabel(index)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=metric.upper())
    return _save(fig, out)


def alpha_beta_heatmap(sweep: pd.DataFrame, out: str | Path, title: str = "") -> Path:
    """Table B.3: PQ over alpha x beta (clean, last layer; at the sweep's t_cnf / t_keep). 650 x 450 px."""
    rows = sweep[(sweep["corruption"] == CLEAN) & (sweep["layer"] == "last")]
    if len(rows):
        keep = rows.groupby(["t_cnf", "t_keep"]).size().idxmax()  # the thresholds with the most alpha/beta points
        rows = rows[(rows["t_cnf"] == keep[0]) & (rows["t_keep"] == keep[1])]
    return _sweep_heatmap(rows, "alpha", "beta", out, SIZES["alpha_beta_heatmap"],
                          title or "PQ over alpha (class score) x beta (mask score), Table B.3")


def threshold_heatmap(sweep: pd.DataFrame, out: str | Path, title: str = "") -> Path:
    """Table B.4: PQ over t_cnf x t_keep (clean, last layer, alpha 1, beta 2). 750 x 500 px."""
    rows = sweep[(sweep["corruption"] == CLEAN) & (sweep["layer"] == "last") & (sweep["alpha"] == 1.0)
                 & (sweep["beta"] == 2.0)]
    return _sweep_heatmap(rows, "t_cnf", "t_keep", out, SIZES["threshold_heatmap"],
                          title or "PQ over t_cnf x t_keep, Table B.4")


def merge_comparison(image: np.ndarray, panels: Sequence[tuple[str, np.ndarray, Sequence[Mapping[str, Any]]]],
                     categories: Sequence[Mapping[str, Any]], out: str | Path, title: str = "") -> Path:
    """Fig. 5 style: the image and one panoptic overlay per method on the same image.

    Args:
        image: (H, W, 3) uint8 RGB.
        panels: (title, (H, W) segment-id map, COCO ``segments_info``) per method (e.g. mask-wise merge, argmax).
        categories: COCO categories (``id``, ``name``, ``color``, ``isthing``).

    Size: (1 + len(panels)) x 420 px wide, 420 * H / W + 60 px high (rounded to whole pixels).
    """
    from harness.viz import render_panoptic

    plt = _plt()
    n = 1 + len(panels)
    h, w = image.shape[:2]
    size = (4.2 * n, round(4.2 * h / w + 0.6, 2))
    fig, axes = plt.subplots(1, n, figsize=size, dpi=DPI, layout="constrained")
    cats = {int(c["id"]): c for c in categories}
    axes = np.atleast_1d(axes)
    axes[0].imshow(image)
    axes[0].set_title("image")
    for ax, (name, id_map, segments) in zip(axes[1:], panels):
        ax.imshow(render_panoptic(image, id_map, segments, cats, legend=False))
        ax.set_title(f"{name} ({len(segments)} segments)")
    for ax in axes:
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    return _save(fig, out)


def attention_maps(npz: str | Path | Mapping[str, np.ndarray], out: str | Path, kind: str = "auto",
                   query: int = 0, image: np.ndarray | None = None, title: str = "") -> Path:
    """Fig. 6 / B.6: one query's mask-decoder attention per layer (rows) and head (columns), plus the head mean.

    Reads ``harness predict --dump-attention`` output (``attn_<kind>_<layer>`` (N, heads, h, w), N = the queries
    painted in the result). ``kind``: "thing", "stuff", or "auto" (things when any was painted, else stuff). With
    ``image``, maps are drawn over it (upsampled to the image size).

    Size: (heads + 1) x 200 px wide, layers x 200 + 60 px high.
    """
    plt = _plt()
    data = dict(np.load(npz, allow_pickle=False)) if not isinstance(npz, Mapping) else dict(npz)
    if kind == "auto":
        things = [v for k, v in data.items() if k.startswith("attn_thing_")]
        kind = "thing" if things and things[0].shape[0] > 0 else "stuff"
    layers = sorted((k[len(f"attn_{kind}_"):] for k in data if k.startswith(f"attn_{kind}_")),
                    key=_layer_key)
    if not layers:
        raise ValueError(f"no attn_{kind}_* arrays in {npz if not isinstance(npz, Mapping) else 'the dump'}")
    heads = int(data[f"attn_{kind}_{layers[0]}"].shape[1])
    fig, axes = plt.subplots(len(layers), heads + 1, figsize=(2.0 * (heads + 1), 2.0 * len(layers) + 0.6),
                             dpi=DPI, layout="constrained", squeeze=False)
    labels = data.get(f"labels_{kind}")
    for i, layer in enumerate(layers):
        maps = data[f"attn_{kind}_{layer}"].astype(np.float32)
        if not 0 <= query < maps.shape[0]:
            raise ValueError(f"query {query} out of range: {maps.shape[0]} {kind} queries in the dump")
        q = maps[query]
        for j in range(heads + 1):
            m = q.mean(0) if j == heads else q[j]
            ax = axes[i, j]
            if image is not None:
                import cv2

                ax.imshow(image)
                ax.imshow(cv2.resize(m, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR),
                          cmap="magma", alpha=0.6)
            else:
                ax.imshow(m, cmap="magma")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title("mean" if j == heads else f"head {j + 1}")
            if j == 0:
                ax.set_ylabel(f"layer {layer}")
    what = f"{kind} query {query}" + (f" (class {int(labels[query])})" if labels is not None else "")
    kind_text = str(data["kind"]) if "kind" in data else ""
    fig.suptitle(title or f"Mask-decoder attention, {what}" + (f": {kind_text}" if kind_text else ""))
    return _save(fig, out)
