"""Synthetic run folders that follow the results schema, for tests and for trying the notebooks without a run.

The numbers are random draws from a seeded generator (PQ falls with severity, the joint model's stuff precision
falls with P_t). They are *not* measurements and never paper values; tables rendered from them are labelled by
their model names like any other run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from harness.engine.results import CORRUPTIONS_TABLE11, PQ_COLUMNS, RESULT_COLUMNS
from harness.io import atomic_write_json

__all__ = ["fake_results", "write_fake_run", "write_fake_demo", "fake_thing_preference", "fake_attention"]


def fake_results(models: Sequence[tuple[str, Sequence[str], Sequence[str]]], corruptions: Sequence[str] = (),
                 severities: Sequence[int] = (1, 2, 3, 4, 5), seed: int = 0, dataset: str = "synthetic",
                 device: str = "cpu (fake)", boundary: bool = True, ap: bool = True, images: int = 8) -> pd.DataFrame:
    """Rows for ``models`` = [(model, post_processes, layers)], clean plus each corruption x severity.

    Returns:
        A frame with exactly :data:`RESULT_COLUMNS` (percent metrics in 5-95).
    """
    rng = np.random.default_rng(seed)
    rows = []
    cells = [("none", 0)] + [(c, s) for c in corruptions for s in severities]
    for model, pps, layers in models:
        base = rng.uniform(30, 70)
        for pp in pps:
            for layer in layers:
                for corr, sev in cells:
                    level = base - 4.0 * sev - rng.uniform(0, 3) - (0 if layer == "last" else rng.uniform(0, 5))
                    r = {k: float(np.clip(level + rng.normal(0, 4), 5, 95)) for k in PQ_COLUMNS}
                    if boundary:
                        r.update({"b" + k: float(np.clip(v - rng.uniform(5, 15), 1, 95)) for k, v in list(r.items())})
                    r.update({"model": model, "weights_sha256": hashlib.sha256(model.encode()).hexdigest(),
                              "dataset": dataset, "split": "val2017", "subset": images, "corruption": corr,
                              "severity": sev, "post_process": pp, "layer": layer,
                              "ap_segm": float(rng.uniform(10, 40)) if ap else np.nan,
                              "ap_bbox": float(rng.uniform(10, 40)) if ap else np.nan,
                              "images": images, "sec_per_image": float(rng.uniform(0.05, 0.5)), "device": device,
                              "commit": "0" * 40, "started_at": f"2026-01-01T00:00:{len(rows) % 60:02d}"})
                    rows.append(r)
    df = pd.DataFrame(rows)
    for c in RESULT_COLUMNS:
        if c not in df.columns:
            df[c] = np.nan
    return df[RESULT_COLUMNS]


def fake_sweep(model: str, alphas: Sequence[float], betas: Sequence[float], t_cnfs: Sequence[float],
               t_keeps: Sequence[float], seed: int = 1) -> pd.DataFrame:
    """Sweep rows (RESULT_COLUMNS + alpha, beta, t_cnf, t_keep) for the clean cell of ``model``."""
    rng = np.random.default_rng(seed)
    frames = []
    for a in alphas:
        for b in betas:
            for tc in t_cnfs:
                for tk in t_keeps:
                    df = fake_results([(model, ["m"], ["last"])], seed=int(rng.integers(1 << 30)))
                    df["alpha"], df["beta"], df["t_cnf"], df["t_keep"] = float(a), float(b), float(tc), float(tk)
                    frames.append(df)
    return pd.concat(frames, ignore_index=True)


def fake_thing_preference(num_queries: int = 60, joint: bool = True, seed: int = 0) -> pd.DataFrame:
    """Per-query rows (``RUN/thing_preference.parquet`` columns)."""
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(num_queries):
        if joint:
            kind, p = "shared", rng.beta(0.6, 0.6)
        else:
            kind, p = ("thing", 1.0) if q < num_queries - 10 else ("stuff", 0.0)
        n = int(rng.integers(5, 80))
        nt = int(round(n * p))
        ns = n - nt
        st = int(rng.binomial(ns, max(0.05, 0.75 - 0.45 * p))) if ns else 0
        tt = int(rng.binomial(nt, 0.65)) if nt else 0
        rows.append({"query": q, "kind": kind, "n_things": nt, "n_stuff": ns, "p_t": nt / n,
                     "thing_tp": tt, "stuff_tp": st, "thing_precision": tt / nt if nt else np.nan,
                     "stuff_precision": st / ns if ns else np.nan})
    return pd.DataFrame(rows)


def fake_attention(path: str | Path, layers: Sequence[str] = ("1", "last"), heads: int = 4, n: int = 3,
                   hw: tuple[int, int] = (12, 16), seed: int = 0) -> Path:
    """An ``*_attention.npz`` in the ``harness predict --dump-attention`` format (random maps)."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {"image_shape": np.array([hw[0] * 8, hw[1] * 8]),
                                     "ori_shape": np.array([hw[0] * 8, hw[1] * 8]), "stride": np.array(8),
                                     "kind": np.array("softmax attention (fake)")}
    for kind in ("thing", "stuff"):
        arrays[f"labels_{kind}"] = rng.integers(0, 5, n).astype(np.int64)
        arrays[f"scores_{kind}"] = rng.uniform(0.3, 1, n).astype(np.float32)
        for layer in layers:
            a = rng.random((n, heads, *hw)).astype(np.float32) ** 4
            arrays[f"attn_{kind}_{layer}"] = (a / a.sum((2, 3), keepdims=True)).astype(np.float16)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(p, **arrays)
    return p


def write_fake_run(run_dir: str | Path, df: pd.DataFrame, run_meta: dict | None = None,
                   thing_preference: pd.DataFrame | None = None) -> Path:
    """Write ``results.parquet`` + ``results.csv`` (+ ``run.json``, ``thing_preference.parquet``)."""
    d = Path(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    df.to_parquet(d / "results.parquet", index=False)
    df.to_csv(d / "results.csv", index=False)
    atomic_write_json(d / "run.json", {"fake": True, **(run_meta or {})}, indent=1)
    if thing_preference is not None:
        thing_preference.to_parquet(d / "thing_preference.parquet", index=False)
    return d


def write_fake_demo(root: str | Path, seed: int = 0) -> Path:
    """A fake ``runs/demo``: ``eval_qd`` (tiny, m/p/p*, layers 1/last, all 16 corruptions at 1-5, thing-preference,
    attention), ``eval_joint`` (tiny joint, thing-preference), ``sweep_qd`` (alpha/beta and t_cnf/t_keep grids),
    and ``profile.csv``."""
    root = Path(root)
    qd = fake_results([("panoptic_segformer_tiny", ["m", "p", "p*", "heuristic"], ["1", "last"])],
                      corruptions=CORRUPTIONS_TABLE11, seed=seed)
    write_fake_run(root / "eval_qd", qd, {"model": "panoptic_segformer_tiny"},
                   fake_thing_preference(joint=False, seed=seed))
    joint = fake_results([("panoptic_segformer_tiny_joint", ["m", "p"], ["last"])],
                         corruptions=CORRUPTIONS_TABLE11[:4], seed=seed + 1)
    write_fake_run(root / "eval_joint", joint, {"model": "panoptic_segformer_tiny_joint"},
                   fake_thing_preference(joint=True, seed=seed + 1))
    sweep = pd.concat([
        fake_sweep("panoptic_segformer_tiny", [0, 1], [0, 1, 2, 3], [0.25], [0.6], seed=seed + 2),
        fake_sweep("panoptic_segformer_tiny", [1], [2], [0.2, 0.25, 0.3, 0.35, 0.4], [0.9, 0.8, 0.7, 0.6, 0.5],
                   seed=seed + 3),
    ], ignore_index=True).drop_duplicates(["alpha", "beta", "t_cnf", "t_keep"])
    write_fake_run(root / "sweep_qd", sweep, {"model": "panoptic_segformer_tiny", "t_keep_applies": "things"})
    pd.DataFrame([{"model": "panoptic_segformer_tiny", "params_M": 3.1, "flops_G": 1.7, "fps": 12.0,
                   "device": "cpu (fake)"}]).to_csv(root / "eval_qd" / "profile.csv", index=False)
    fake_attention(root / "eval_qd" / "attention" / "image0_attention.npz", seed=seed)
    (root / "README.txt").write_text(json.dumps({"fake": True, "note": "random numbers, not measurements"}))
    return root
