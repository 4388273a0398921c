"""`harness report`: report.md / self-contained report.html, table files, recipes, pictures from candidates."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.testing import fake_results, write_fake_demo, write_fake_run
from harness.cli import main
from harness.commands.report import make_report, pictures_for, recipes_text
from harness.data.coco_panoptic import PanopticDataset
from harness.engine.candidates_io import save_candidates, write_meta
from models.postprocess import Candidates


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_demo(tmp_path_factory.mktemp("rep") / "demo")


def test_report_files(demo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    rep = make_report([demo_root / "eval_qd", demo_root / "eval_joint", demo_root / "sweep_qd"], out)
    md = rep.markdown.read_text()
    for needle in ("## Headline numbers", "Table 11 (demo version)", "Table B.6 (demo version)", "## Provenance",
                   "panoptic_segformer_tiny_joint", "mPC", "figures/robustness_heatmap.png"):
        assert needle in md, needle
    assert {t.id for t in rep.tables} >= {"7", "8", "10", "11", "B3", "B4", "B6"}
    for t in rep.tables:
        for ext in ("md", "tex", "csv", "json"):
            assert (out / "tables" / f"table_{t.id}.{ext}").is_file()
    for f in rep.figures:
        assert f.path.is_file() and f.path.parent == out / "figures"
    html = rep.html.read_text()
    srcs = re.findall(r"src='([^']*)'", html) + re.findall(r'src="([^"]*)"', html)
    assert len(srcs) == len(rep.figures) >= 8
    assert all(s.startswith("data:image/png;base64,") for s in srcs)  # self-contained
    assert "DEMO VERSION" in html and "<table" in html


def test_summary_says_why_there_is_no_thing_preference_line(demo_root: Path, tmp_path: Path) -> None:
    """A joint model whose queries each predict only things or only stuff (P_t 0 or 1, as the demo's after minutes
    of training on 12 images): the fit of stuff precision on P_t is undefined, and the summary says why."""
    from analysis.testing import fake_thing_preference

    tp = fake_thing_preference(num_queries=20, joint=True, seed=3)
    stuff_only = tp["n_stuff"] > tp["n_things"]
    tp.loc[stuff_only, "n_things"] = 0
    tp.loc[~stuff_only, "n_stuff"] = 0
    tp["p_t"] = tp["n_things"] / (tp["n_things"] + tp["n_stuff"])
    tp["stuff_tp"] = np.minimum(tp["stuff_tp"], tp["n_stuff"])
    tp["stuff_precision"] = np.where(tp["n_stuff"] > 0, tp["stuff_tp"] / tp["n_stuff"].clip(lower=1), np.nan)
    run = tmp_path / "eval_joint"
    rows = pd.read_csv(demo_root / "eval_joint" / "results.csv")
    write_fake_run(run, rows, {"model": "panoptic_segformer_tiny_joint"}, tp)
    md = make_report([run], tmp_path / "report").markdown.read_text()
    line = next(t for t in md.splitlines() if t.startswith("- Thing preference of"))
    assert "nan" not in line and f"the {int(stuff_only.sum())} queries with stuff masks all have the same P_t" in line


def test_cli_tables_recipes_and_errors(demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "r"
    assert main(["report", "--results", str(demo_root), "--out", str(out), "--tables", "7,b.4", "-q"]) == 0
    assert sorted(p.name for p in (out / "tables").glob("*.csv")) == ["table_7.csv", "table_B4.csv"]
    capsys.readouterr()
    assert main(["report", "--recipes", "--table", "11"]) == 0
    text = capsys.readouterr().out
    assert sum(ln.startswith("harness eval ") for ln in text.splitlines()) == 7 and "--corruptions all --severities 1-5" in text
    assert "--subset 2000" in text and "harness report --results" in text and "harness train" in text
    # Given results that hold only the demo's tiny models, every paper row of Table 10 is still missing.
    assert "4 missing row(s)" in recipes_text(["10"], [str(demo_root)])
    assert main(["report", "--recipes", "--table", "9"]) == 2
    assert main(["report", "--results", str(demo_root)]) == 2
    assert main(["report", "--results", str(tmp_path / "none"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no Table 9" in err and "--out" in err and "not found" in err


def test_recipes_parse_with_our_commands() -> None:
    """Every command a recipe prints names an existing subcommand; sweep / report / train lines parse."""
    from harness.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    text = recipes_text(None)
    lines = [ln for ln in text.splitlines() if ln.startswith("harness ")]
    assert len(lines) > 40
    # Commands and options of other issues parse once they have landed (issue #10: eval grid, profile;
    # issue #11: train --epochs); ours always.
    landed = {"sweep": None, "report": None, "eval": "--corruptions", "train": "--epochs", "profile": "--model"}
    for ln in lines:
        argv = ln.split()[1:]
        assert argv[0] in set(sub.choices) | {"profile"}, ln
        if argv[0] not in sub.choices:
            continue
        flag = landed[argv[0]]
        if flag is None or any(flag in a.option_strings for a in sub.choices[argv[0]]._actions):
            parser.parse_args(argv)


def test_pictures_from_candidates(synth_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    dataset = PanopticDataset(synth_root, split="val2017", validate=False)
    cats = dataset.categories
    iid = dataset.image_ids[0]
    sample = dataset[0]
    masks = torch.stack([torch.from_numpy((sample.id_map == s.id).astype(np.float32)) for s in sample.segments])
    cands = Candidates(torch.linspace(0.9, 0.5, len(masks)), torch.tensor([s.label for s in sample.segments]), masks)
    write_meta(run / "candidates" / "panoptic_segformer_tiny", {
        "model": "panoptic_segformer_tiny", "num_things": cats.num_things, "num_stuff": cats.num_stuff,
        "categories": list(cats.categories), "layers": ["last"], "post_process_options": {"m": {}},
        "data": str(synth_root), "split": "val2017"})
    stem = Path(dataset.image_info(iid)["file_name"]).stem
    save_candidates(run / "candidates" / "panoptic_segformer_tiny" / "none_0" / f"{stem}.npz", iid,
                    sample.id_map.shape, {"last": cands})
    write_fake_run(run, fake_results([("panoptic_segformer_tiny", ["m", "p"], ["last"])]))
    pics = pictures_for([run])
    assert len(pics) == 1 and [p[0] for p in pics[0].panels] == ["mask-wise merging (m)", "pixel-wise argmax (p)"]
    assert pics[0].image.shape[:2] == sample.id_map.shape
    # GT masks as candidates: mask-wise merging paints every GT segment.
    assert len(pics[0].panels[0][2]) == len(sample.segments)
    rep = make_report([run], tmp_path / "rep")
    assert any(f.path.name == "merge_vs_argmax_0.png" for f in rep.figures)
    assert not pictures_for([tmp_path / "rep"])  # folders without candidates give none
    df = pd.read_csv(tmp_path / "rep" / "tables" / "table_7.csv")
    assert df["measured"].notna().sum() == 12  # the tiny (p) and (m) rows, six columns each
