"""Training loop: AdamW with the official parameter groups, gradient clipping, step LR, resumable checkpoints.

Official schedule (`configs/panformer/base.py`, see the reference §4): AdamW lr 1.4e-4, weight decay 1e-4 on
every parameter, lr x0.1 for parameters whose name contains `backbone`, `sampling_offsets` or
`reference_points`, L2 gradient clipping at 0.1, step decay x0.1 at 3/4 of the schedule (epoch 18 of 24),
no warm-up, total batch 8 (1 per GPU). Here the schedule is counted in iterations.

Outputs in `out_dir`:
- `checkpoint_last.pt`: model + optimiser + RNG state + history, written atomically every
  `checkpoint_every` iterations; a re-run with the same `out_dir` resumes from it.
- `model.safetensors` + `model.json` (our weights format: tensors + the model config) at the end.
- `train_log.csv`: iteration, loss terms, learning rate, seconds per iteration.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from harness.data.coco_panoptic import PanopticDataset
from harness.engine.data import AugmentConfig, augment, collate, item_from_sample
from harness.errors import UserError
from harness.io import atomic_write, atomic_write_text
from harness.logging_utils import progress_disabled
from models.configs import PanopticSegFormerConfig, get_config
from models.losses import LossConfig, PanopticCriterion
from models.matcher import HungarianMatcher, MatcherConfig
from models.panoptic_segformer import PanopticSegFormer

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint_last.pt"


@dataclass
class TrainConfig:
    """Optimisation settings (defaults = official).

    Attributes:
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (all parameters).
        lr_mult_keys: parameter-name substrings whose lr is multiplied by lr_mult.
        lr_mult: multiplier for those parameters.
        grad_clip: max L2 norm of all gradients (<= 0 disables).
        lr_drop: fraction of the iterations after which the lr is multiplied by 0.1.
        batch_size: images per iteration.
        seed: seeds the sampling order, the augmentation and the model initialisation.
        checkpoint_every: iterations between checkpoints (the last iteration always writes one).
        log_every: iterations between log lines.
        augment: augmentation settings; None = official recipe scaled to the model's test scale.
        matcher: matching options; loss: loss options.
    """

    lr: float = 1.4e-4
    weight_decay: float = 1e-4
    lr_mult_keys: tuple[str, ...] = ("backbone", "sampling_offsets", "reference_points")
    lr_mult: float = 0.1
    grad_clip: float = 0.1
    lr_drop: float = 0.75
    batch_size: int = 1
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    augment: AugmentConfig | None = None
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    loss: LossConfig = field(default_factory=LossConfig)


def default_train_config(model_name: str) -> TrainConfig:
    """The official recipe, except for our CPU-sized `panoptic_segformer_tiny` (random-init backbone, minutes of
    training): lr 1e-3 and batch 2, which overfit 4 synthetic images in 100 iterations (tests/test_overfit.py)."""
    if model_name == "panoptic_segformer_tiny":
        return TrainConfig(lr=1e-3, batch_size=2)
    return TrainConfig()


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Two AdamW groups: lr x lr_mult for names containing a `lr_mult_keys` substring (mmcv custom_keys)."""
    base, mult = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (mult if any(k in name for k in cfg.lr_mult_keys) else base).append(p)
    return [
        {"params": base, "lr": cfg.lr, "name": "base"},
        {"params": mult, "lr": cfg.lr * cfg.lr_mult, "name": "lr_mult"},
    ]


def save_weights(model: PanopticSegFormer, out_dir: Path, categories: list[dict[str, Any]] | None = None) -> Path:
    """Write `out_dir/model.safetensors` + `out_dir/model.json` (`models.checkpoint` format); returns the weights.

    The training set's categories (contiguous order) travel in the JSON's `meta`, so `predict` and `eval` write
    the right category ids without being told.
    """
    from models.checkpoint import save_checkpoint

    meta: dict[str, Any] = {"written_by": "harness.engine.train"}
    if categories is not None:
        meta["categories"] = categories
    return save_checkpoint(model.state_dict(), model.cfg, out_dir, meta=meta)


def _to_jsonable(obj: Any) -> Any:
    return json.loads(
        json.dumps(obj, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o))
    )


def _write_log(out_dir: Path, history: list[dict[str, float]]) -> None:
    if not history:
        return
    keys = sorted({k for row in history for k in row}, key=lambda k: (k not in ("iter", "loss", "lr", "sec"), k))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(out_dir / "train_log.csv", buf.getvalue())


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    def write(tmp: Path) -> None:
        torch.save(state, tmp)

    atomic_write(path, write)


def train(
    config: PanopticSegFormerConfig | str,
    data_root: str | Path,
    out_dir: str | Path,
    iters: int,
    train_cfg: TrainConfig | None = None,
    split: str = "train2017",
    resume: bool = True,
    init_weights: str | Path | None = None,
    device: str = "cpu",
    **config_overrides: Any,
) -> Path:
    """Train a Panoptic SegFormer on a COCO-panoptic-layout data set and return the weights path.

    Args:
        config: a model config, or a config name (`models.configs`); class counts come from the data set.
        data_root: data set root (`<root>/<split>/`, `<root>/annotations/panoptic_<split>.json`).
        out_dir: output folder (checkpoint, weights, log).
        iters: total iterations (a resumed run continues up to this number).
        train_cfg: optimisation settings (default: `default_train_config(config name)`).
        split: training split name.
        resume: continue from `out_dir/checkpoint_last.pt` when present.
        init_weights: optional weights to start from (our `.safetensors` or a training checkpoint).
        device: torch device.
        **config_overrides: model config fields to override when `config` is a name.

    Returns:
        Path of `out_dir/model.safetensors`.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = PanopticDataset(data_root, split=split)
    if len(dataset) == 0:
        raise UserError(f"no training images in {dataset.json_path}")
    cats = dataset.categories
    if isinstance(config, str):
        try:
            model_cfg = get_config(config, num_things=cats.num_things, num_stuff=cats.num_stuff, **config_overrides)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    else:
        model_cfg = config
    cfg_t = train_cfg or default_train_config(model_cfg.name)
    if (model_cfg.num_things, model_cfg.num_stuff) != (cats.num_things, cats.num_stuff):
        raise UserError(
            f"model config has {model_cfg.num_things} thing / {model_cfg.num_stuff} stuff classes but "
            f"{dataset.json_path} has {cats.num_things} / {cats.num_stuff}"
        )

    torch.manual_seed(cfg_t.seed)
    model = PanopticSegFormer(model_cfg).to(device)
    if init_weights is not None:
        from harness.engine.evaluate import load_model

        init = load_model(init_weights, model_cfg.name, cats.num_things, cats.num_stuff)
        if init.cfg.to_dict() != model_cfg.to_dict():
            raise UserError(f"--init {init_weights} holds another model config than {model_cfg.name}")
        model.load_state_dict(init.state_dict())
    if model_cfg.box_free:  # Table 6 "6*": L1 on mass centres, no GIoU (paper App. A.1)
        matcher_cfg = dataclasses.replace(cfg_t.matcher, use_giou=False)
        loss_cfg = dataclasses.replace(cfg_t.loss, use_giou=False, box_target="mass_center")
    else:
        matcher_cfg, loss_cfg = cfg_t.matcher, cfg_t.loss
    criterion = PanopticCriterion(cats.num_things, cats.num_stuff, HungarianMatcher(matcher_cfg), loss_cfg)
    optimizer = torch.optim.AdamW(param_groups(model, cfg_t), lr=cfg_t.lr, weight_decay=cfg_t.weight_decay)
    # Step decay computed from the iteration (not a scheduler object), so a resumed run with another
    # --iters follows the new schedule.
    drop_at = max(1, int(round(iters * cfg_t.lr_drop)))
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    aug_cfg = cfg_t.augment
    if aug_cfg is None:
        aug_cfg = AugmentConfig().scaled(min(model_cfg.test_scale) / 800.0)
    rng = np.random.default_rng(cfg_t.seed)
    order: list[int] = []
    start, history = 0, []

    ckpt_path = out / CHECKPOINT
    if resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        if state["config"] != model_cfg.to_dict():
            raise UserError(f"{ckpt_path} was written for another model config; use a new --out or --no-resume")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        order, start, history = state["order"], state["iter"], state["history"]
        log.info("resumed from %s at iteration %d", ckpt_path, start)

    def checkpoint(it: int) -> None:
        _save_checkpoint(
            ckpt_path,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
                "order": order,
                "iter": it,
                "history": history,
                "config": model_cfg.to_dict(),
                "train_config": _to_jsonable(cfg_t),
            },
        )
        _write_log(out, history)

    model.train()
    bar = tqdm(range(start, iters), initial=start, total=iters, desc="train", disable=progress_disabled())
    for it in bar:
        t0 = time.perf_counter()
        for group, base_lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base_lr * (0.1 if it >= drop_at else 1.0)
        items = []
        for _ in range(cfg_t.batch_size):
            if not order:  # a new epoch: reshuffle
                order = [int(i) for i in rng.permutation(len(dataset))]
            sample = dataset[order.pop()]
            items.append(augment(item_from_sample(sample, dataset), aug_cfg, model_cfg.test_scale, rng))
        images, pad_mask, targets = collate(items, cats.num_things, model_cfg.pixel_mean, model_cfg.pixel_std)
        images, pad_mask = images.to(device), pad_mask.to(device)
        loss, logs = criterion(model, images, pad_mask, targets)
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss at iteration {it + 1}: {logs}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg_t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg_t.grad_clip)
        optimizer.step()
        row = {"iter": it + 1, "lr": optimizer.param_groups[0]["lr"], "sec": time.perf_counter() - t0, **logs}
        history.append(row)
        bar.set_postfix(loss=f"{logs['loss']:.3f}")
        if (it + 1) % cfg_t.log_every == 0:
            log.info("iter %d/%d loss %.4f lr %.2e", it + 1, iters, logs["loss"], row["lr"])
        if (it + 1) % cfg_t.checkpoint_every == 0 or it + 1 == iters:
            checkpoint(it + 1)
    model.eval()
    path = save_weights(model, out, [dict(c) for c in cats.categories])
    _write_log(out, history)
    log.info("wrote %s", path)
    return path
