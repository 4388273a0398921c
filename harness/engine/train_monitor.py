"""What a training run records: the per-step loss log, validation PQ every N steps, the learning-curve plot.

Files (written by rank 0 only, atomically):

- ``train_log.csv``: one row per step: ``step, epoch, lr, sec, grad_norm, loss`` and every loss term.
- ``val_log.csv``: one row per validation: ``step, epoch, seconds, images, post_process, pq, sq, rq, pq_th, sq_th,
  rq_th, pq_st, sq_st, rq_st`` (percent), scored in memory exactly as ``harness eval-pq`` would.
- ``learning_curve.png``: the loss terms (moving mean) and validation PQ / Things / Stuff against the step.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from harness.data.coco_panoptic import PanopticDataset
from harness.io import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

TRAIN_LOG = "train_log.csv"
VAL_LOG = "val_log.csv"
CURVE_PNG = "learning_curve.png"
_FIRST = ("step", "epoch", "lr", "sec", "grad_norm", "loss")
VAL_COLUMNS = ("step", "epoch", "seconds", "images", "post_process", "pq", "sq", "rq", "pq_th", "sq_th", "rq_th",
               "pq_st", "sq_st", "rq_st")


def write_csv(path: Path, rows: list[dict[str, Any]], first: tuple[str, ...] = ()) -> None:
    """Rows as CSV (columns: ``first`` then the rest sorted), atomically; nothing for no rows."""
    if not rows:
        return
    keys = list(dict.fromkeys(k for k in first if any(k in r for r in rows)))
    keys += sorted({k for r in rows for k in r} - set(keys))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def write_train_log(out_dir: Path, history: list[dict[str, Any]]) -> None:
    write_csv(out_dir / TRAIN_LOG, history, _FIRST)


def write_val_log(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    write_csv(out_dir / VAL_LOG, rows, VAL_COLUMNS)


@torch.no_grad()
def validate(model: nn.Module, dataset: PanopticDataset, num_images: int, device: str,
             method: str | None = None) -> dict[str, Any]:
    """Panoptic quality of ``model`` on the first ``num_images`` images of ``dataset`` (any model family).

    Uses the model's ``test_transform()`` and ``candidates()`` with ``method`` (default: the model's
    ``default_post_process``, "m" for Panoptic SegFormer; "own" = the model's own post-processing), scored in memory
    with the same accumulator as ``harness eval-pq``.

    Returns:
        ``{"images", "post_process", "pq", "sq", "rq", "pq_th", ..., "rq_st", "seconds"}`` (percent).
    """
    from harness.data.transforms import prepare
    from harness.engine.results import pq_columns
    from harness.engine.scoring import add_prediction
    from harness.metrics.pq import PQAccumulator
    from models.postprocess import post_process

    t0 = time.perf_counter()
    method = method or getattr(model, "default_post_process", "m")
    was_training = model.training
    model.eval()
    cats = dataset.categories
    acc = PQAccumulator(cats.categories)
    spec = model.test_transform()
    n = min(num_images, len(dataset))
    for i in range(n):
        sample = dataset[i]
        prep = prepare(spec, sample.image)
        x = torch.from_numpy(prep.image)[None].to(device)
        outputs = model(x, None)
        size = sample.image.shape[:2]
        if method == "own":
            result = model.own_post_process(outputs, 0, size)
        else:
            cands = model.candidates(outputs, 0)
            result = post_process(method, cands, cats.num_things, size, **model.post_process_options(method))
        add_prediction(acc, sample, result, cats.ids)
    if was_training:
        model.train()
    cols = {k: round(v, 3) for k, v in pq_columns(acc.summarize()).items() if not k.startswith("b")}
    return {"images": n, "post_process": method, **cols, "seconds": round(time.perf_counter() - t0, 2)}


def plot_learning_curve(out_dir: Path, history: list[dict[str, Any]], val_rows: list[dict[str, Any]],
                        title: str) -> Path | None:
    """``learning_curve.png``: loss terms (moving mean over ~2 % of the run) and validation PQ against the step."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in history])
    window = max(1, len(history) // 50)

    def smooth(values: np.ndarray) -> np.ndarray:
        kernel = np.ones(window) / window
        padded = np.concatenate([np.full(window - 1, values[0]), values])
        return np.convolve(padded, kernel, mode="valid")

    terms = sorted({k for r in history for k in r if "loss" in k and k != "loss"})
    # Group deep-supervision terms by their kind (last layer only keeps the plot readable).
    shown = [t for t in terms if not t.startswith("d") or t.startswith(f"d{_last_layer(terms)}.")]
    ncols = 2 if val_rows else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 4.2), dpi=110, squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, smooth(np.array([r["loss"] for r in history], float)), lw=2, color="black", label="total")
    cmap = plt.get_cmap("tab10")
    for i, term in enumerate(shown[:9]):
        vals = np.array([r.get(term, np.nan) for r in history], float)
        ax.plot(steps, smooth(np.nan_to_num(vals)), lw=1.2, color=cmap(i % 10), label=term)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss (moving mean of {window})")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    if val_rows:
        ax2 = axes[0][1]
        vs = [r["step"] for r in val_rows]
        for key, label, style in (("pq", "PQ", "-o"), ("pq_th", "Things PQ", "-s"), ("pq_st", "Stuff PQ", "-^")):
            ax2.plot(vs, [r.get(key) if r.get(key) is not None else np.nan for r in val_rows], style, label=label)
        ax2.set_xlabel("step")
        ax2.set_ylabel(f"validation PQ (%), {val_rows[-1]['images']} images, ({val_rows[-1]['post_process']})")
        ax2.set_ylim(0, 100)
        ax2.legend()
        ax2.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = out_dir / CURVE_PNG
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return path


def _last_layer(terms: list[str]) -> int:
    layers = [int(t[1:].split(".")[0]) for t in terms if t.startswith("d") and t[1:].split(".")[0].isdigit()]
    return max(layers) if layers else 0
