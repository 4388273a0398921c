"""Paper table specs: every table renders from a synthetic results table, measured cells come from the inputs only."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.model_names import DEFAULT_VARIANT, default_post_process, row_variant
from analysis.paper import TABLE_IDS, normalise_table_id, paper_table, paper_tables
from analysis.paper_specs import TABLE11_NAMES, TABLE_SPECS
from analysis.runs import load_runs
from analysis.specs import (BinValue, CorruptionMean, CorruptionsMean, Fps, Metric, ProfileValue, RowSpec,
                            TableSpec)
from analysis.tables import CSV_COLUMNS, build_table, build_tables, missing_rows, write_table
from analysis.testing import fake_thing_preference, write_fake_demo
from analysis.thing_preference import BIN_LABELS, bins_from_queries, regression
from harness.engine.results import CORRUPTIONS_TABLE11, PQ_COLUMNS, RESULT_COLUMNS
from harness.errors import UserError

METRICS = PQ_COLUMNS + ["b" + c for c in PQ_COLUMNS] + ["ap_segm", "ap_bbox"]


def _pp(spec_row: RowSpec) -> str:
    sel = spec_row.select
    return (sel.post_process or (default_post_process(sel.models[0]),))[0]


def _sweep_points(spec: TableSpec, row: RowSpec) -> list[dict | None]:
    if row.select.sweep is None:
        return [None]
    where = [dict(c.measure.where) for c in spec.columns if isinstance(c.measure, Metric) and c.measure.where]
    return [{**row.select.sweep, **w} for w in where] or [dict(row.select.sweep)]


def _complete_runs(root: Path, seed: int = 0) -> list[str]:
    """Run folders with a row for every reproducible cell of every table (random values), one per variant/data."""
    rng = np.random.default_rng(seed)
    runs: dict[tuple[str, str, str], list[dict]] = {}
    profiles: dict[tuple[str, str, str], set[str]] = {}
    for spec in TABLE_SPECS.values():
        dataset = "ade20k" if spec.dataset == "ade20k" else "coco"
        split = "test-dev2017" if spec.split == "test-dev" else "val2017"
        for row in spec.rows:
            if row.select is None:
                continue
            key = (row.select.variant, dataset, split)
            model = row.select.models[0]
            cells = [("none", 0)]
            if any(isinstance(c.measure, (CorruptionMean, CorruptionsMean)) for c in spec.columns):
                cells += [(c, s) for c in CORRUPTIONS_TABLE11 for s in range(1, 6)]
            for sweep in _sweep_points(spec, row):
                for corr, sev in cells:
                    r = {k: float(rng.uniform(5, 95)) for k in METRICS}
                    r.update({"model": model, "weights_sha256": "ab" * 32, "dataset": dataset, "split": split,
                              "subset": 2000, "corruption": corr, "severity": sev, "post_process": _pp(row),
                              "layer": row.select.layer, "images": 2000, "device": "NVIDIA H100",
                              "sec_per_image": float(rng.uniform(0.05, 0.5)), "commit": "c" * 40,
                              "started_at": "2026-01-01T00:00:00", **(sweep or {})})
                    runs.setdefault(key, []).append(r)
            if any(isinstance(c.measure, ProfileValue) for c in spec.columns):
                profiles.setdefault(key, set()).add(model)
    args = []
    for (variant, dataset, split), rows in runs.items():
        d = root / f"{variant}_{dataset}_{split}"
        d.mkdir(parents=True)
        df = pd.DataFrame(rows)
        for c in RESULT_COLUMNS + ["alpha", "beta", "t_cnf", "t_keep"]:
            if c not in df.columns:
                df[c] = np.nan
        df = df.drop_duplicates(["model", "corruption", "severity", "post_process", "layer", "alpha", "beta", "t_cnf",
                                 "t_keep"])
        sweep = df["alpha"].notna()
        df[~sweep][RESULT_COLUMNS].to_parquet(d / "results.parquet", index=False)
        if sweep.any():
            (d / "sweep").mkdir()
            df[sweep].to_csv(d / "sweep" / "results.csv", index=False)
        if (variant, dataset, split) in profiles:
            pd.DataFrame([{"model": m, "params_M": float(rng.uniform(10, 300)), "flops_G": float(rng.uniform(50, 900)),
                           "fps": 5.0, "device": "NVIDIA H100"} for m in sorted(profiles[(variant, dataset, split)])]
                         ).to_csv(d / "profile.csv", index=False)
        if variant == "joint":
            tp = fake_thing_preference(353, joint=True, seed=seed)
            tp.to_parquet(d / "thing_preference.parquet", index=False)
        args.append(str(d) if variant == DEFAULT_VARIANT else f"{d}={variant}")
    return args


def _oracle(data, spec: TableSpec, row: RowSpec, measure) -> float | None:
    """The expected measured value, by direct lookup in the loaded inputs."""
    sel = row.select
    model, pp = sel.models[0], _pp(row)
    res = data.results
    mine = res[(res["model"] == model) & (res["variant"] == sel.variant) & (res["post_process"] == pp)
               & (res["layer"] == sel.layer)
               & (res["dataset"] == ("ade20k" if spec.dataset == "ade20k" else "coco"))
               & (res["split"] == ("test-dev2017" if spec.split == "test-dev" else "val2017"))]
    setting = dict(sel.sweep or {})
    if isinstance(measure, Metric):
        setting.update(dict(measure.where))
    if setting:
        for k, v in setting.items():
            mine = mine[np.isclose(mine[k], v)]
    else:
        mine = mine[mine["alpha"].isna()]
    if isinstance(measure, Metric):
        hit = mine[(mine["corruption"] == measure.corruption) & (mine["severity"] == measure.severity)]
        assert len(hit) == 1
        return float(hit[measure.column].iloc[0])
    if isinstance(measure, Fps):
        hit = mine[mine["corruption"] == "none"]
        return 1.0 / float(hit["sec_per_image"].iloc[0])
    if isinstance(measure, CorruptionMean):
        return float(np.mean(mine[mine["corruption"] == measure.corruption]["pq"]))
    if isinstance(measure, CorruptionsMean):
        return float(np.mean([np.mean(mine[mine["corruption"] == c]["pq"]) for c in CORRUPTIONS_TABLE11]))
    if isinstance(measure, ProfileValue):
        prof = data.profile[(data.profile["model"] == model) & (data.profile["variant"] == sel.variant)]
        return float(prof[measure.column].iloc[0])
    if isinstance(measure, BinValue):
        tp = data.thing_preference[data.thing_preference["variant"] == sel.variant]
        b = bins_from_queries(tp).set_index("P_t_bin")
        return float(b.loc[row.bin_label, measure.column])
    raise AssertionError(measure)


@pytest.fixture(scope="module")
def complete(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("complete")
    args = _complete_runs(root / "a", seed=0)
    return {"root": root, "args": args, "data": load_runs(args)}


def test_specs_cover_the_paper() -> None:
    assert list(TABLE_SPECS) == TABLE_IDS and "9" not in TABLE_SPECS
    for tid, spec in TABLE_SPECS.items():
        paper = paper_table(tid)
        found = [paper.find_row(r.paper) for r in spec.rows]
        assert len({id(f) for f in found}) == len(paper.rows) == len(spec.rows), tid  # one spec row per paper row
        for c in spec.columns:
            assert c.key in paper.columns, (tid, c.key)
        assert len({r.label for r in spec.rows}) == len(spec.rows)
        for r in spec.rows:
            assert (r.select is None) == (r.recipe is None) or spec.split == "test-dev", (tid, r.label)
            assert r.select is not None or r.note, (tid, r.label)
    assert [c.name for c in TABLE_SPECS["11"].columns] == ["Clean", "Mean"] + TABLE11_NAMES
    assert normalise_table_id("b.3") == "B3" and normalise_table_id("table_11") == "11"
    with pytest.raises(ValueError, match="no Table 9"):
        normalise_table_id("9")


def test_every_table_renders_with_expected_cells(complete: dict, tmp_path: Path) -> None:
    data = complete["data"]
    rendered = {t.id: t for t in build_tables(data)}
    assert set(rendered) == set(TABLE_SPECS)  # every table has reproducible rows
    for tid, t in rendered.items():
        spec = TABLE_SPECS[tid]
        assert not t.demo
        assert [(c.row, c.column) for c in t.cells] == [(r.label, c.name) for r in spec.rows for c in spec.columns]
        for cell, (row, col) in zip(t.cells, [(r, c) for r in spec.rows for c in spec.columns]):
            assert cell.paper == paper_table(tid).value(row.paper, col.key)
            if row.select is None or col.measure is None:
                assert cell.measured is None, (tid, row.label, col.name)
                continue
            expected = _oracle(data, spec, row, col.measure)
            assert cell.measured == pytest.approx(expected, rel=1e-12, abs=1e-12), (tid, row.label, col.name)
            assert cell.sources and all(Path(s.split(";")[0]).exists() for s in cell.sources)
        paths = write_table(t, tmp_path / "tables")
        csv = pd.read_csv(paths["csv"], dtype={"table": str, "row": str, "column": str})
        assert list(csv.columns) == CSV_COLUMNS
        assert len(csv) == len(spec.rows) * len(spec.columns) and set(csv["table"]) == {tid}
        assert list(csv["column"].unique()) == [c.name for c in spec.columns]
        m = csv["measured"].notna() & csv["paper"].notna()
        assert np.allclose(csv.loc[m, "diff"], csv.loc[m, "measured"] - csv.loc[m, "paper"])
        assert "\\begin{tabular}" in paths["tex"].read_text() and "| Row |" in paths["md"].read_text()
    assert "NVIDIA H100" in rendered["11"].caption() and "coco" in rendered["11"].caption()


def _perturbed(args: list[str], dest: Path, delta: float) -> list[str]:
    """Copies of the runs with every metric + delta, sec_per_image x 2, profile values + delta."""
    out = []
    for a in args:
        src = Path(a.split("=")[0])
        d = dest / src.name
        for f in src.rglob("*"):
            if f.is_dir():
                continue
            t = d / f.relative_to(src)
            t.parent.mkdir(parents=True, exist_ok=True)
            if f.name.startswith("results."):
                df = pd.read_parquet(f) if f.suffix == ".parquet" else pd.read_csv(f, dtype={"layer": str})
                df[METRICS] = df[METRICS] + delta
                df["sec_per_image"] = df["sec_per_image"] * 2
                df.to_parquet(t, index=False) if f.suffix == ".parquet" else df.to_csv(t, index=False)
            elif f.name == "profile.csv":
                df = pd.read_csv(f)
                df[["params_M", "flops_G"]] += delta
                df.to_csv(t, index=False)
            else:
                t.write_bytes(f.read_bytes())
        out.append(str(d) + (a[len(str(src)):] if "=" in a else ""))
    return out


def test_measured_cells_follow_the_inputs_never_the_paper(complete: dict, tmp_path: Path) -> None:
    before = {t.id: t for t in build_tables(complete["data"])}
    after = {t.id: t for t in build_tables(load_runs(_perturbed(complete["args"], tmp_path, 0.5)))}
    checked = 0
    for tid, t in before.items():
        spec = TABLE_SPECS[tid]
        kinds = {c.name: c.measure for c in spec.columns}
        for c0, c1 in zip(t.cells, after[tid].cells):
            assert c0.paper == c1.paper
            if c0.measured is None:
                assert c1.measured is None
                continue
            m = kinds[c0.column]
            if isinstance(m, Fps):
                assert c1.measured == pytest.approx(c0.measured / 2)
            elif isinstance(m, BinValue):
                assert c1.measured == c0.measured
            else:
                assert c1.measured == pytest.approx(c0.measured + 0.5), (tid, c0.row, c0.column)
                checked += 1
    assert checked > 300


def test_inputs_equal_to_the_paper_then_perturbed(tmp_path: Path) -> None:
    """Rows built from the paper's own Table 11 numbers give diff 0; shifting them shifts only `measured`."""
    paper = paper_table("11")
    ours = paper.find_row({"method": "Ours", "backbone": "R50"})
    keys = ["blur_motion", "blur_defocus", "blur_glass", "blur_gaussian", "noise_gaussian", "noise_impulse",
            "noise_shot", "noise_speckle", "digital_brightness", "digital_contrast", "digital_saturate",
            "digital_jpeg", "weather_snow", "weather_spatter", "weather_fog", "weather_frost"]
    for shift, name in ((0.0, "same"), (0.7, "shifted")):
        rows = [{"corruption": "none", "severity": 0, "pq": ours["clean"] + shift}]
        rows += [{"corruption": c, "severity": s, "pq": ours[k] + shift} for c, k in zip(CORRUPTIONS_TABLE11, keys)
                 for s in range(1, 6)]
        df = pd.DataFrame(rows)
        for c in RESULT_COLUMNS:
            if c not in df.columns:
                df[c] = {"model": "panoptic_segformer_r50", "post_process": "m", "layer": "last", "dataset": "coco",
                         "split": "val2017", "device": "gpu", "started_at": "t", "commit": "", "weights_sha256": ""
                         }.get(c, np.nan)
        (tmp_path / name).mkdir()
        df[RESULT_COLUMNS].to_csv(tmp_path / name / "results.csv", index=False)
        t = build_table("11", load_runs([tmp_path / name]))
        row = [c for c in t.cells if c.row == "Ours (R50)"]
        assert all(c.measured is not None for c in row)
        for c in (c for c in row if c.column != "Mean"):  # the paper's Mean is rounded from unrounded columns
            assert c.measured == pytest.approx(c.paper + shift, abs=1e-9) and c.diff == pytest.approx(shift, abs=1e-9)
        # Every other row has no measurement, whatever the paper says.
        assert all(c.measured is None for c in t.cells if c.row != "Ours (R50)")
        mean = next(c for c in row if c.column == "Mean")
        assert mean.measured == pytest.approx(np.mean([ours[k] for k in keys]) + shift)


def test_mean_needs_all_16_corruptions(complete: dict) -> None:
    data = complete["data"]
    keep = ~((data.results["model"] == "panoptic_segformer_r50") & (data.results["corruption"] == "fog"))
    data.results = data.results[keep].reset_index(drop=True)
    t = build_table("11", data)
    cells = {c.column: c for c in t.cells if c.row == "Ours (R50)"}
    assert cells["Mean"].measured is None and cells["Fog"].measured is None and cells["Clean"].measured is not None
    assert cells["Mean"].paper == 32.9


def test_demo_versions(tmp_path: Path) -> None:
    write_fake_demo(tmp_path / "demo")
    data = load_runs([tmp_path / "demo"])
    tables = {t.id: t for t in build_tables(data)}
    assert {"7", "8", "10", "11", "B3", "B4", "B6"} <= set(tables)
    assert not {"1", "5", "6", "B5", "D1"} & set(tables)  # tiny models differ in what these tables vary
    for t in tables.values():
        assert t.demo and "DEMO VERSION" in t.caption() and "synthetic" in t.caption()
        assert all("tiny" in v for v in t.measured_with.values())
        assert "(demo version)" in t.markdown()
    assert tables["8"].measured_with["Ours (Joint Matching)"].startswith("panoptic_segformer_tiny_joint")
    ten = {c.row: c for c in tables["10"].cells if c.column == "PQ"}
    assert ten["1st"].measured is not None and ten["Last"].measured is not None and ten["2nd"].measured is None
    # A real model's rows take precedence: then the table has no demo rows at all.
    from analysis.testing import fake_results, write_fake_run

    write_fake_run(tmp_path / "demo" / "real", fake_results([("panoptic_segformer_r50", ["m"], ["last"])],
                                                            dataset="coco", device="gpu"))
    seven = build_table("7", load_runs([tmp_path / "demo"]))
    assert not seven.demo and seven.measured_with == {"Panoptic SegFormer (m)": "panoptic_segformer_r50 (m)"}
    assert "DEMO" not in seven.caption() and "coco" in seven.caption() and "synthetic" not in seven.caption()


def test_missing_rows_and_loader_errors(complete: dict, tmp_path: Path) -> None:
    spec = TABLE_SPECS["11"]
    assert [r.label for r in missing_rows(spec, None)] == [r.label for r in spec.rows]
    assert missing_rows(spec, complete["data"]) == []
    bad = tmp_path / "bad"
    bad.mkdir()
    pd.DataFrame({"model": ["x"], "pq": [1.0]}).to_csv(bad / "results.csv", index=False)
    with pytest.raises(UserError, match=r"bad/results.csv.*missing column"):
        load_runs([bad])
    with pytest.raises(UserError, match="not found"):
        load_runs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no results"):
        load_runs([tmp_path / "empty"])


def test_bins_hand_computed() -> None:
    q = pd.DataFrame({"query": range(6), "kind": "shared",
                      "n_things": [0, 1, 3, 9, 10, 0], "n_stuff": [4, 9, 7, 1, 0, 0],
                      "thing_tp": [0, 1, 2, 5, 7, 0], "stuff_tp": [3, 6, 2, 0, 0, 0]})
    q["p_t"] = q["n_things"] / (q["n_things"] + q["n_stuff"]).replace(0, np.nan)
    q["stuff_precision"] = q["stuff_tp"] / q["n_stuff"].replace(0, np.nan)
    b = bins_from_queries(q).set_index("P_t_bin")
    assert list(b.index) == BIN_LABELS + ["Total"] and b.attrs["unused"] == 1
    assert b.loc["(0.0, 0.1)", "num_queries"] == 1 and b.loc["(0.0, 0.1)", "stuff_precision"] == 0.75
    assert b.loc["[0.1, 0.2)", "stuff_TP_FP"] == 9 and b.loc["[0.3, 0.4)", "things_TP"] == 2
    assert b.loc["[0.9, 1.0]", "num_queries"] == 2 and b.loc["[0.9, 1.0]", "things_TP_FP"] == 19
    assert b.loc["Total", "num_queries"] == 6 and b.loc["Total", "stuff_TP"] == 11
    assert b.loc["Total", "stuff_precision"] == pytest.approx(11 / 21)
    assert math.isnan(b.loc["[0.5, 0.6)", "stuff_precision"])
    fit = regression(q)  # 4 queries with stuff: p_t 0, .1, .3, .9 vs precision .75, 6/9, 2/7, 0
    x, y = np.array([0, 0.1, 0.3, 0.9]), np.array([0.75, 6 / 9, 2 / 7, 0])
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    assert fit["slope"] == pytest.approx(slope) and fit["n"] == 4


def test_paper_tables_shipped_copy_matches_shared_paper() -> None:
    import json

    shared = Path("/work/shared/paper/tables.json")
    if not shared.is_file():
        pytest.skip("shared paper folder not on this machine")
    ours = json.loads((Path(__file__).parents[1] / "analysis" / "data" / "tables.json").read_text())
    assert ours == json.loads(shared.read_text())
    assert len(paper_tables()) == 17


def test_bins_and_fit_equal_the_metric_module() -> None:
    """analysis' torch-free bins / fit equal harness.metrics.thing_preference's on the same counts."""
    from harness.metrics.thing_preference import ThingPreferenceStats

    rng = np.random.default_rng(3)
    s = ThingPreferenceStats(80, 5, 3)
    c = s.counts
    c["n_things"][:] = rng.integers(0, 30, 80) * (rng.random(80) < 0.8)
    c["n_stuff"][:] = rng.integers(0, 30, 80) * (rng.random(80) < 0.8)
    for what, n in (("thing", "n_things"), ("stuff", "n_stuff")):
        c[f"{what}_ignored"][:] = rng.integers(0, 3, 80).clip(max=c[n])
        c[f"{what}_tp"][:] = rng.integers(0, 30, 80).clip(max=c[n] - c[f"{what}_ignored"])
    q = s.per_query()
    mine = bins_from_queries(q)
    theirs = s.bins()
    theirs = theirs[theirs["bin"] != "none"]
    assert list(mine["num_queries"]) == list(theirs["queries"])
    for a, b in (("stuff_TP", "stuff_tp"), ("stuff_TP_FP", "stuff_tp_fp"), ("things_TP", "thing_tp"),
                 ("things_TP_FP", "thing_tp_fp")):
        assert list(mine[a]) == list(theirs[b]), a
    assert np.allclose(mine["stuff_precision"], theirs["stuff_precision"], equal_nan=True)
    ours, ref = regression(q), s.regression()
    for k in ("slope", "intercept", "r", "p", "n"):
        assert ours[k] == pytest.approx(ref[k], rel=1e-12), k


def test_variants_from_run_json() -> None:
    grid_doc = {"format": 1, "settings": {"model": "panoptic_segformer_r50",
                                          "model_config": {"decouple_queries": False}},
                "info": {"weights": "/w/model.safetensors"}}
    assert row_variant("panoptic_segformer_r50", grid_doc) == "joint"
    assert row_variant("panoptic_segformer_r50", {"info": {"weights": "/w/panoptic_segformer_r50_1x.pth"}}) == "1x"
    assert row_variant("panoptic_segformer_r50", {"settings": {"model_config": {"decouple_queries": True}}}) == \
        DEFAULT_VARIANT
    assert row_variant("panoptic_segformer_r50", grid_doc, label="heads1") == "heads1"
    assert row_variant("panoptic_segformer_tiny_joint") == "joint"
