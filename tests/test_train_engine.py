"""The training engine: exact resume (also after SIGKILL), checkpoints kept / refused, non-finite losses, bad input,
epochs and AMP, model-generic collation. CPU-cheap: the tiny config at 64 px, a few steps."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.cli import main
from harness.data.synthetic import generate_dataset
from harness.engine.data import AugmentConfig
from harness.engine.train import TrainConfig, default_train_config, train
from harness.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TINY = "panoptic_segformer_tiny"
SMALL = {"test_scale": (64, 64)}


@pytest.fixture(scope="module")
def data64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("train64") / "data", 6, 2, seed=3, size=64, workers=1,
                            preview=False)


def _cfg(**kw: object) -> TrainConfig:
    base = default_train_config(TINY)
    return TrainConfig(**{**base.__dict__, "checkpoint_every": 2, "log_every": 10**6, **kw})


def _log(run: Path) -> list[dict[str, str]]:
    with open(run / "train_log.csv", newline="") as f:
        return list(csv.DictReader(f))


def _losses(run: Path) -> list[float]:
    return [float(r["loss"]) for r in _log(run)]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness", "train", "-q", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_resume_continues_exactly(data64: Path, tmp_path: Path) -> None:
    # A flat schedule, so that a 2-step run is the first half of the 4-step one (a run's warm-up and lr drop depend
    # on its length; the SIGKILL test below interrupts a run of one length). The scaled official augmentation: its
    # per-step RNG is part of what must resume exactly.
    tc = _cfg(warmup_iters=0, lr_drops=())
    straight = train(TINY, data64, tmp_path / "straight", 4, tc, **SMALL)
    train(TINY, data64, tmp_path / "resumed", 2, tc, **SMALL)
    resumed = train(TINY, data64, tmp_path / "resumed", 4, tc, **SMALL)
    assert len(_losses(straight.parent)) == 4
    assert _losses(straight.parent) == _losses(resumed.parent)  # bit-identical on one CPU thread
    from safetensors.torch import load_file

    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "resumed" / "checkpoint_prev.pt").is_file()
    assert not list((tmp_path / "resumed").glob(".*tmp*"))
    doc = json.loads((tmp_path / "resumed" / "model.json").read_text())
    assert doc["family"] == "panoptic_segformer" and doc["config"]["test_scale"] == [64, 64]
    state = torch.load(tmp_path / "resumed" / "checkpoint_last.pt", weights_only=True)
    assert state["family"] == "panoptic_segformer" and state["step"] == 4


def test_resume_after_sigkill_equals_uninterrupted(data64: Path, tmp_path: Path) -> None:
    args = ["--config", TINY, "--data", str(data64), "--iters", "8", "--checkpoint-every", "2", "--no-augment"]
    straight = tmp_path / "straight"
    subprocess.run(_cli(*args, "--out", str(straight)), check=True, env=_env(), timeout=600)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*args, "--out", str(killed)), env=_env())
    deadline = time.time() + 600
    while not (killed / "checkpoint_prev.pt").is_file():  # two checkpoints written: mid-run for sure
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.safetensors").exists()
    subprocess.run(_cli(*args, "--out", str(killed)), check=True, env=_env(), timeout=600)
    assert _losses(killed) == _losses(straight)
    assert [r["step"] for r in _log(killed)] == [str(i) for i in range(1, 9)]


def test_non_finite_loss_names_step_and_term_and_keeps_checkpoint(data64: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    tc = _cfg(augment=AugmentConfig(enabled=False))
    out = tmp_path / "run"
    train(TINY, data64, out, 2, tc, **SMALL)
    # The weights diverge: the last location layer's box head turns NaN (its box losses go first).
    ckpt = out / "checkpoint_last.pt"
    state = torch.load(ckpt, weights_only=True)
    state["model"]["bbox_head.reg_branches.1.4.bias"][:] = float("nan")
    torch.save(state, ckpt)
    before = ckpt.read_bytes()
    with pytest.raises(UserError) as exc:
        train(TINY, data64, out, 4, tc, **SMALL)
    msg = str(exc.value)
    assert "non-finite loss at step 3" in msg and "d1.loss_l1 = nan" in msg and str(ckpt) in msg
    assert ckpt.read_bytes() == before  # the last checkpoint is kept as it was


def test_corrupt_checkpoint_is_refused_and_the_previous_one_kept(data64: Path, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    tc = _cfg(augment=AugmentConfig(enabled=False), warmup_iters=0, lr_drops=())  # flat: runs of 4 and 6 agree
    out = tmp_path / "run"
    train(TINY, data64, out, 4, tc, **SMALL)  # checkpoints at 2 (-> prev) and 4 (last)
    last, prev = out / "checkpoint_last.pt", out / "checkpoint_prev.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a partial copy
    good_prev = prev.read_bytes()
    with caplog.at_level("WARNING"):
        train(TINY, data64, out, 6, tc, **SMALL)
    assert f"refusing corrupt or partial checkpoint {last}" in caplog.text
    assert "resuming from the previous checkpoint" in caplog.text
    assert [int(r["step"]) for r in _log(out)] == [1, 2, 3, 4, 5, 6]  # steps 3-4 recomputed from step 2
    straight = train(TINY, data64, tmp_path / "straight", 6, tc, **SMALL)
    assert _losses(out) == _losses(straight.parent)
    # The partial file was overwritten, never rotated over the good previous checkpoint; the new last is valid.
    assert torch.load(last, weights_only=True)["step"] == 6
    assert good_prev != prev.read_bytes() and torch.load(prev, weights_only=True)["step"] == 4
    # Every checkpoint unreadable: one clear error naming them, exit 2.
    for p in (last, prev):
        p.write_bytes(b"not a checkpoint")
    assert main(["train", "-q", "--config", TINY, "--data", str(data64), "--out", str(out), "--iters", "8"]) == 2


def test_bad_input_fails_before_any_work(data64: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    base = ["train", "-q", "--data", str(data64), "--out", str(out)]
    cases = [
        ([*base, "--config", "nope", "--iters", "1"], "unknown --config 'nope'"),
        ([*base, "--config", TINY], "exactly one of --iters and --epochs"),
        ([*base, "--config", TINY, "--iters", "2", "--epochs", "1"], "exactly one of --iters and --epochs"),
        ([*base, "--config", TINY, "--iters", "1", "--split", "train2099"], "split 'train2099' not found"),
        (["train", "-q", "--config", TINY, "--data", str(tmp_path / "missing"), "--out", str(out), "--iters", "1"],
         "missing"),
        ([*base, "--config", TINY, "--iters", "1", "--amp", "fp16"], "needs a CUDA device"),
        ([*base, "--config", TINY, "--iters", "1", "--ema", "1"], "--ema"),
    ]
    for argv, expect in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expect in err and "Traceback" not in err, (argv, err)
    assert not out.exists()  # nothing written


def test_resume_refuses_other_settings_architecture_and_categories(data64: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(data64, data)
    out = tmp_path / "run"
    argv = ["train", "-q", "--data", str(data), "--out", str(out), "--iters", "1", "--no-augment"]
    assert main([*argv, "--config", TINY]) == 0
    capsys.readouterr()
    # Another config into the run folder: refused by its settings (output marker), naming the setting.
    assert main([*argv, "--config", "panoptic_segformer_tiny_joint", "--iters", "2"]) == 2
    err = capsys.readouterr().err
    assert "other settings (config:" in err and "--overwrite" in err
    # A folder made before output markers is adopted: the checkpoint's own check names the architecture.
    (out / ".psf-harness.json").unlink()
    assert main([*argv, "--config", "panoptic_segformer_tiny_joint", "--iters", "2"]) == 2
    err = capsys.readouterr().err
    assert str(out / "checkpoint_last.pt") in err and "another model architecture" in err
    # The same data set root with one category renamed (regenerated in place): other categories.
    for split in ("train2017", "val2017"):
        path = data / "annotations" / f"panoptic_{split}.json"
        doc = json.loads(path.read_text())
        doc["categories"][0]["name"] = "plate"
        path.write_text(json.dumps(doc))
    assert main([*argv, "--iters", "2", "--config", TINY]) == 2
    assert "other categories" in capsys.readouterr().err


def test_epochs_give_the_step_count_and_the_official_drop(data64: Path, tmp_path: Path) -> None:
    from harness.engine.train_setup import make_schedule

    s = make_schedule(TrainConfig(), num_images=118_287, global_batch=8, iters=None, epochs=24)
    assert s.total_steps == 354_861 and s.drop_at == (266_146,)  # epoch 18 of 24 (official step at 3/4)
    assert s.factor(266_145) == 1.0 and s.factor(266_146) == pytest.approx(0.1)
    with pytest.raises(UserError):
        make_schedule(TrainConfig(), 10, 2, iters=None, epochs=None)
    # 6 images, batch 2: 1.5 epochs = 5 steps (rounded up), lr x0.1 after step 4 (3/4 of 5, rounded).
    weights = train(TINY, data64, tmp_path / "ep", epochs=1.5,
                    train_cfg=_cfg(warmup_iters=0, augment=AugmentConfig(enabled=False)), **SMALL)
    rows = _log(weights.parent)
    assert len(rows) == 5 and float(rows[-1]["epoch"]) == pytest.approx(5 / 3, abs=1e-3)
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[:4] == [1e-3] * 4 and lrs[4:] == pytest.approx([1e-4])
    run = json.loads((weights.parent / "train_run.json").read_text())
    assert run["global_batch"] == 2 and run["total_steps"] == 5 and run["lr_drop_steps"] == [4]


def test_amp_bf16_on_cpu_trains(data64: Path, tmp_path: Path) -> None:
    w = train(TINY, data64, tmp_path / "amp", 2, _cfg(amp="auto", augment=AugmentConfig(enabled=False)), **SMALL)
    losses = _losses(w.parent)
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert json.loads((w.parent / "train_run.json").read_text())["amp"] == "bf16"


def test_weight_average_is_what_is_written_and_it_resumes(data64: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from harness.data.coco_panoptic import PanopticDataset
    from models.zoo import build_model, get_config

    tc = _cfg(warmup_iters=0, lr_drops=(), ema_decay=0.9, checkpoint_every=1, augment=AugmentConfig(enabled=False))
    w = train(TINY, data64, tmp_path / "one", 1, tc, **SMALL)
    raw = torch.load(w.parent / "checkpoint_last.pt", weights_only=True)["model"]
    cats = PanopticDataset(data64).categories
    torch.manual_seed(tc.seed)  # the run's initialisation (train seeds it the same way)
    init = build_model(get_config(TINY, num_things=cats.num_things, num_stuff=cats.num_stuff, **SMALL)).state_dict()
    written = load_file(str(w))
    d = 2 / 11  # first update: min(decay, (1 + 1) / (10 + 1))
    floats = [k for k, v in init.items() if v.is_floating_point()]
    assert any(not torch.equal(raw[k], init[k]) for k in floats)  # the step moved the weights
    for k in floats:
        torch.testing.assert_close(written[k], d * init[k] + (1 - d) * raw[k], rtol=1e-5, atol=1e-6)
    # Resumed: the average continues from the checkpoint (the written weights equal an uninterrupted run's).
    straight = train(TINY, data64, tmp_path / "straight", 3, tc, **SMALL)
    train(TINY, data64, tmp_path / "resumed", 2, tc, **SMALL)
    resumed = train(TINY, data64, tmp_path / "resumed", 3, tc, **SMALL)
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    straight_raw = torch.load(straight.parent / "checkpoint_last.pt", weights_only=True)["model"]
    assert any(not torch.equal(a[k], straight_raw[k]) for k in floats)  # written: the average, not the raw weights


def test_validation_curve_and_plot(data64: Path, tmp_path: Path) -> None:
    w = train(TINY, data64, tmp_path / "val", 4, _cfg(val_every=2, val_images=2), **SMALL)
    with open(w.parent / "val_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["2", "4"] and all(r["images"] == "2" for r in rows)
    assert {"pq", "pq_th", "pq_st", "post_process"} <= set(rows[0])
    png = w.parent / "learning_curve.png"
    assert png.is_file() and png.stat().st_size > 10_000


def test_oom_message_names_batch_and_size() -> None:
    from harness.engine.distributed import DistInfo
    from harness.engine.train_step import OutOfMemoryError, amp_settings, train_step

    def criterion(model, images, pad_mask, targets):  # the device's allocator failing (no GPU here)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = (torch.zeros(3, 3, 40, 56), torch.zeros(3, 40, 56, dtype=torch.bool), [])
    with pytest.raises(OutOfMemoryError) as exc:
        train_step(model, criterion, opt, batch, 6, DistInfo(), amp_settings(None, "cpu"), 0.1)
    assert "step 7" in str(exc.value) and "batch 3" in str(exc.value) and "40x56" in str(exc.value)
    assert "--batch-size" in str(exc.value)


def test_panoptic_fcn_recipe_sgd_poly_warmup_and_value_clipping(data64: Path, tmp_path: Path) -> None:
    import dataclasses
    import math

    from harness.engine.distributed import DistInfo
    from harness.engine.train_setup import build_optimizer, make_schedule
    from harness.engine.train_step import amp_settings, train_step

    tc = default_train_config("panoptic_fcn_r50_3x")  # detectron2's recipe (models.baselines.panoptic_fcn)
    assert (tc.optimizer, tc.lr, tc.momentum, tc.lr_schedule, tc.poly_power) == ("sgd", 0.01, 0.9, "poly", 0.9)
    assert (tc.warmup_iters, tc.grad_clip, tc.grad_clip_mode, tc.batch_size * 8) == (1000, 35.0, "value", 16)
    assert default_train_config("panoptic_fcn_tiny").optimizer == "adamw"  # the tiny recipe is shared by all tiny
    # WarmupPolyLR by hand: lr x (1 - it / max_iter)^0.9, times the linear warm-up factor from 0.001.
    sched = make_schedule(dataclasses.replace(tc, warmup_iters=10), 100, 2, 1000, None)
    assert sched.drop_at == () and sched.total_steps == 1000
    assert sched.factor(500) == pytest.approx(0.5 ** 0.9, rel=1e-12)
    assert sched.factor(5) == pytest.approx((1 - 5 / 1000) ** 0.9 * (0.001 + 0.999 * 0.5), rel=1e-12)
    assert sched.factor(999) == pytest.approx(0.001 ** 0.9, rel=1e-12)
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, tc, 1.0)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9
    assert math.isclose(opt.param_groups[0]["lr"], 0.01)

    def criterion(m, images, pad_mask, targets):  # gradients: +-1000 on weights, 1000 and 1 on the biases
        loss = (m.weight * torch.tensor([[1000.0, -1000.0, 0.5], [0.0, 2.0, -3.0]])).sum() + m.bias @ torch.tensor(
            [1000.0, 1.0])
        return loss, {"loss": float(loss.detach())}

    batch = (torch.zeros(1, 3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.bool), [])
    res = train_step(model, criterion, opt, batch, 0, DistInfo(), amp_settings(None, "cpu"), 35.0,
                     clip_mode="value")
    assert model.weight.grad.tolist() == [[35.0, -35.0, 0.5], [0.0, 2.0, -3.0]]
    assert model.bias.grad.tolist() == [35.0, 1.0]
    assert res.grad_norm == pytest.approx(math.sqrt(3 * 1000.0**2 + 0.25 + 4 + 9 + 1), rel=1e-6)  # before clipping
    # The whole recipe end to end on the tiny Panoptic FCN (2 steps, batch 1).
    w = train("panoptic_fcn_tiny", data64, tmp_path / "pfcn", 2, dataclasses.replace(
        tc, batch_size=1, checkpoint_every=2, log_every=10**6, augment=AugmentConfig(enabled=False)))
    run = json.loads((w.parent / "train_run.json").read_text())
    assert run["train_config"]["optimizer"] == "sgd" and run["train_config"]["lr_schedule"] == "poly"
    assert all(np.isfinite(_losses(w.parent)))
    want = [0.01 * 0.001, 0.01 * 0.5**0.9 * (0.001 + 0.999 / 2)]  # steps 0 and 1 of 2, warm-up over both
    assert [float(r["lr"]) for r in _log(w.parent)] == pytest.approx(want, rel=1e-6)


def test_collate_follows_the_models_test_transform() -> None:
    from harness.engine.data import TrainItem, collate_for
    from models.inference import TestTransformSpec

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    item = TrainItem(image=image, masks=torch.zeros((0, 5, 7), dtype=torch.bool), labels=torch.zeros(0).long(),
                     boxes=np.zeros((0, 4), np.float32))
    spec = TestTransformSpec(resize="detectron2", mean=(103.5, 116.3, 123.7), std=(1.0, 1.0, 1.0),
                             channel_order="bgr", size_divisor=4)
    images, pad, _ = collate_for([item], 3, spec)
    assert images.shape == (1, 3, 8, 8) and pad[0, :5, :7].logical_not().all() and pad[0, 5:].all()
    expect = (image[..., ::-1].astype(np.float32) - np.array(spec.mean, np.float32)) / np.array(spec.std, np.float32)
    np.testing.assert_allclose(images[0, :, :5, :7].permute(1, 2, 0).numpy(), expect, rtol=0, atol=1e-5)


def test_pretrained_backbone_starts_training_and_is_not_needed_later(data64: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`--pretrained-backbone` loads the file into the backbone before step 1; the trained weights then load
    without it (the path is not re-read), and an unreadable file is one line, exit 2."""
    from models.checkpoint import load_model
    from models.configs import get_config
    from models.panoptic_segformer import PanopticSegFormer

    ref = PanopticSegFormer(get_config(TINY, num_things=10, num_stuff=6, **SMALL))
    torch.manual_seed(123)
    for p in ref.backbone.parameters():
        p.data.normal_()
    backbone_file = tmp_path / "imagenet.pth"
    torch.save(ref.backbone.state_dict(), backbone_file)
    out = tmp_path / "run"
    args = ["train", "-q", "--config", TINY, "--data", str(data64), "--out", str(out), "--iters", "1",
            "--pretrained-backbone", str(backbone_file), "--lr", "1e-30"]
    assert main(args) == 0
    backbone_file.unlink()  # the trained weights do not need it
    model, _ = load_model(out / "model.safetensors")
    for (name, a), b in zip(model.backbone.state_dict().items(), ref.backbone.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name  # lr ~0: still the file's values
    (tmp_path / "bad.pth").write_text("not a checkpoint")
    capsys.readouterr()
    args[args.index("--out") + 1] = str(tmp_path / "run2")
    args[args.index("--pretrained-backbone") + 1] = str(tmp_path / "bad.pth")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.pth" in err[0]
