"""Every figure function writes a non-empty PNG of its documented size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analysis import figures as F
from analysis.paper import paper_table
from analysis.runs import load_runs
from analysis.testing import write_fake_demo
from analysis.thing_preference import bins_from_queries


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("figs")
    write_fake_demo(root / "demo")
    return load_runs([root / "demo"])


def _check(path: Path, size: tuple[float, float]) -> None:
    assert path.is_file() and path.stat().st_size > 5000
    img = Image.open(path)
    assert img.format == "PNG"
    assert img.size == (round(size[0] * F.DPI), round(size[1] * F.DPI))
    arr = np.asarray(img.convert("L"))
    assert arr.std() > 5  # something was drawn


def test_result_figures(demo, tmp_path: Path) -> None:
    r = demo.results
    joint = demo.thing_preference[demo.thing_preference["model"].str.endswith("joint")]
    cases = {
        "robustness_heatmap": lambda p: F.robustness_heatmap(r, p),
        "corruption_family_bars": lambda p: F.corruption_family_bars(r, p),
        "severity_curves": lambda p: F.severity_curves(r, p),
        "thing_preference_scatter": lambda p: F.thing_preference_scatter(demo.thing_preference, p),
        "thing_preference_bins": lambda p: F.thing_preference_bins(bins_from_queries(joint), p,
                                                                   paper=pd.DataFrame(paper_table("B6").rows)),
        "per_layer": lambda p: F.per_layer(r, p),
        "alpha_beta_heatmap": lambda p: F.alpha_beta_heatmap(demo.sweep_rows, p),
        "threshold_heatmap": lambda p: F.threshold_heatmap(demo.sweep_rows, p),
    }
    assert set(cases) == set(F.SIZES)
    for name, fn in cases.items():
        _check(fn(tmp_path / f"{name}.png"), F.SIZES[name])


def test_picture_figures(demo, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = (rng.random((90, 120, 3)) * 255).astype(np.uint8)
    ids = np.zeros((90, 120), np.int64)
    ids[5:40, 10:70] = 300
    ids[50:, :] = 301
    segs = [{"id": 300, "category_id": 1}, {"id": 301, "category_id": 2}]
    cats = [{"id": 1, "name": "box", "isthing": 1, "color": [220, 50, 0]},
            {"id": 2, "name": "ground", "isthing": 0, "color": [0, 90, 200]}]
    p = F.merge_comparison(image, [("mask-wise (m)", ids, segs), ("argmax (p)", ids * (ids != 300), segs[1:])],
                           cats, tmp_path / "merge.png")
    _check(p, (4.2 * 3, round(4.2 * 90 / 120 + 0.6, 2)))
    npz = demo.attention[0]
    with np.load(npz) as d:
        layers = len([k for k in d.files if k.startswith("attn_thing_")])
        heads = d["attn_thing_last"].shape[1]
    _check(F.attention_maps(npz, tmp_path / "attn.png"), (2.0 * (heads + 1), 2.0 * layers + 0.6))
    _check(F.attention_maps(npz, tmp_path / "attn_img.png", kind="stuff", query=1,
                            image=(rng.random((96, 128, 3)) * 255).astype(np.uint8)),
           (2.0 * (heads + 1), 2.0 * layers + 0.6))
    with pytest.raises(ValueError, match="out of range"):
        F.attention_maps(npz, tmp_path / "x.png", query=99)


def test_empty_inputs_still_draw(tmp_path: Path) -> None:
    empty = pd.DataFrame(columns=["model", "post_process", "layer", "corruption", "severity", "pq", "alpha", "beta",
                                  "t_cnf", "t_keep"])
    assert Image.open(F.robustness_heatmap(empty, tmp_path / "h.png")).size == (1300, 500)
    assert Image.open(F.alpha_beta_heatmap(empty, tmp_path / "ab.png")).size == (650, 450)


def test_attention_from_harness_predict(synth_root: Path, tmp_path: Path) -> None:
    """A real `harness predict --dump-attention` file draws (things when painted, else stuff)."""
    import torch

    from harness.cli import main
    from harness.data.coco_panoptic import PanopticDataset, read_image_rgb
    from models.checkpoint import save_checkpoint
    from models.configs import panoptic_segformer_tiny
    from models.panoptic_segformer import PanopticSegFormer

    ds = PanopticDataset(synth_root, split="val2017", validate=False)
    torch.manual_seed(0)
    cfg = panoptic_segformer_tiny(num_things=ds.categories.num_things, num_stuff=ds.categories.num_stuff,
                                  test_scale=(128, 128))
    model = PanopticSegFormer(cfg)
    with torch.no_grad():  # raise the focal-loss prior so that random queries get painted
        for name, p in model.named_parameters():
            if "cls" in name and name.endswith("bias"):
                p.fill_(2.0)
    save_checkpoint(model.state_dict(), cfg, tmp_path / "w" / "model.safetensors")
    image = ds.image_path(ds.image_ids[0])
    assert main(["predict", "--weights", str(tmp_path / "w"), "--image", str(image), "--out", str(tmp_path / "p"),
                 "--dump-attention", "-q"]) == 0
    npz = next((tmp_path / "p").glob("*_attention.npz"))
    with np.load(npz) as d:
        layers = len([k for k in d.files if k.startswith("attn_stuff_")])
        heads = d["attn_stuff_last"].shape[1]
        assert d["attn_stuff_last"].shape[0] + d["attn_thing_last"].shape[0] > 0
    out = F.attention_maps(npz, tmp_path / "a.png", image=read_image_rgb(image))
    _check(out, (2.0 * (heads + 1), 2.0 * layers + 0.6))
