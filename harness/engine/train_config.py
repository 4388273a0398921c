"""Training settings: the `TrainConfig` dataclass and the default recipe of each model (official, or the tiny recipe
for the CPU-sized configs trained from scratch on the synthetic data)."""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.engine.data import AugmentConfig
from models.losses import LossConfig
from models.matcher import MatcherConfig

__all__ = ["TrainConfig", "default_train_config", "TINY_CONFIGS"]

# Configs trained from scratch on the synthetic data (their own recipe, see default_train_config).
TINY_CONFIGS = ("panoptic_segformer_tiny", "panoptic_segformer_tiny_joint", "detr_tiny", "deformable_detr_tiny",
                "maskformer_tiny", "panoptic_fcn_tiny")


@dataclass
class TrainConfig:
    """Optimisation settings (defaults = official).

    Attributes:
        lr: AdamW learning rate for ``reference_batch`` images per step.
        weight_decay: AdamW weight decay (all parameters).
        lr_mult_keys: parameter-name substrings whose lr is multiplied by lr_mult.
        lr_mult: multiplier for those parameters.
        grad_clip: max L2 norm of all gradients (<= 0 disables), or with ``grad_clip_mode="value"`` the largest
            absolute gradient element.
        grad_clip_mode: "norm" (official) or "value" (detectron2's value clipping: Panoptic FCN).
        optimizer: "adamw" (official) or "sgd" (momentum ``momentum``; Panoptic FCN's detectron2 recipe).
        momentum: SGD momentum.
        lr_schedule: "step" (x0.1 at each of ``lr_drops``; official) or "poly" (x(1 - step / total)^poly_power,
            detectron2's WarmupPolyLR; ``lr_drops`` ignored).
        poly_power: exponent of the poly schedule.
        lr_drops: fractions of the run after which the lr is multiplied by 0.1 (official: 3/4).
        warmup_iters: linear lr warm-up steps (official: none).
        batch_size: images per step and process.
        reference_batch: the global batch the lr is stated for (official 8).
        lr_scaling: "none" (official: the lr is used as given) or "linear" (lr x global batch / reference_batch).
        seed: seeds the model initialisation, the sample order and the augmentation.
        checkpoint_every: steps between checkpoints (the last step always writes one).
        log_every: steps between log lines.
        val_every: steps between validations (0 = only at the end when val_images > 0).
        val_images: validation images scored each time (0 = no validation).
        val_split: validation split name.
        augment: explicit augmentation settings; None = ``augment_policy`` at the model's test scale.
        augment_policy: "official" (flip + resize / crop policies, scaled), "flip" (flip at the test scale) or
            "none" (``harness.engine.data.augment_for``).
        amp: None (fp32), "auto", "bf16" or "fp16" autocast.
        ema_decay: exponential moving average of the weights for validation and the written weights (0 = off, as
            the official recipe; `harness.engine.train_step.WeightAverage`).
        matcher / loss: Panoptic SegFormer matching and loss options (other families use their own defaults).
    """

    lr: float = 1.4e-4
    weight_decay: float = 1e-4
    lr_mult_keys: tuple[str, ...] = ("backbone", "sampling_offsets", "reference_points")
    lr_mult: float = 0.1
    grad_clip: float = 0.1
    grad_clip_mode: str = "norm"
    optimizer: str = "adamw"
    momentum: float = 0.9
    lr_schedule: str = "step"
    poly_power: float = 0.9
    lr_drops: tuple[float, ...] = (0.75,)
    warmup_iters: int = 0
    batch_size: int = 1
    reference_batch: int = 8
    lr_scaling: str = "none"
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    val_every: int = 0
    val_images: int = 0
    val_split: str = "val2017"
    augment: AugmentConfig | None = None
    augment_policy: str = "official"
    amp: str | None = None
    ema_decay: float = 0.0
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    loss: LossConfig = field(default_factory=LossConfig)


def default_train_config(model_name: str) -> TrainConfig:
    """The default training recipe of a model.

    * Panoptic SegFormer: the official recipe (the `TrainConfig` defaults).
    * The tiny configs of every family (random-init backbone, a few minutes of CPU): lr 1e-3 with a 100-step warm-up,
      batch 2, full lr for the (random-init, GroupNorm) backbone, flips at the test scale instead of the scale / crop
      jitter; see docs/training.md for the measurements behind each choice.
    * DETR and Deformable DETR: their ``main.py`` settings as stored in the config (lr, backbone lr, weight decay,
      gradient clip, lr drop epoch / epochs, batch per GPU); MaskFormer: its detectron2 recipe
      (``models.baselines.maskformer.OFFICIAL_RECIPES``: AdamW, backbone x0.1, clip 0.01, drop at 2/3, batch 64 as
      8 per process on 8 GPUs); Panoptic FCN: its detectron2 recipe (``panoptic_fcn.OFFICIAL_RECIPES``: SGD
      momentum 0.9, lr 0.01 for batch 16 as 2 per process on 8 GPUs, poly 0.9, 1,000-step warm-up from 0.001 x lr,
      gradient values clipped at 35).
    """
    if model_name in TINY_CONFIGS:
        return TrainConfig(lr=1e-3, batch_size=2, reference_batch=2, warmup_iters=100,
                           lr_mult_keys=("sampling_offsets", "reference_points"), augment_policy="flip")
    if model_name.startswith(("detr_", "deformable_detr_")):
        from models.zoo import get_config

        cfg = get_config(model_name)
        keys: tuple[str, ...] = ("backbone",)
        if model_name.startswith("deformable_detr_"):  # lr_linear_proj_mult (0.1) equals the backbone's here
            keys += ("sampling_offsets", "reference_points")
        # reference_batch (used only by --lr-scaling linear) assumes the batch per GPU on 8 GPUs.
        return TrainConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, lr_mult_keys=keys,
                           lr_mult=cfg.lr_backbone / cfg.lr, grad_clip=cfg.grad_clip,
                           lr_drops=(cfg.lr_drop / cfg.epochs,), batch_size=cfg.batch_size,
                           reference_batch=cfg.batch_size * 8)
    if model_name.startswith("maskformer_"):
        from models.baselines.maskformer import OFFICIAL_RECIPES

        r = OFFICIAL_RECIPES.get(model_name)
        if r is not None:
            return TrainConfig(lr=r["lr"], weight_decay=r["weight_decay"], lr_mult_keys=("backbone",),
                               lr_mult=r["backbone_lr_mult"], grad_clip=r["clip_grad_norm"],
                               lr_drops=tuple(s_ / r["iterations"] for s_ in r["lr_steps"]),
                               warmup_iters=r["warmup_iters"], batch_size=r["batch_size"] // 8,
                               reference_batch=r["batch_size"])
    if model_name.startswith("panoptic_fcn_"):
        from models.baselines.panoptic_fcn import OFFICIAL_RECIPES as PFCN_RECIPES

        r = PFCN_RECIPES.get(model_name)
        if r is not None:
            return TrainConfig(optimizer=r["optimizer"], momentum=r["momentum"], lr=r["lr"],
                               weight_decay=r["weight_decay"], lr_mult_keys=(), lr_mult=1.0,
                               lr_schedule=r["lr_schedule"], poly_power=r["poly_power"], lr_drops=(),
                               warmup_iters=r["warmup_iters"], grad_clip=r["clip_grad_value"],
                               grad_clip_mode="value", batch_size=r["batch_size"] // 8,
                               reference_batch=r["batch_size"])
    return TrainConfig()
