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
