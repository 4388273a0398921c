"""One optimisation step: forward + loss, backward, gradient averaging over processes, clipping, update.

Model-generic: the criterion is any family's ``build_criterion(cfg, num_things, num_stuff)`` result, called as
``criterion(model, images, pad_mask, targets) -> (loss, logs)``.

Multi-process (torchrun): each process computes the loss of its share of the global batch; its criterion averages
the batch normalisers (number of ground-truth segments) over processes, as DETR and mmdet do (``reduce_mean``), so
the gradients, summed here over processes and divided by the world size, equal those of one process on the whole
global batch (to float rounding; ``tests/test_train_distributed.py``). Gradients are averaged with one
``all_reduce`` per flat bucket instead of wrapping the model in ``DistributedDataParallel``: the criterion calls
the model's stages (encode / locate / segment) rather than ``forward``, which DDP's hooks need, and parameters
without a gradient on every process stay without one (AdamW skips them, as in a single process).

Failures: a non-finite loss stops training naming the step and the first non-finite loss term
(:class:`NonFiniteLossError`); a CUDA out-of-memory error becomes a message naming the batch and image size with a
hint (:class:`OutOfMemoryError`).
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch
import torch.distributed as dist
from torch import Tensor, nn

from harness.engine.distributed import DistInfo
from harness.errors import UserError

__all__ = ["AmpSettings", "amp_settings", "NonFiniteLossError", "OutOfMemoryError", "StepResult", "train_step",
           "average_gradients", "step_seed", "WeightAverage"]

_BUCKET_NUMEL = 1 << 22  # 4 M elements (16 MB fp32) per all_reduce


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite (the message names the step and the loss term)."""


class OutOfMemoryError(UserError):
    """The device ran out of memory (the message names the batch and image size, with a hint)."""


@dataclass(frozen=True)
class AmpSettings:
    """Autocast settings: ``dtype`` None = full precision; ``scaler`` only for fp16 on CUDA."""

    device_type: str = "cpu"
    dtype: torch.dtype | None = None

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def context(self) -> ContextManager[Any]:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def amp_settings(amp: str | None, device: str) -> AmpSettings:
    """Resolve ``--amp``: None/"off" = fp32; "auto" = bf16 where supported (CPU, Ampere+ GPUs), else fp16 on CUDA;
    "bf16" / "fp16" explicitly (fp16 needs CUDA)."""
    device_type = torch.device(device).type
    if amp in (None, "off", "fp32"):
        return AmpSettings(device_type, None)
    if amp not in ("auto", "bf16", "fp16"):
        raise UserError(f"--amp must be auto, bf16 or fp16, got {amp!r}")
    if device_type == "cuda":
        bf16_ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if amp == "bf16" and not bf16_ok:
            raise UserError(f"--amp bf16: device {device} does not support bfloat16; use --amp fp16")
        return AmpSettings("cuda", torch.bfloat16 if (amp == "bf16" or (amp == "auto" and bf16_ok)) else torch.float16)
    if amp == "fp16":
        raise UserError(f"--amp fp16 needs a CUDA device (got {device}); use --amp bf16 on the CPU")
    return AmpSettings(device_type, torch.bfloat16)


def step_seed(seed: int, step: int, rank: int) -> int:
    """Torch seed of one step on one process (dropout etc.): a function of (seed, step, rank) only, so resuming
    needs no RNG state."""
    return (int(seed) * 1_000_003 + int(step) * 7_919 + int(rank) * 104_729) % (2**63 - 1)


def average_gradients(params: list[nn.Parameter], info: DistInfo) -> None:
    """Average ``.grad`` over processes in place (sum / world size) in flat buckets.

    A parameter gets a gradient when any process produced one (zeros on the others); parameters without a gradient
    on every process keep ``grad = None``.
    """
    if not info.distributed:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=params[0].device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    active = [p for p, h in zip(params, has.tolist()) if h]
    for p in active:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[nn.Parameter] = []
    numel = 0
    for p in active + [None]:  # type: ignore[list-item]
        if p is not None:
            bucket.append(p)
            numel += p.numel()
        if bucket and (p is None or numel >= _BUCKET_NUMEL):
            flat = torch.cat([q.grad.reshape(-1) for q in bucket])
            dist.all_reduce(flat)
            flat /= info.world_size
            offset = 0
            for q in bucket:
                n = q.numel()
                q.grad.copy_(flat[offset:offset + n].view_as(q.grad))
                offset += n
            bucket, numel = [], 0


def _first_non_finite(logs: dict[str, float]) -> str | None:
    for k, v in logs.items():
        if k != "loss" and not math.isfinite(v):
            return k
    return "loss" if not math.isfinite(logs.get("loss", 0.0)) else None


@dataclass
class StepResult:
    """Logs of one step: every loss term (this process's share), total loss, gradient norm before clipping."""

    logs: dict[str, float]
    grad_norm: float


def _is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom_type is not None and isinstance(exc, oom_type)) or "out of memory" in str(exc).lower()


def train_step(
    model: nn.Module,
    criterion: Callable[..., tuple[Tensor, dict[str, float]]],
    optimizer: torch.optim.Optimizer,
    batch: tuple[Tensor, Tensor, list[dict[str, Tensor]]],
    step: int,
    info: DistInfo,
    amp: AmpSettings,
    grad_clip: float,
    scaler: "torch.amp.GradScaler | None" = None,
    params: list[nn.Parameter] | None = None,
    clip_mode: str = "norm",
) -> StepResult:
    """Run one step on this process's share of the global batch.

    Args:
        model / criterion / optimizer: as built by ``harness.engine.train_setup``.
        batch: ``(images (B, 3, H, W), pad_mask (B, H, W), targets)`` already on the device.
        step: 0-based step (for messages).
        info: the process group (single process: world size 1).
        amp: autocast settings; scaler: fp16 gradient scaler or None.
        grad_clip: max L2 norm of all gradients (<= 0 disables); with ``clip_mode="value"`` the largest absolute
            value of each gradient element (detectron2's ``CLIP_TYPE: value``).
        params: trainable parameters (default: those of ``model`` with ``requires_grad``).

    Raises:
        NonFiniteLossError: on any process (all processes stop together).
        OutOfMemoryError: the device ran out of memory.
    """
    images, pad_mask, targets = batch
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    try:
        with amp.context():
            loss, logs = criterion(model, images, pad_mask, targets)
        bad = _first_non_finite(logs) if not torch.isfinite(loss.detach()).all() else None
        bad_any = bad is not None
        if info.distributed:  # stop every process together
            flag = torch.tensor([1.0 if bad_any else 0.0], device=images.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad_any = bool(flag.item() > 0)
        if bad_any:
            where = f" on rank {info.rank}" if info.distributed else ""
            term = bad or "another process's loss"
            value = logs.get(bad, float("nan")) if bad else float("nan")
            raise NonFiniteLossError(f"non-finite loss at step {step + 1}{where}: {term} = {value}")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        average_gradients(params, info)
        if scaler is not None:
            scaler.unscale_(optimizer)
        by_norm = clip_mode == "norm" and grad_clip > 0
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if by_norm else float("inf"))
        if clip_mode == "value" and grad_clip > 0:
            torch.nn.utils.clip_grad_value_(params, grad_clip)
        if scaler is not None:
            scaler.step(optimizer)  # skips the update on inf/NaN gradients (fp16 overflow), as intended
            scaler.update()
        else:
            optimizer.step()
    except RuntimeError as exc:
        if not _is_oom(exc):
            raise
        b, _, h, w = images.shape
        if images.is_cuda:
            torch.cuda.empty_cache()
        raise OutOfMemoryError(
            f"out of memory on {images.device} at step {step + 1}: batch {b} per process, images padded to "
            f"{h}x{w}; lower --batch-size, add --amp, or train at a smaller scale") from None
    return StepResult(logs=logs, grad_norm=float(norm))


class WeightAverage:
    """Exponential moving average of a model's weights (``TrainConfig.ema_decay``; not in the official recipe).

    After update n the average moves towards the weights by ``1 - d`` with ``d = min(decay, (1 + n) / (10 + n))``
    (the usual warm-up, so the average of a short run does not stay near the random initialisation). Every floating
    tensor of the state dict (parameters and buffers) is averaged; integer buffers are copied. ``module`` is an
    eval-mode copy of the model that validation and the written weights use. Every torchrun process holds the same
    average (the update follows the averaged gradients).

    The model's tensors are paired with the copy's once: the optimiser and ``load_state_dict`` (resume) change them
    in place, so the pairs stay valid and a step pays for the lerp only.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise UserError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        ema, cur = self.module.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
        self._float_pairs = ([ema[k].data for k in ema if ema[k].is_floating_point()],
                             [cur[k].data for k in ema if ema[k].is_floating_point()])
        self._other_pairs = [(ema[k].data, cur[k].data) for k in ema if not ema[k].is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the model's current weights (after each optimiser step)."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(*self._float_pairs, 1.0 - d)
        for avg, cur in self._other_pairs:
            avg.copy_(cur)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "model": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        self.module.load_state_dict(state["model"])
