"""`harness sweep`: re-merging saved candidates equals merging them directly, exactly, at every setting."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from harness.cli import main
from harness.data.coco_panoptic import PanopticDataset
from harness.engine.candidates_io import save_candidates, write_meta
from harness.engine.results import PQ_COLUMNS, RESULT_COLUMNS, pq_columns
from harness.engine.scoring import add_prediction
from harness.engine.sweep import MergeSetting, default_setting, merge_kwargs
from harness.errors import UserError
from harness.metrics.pq import PQAccumulator
from models.postprocess import Candidates, mask_wise_merge

OPTS = {"thing_threshold": 0.25, "stuff_threshold": 0.25, "thing_overlap": 0.4, "stuff_overlap": 0.2}


def _gt_candidates(sample, num_things: int, num_classes: int, seed: int) -> Candidates:
    """Noisy low-resolution copies of the GT segments plus distractors (PQ well above 0, ties included)."""
    g = torch.Generator().manual_seed(seed)
    h, w = sample.id_map.shape
    small = (max(1, h // 4), max(1, w // 4))
    masks, labels, scores = [], [], []
    for seg in sample.segments:
        m = torch.from_numpy((sample.id_map == seg.id).astype(np.float32))[None, None]
        m = torch.nn.functional.interpolate(m, size=small, mode="bilinear", align_corners=False)[0, 0]
        masks.append((m * 1.4 + 0.3 * torch.rand(small, generator=g)).clamp(min=0))
        labels.append(seg.label)
        scores.append(float(torch.rand((), generator=g)) * 0.7 + 0.2)
    for _ in range(4):  # distractors of random classes
        masks.append(torch.rand(small, generator=g) ** 3 * 1.2)
        labels.append(int(torch.randint(num_classes, (), generator=g)))
        scores.append(float(torch.rand((), generator=g)))
    return Candidates(torch.tensor(scores), torch.tensor(labels), torch.stack(masks),
                      query_index=torch.arange(len(labels)))


def _tiny_candidates(dataset: PanopticDataset) -> dict:
    """Candidates of every layer of a randomly initialised tiny Panoptic SegFormer, per image id."""
    from harness.data.transforms import prepare
    from models.configs import panoptic_segformer_tiny
    from models.panoptic_segformer import PanopticSegFormer

    torch.manual_seed(0)
    cats = dataset.categories
    model = PanopticSegFormer(panoptic_segformer_tiny(num_things=cats.num_things, num_stuff=cats.num_stuff,
                                                      test_scale=(128, 128))).eval()
    out = {}
    with torch.no_grad():
        for i in range(len(dataset)):
            sample = dataset[i]
            prep = prepare(model.test_transform(), sample.image)
            outputs = model(torch.from_numpy(prep.image)[None], None)
            layers = {la: model.candidates(outputs, 0, la) for la in model.mask_layers()}
            for c in layers.values():  # raw random masks sit near 0: lift them so that segments get painted
                c.masks.mul_(4.0)
            out[sample.image_id] = layers
    return out


@pytest.fixture(scope="module")
def cand_run(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A run folder with saved candidates for two models, and the direct merges computed before saving."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("sweep") / "eval"
    dataset = PanopticDataset(synth_root, split="val2017", validate=False)
    cats = dataset.categories
    order = list(reversed(dataset.image_ids))  # an evaluation order that is not the JSON's
    (run).mkdir(parents=True)
    (run / "image_ids.json").write_text(json.dumps(order))
    per_model = {"panoptic_segformer_tiny": _tiny_candidates(dataset), "gt_noisy": {}}
    for i, iid in enumerate(order):
        sample = dataset[dataset.index_of(iid)]
        per_model["gt_noisy"][iid] = {"last": _gt_candidates(sample, cats.num_things, cats.num_classes, i)}
    cells = ("none_0", "fog_3")
    for model, cands in per_model.items():
        layers = sorted(next(iter(cands.values())))
        write_meta(run / "candidates" / model, {
            "model": model, "num_things": cats.num_things, "num_stuff": cats.num_stuff,
            "categories": list(cats.categories), "layers": layers, "post_process_options": {"m": OPTS},
            "data": str(synth_root), "split": "val2017"})
        for cell in cells:
            for iid, per_layer in cands.items():
                if cell != "none_0":  # another cell: the same candidates, slightly damped
                    per_layer = {la: Candidates(c.scores * 0.9, c.labels, c.masks * 0.95, query_index=c.query_index)
                                 for la, c in per_layer.items()}
                stem = Path(dataset.image_info(iid)["file_name"]).stem
                save_candidates(run / "candidates" / model / cell / f"{stem}.npz", iid,
                                (dataset.image_info(iid)["height"], dataset.image_info(iid)["width"]), per_layer)
    return {"run": run, "dataset": dataset, "order": order, "cells": cells}


def _direct(cand_run: dict, model: str, cell: str, layer: str, **kwargs: object) -> dict[str, float]:
    """The oracle: merge the saved candidates with mask_wise_merge, score each image on its own and add the
    per-image sums as the evaluation grid does (exact sum of per-image IoU sums = math.fsum)."""
    from harness.engine.candidates_io import load_candidates
    from harness.metrics.pq import PQStats, summarize_stats

    dataset = cand_run["dataset"]
    per_image = []
    for iid in reversed(cand_run["order"]):  # any order: the exact sum does not depend on it
        sample = dataset[dataset.index_of(iid)]
        stem = Path(dataset.image_info(iid)["file_name"]).stem
        _, size, per_layer = load_candidates(cand_run["run"] / "candidates" / model / cell / f"{stem}.npz")
        res = mask_wise_merge(per_layer[layer], dataset.categories.num_things, size, **kwargs)
        acc = PQAccumulator(dataset.raw_categories)
        add_prediction(acc, sample, res, dataset.categories.ids)
        per_image.append(acc.mask)
    total = PQStats(len(per_image[0].tp))
    for s in per_image:
        total.tp += s.tp
        total.fp += s.fp
        total.fn += s.fn
    total.iou[:] = [math.fsum(s.iou[c] for s in per_image) for c in range(len(total.iou))]
    return pq_columns({"pq": summarize_stats(total, PQAccumulator(dataset.raw_categories).table)})


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_default_setting_equals_direct_evaluation_exactly(cand_run: dict, tmp_path: Path) -> None:
    out = tmp_path / "sweep_default"
    assert main(["sweep", "--candidates", str(cand_run["run"]), "--out", str(out), "-q"]) == 0
    df = pd.read_parquet(out / "results.parquet")
    assert list(df.columns) == RESULT_COLUMNS + ["alpha", "beta", "t_cnf", "t_keep"]
    assert len(df) == 2 * 2 + 1 * 2  # tiny: layers 1 + last, gt_noisy: last; two cells each
    assert set(df["alpha"]) == {1.0} and set(df["beta"]) == {2.0} and set(df["t_cnf"]) == {0.25}
    assert set(df["t_keep"]) == {0.6} and (df["images"] == len(cand_run["order"])).all()
    nonzero = 0
    for r in df.itertuples():
        cell = f"{r.corruption}_{r.severity}"
        ref = _direct(cand_run, r.model, cell, r.layer, **OPTS)
        for c in PQ_COLUMNS:
            assert _same(getattr(r, c), ref[c]), (r.model, cell, r.layer, c, getattr(r, c), ref[c])
        nonzero += r.pq > 0
    assert nonzero >= 2  # the oracle is not trivially zero
    # Images split over two processes: the same numbers to the last bit (exact sums).
    assert main(["sweep", "--candidates", str(cand_run["run"]), "--out", str(tmp_path / "w2"), "--workers", "2",
                 "-q"]) == 0
    two = pd.read_parquet(tmp_path / "w2" / "results.parquet")
    assert two[PQ_COLUMNS].equals(df[PQ_COLUMNS])
    # The CSV carries the same numbers.
    csv = pd.read_csv(out / "results.csv", dtype={"layer": str})
    assert np.array_equal(csv["pq"].to_numpy(), df["pq"].to_numpy())


def test_grid_points_equal_direct_merges_and_resume(cand_run: dict, tmp_path: Path) -> None:
    out = tmp_path / "grid"
    argv = ["sweep", "--candidates", str(cand_run["run"]), "--models", "gt_noisy", "--cells", "none_0",
            "--alpha", "0,1", "--beta", "1,3", "--t-keep", "0.7", "--t-keep-applies", "both", "--out", str(out),
            "-q"]
    assert main(argv + ["--workers", "2"]) == 0
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 4
    for r in df.itertuples():
        kw = {**OPTS, "alpha": r.alpha, "beta": r.beta, "thing_overlap": 0.3, "stuff_overlap": 0.3}
        ref = _direct(cand_run, "gt_noisy", "none_0", "last", **kw)
        assert all(_same(getattr(r, c), ref[c]) for c in PQ_COLUMNS), (r.alpha, r.beta)
    assert df["pq"].nunique() > 1  # the settings matter
    # Resume: the same command adds nothing and recomputes nothing; another t_keep mode is refused.
    before = (out / "results.parquet").stat().st_mtime_ns
    assert main(argv) == 0
    assert (out / "results.parquet").stat().st_mtime_ns == before
    assert main([a if a != "both" else "things" for a in argv]) == 2


def test_t_keep_mapping() -> None:
    base = dict(OPTS)
    d = default_setting(base)
    assert d == MergeSetting(1.0, 2.0, 0.25, 0.6)
    kw = merge_kwargs(d, base)
    assert kw["thing_overlap"] is base["thing_overlap"] and kw["stuff_overlap"] == 0.2
    assert merge_kwargs(MergeSetting(1, 2, 0.25, 0.7), base)["thing_overlap"] == pytest.approx(0.3)
    assert merge_kwargs(MergeSetting(1, 2, 0.25, 0.7), base)["stuff_overlap"] == 0.2
    both = merge_kwargs(MergeSetting(1, 2, 0.3, 0.6), base, "both")
    assert both["stuff_overlap"] == 0.4 and both["thing_threshold"] == both["stuff_threshold"] == 0.3
    with pytest.raises(UserError):
        merge_kwargs(d, base, "stuff")


def test_bad_input_is_one_line(cand_run: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = str(cand_run["run"])
    assert main(["sweep", "--candidates", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert main(["sweep", "--candidates", run, "--models", "nope", "--out", str(tmp_path / "o")]) == 2
    assert main(["sweep", "--candidates", run, "--t-keep", "1.5", "--out", str(tmp_path / "o")]) == 2
    assert main(["sweep", "--candidates", run, "--alpha", "x", "--out", str(tmp_path / "o")]) == 2
    assert main(["sweep", "--candidates", run, "--out", run]) == 2
    assert main(["sweep", "--candidates", run, "--data", str(tmp_path / "missing"), "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "--t-keep" in err and "'x'" in err and "missing" in err
    with pytest.raises(UserError, match="no candidates"):
        from harness.engine.sweep import plan_sweep

        plan_sweep(run, {}, cells=["snow_9"])


def _trained_tiny(tmp_path_factory: pytest.TempPathFactory, synth_root: Path) -> Path:
    """Tiny weights trained for a few iterations (segments match, IoU sums are real numbers); the same session
    cache as tests/test_eval_grid.py."""
    import shutil

    from harness.engine.train import train

    folder = tmp_path_factory.getbasetemp() / "eval_grid_tiny"
    weights = folder / "model.safetensors"
    if not weights.exists():
        torch.manual_seed(0)
        train("panoptic_segformer_tiny", synth_root, folder / "run", iters=8)
        shutil.copytree(folder / "run", folder, dirs_exist_ok=True)
    return weights


def test_default_setting_equals_harness_eval(synth_root: Path, tmp_path_factory: pytest.TempPathFactory,
                                             tmp_path: Path) -> None:
    """`harness eval --save-candidates`, then `harness sweep` at the run's setting: the "m" rows, bit for bit."""
    weights = _trained_tiny(tmp_path_factory, synth_root)
    run = tmp_path / "eval"
    assert main(["eval", "--weights", str(weights), "--data", str(synth_root), "--corruptions", "fog",
                 "--severities", "2", "--post-process", "m,p", "--layers", "all", "--boundary", "--save-candidates",
                 "--workers", "0", "--score-workers", "0", "--out", str(run), "-q"]) == 0
    assert main(["sweep", "--candidates", str(run), "--boundary", "--workers", "2", "--out", str(tmp_path / "sw"),
                 "-q"]) == 0
    ev = pd.read_parquet(run / "results.parquet")
    ev = ev[ev["post_process"] == "m"].sort_values(["corruption", "layer"]).reset_index(drop=True)
    sw = pd.read_parquet(tmp_path / "sw" / "results.parquet").sort_values(["corruption", "layer"])
    sw = sw.reset_index(drop=True)
    assert len(ev) == len(sw) == 4 and ev["pq"].max() > 0
    metric_cols = PQ_COLUMNS + ["b" + c for c in PQ_COLUMNS]
    for c in ["model", "weights_sha256", "dataset", "split", "corruption", "severity", "layer", "images"] + metric_cols:
        a, b = ev[c].to_numpy(), sw[c].to_numpy()
        assert all(x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y)) for x, y in zip(a, b)), c
