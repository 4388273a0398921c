"""Training: the recipe (:class:`TrainConfig`), and :func:`train`, which runs it in readable steps.

Official schedule (`configs/panformer/base.py`, see the reference §4): AdamW lr 1.4e-4, weight decay 1e-4 on
every parameter, lr x0.1 for parameters whose name contains `backbone`, `sampling_offsets` or
`reference_points`, L2 gradient clipping at 0.1, step decay x0.1 at 3/4 of the schedule (epoch 18 of 24),
no warm-up, total batch 8 (1 per GPU x 8 GPUs). The schedule is given in steps (``iters``) or epochs.

The tiny configs (random-init backbone, minutes of CPU) use their own recipe (:func:`default_train_config`,
docs/training.md explains every difference and why).

Steps of :func:`train` (each in its own module):

1. :mod:`harness.engine.train_setup`: open the data, resolve the config, schedule, model, criterion, optimiser —
   every user mistake is reported before any work;
2. :mod:`harness.engine.train_checkpoint`: resume from the run folder (refusing corrupt files and checkpoints of
   another architecture or other categories);
3. :mod:`harness.engine.train_step`: one step at a time on this process's share of the deterministic sample
   stream (:class:`harness.engine.data.SampleStream`), gradients averaged over torchrun processes;
4. :mod:`harness.engine.train_monitor`: the loss log, validation PQ every ``val_every`` steps, the learning curve;
   checkpoints every ``checkpoint_every`` steps; the final weights (``model.safetensors`` + ``model.json``).

The run folder is an owned output (:mod:`harness.engine.train_outputs`): its settings are pinned, a run of other
settings is refused unless ``overwrite``, a longer schedule continues the same run. Only rank 0 claims it and writes
files, after every check. Outputs in ``out_dir``: ``checkpoint_last.pt`` / ``checkpoint_prev.pt``,
``train_log.csv``, ``val_log.csv``, ``learning_curve.png``, ``model.safetensors`` + ``model.json``,
``train_run.json`` (settings: batch sizes, lr scaling, schedule, device, AMP, world size).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.engine.data import SampleStream, augment_for, collate_for
from harness.engine.distributed import DistInfo, barrier, init_distributed
from harness.errors import UserError
from harness.io import atomic_write_json
from harness.logging_utils import progress_disabled
from harness.engine.train_config import TINY_CONFIGS, TrainConfig, default_train_config
from harness.engine.train_outputs import jsonable

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "default_train_config", "train", "save_weights", "TINY_CONFIGS"]

CHECKPOINT = "checkpoint_last.pt"
RUN_JSON = "train_run.json"
def save_weights(model: nn.Module, out_dir: Path, categories: list[dict[str, Any]] | None = None,
                 cfg: Any = None) -> Path:
    """Write `out_dir/model.safetensors` + `out_dir/model.json` (`models.checkpoint` format, with the family);
    the training set's categories (contiguous order) travel in the JSON's `meta`. Returns the weights path.

    ``cfg`` defaults to ``model.cfg``."""
    from models.checkpoint import save_checkpoint

    meta: dict[str, Any] = {"written_by": "harness.engine.train"}
    if categories is not None:
        meta["categories"] = categories
    return save_checkpoint(model.state_dict(), cfg if cfg is not None else model.cfg, out_dir, meta=meta)


@dataclass
class _Run:
    """Everything built by step 1 (see the module docstring)."""

    out: Path
    info: DistInfo
    cfg: Any
    family: str
    train_cfg: TrainConfig
    dataset: Any
    val_dataset: Any
    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Any
    stream: SampleStream
    amp: Any
    scaler: Any
    ema: Any
    categories: list[dict[str, Any]]
    global_batch: int
    lr_scale: float


def _setup(config: Any, data_root: str | Path, out_dir: str | Path, iters: int | None, epochs: float | None,
           train_cfg: TrainConfig | None, split: str, init_weights: str | Path | None, device: str,
           overrides: dict[str, Any]) -> _Run:
    """Step 1: check every input, then build the run (nothing is written yet)."""
    from harness.engine import train_setup as setup
    from harness.engine.train_step import WeightAverage, amp_settings
    from models.zoo import build_model, family_of_config

    if (iters is None) == (epochs is None):
        raise UserError("give exactly one of --iters and --epochs")
    dataset = setup.open_split(data_root, split)
    cats = dataset.categories
    cfg = setup.resolve_config(config, cats.num_things, cats.num_stuff, **overrides)
    tc = train_cfg or default_train_config(cfg.name)
    if tc.batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {tc.batch_size}")
    if tc.grad_clip_mode not in ("norm", "value"):  # any other value would clip nothing
        raise UserError(f"gradient clip mode must be 'norm' or 'value', got {tc.grad_clip_mode!r}")
    val_dataset = setup.open_split(data_root, tc.val_split, "validation") if tc.val_images > 0 else None
    amp = amp_settings(tc.amp, device)
    info = init_distributed(device)
    global_batch = tc.batch_size * info.world_size
    schedule = setup.make_schedule(tc, len(dataset), global_batch, iters, epochs)
    lr_scale = setup.lr_scale_for(tc, global_batch)
    torch.manual_seed(tc.seed)  # identical initialisation on every process
    model = build_model(cfg).to(info.device)  # a bad --pretrained-backbone file: InputError naming it
    if init_weights is not None:
        setup.load_init_weights(model, cfg, init_weights)
    elif (hasattr(cfg, "pretrained_backbone") and not cfg.pretrained_backbone and getattr(cfg, "norm_eval", False)
          and cfg.name not in TINY_CONFIGS):
        # The official recipe freezes BatchNorm for ImageNet weights; from random init that switches the residual
        # branches off for good (models.backbones.build_backbone): the model would learn almost nothing.
        log.warning("%s: training from a random-init backbone with frozen BatchNorm; the official recipe starts "
                    "from ImageNet weights (--pretrained-backbone FILE)", cfg.name)
    criterion = setup.build_criterion(cfg, cats.num_things, cats.num_stuff, tc)
    optimizer = setup.build_optimizer(model, tc, lr_scale)
    spec = model.test_transform()
    try:
        aug = tc.augment if tc.augment is not None else augment_for(spec, tc.augment_policy)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    stream = SampleStream(dataset, aug, (spec.long, spec.short), tc.seed, global_batch)
    scaler = torch.amp.GradScaler("cuda") if amp.dtype == torch.float16 else None
    ema = WeightAverage(model, tc.ema_decay) if tc.ema_decay > 0 else None
    return _Run(out=Path(out_dir), info=info, cfg=cfg, family=family_of_config(cfg).name, train_cfg=tc,
                dataset=dataset, val_dataset=val_dataset, model=model, criterion=criterion, optimizer=optimizer,
                schedule=schedule, stream=stream, amp=amp, scaler=scaler, ema=ema,
                categories=[dict(c) for c in cats.categories], global_batch=global_batch, lr_scale=lr_scale)


def _resume(run: _Run) -> tuple[int, list[dict[str, Any]], list[dict[str, Any]], bool]:
    """Step 2: ``(start step, loss history, validation rows, last checkpoint valid)`` from the run folder."""
    from harness.engine.train_checkpoint import check_compatible, find_resume_checkpoint

    state, last_valid = find_resume_checkpoint(run.out)
    if state is None:
        return 0, [], [], last_valid
    where = run.out / CHECKPOINT
    check_compatible(state, where, run.family, run.cfg.to_dict(), run.categories)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    if run.ema is not None:
        if not state.get("ema"):
            raise UserError(f"{where}: holds no weight average (ema_decay {run.train_cfg.ema_decay}); start over "
                            "with --no-resume --overwrite")
        run.ema.load_state_dict(state["ema"])
    log.info("resumed from %s at step %d", where, state["step"])
    return int(state["step"]), list(state["history"]), list(state.get("val_history", [])), last_valid


def _describe(run: _Run) -> dict[str, Any]:
    tc, s = run.train_cfg, run.schedule
    return {"model": run.cfg.name, "family": run.family, "world_size": run.info.world_size,
            "batch_per_process": tc.batch_size, "global_batch": run.global_batch,
            "base_lr": tc.lr, "lr_scaling": tc.lr_scaling, "effective_lr": tc.lr * run.lr_scale,
            "total_steps": s.total_steps, "steps_per_epoch": s.steps_per_epoch,
            "epochs": round(s.total_steps / s.steps_per_epoch, 3), "lr_drop_steps": list(s.drop_at),
            "warmup_steps": s.warmup_steps, "device": run.info.device, "backend": run.info.backend,
            "amp": run.amp.name, "train_images": len(run.dataset), "seed": tc.seed,
            "train_config": jsonable(tc), "model_config": run.cfg.to_dict()}


def train(
    config: Any,
    data_root: str | Path,
    out_dir: str | Path,
    iters: int | None = None,
    train_cfg: TrainConfig | None = None,
    split: str = "train2017",
    resume: bool = True,
    init_weights: str | Path | None = None,
    device: str = "cpu",
    epochs: float | None = None,
    overwrite: bool = False,
    **config_overrides: Any,
) -> Path:
    """Train a model of any family on a COCO-panoptic-layout data set and return the weights path.

    Args:
        config: a model config, or a model name (``models.zoo``); class counts come from the data set.
        data_root: data set root (``<root>/<split>/``, ``<root>/annotations/panoptic_<split>.json``).
        out_dir: output folder (checkpoints, logs, weights).
        iters / epochs: run length, exactly one (a resumed run continues up to it).
        train_cfg: optimisation settings (default: :func:`default_train_config` of the config's name).
        split: training split name.
        resume: continue from the run folder's checkpoint when present (False over a run's weights needs
            ``overwrite``).
        init_weights: optional weights to start from (ours, or a training checkpoint), same config.
        overwrite: replace a run of other settings in ``out_dir`` (deleting only the files training writes).
        device: torch device (under torchrun with CUDA each process takes ``cuda:<LOCAL_RANK>``).
        **config_overrides: model config fields to override when ``config`` is a name.

    The run folder is claimed (:mod:`harness.engine.train_outputs`) after every check: a refused run writes
    nothing, and does not create ``out_dir``.

    Returns:
        Path of ``out_dir/model.safetensors``.
    """
    from harness.engine.train_checkpoint import save_checkpoint
    from harness.engine.train_monitor import plot_learning_curve, validate, write_train_log, write_val_log
    from harness.engine.train_outputs import claim_folder, plan_folder, run_settings
    from harness.engine.train_step import step_seed, train_step

    run = _setup(config, data_root, out_dir, iters, epochs, train_cfg, split, init_weights, device,
                 config_overrides)
    tc, info, total = run.train_cfg, run.info, run.schedule.total_steps
    settings = run_settings(run.cfg.name, config_overrides, data_root, split, tc, init_weights, iters, epochs)
    plan = plan_folder(run.out, settings, resume, overwrite)  # every process; reads only
    start, history, val_rows, last_valid = _resume(run) if plan == "resume" else (0, [], [], True)
    barrier(info)  # every process has read the folder before rank 0 changes it
    claim = claim_folder(run.out, settings, plan, start < total) if info.is_main else None
    barrier(info)
    desc = _describe(run)
    if info.is_main:
        atomic_write_json(run.out / RUN_JSON, desc, indent=2)
        log.info("training %s: %d process(es) x batch %d = global batch %d, lr %.3g (x%.3g, %s scaling), "
                 "%d steps (%.2f epochs of %d images), AMP %s, device %s", run.cfg.name, info.world_size,
                 tc.batch_size, run.global_batch, tc.lr * run.lr_scale, run.lr_scale, tc.lr_scaling, total,
                 desc["epochs"], len(run.dataset), run.amp.name, info.device)
    params = [p for p in run.model.parameters() if p.requires_grad]
    base_lrs = [g["initial_lr"] for g in run.optimizer.param_groups]
    spec = run.model.test_transform()
    num_things = run.cfg.num_things
    final = run.ema.module if run.ema is not None else run.model  # what is validated and written
    title = f"{run.cfg.name} on {Path(data_root).name} ({info.device}, global batch {run.global_batch})"

    def checkpoint(step: int) -> None:
        nonlocal last_valid
        if info.is_main:
            save_checkpoint(run.out, {
                "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                "scaler": run.scaler.state_dict() if run.scaler is not None else None,
                "ema": run.ema.state_dict() if run.ema is not None else None, "step": step,
                "history": history, "val_history": val_rows, "config": run.cfg.to_dict(), "family": run.family,
                "categories": run.categories, "train_config": jsonable(tc), "run": desc}, last_valid)
            last_valid = True
            write_train_log(run.out, history)
        barrier(info)

    def validation(step: int) -> None:
        if info.is_main and run.val_dataset is not None:
            row = validate(final, run.val_dataset, tc.val_images, info.device)
            row = {"step": step, "epoch": round(step / run.schedule.steps_per_epoch, 3), **row}
            val_rows[:] = [r for r in val_rows if r["step"] != step] + [row]
            write_val_log(run.out, val_rows)
            plot_learning_curve(run.out, history, val_rows, title)
            log.info("step %d: validation PQ %.2f (Things %.2f, Stuff %.2f) on %d images", step, row["pq"],
                     row["pq_th"], row["pq_st"], row["images"])
        barrier(info)

    from tqdm import tqdm

    run.model.train()
    bar = tqdm(range(start, total), initial=start, total=total, desc="train",
               disable=progress_disabled() or not info.is_main)
    for step in bar:
        t0 = time.perf_counter()
        factor = run.schedule.factor(step)
        for group, base_lr in zip(run.optimizer.param_groups, base_lrs):
            group["lr"] = base_lr * factor
        items = run.stream.local_items(step, info.rank, tc.batch_size)
        images, pad_mask, targets = collate_for(items, num_things, spec)
        batch = (images.to(info.device), pad_mask.to(info.device), [_to(t, info.device) for t in targets])
        torch.manual_seed(step_seed(tc.seed, step, info.rank))
        try:
            result = train_step(run.model, run.criterion, run.optimizer, batch, step, info, run.amp,
                                tc.grad_clip, run.scaler, params, tc.grad_clip_mode)
            if run.ema is not None:
                run.ema.update()
        except UserError as exc:
            if info.is_main:
                write_train_log(run.out, history)
                if (run.out / CHECKPOINT).is_file():
                    exc.args = (f"{exc.args[0]}; last good checkpoint kept: {run.out / CHECKPOINT}",)
            raise
        row = {"step": step + 1, "epoch": round((step + 1) / run.schedule.steps_per_epoch, 4),
               "lr": run.optimizer.param_groups[0]["lr"], "sec": round(time.perf_counter() - t0, 4),
               "grad_norm": result.grad_norm, **result.logs}
        history.append(row)
        bar.set_postfix(loss=f"{result.logs['loss']:.3f}")
        done = step + 1
        if done % tc.log_every == 0 and info.is_main:
            log.info("step %d/%d loss %.4f lr %.2e", done, total, result.logs["loss"], row["lr"])
        if tc.val_images > 0 and ((tc.val_every and done % tc.val_every == 0) or done == total):
            validation(done)
        if done % tc.checkpoint_every == 0 or done == total:
            checkpoint(done)
    if start >= total and tc.val_images > 0 and not any(r["step"] == total for r in val_rows):
        validation(total)
    run.model.eval()
    path = run.out / "model.safetensors"
    if info.is_main:
        path = save_weights(final, run.out, run.categories, run.cfg)
        write_train_log(run.out, history)
        plot_learning_curve(run.out, history, val_rows, title)
        claim.complete()
        log.info("wrote %s", path)
    barrier(info)
    return path


def _to(target: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in target.items()}
