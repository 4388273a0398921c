"""`harness eval` grid: on-the-fly vs on-disk COCO-C, eval-pq parity, per-layer rows, exact shard merge, resume,
tables, bad input.

Every run uses the tiny Panoptic SegFormer, briefly trained on the session's synthetic set (so segments match and
the IoU sums are real numbers), on its 6 validation images at 128 px, in the main process (workers 0) unless a test
is about the worker processes.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from harness.cli import main
from harness.engine.grid import run_grid
from harness.engine.grid_config import GridOptions, select_image_ids
from harness.engine.grid_stats import ExactPQ
from harness.engine.results import (
    CORRUPTIONS_TABLE11,
    PER_CLASS_COLUMNS,
    RESULT_COLUMNS,
)
from harness.metrics.pq import PQStats

# Columns that depend on the run's metric computation (not on timing, machine, time or folder names).
METRICS = [c for c in RESULT_COLUMNS if c not in ("weights_sha256", "dataset", "sec_per_image", "device", "commit",
                                                   "started_at")]
TRAIN_ITERS = 8


def trained_tiny(tmp_path_factory: pytest.TempPathFactory, synth_root: Path) -> Path:
    """Tiny model weights trained for a few iterations, cached once per session on disk (shared by test files)."""
    from harness.engine.train import train

    folder = tmp_path_factory.getbasetemp() / "eval_grid_tiny"
    weights = folder / "model.safetensors"
    if not weights.exists():
        torch.manual_seed(0)
        train("panoptic_segformer_tiny", synth_root, folder / "run", iters=TRAIN_ITERS)
        shutil.copytree(folder / "run", folder, dirs_exist_ok=True)
    return weights


def grid(weights: Path, data: Path, out: Path, **kw: Any) -> pd.DataFrame:
    opts = GridOptions(weights=weights, data=data, out=out, workers=kw.pop("workers", 0),
                       score_workers=kw.pop("score_workers", 0), warmup=kw.pop("warmup", 0),
                       timing_images=kw.pop("timing_images", 1), **kw)
    return run_grid(opts).results


def metrics(df: pd.DataFrame) -> pd.DataFrame:
    return df[METRICS].reset_index(drop=True)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory, synth_root: Path) -> Path:
    return trained_tiny(tmp_path_factory, synth_root)


GRID = dict(corruptions="fog,gaussian_noise", severities="1", post_process="m,p,heuristic", layers="all",
            boundary=True, thing_preference=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, weights: Path, synth_root: Path) -> Path:
    """One unsharded grid run: clean + fog 1 + gaussian_noise 1, m/p/heuristic, layers 1 and last, Boundary PQ,
    thing-preference statistics."""
    out = tmp_path_factory.mktemp("grid") / "ref"
    grid(weights, synth_root, out, save_predictions=True, **GRID)
    return out


def test_reference_run_has_real_matches(reference: Path) -> None:
    per_class = pd.read_parquet(reference / "per_class.parquet")
    assert list(per_class.columns) == PER_CLASS_COLUMNS
    assert per_class["tp"].sum() > 0, "the trained tiny model should match some segments"
    results = pd.read_parquet(reference / "results.parquet")
    assert list(results.columns) == RESULT_COLUMNS
    assert len(results) == 3 * 3 * 2  # cells x post-processors x layers
    assert results[["corruption", "severity"]].drop_duplicates().values.tolist() == [
        ["none", 0], ["gaussian_noise", 1], ["fog", 1]]  # clean first, then Table 11 order
    assert (results["images"] == 6).all() and (results["subset"] == 6).all()
    assert results["sec_per_image"].gt(0).all() and results["bpq"].notna().all()
    # CSV and Parquet hold the same table, floats to the last bit.
    from harness.engine.grid_results import read_results_csv

    pd.testing.assert_frame_equal(read_results_csv(reference / "results.csv"), results, check_dtype=False)


@pytest.mark.parametrize("decoder", ["numpy", "compiled"])
def test_clean_row_equals_eval_pq_on_written_pngs(reference: Path, decoder: str) -> None:
    """`harness eval-pq`'s file evaluator on the written PNGs gives the grid's rows, on its numpy path and on its
    compiled kernel (built on first use when missing). Layer 1 of the briefly trained model leaves some images
    without any segment, an edge case for the evaluators.

    The oracle runs in a child process so that a crash of a compiled kernel fails this test, not the session.
    """
    import subprocess
    import sys

    folders = {(pp, layer): reference / "predictions" / "panoptic_segformer_tiny" / "none_0" / f"{path_pp}_{layer}"
               for pp, path_pp in (("m", "m"), ("p", "p"), ("heuristic", "heuristic")) for layer in ("1", "last")}
    script = (
        "import json, sys\n"
        "from harness.metrics.pq import PQOptions\n"
        "from harness.metrics.pq_files import evaluate_pq_files\n"
        "gt, gt_dir, *dirs = sys.argv[1:]\n"
        "print(json.dumps([evaluate_pq_files(gt, d + '/panoptic.json', gt_dir=gt_dir, pred_dir=d,\n"
        "                                    options=PQOptions(boundary=True)) for d in dirs]))\n")
    done = subprocess.run([sys.executable, "-c", script, str(reference / "gt_subset.json"), str(_gt_dir(reference)),
                           *map(str, folders.values())], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                               "HARNESS_PNG_DECODER": "pil" if decoder == "numpy" else ""})
    assert done.returncode == 0, f"eval-pq failed (exit {done.returncode}): {done.stderr[-1500:]}"
    results = pd.read_parquet(reference / "results.parquet")
    for (pp, layer), ref in zip(folders, json.loads(done.stdout.splitlines()[-1])):
        row = results[(results.corruption == "none") & (results.post_process == pp) & (results.layer == layer)].iloc[0]
        for key, prefix in (("pq", ""), ("boundary_pq", "b")):
            for split, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
                for m in ("pq", "sq", "rq"):
                    want = ref[key][split][m]
                    got = row[f"{prefix}{m}{suffix}"]
                    if want is None:
                        assert math.isnan(got)
                    else:  # per-image exact sums vs one running sum: equal to ~1e-15 (grid_stats docstring)
                        assert got == pytest.approx(100 * want, rel=1e-13, abs=1e-12), (pp, layer, key, split, m)


def _gt_dir(run: Path) -> Path:
    info = json.loads((run / "run.json").read_text())["info"]
    return Path(info["data"]) / "annotations" / "panoptic_val2017"


def test_layers_all_last_rows_equal_plain_run(reference: Path, weights: Path, synth_root: Path,
                                              tmp_path: Path) -> None:
    plain = grid(weights, synth_root, tmp_path / "plain", **{**GRID, "layers": "last"})
    ref = pd.read_parquet(reference / "results.parquet")
    last = ref[ref.layer == "last"]
    pd.testing.assert_frame_equal(metrics(plain), metrics(last))
    assert not metrics(ref[ref.layer == "1"]).equals(metrics(last).assign(layer="1"))  # layer 1 is its own


def test_on_the_fly_equals_on_disk_coco_c(reference: Path, weights: Path, synth_root: Path, tmp_path: Path) -> None:
    from harness.corruptions.runner import RunConfig
    from harness.corruptions.runner import run as corrupt_run

    coco_c = tmp_path / "coco_c"
    corrupt_run(RunConfig(images_dir=synth_root / "val2017", out_dir=coco_c,
                          corruptions=["fog", "gaussian_noise"], severities=[1], fmt="png"))
    ref = pd.read_parquet(reference / "results.parquet")
    for corruption in ("fog", "gaussian_noise"):
        root = tmp_path / corruption
        (root / "val2017").mkdir(parents=True)
        (root / "annotations").symlink_to(synth_root / "annotations")
        for img in sorted((synth_root / "val2017").iterdir()):  # the on-disk PNG under the split's file name
            shutil.copyfile(coco_c / corruption / "1" / f"{img.stem}.png", root / "val2017" / img.name)
        disk = grid(weights, root, tmp_path / f"eval_{corruption}", **{**GRID, "corruptions": "none"})
        fly = ref[ref.corruption == corruption]
        cols = [c for c in METRICS if c not in ("corruption", "severity")]
        pd.testing.assert_frame_equal(disk[cols].reset_index(drop=True), fly[cols].reset_index(drop=True))


def test_three_shards_merge_to_the_unsharded_run(reference: Path, weights: Path, synth_root: Path,
                                                 tmp_path: Path) -> None:
    shards = []
    for i in range(3):
        out = tmp_path / f"shard{i}"
        grid(weights, synth_root, out, save_predictions=True, shard=(i, 3), **GRID)
        assert not (out / "results.parquet").exists()  # partial statistics only
        shards.append(str(out))
    assert main(["eval", "--merge", *reversed(shards), "--out", str(tmp_path / "merged"), "-q"]) == 0
    merged = tmp_path / "merged"
    ref = pd.read_parquet(reference / "results.parquet")
    pd.testing.assert_frame_equal(metrics(pd.read_parquet(merged / "results.parquet")), metrics(ref))
    pd.testing.assert_frame_equal(pd.read_parquet(merged / "per_class.parquet"),
                                  pd.read_parquet(reference / "per_class.parquet"))
    for cell in ("none_0", "fog_1", "gaussian_noise_1"):
        a = json.loads((merged / "cells" / f"{cell}.json").read_text())
        b = json.loads((reference / "cells" / f"{cell}.json").read_text())
        assert [(r["mask"], r["boundary"]) for r in a["rows"]] == [(r["mask"], r["boundary"]) for r in b["rows"]]
    pd.testing.assert_frame_equal(pd.read_parquet(merged / "thing_preference.parquet"),
                                  pd.read_parquet(reference / "thing_preference.parquet"))
    # The merged predictions equal the unsharded ones file for file.
    rel = Path("predictions/panoptic_segformer_tiny/fog_1/m_last")
    assert json.loads((merged / rel / "panoptic.json").read_text()) == json.loads(
        (reference / rel / "panoptic.json").read_text())
    for png in (reference / rel).glob("*.png"):
        assert (merged / rel / png.name).read_bytes() == png.read_bytes()
    # A missing shard, or the same shard twice: one clear error.
    assert main(["eval", "--merge", shards[0], shards[1], "--out", str(tmp_path / "m2")]) == 2
    assert main(["eval", "--merge", shards[0], shards[0], shards[1], "--out", str(tmp_path / "m3")]) == 2


def test_resume_skips_finished_cells_and_rebuilds_identically(reference: Path, weights: Path, synth_root: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference, out, symlinks=True)
    # As after a kill during the last cell: no cell file, tables of the first two cells.
    (out / "cells" / "fog_1.json").unlink()
    for name in ("results.parquet", "per_class.parquet"):
        df = pd.read_parquet(out / name)
        df[df.corruption != "fog"].to_parquet(out / name, index=False)
    (out / "results.csv").unlink()
    before = {c: (out / "cells" / f"{c}.json").stat().st_mtime_ns for c in ("none_0", "gaussian_noise_1")}
    again = grid(weights, synth_root, out, save_predictions=True, **GRID)
    pd.testing.assert_frame_equal(metrics(again), metrics(pd.read_parquet(reference / "results.parquet")))
    assert {c: (out / "cells" / f"{c}.json").stat().st_mtime_ns for c in before} == before  # not recomputed
    # Deleted tables are rebuilt from the cell files, identically.
    for name in ("results.parquet", "results.csv", "per_class.parquet", "summary.csv"):
        (out / name).unlink()
    grid(weights, synth_root, out, save_predictions=True, **GRID)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), again)


def test_refuses_other_settings_and_hand_edited_results(reference: Path, weights: Path, synth_root: Path,
                                                        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference, out, symlinks=True)
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and not p.is_symlink()}
    base = ["eval", "--weights", str(weights), "--data", str(synth_root), "--out", str(out), "--workers", "0",
            "--score-workers", "0", "--corruptions", "fog,gaussian_noise", "--severities", "1", "--post-process",
            "m,p,heuristic", "--layers", "all", "--boundary", "--thing-preference", "--save-predictions"]
    capsys.readouterr()
    assert main(base[:-1] + ["--severities", "2"]) == 2  # other settings (and no --save-predictions)
    errors = _errors(capsys)
    assert len(errors) == 1 and "other settings" in errors[0]
    csv = out / "results.csv"
    lines = csv.read_text().splitlines()
    fields = lines[3].split(",")
    fields[RESULT_COLUMNS.index("pq")] = "99.5"
    csv.write_text("\n".join(lines[:3] + [",".join(fields)] + lines[4:]) + "\n")
    snapshot[csv] = csv.read_bytes()
    capsys.readouterr()
    assert main(base) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and "results.csv" in errors[0] and "pq is 99.5" in errors[0] and "by hand" in errors[0]
    csv.write_text("not,a\nresults,table\n")
    snapshot[csv] = csv.read_bytes()
    assert main(base) == 2
    assert "lacks column 'model'" in _errors(capsys)[0]
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and not p.is_symlink()}
    assert after == snapshot  # nothing lost, nothing rewritten


def _errors(capsys: pytest.CaptureFixture) -> list[str]:
    """ERROR lines the CLI printed since the last call (the CLI's logging replaces pytest's log capture), and
    argument errors (refused at parse time: ``harness eval: error: argument --x: ...``)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith(("ERROR", "harness eval: error:"))]


def test_thing_preference_equals_direct_count(reference: Path, weights: Path, synth_root: Path) -> None:
    """The grid's per-query table equals ThingPreferenceStats fed image by image with the model's candidates."""
    from harness.data.coco_panoptic import PanopticDataset
    from harness.data.transforms import prepare
    from harness.engine.evaluate import load_model
    from harness.metrics.thing_preference import ThingPreferenceStats

    model = load_model(weights)
    stats = ThingPreferenceStats.for_model(model)
    ds = PanopticDataset(synth_root)
    with torch.inference_mode():
        for iid in sorted(ds.image_ids):
            sample = ds[ds.index_of(iid)]
            x = torch.from_numpy(prepare(model.test_transform(), sample.image).image)[None]
            stats.add(model.candidates(model(x), 0, "last"), sample, sample.image.shape[:2])
    got = pd.read_parquet(reference / "thing_preference.parquet")
    pd.testing.assert_frame_equal(got, stats.per_query())
    assert stats.per_query()[["n_things", "n_stuff"]].to_numpy().sum() > 0
    bins = pd.read_csv(reference / "thing_preference_bins.csv")
    assert bins["bin"].tolist()[-2:] == ["none", "total"] and bins["queries"].iloc[-1] == stats.num_queries


def test_summary_csv(reference: Path) -> None:
    summary = pd.read_csv(reference / "summary.csv", dtype={"layer": str})
    assert list(summary.columns[:10]) == ["model", "weights_sha256", "dataset", "split", "subset", "post_process",
                                          "layer", "clean", "mPC", "rPC"]
    assert list(summary.columns[10:26]) == CORRUPTIONS_TABLE11
    assert list(summary.columns[26:]) == ["blur", "noise", "digital", "weather"]
    results = pd.read_parquet(reference / "results.parquet")
    for _, s in summary.iterrows():
        rows = results[(results.post_process == s.post_process) & (results.layer == s.layer)]
        pq = {c: float(rows[rows.corruption == c].pq.iloc[0]) for c in ("none", "fog", "gaussian_noise")}
        assert s.clean == pq["none"]
        assert s.mPC == pytest.approx((pq["fog"] + pq["gaussian_noise"]) / 2, abs=1e-12)
        assert s.rPC == pytest.approx(s.mPC / s.clean if s.clean else math.nan, nan_ok=True)
        assert s.fog == pq["fog"] and s.noise == pq["gaussian_noise"] and s.weather == pq["fog"]
        assert math.isnan(s.motion_blur) and math.isnan(s.blur) and math.isnan(s.digital)


def test_single_cell_run_keeps_the_old_outputs(weights: Path, synth_root: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    from harness.engine.evaluate import evaluate

    out = tmp_path / "single"
    result = evaluate(weights, synth_root, out, post_process_method="p", max_images=4, boundary=True)
    assert result["num_images"] == 4 and result["post_process"] == "p" and "boundary_pq" in result
    pred = json.loads((out / "pred.json").read_text())
    assert [a["image_id"] for a in pred["annotations"]] == json.loads((out / "image_ids.json").read_text())
    assert all((out / "pred" / a["file_name"]).is_file() for a in pred["annotations"])
    assert json.loads((out / "pq.json").read_text()) == result
    # The in-memory model path and the weights path agree; the same folder is replaced, not refused.
    from harness.engine.evaluate import load_model

    model = load_model(weights)
    again = evaluate(model, synth_root, out, post_process_method="p", max_images=4, boundary=True)
    assert again["pq"] == result["pq"]
    assert main(["eval", "--weights", str(weights), "--data", str(synth_root), "--out", str(tmp_path / "cli"),
                 "--workers", "0", "--score-workers", "0", "-q"]) == 0
    assert "Mask PQ" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--corruptions", "fogg"], "unknown corruption 'fogg'"),
    (["--corruptions", "fog", "--severities", "6"], "invalid severity 6"),
    (["--subset", "7"], "--subset 7 must be between 1 and"),
    (["--model", "panoptic_segformer_r50"], "panoptic_segformer_r50"),
    (["--post-process", "m,q"], "unknown post-processor 'q'"),
    (["--layers", "3"], "unknown mask layer '3'"),
    (["--shard", "3/3"], "invalid --shard"),
])
def test_bad_input_one_line_exit_2(args: list[str], message: str, weights: Path, synth_root: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["eval", "--weights", str(weights), "--data", str(synth_root), "--out", str(out), *args])
    assert code == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and message in errors[0]
    assert not out.exists()  # refused before writing anything


def test_weights_for_other_categories_are_refused(weights: Path, synth_root: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copyfile(weights, bad / "model.safetensors")
    doc = json.loads((weights.parent / "model.json").read_text())
    doc["meta"]["categories"][0]["name"] = "not-a-disc"
    (bad / "model.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["eval", "--weights", str(bad), "--data", str(synth_root), "--out", str(tmp_path / "o")]) == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and "other categories" in errors[0] and "not-a-disc" in errors[0]


def test_subset_rule_is_the_corrupt_runners() -> None:
    from harness.corruptions.runner import select_subset

    ids = list(range(100, 400, 3))
    random.Random(0).shuffle(ids)
    chosen, rule = select_image_ids(ids, subset=17, subset_seed=5)
    assert chosen == select_subset(ids, 17, 5) and rule["n"] == 17 and rule["seed"] == 5
    assert chosen == sorted(chosen)
    strings, _ = select_image_ids([f"img{i:03d}" for i in range(30)], subset=4, subset_seed=0)
    assert len(strings) == 4 and strings == sorted(strings)


def test_exact_pq_is_independent_of_grouping() -> None:
    """Exact IoU sums: any split of the images over processes / shards merges to the same bits."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(300):
        s = PQStats(5)
        s.tp[:] = rng.integers(0, 3, 5)
        s.iou[:] = np.where(s.tp > 0, rng.uniform(0.5, 1.0, 5) * s.tp, 0.0)
        s.fn[:] = rng.integers(0, 2, 5)
        images.append(s)
    one = ExactPQ(5)
    for s in images:
        one.add(s)
    totals = []
    for trial in range(5):
        order = rng.permutation(len(images))
        parts = [ExactPQ(5) for _ in range(trial + 2)]
        for k, i in enumerate(order):
            parts[k % len(parts)].add(images[i])
        merged = parts[-1]
        for p in parts[:-1]:
            merged.merge(p)
        assert merged == one
        totals.append(merged.to_pq_stats().iou)
    exact = np.array([math.fsum(s.iou[c] for s in images) for c in range(5)])
    assert all(np.array_equal(t, exact) for t in totals)  # = correctly rounded sum of the per-image values
    assert ExactPQ.from_json(json.loads(json.dumps(one.to_json())), 5) == one
