"""Read run folders: results tables, sweep rows, thing-preference statistics, cost profiles, attention dumps.

Accepted inputs (``harness report --results``, :func:`load_runs`):

* a run folder of ``harness eval`` / ``harness sweep`` (``results.parquet``, else ``results.csv``; ``run.json``,
  ``thing_preference.parquet``, ``profile*.csv``, ``*_attention.npz`` beside it);
* a folder of run folders (e.g. ``runs/demo``: its own files and those of its sub-folders, two levels deep);
* a results / profile file itself.

``PATH=LABEL`` gives the rows of ``PATH`` the training variant ``LABEL`` (see :func:`analysis.model_names.row_variant`).
Rows are checked against :data:`harness.engine.results.RESULT_COLUMNS` (a clear error names the file and the missing
columns). Every row keeps the file it came from in ``source``. A row present in several inputs (same key) is kept
once: the one with the latest ``started_at``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from analysis.model_names import row_variant
from harness.engine.results import KEY_COLUMNS, RESULT_COLUMNS
from harness.errors import UserError

__all__ = ["RunData", "load_runs", "read_results_file", "split_label", "SWEEP_COLUMNS", "TP_COLUMNS", "PROFILE_ALIASES",
           "find_files"]

log = logging.getLogger(__name__)

SWEEP_COLUMNS = ["alpha", "beta", "t_cnf", "t_keep"]
TP_COLUMNS = ["query", "kind", "n_things", "n_stuff", "p_t", "thing_tp", "stuff_tp", "thing_precision",
              "stuff_precision"]
# `harness profile` CSV columns -> ours, first match wins. The paper's #P counts trainable parameters and its #F
# is mmcv's FLOP convention (`params_trainable_m`, `gflops_mmcv` of `harness profile`).
PROFILE_ALIASES = {
    "params_M": ("params_M", "params_trainable_m", "params_m", "params"),
    "flops_G": ("flops_G", "gflops_mmcv", "gflops", "flops"),
    "fps": ("fps", "images_per_s"),
}
_STR_COLS = ["model", "weights_sha256", "dataset", "split", "corruption", "post_process", "layer", "device",
             "commit", "started_at"]
_MAX_DEPTH = 2


@dataclass
class RunData:
    """Everything the tables, figures and reports read.

    Attributes:
        results: RESULT_COLUMNS + ``alpha, beta, t_cnf, t_keep`` (NaN on non-sweep rows) + ``variant``, ``source``
            (the results file), ``run_dir``.
        runs: ``run_dir -> run.json`` content (empty dict when absent).
        thing_preference: per-query rows (:data:`TP_COLUMNS`) + ``model, variant, dataset, split, device,
            source``.
        profile: ``model, variant, params_M, flops_G, fps, device, source`` (NaN where the CSV lacks a column).
        attention: ``*_attention.npz`` files found.
        inputs: the paths given.
    """

    results: pd.DataFrame
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    thing_preference: pd.DataFrame = field(default_factory=pd.DataFrame)
    profile: pd.DataFrame = field(default_factory=pd.DataFrame)
    attention: list[Path] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)

    @property
    def eval_rows(self) -> pd.DataFrame:
        """Rows of `harness eval` (not sweeps)."""
        return self.results[self.results["alpha"].isna()]

    @property
    def sweep_rows(self) -> pd.DataFrame:
        """Rows of `harness sweep`."""
        return self.results[self.results["alpha"].notna()]


def split_label(arg: str | Path) -> tuple[Path, str | None]:
    """``"runs/x=joint"`` -> (Path("runs/x"), "joint"); a path that exists (even with "=") has no label."""
    s = str(arg)
    if Path(s).exists() or "=" not in s:
        return Path(s), None
    path, label = s.rsplit("=", 1)
    return Path(path), (label or None)


def _read_table(path: Path) -> pd.DataFrame:
    """The shared reader of run tables (a damaged or foreign file is one line naming it)."""
    from harness.engine.results import read_table

    return read_table(path, "table", keep_default_na=True, dtype={"layer": str, "post_process": str})


def _layer_str(v: Any) -> str:
    if isinstance(v, (float, np.floating)) and not math.isnan(v) and float(v).is_integer():
        return str(int(v))
    return str(v)


def read_results_file(path: str | Path) -> pd.DataFrame:
    """One ``results.parquet`` / ``results.csv`` with normalised types; ``UserError`` naming missing columns."""
    p = Path(path)
    df = _read_table(p)
    missing = [c for c in RESULT_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{p}: not a results table, missing column(s) {', '.join(missing)} "
                        f"(see harness/engine/results.py RESULT_COLUMNS)")
    df = df.copy()
    for c in _STR_COLS:
        df[c] = df[c].map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    df["layer"] = df["layer"].map(_layer_str)
    try:
        df["severity"] = pd.to_numeric(df["severity"]).astype(int)
        for c in RESULT_COLUMNS[len(KEY_COLUMNS):]:
            if c not in _STR_COLS:
                df[c] = pd.to_numeric(df[c], errors="raise").astype(float)
        for c in SWEEP_COLUMNS:
            df[c] = pd.to_numeric(df[c]).astype(float) if c in df.columns else np.nan
    except (ValueError, TypeError) as exc:
        raise UserError(f"{p}: a numeric column holds a non-number: {exc}") from None
    return df


def _run_json(run_dir: Path) -> dict[str, Any]:
    p = run_dir / "run.json"
    if not p.is_file():
        return {}
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {p}: {exc}") from None
    return meta if isinstance(meta, dict) else {}


def find_files(root: Path, depth: int = _MAX_DEPTH) -> list[Path]:
    """Folders at most ``depth`` levels below ``root`` (``root`` first) that hold any run file."""
    out: list[Path] = []
    level = [root]
    for _ in range(depth + 1):
        nxt: list[Path] = []
        for d in level:
            names = {p.name for p in d.iterdir()} if d.is_dir() else set()
            if names & {"results.parquet", "results.csv", "thing_preference.parquet", "run.json"} or any(
                    n.startswith("profile") and n.endswith(".csv") for n in names) or any(
                    n.endswith("_attention.npz") for n in names):
                out.append(d)
            nxt.extend(sorted(p for p in d.iterdir() if p.is_dir() and p.name not in
                              ("predictions", "candidates", "cells", "pred", "tables", "figures")) if d.is_dir() else [])
        level = nxt
    return out


def _is_profile(df: pd.DataFrame) -> bool:
    cols = set(df.columns)
    return "model" in cols and any(a in cols for alias in PROFILE_ALIASES.values() for a in alias)


def _profile_frame(df: pd.DataFrame, source: Path, label: str | None, meta: Mapping[str, Any]) -> pd.DataFrame:
    out = pd.DataFrame({"model": df["model"].astype(str)})
    for ours, aliases in PROFILE_ALIASES.items():
        col = next((a for a in aliases if a in df.columns), None)
        out[ours] = pd.to_numeric(df[col], errors="coerce") if col else np.nan
    out["device"] = df["device"].astype(str) if "device" in df.columns else ""
    out["variant"] = [row_variant(m, meta, label) for m in out["model"]]
    out["source"] = str(source)
    return out


def _tp_frame(path: Path, run_dir: Path, label: str | None, meta: Mapping[str, Any],
              results: pd.DataFrame | None) -> pd.DataFrame:
    df = _read_table(path)
    missing = [c for c in TP_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing thing-preference column(s) {', '.join(missing)}")
    model = str(df["model"].iloc[0]) if "model" in df.columns and len(df) else None
    info: dict[str, str] = {}
    if results is not None and len(results):
        clean = results[results["corruption"] == "none"]
        first = (clean if len(clean) else results).iloc[0]
        info = {k: str(first[k]) for k in ("dataset", "split", "device")}
        model = model or str(first["model"])
    model = model or str(meta.get("model") or (meta.get("models") or ["?"])[0])
    df = df.copy()
    df["model"] = model
    df["variant"] = row_variant(model, meta, label)
    for k in ("dataset", "split", "device"):
        df[k] = info.get(k, str(meta.get(k, "")))
    df["source"] = str(path)
    return df


def load_runs(paths: Sequence[str | Path] | str | Path) -> RunData:
    """Read every run under ``paths`` (see the module docstring)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    frames: list[pd.DataFrame] = []
    tp_frames: list[pd.DataFrame] = []
    prof_frames: list[pd.DataFrame] = []
    runs: dict[str, dict[str, Any]] = {}
    attention: list[Path] = []
    for arg in paths:
        path, label = split_label(arg)
        if not path.exists():
            raise UserError(f"results path not found: {path}")
        if path.is_file():
            df = _read_table(path)
            if _is_profile(df) and not set(RESULT_COLUMNS) <= set(df.columns):
                prof_frames.append(_profile_frame(df, path, label, _run_json(path.parent)))
                continue
            res = read_results_file(path)
            meta = _run_json(path.parent)
            runs[str(path.parent)] = meta
            frames.append(_annotate(res, path, path.parent, label, meta))
            continue
        dirs = find_files(path)
        if not dirs:
            raise UserError(f"{path}: no results.parquet / results.csv / thing_preference.parquet / profile CSV "
                            f"in it or in its sub-folders")
        for d in dirs:
            meta = _run_json(d)
            runs[str(d)] = meta
            res_path = next((d / n for n in ("results.parquet", "results.csv") if (d / n).is_file()), None)
            res = None
            if res_path is not None:
                res = read_results_file(res_path)
                frames.append(_annotate(res, res_path, d, label, meta))
            if (d / "thing_preference.parquet").is_file():
                tp_frames.append(_tp_frame(d / "thing_preference.parquet", d, label, meta, res))
            for prof in sorted(d.glob("profile*.csv")):
                df = _read_table(prof)
                if _is_profile(df):
                    prof_frames.append(_profile_frame(df, prof, label, meta))
            attention.extend(sorted(d.glob("*_attention.npz")))
    results = _dedupe(pd.concat(frames, ignore_index=True)) if frames else _empty_results()
    return RunData(
        results=results,
        runs=runs,
        thing_preference=pd.concat(tp_frames, ignore_index=True) if tp_frames else pd.DataFrame(
            columns=TP_COLUMNS + ["model", "variant", "dataset", "split", "device", "source"]),
        profile=pd.concat(prof_frames, ignore_index=True) if prof_frames else pd.DataFrame(
            columns=["model", "variant", "params_M", "flops_G", "fps", "device", "source"]),
        attention=attention,
        inputs=[str(p) for p in paths],
    )


def _annotate(df: pd.DataFrame, source: Path, run_dir: Path, label: str | None,
              meta: Mapping[str, Any]) -> pd.DataFrame:
    df = df.copy()
    df["variant"] = [row_variant(m, meta, label) for m in df["model"]]
    df["source"] = str(source)
    df["run_dir"] = str(run_dir)
    return df


def _empty_results() -> pd.DataFrame:
    cols = RESULT_COLUMNS + SWEEP_COLUMNS + ["variant", "source", "run_dir"]
    return pd.DataFrame({c: pd.Series(dtype=float if c in SWEEP_COLUMNS else object) for c in cols})


def _dedupe(df: pd.DataFrame) -> pd.DataFrame:
    """One row per key (+ variant, sweep setting): the most recent ``started_at`` wins."""
    keys = KEY_COLUMNS + ["variant"] + SWEEP_COLUMNS
    df = df.sort_values("started_at", kind="stable")
    dup = df.duplicated(subset=keys, keep="last")
    if dup.any():
        log.info("%d row(s) appear in more than one results file; keeping the most recent", int(dup.sum()))
    return df[~dup].sort_index().reset_index(drop=True)


def unique_values(values: Iterable[Any]) -> list[str]:
    """Distinct non-empty string values in first-seen order (for captions)."""
    seen: list[str] = []
    for v in values:
        s = "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
        if s and s not in seen:
            seen.append(s)
    return seen
