"""The tiny config overfits a handful of synthetic images: loss falls and PQ rises (CI-sized budget).

Also: `harness train` / `harness eval` work end to end (resume, bad input: tests/test_train_engine.py).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from harness.cli import main
from harness.data.format import CategoryMap
from harness.data.synthetic import categories as synth_categories
from harness.data.synthetic import generate_dataset
from harness.engine.data import AugmentConfig
from harness.engine.evaluate import evaluate
from harness.engine.train import TrainConfig, default_train_config, train
from models.configs import panoptic_segformer_tiny
from models.panoptic_segformer import PanopticSegFormer

OVERFIT_ITERS = 100
OVERFIT_LR = 1e-3


def _tiny_config(size: int):
    cats = CategoryMap.from_categories(synth_categories())
    return panoptic_segformer_tiny(num_things=cats.num_things, num_stuff=cats.num_stuff, test_scale=(size, size))


def _train_cfg(**kw) -> TrainConfig:
    base = dataclasses.replace(
        default_train_config("panoptic_segformer_tiny"),
        lr=OVERFIT_LR,
        batch_size=2,
        augment=AugmentConfig(enabled=False),
        lr_drops=(),
        warmup_iters=0,
        checkpoint_every=10**6,
        log_every=10**6,
    )
    return dataclasses.replace(base, **kw)


def _losses(run_dir: Path) -> list[float]:
    with open(run_dir / "train_log.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """4 synthetic 128-px images; PQ of an untrained model, then OVERFIT_ITERS iterations of training."""
    tmp = tmp_path_factory.mktemp("overfit")
    root = generate_dataset(tmp / "data", 4, 0, seed=7, size=128, workers=1, preview=False)
    cfg = _tiny_config(128)
    torch.manual_seed(0)
    before = evaluate(PanopticSegFormer(cfg), root, tmp / "eval_before", split="train2017")
    weights = train(cfg, root, tmp / "run", OVERFIT_ITERS, _train_cfg())
    after = evaluate(weights, root, tmp / "eval_after", split="train2017")
    return {"root": root, "tmp": tmp, "weights": weights, "before": before, "after": after}


@pytest.mark.slow
def test_tiny_config_overfits(overfit_run: dict) -> None:
    losses = _losses(overfit_run["weights"].parent)
    assert len(losses) == OVERFIT_ITERS
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, f"loss did not fall enough: {first:.3f} -> {last:.3f}"
    pq_before = overfit_run["before"]["pq"]["All"]["pq"] or 0.0
    pq_after = overfit_run["after"]["pq"]["All"]["pq"] or 0.0
    assert pq_after > pq_before + 0.15, f"PQ did not rise: {pq_before:.3f} -> {pq_after:.3f}"
    # Stuff (big regions) is learnt first; it must be clearly above chance.
    assert (overfit_run["after"]["pq"]["Stuff"]["pq"] or 0.0) > 0.3


@pytest.mark.slow
def test_cli_eval_and_mismatched_weights(overfit_run: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, weights = overfit_run["root"], overfit_run["weights"]
    out = tmp_path / "eval_p"
    assert (
        main(
            [
                "eval",
                "--weights",
                str(weights),
                "--data",
                str(root),
                "--out",
                str(out),
                "--split",
                "train2017",
                "--post-process",
                "p",
                "--max-images",
                "2",
                "--boundary",
                "-q",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "PQ" in printed and "Stuff" in printed
    result = json.loads((out / "pq.json").read_text())
    assert result["post_process"] == "p" and result["num_images"] == 2
    assert "Boundary PQ" in printed and result["boundary_pq"]["All"]["n"] > 0
    assert len(json.loads((out / "pred.json").read_text())["annotations"]) == 2
    # Weights whose config has other class counts: one clear error, exit 2, naming the mismatch.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(weights.read_bytes())
    cfg = json.loads((weights.parent / "model.json").read_text())
    cfg["config"]["num_things"] += 1
    (bad / "model.json").write_text(json.dumps(cfg))
    assert (
        main(
            [
                "eval",
                "--weights",
                str(bad / "model.safetensors"),
                "--data",
                str(root),
                "--out",
                str(tmp_path / "x"),
                "--split",
                "train2017",
            ]
        )
        == 2
    )
    # Same class count but another architecture: the strict load lists the offending keys.
    cfg["config"]["num_things"] -= 1
    cfg["config"]["num_encoder_layers"] += 1
    (bad / "model.json").write_text(json.dumps(cfg))
    from harness.engine.evaluate import load_model
    from harness.errors import UserError

    with pytest.raises(UserError) as exc:
        load_model(bad / "model.safetensors")
    assert "missing keys" in str(exc.value) and "bbox_head.transformer.encoder.layers.2." in str(exc.value)


def test_augmentation_keeps_boxes_masks_and_images_aligned(synth_root: Path) -> None:
    import numpy as np

    from harness.data.coco_panoptic import PanopticDataset
    from harness.engine.data import augment, collate, item_from_sample
    from models.box_ops import masks_to_boxes

    ds = PanopticDataset(synth_root, "train2017")
    nt = ds.categories.num_things
    rng = np.random.default_rng(0)
    for crop_prob in (0.0, 1.0):
        aug = dataclasses.replace(AugmentConfig().scaled(128 / 800), crop_prob=crop_prob)
        changed_ratio = 0
        for trial in range(8):
            item = item_from_sample(ds[trial % len(ds)], ds)
            out = augment(item, aug, (128, 128), rng)
            h, w = out.image.shape[:2]
            assert out.masks.shape[1:] == (h, w) and len(out.labels) == out.masks.shape[0] == len(out.boxes)
            assert max(h, w) <= aug.max_size + 1
            assert out.masks.flatten(1).any(1).all()  # segments cropped away are dropped
            things = (out.labels < nt).numpy()
            if things.any():
                tight = masks_to_boxes(out.masks[torch.from_numpy(things)]).numpy()
                box = out.boxes[things]
                # mmdet clips boxes to the crop, so the mask's tight box lies inside the box (up to ~1 source px
                # of nearest-resize error); without a crop the two agree.
                assert (tight[:, :2] >= box[:, :2] - 3.0).all() and (tight[:, 2:] <= box[:, 2:] + 3.0).all()
                if crop_prob == 0.0:
                    assert np.abs(tight - box).max() <= 3.0  # nearest resize: up to ~1 source px
            ratio_in = item.image.shape[0] / item.image.shape[1]
            changed_ratio += int(abs(h / w - ratio_in) > 0.05)
        assert (changed_ratio > 0) == (crop_prob == 1.0)  # only the crop policy changes the aspect ratio

    items = [augment(item_from_sample(ds[i], ds), AugmentConfig(enabled=False), (128, 128), rng) for i in range(2)]
    images, pad_mask, targets = collate(items, nt, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    for i, it in enumerate(items):
        h, w = it.image.shape[:2]
        assert torch.equal(images[i, :, :h, :w], torch.from_numpy(it.image).permute(2, 0, 1).float())
        assert not pad_mask[i, :h, :w].any() and pad_mask[i].sum() == pad_mask.shape[1] * pad_mask.shape[2] - h * w
        assert (images[i][:, pad_mask[i]] == 0).all()
        t = targets[i]
        assert t["image_size"].tolist() == [h, w]
        assert not t["thing_masks"][:, h:, :].any() and not t["thing_masks"][:, :, w:].any()
        # Boxes are normalised by the unpadded size.
        tight = masks_to_boxes(t["thing_masks"])
        expect = torch.stack(
            [
                (tight[:, 0] + tight[:, 2]) / 2 / w,
                (tight[:, 1] + tight[:, 3]) / 2 / h,
                (tight[:, 2] - tight[:, 0]) / w,
                (tight[:, 3] - tight[:, 1]) / h,
            ],
            1,
        )
        torch.testing.assert_close(t["thing_boxes"], expect, atol=0.03, rtol=0)
