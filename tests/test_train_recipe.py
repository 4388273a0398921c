"""The tiny recipe's premises: why the old tiny backbone could not learn, and that the tiny configs are the full
architecture with smaller numbers (query-decoupled and joint-matching)."""

from __future__ import annotations

import torch

from models.backbones import ResNetBackbone
from models.configs import get_config, panoptic_segformer_tiny, panoptic_segformer_tiny_joint
from models.panoptic_segformer import PanopticSegFormer


def _branch_conv_grads(bb: ResNetBackbone) -> list[float]:
    """Gradient norms of the residual-branch convolutions after one SGD step and a second backward."""
    opt = torch.optim.SGD([p for p in bb.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        opt.zero_grad()
        sum(o.pow(2).mean() for o in bb(x)).backward()
        opt.step()
    return [float(p.grad.norm()) if p.grad is not None else 0.0
            for n, p in bb.named_parameters() if n.startswith("layer") and ".conv" in n]


def test_frozen_batchnorm_from_scratch_keeps_residual_branches_off() -> None:
    """timm zero-initialises each block's last norm scale; frozen (official) BatchNorm never lets it grow, so no
    residual-branch convolution ever gets a gradient (the old tiny recipe's backbone); GroupNorm trains it."""
    torch.manual_seed(0)
    frozen = ResNetBackbone("resnet18", frozen_stages=-1, norm_eval=True).train()
    assert max(_branch_conv_grads(frozen)) == 0.0
    torch.manual_seed(0)
    gn = ResNetBackbone("resnet18", frozen_stages=-1, norm="gn", width=32).train()
    grads = _branch_conv_grads(gn)
    assert len(grads) == 16 and min(grads) > 0.0
    assert gn.out_channels == (64, 128, 256)


def _module_types(model: torch.nn.Module, prefix: str) -> set[str]:
    return {type(m).__name__ for n, m in model.named_modules() if n.startswith(prefix)}


def test_tiny_configs_are_the_full_architecture_with_smaller_numbers() -> None:
    with torch.device("meta"):
        r50 = PanopticSegFormer(get_config("panoptic_segformer_r50"))
        tiny = PanopticSegFormer(panoptic_segformer_tiny())
        joint = PanopticSegFormer(panoptic_segformer_tiny_joint(num_things=10, num_stuff=6))
    for prefix in ("neck", "bbox_head"):
        assert _module_types(tiny, prefix) == _module_types(r50, prefix), prefix
    assert type(tiny.backbone) is type(r50.backbone)
    cfg = joint.cfg
    assert not cfg.decouple_queries and cfg.num_thing_queries == tiny.cfg.num_thing_queries + 6
    assert joint.bbox_head.stuff_mask_head is None and cfg.num_location_classes == 16
    # The official recipe stays the default of the full configs.
    r = get_config("panoptic_segformer_r50")
    assert (r.backbone_norm, r.backbone_width, r.norm_eval, r.num_thing_queries) == ("bn", None, True, 300)


def test_match_rounds_gives_each_gt_up_to_k_distinct_queries() -> None:
    from models.matcher import HungarianMatcher

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 4, generator=g)
    boxes = torch.rand(7, 4, generator=g) * 0.5 + 0.25
    labels = torch.tensor([0, 3])
    gt_boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.1, 0.3]])
    m = HungarianMatcher()
    q1, g1 = m.match(logits, boxes, labels, gt_boxes, (64, 64))
    q, gi = m.match_rounds(logits, boxes, labels, gt_boxes, (64, 64), rounds=3)
    assert len(q) == 6 and len(set(q.tolist())) == 6  # 3 rounds x 2 GT, never the same query twice
    assert sorted(gi.tolist()) == [0, 0, 0, 1, 1, 1]
    assert q[:2].tolist() == q1.tolist() and gi[:2].tolist() == g1.tolist()  # round 1 = one-to-one matching
    q, _ = m.match_rounds(logits, boxes, labels, gt_boxes, (64, 64), rounds=9)
    assert len(q) == 6  # at most Q // G = 3 rounds


def test_augmentation_policies() -> None:
    import numpy as np

    from harness.engine.data import TrainItem, augment, augment_for
    from models.inference import TestTransformSpec

    spec = TestTransformSpec(short=128, long=128)
    item = TrainItem(image=np.zeros((96, 128, 3), np.uint8), masks=torch.zeros((0, 96, 128), dtype=torch.bool),
                     labels=torch.zeros(0).long(), boxes=np.zeros((0, 4), np.float32))
    rng = np.random.default_rng(0)
    sizes = {augment(item, augment_for(spec, "flip"), (128, 128), rng).image.shape[:2] for _ in range(8)}
    assert sizes == {(96, 128)}  # flips only: always the test scale
    sizes = {augment(item, augment_for(spec, "official"), (128, 128), rng).image.shape[:2] for _ in range(16)}
    assert len(sizes) > 3  # scale and crop jitter
    import pytest

    with pytest.raises(ValueError):
        augment_for(spec, "mosaic")
