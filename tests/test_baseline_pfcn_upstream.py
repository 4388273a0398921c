"""Panoptic FCN against the official code on the same (random) weights and image. Skipped unless the upstream sources
are available: set ``PSF_UPSTREAM`` to a folder holding checkouts ``detectron2/`` (source; its ``_C`` extension is
stubbed here) and ``PanopticFCN/`` (dvlab-research), with ``fvcore`` and ``iopath`` installed.

detectron2's DCNv2 op is CUDA-only, so on CPU the upstream model runs it through torchvision's ``deform_conv2d``
(``tests/test_baseline_pfcn.py`` checks that op against the arithmetic of detectron2's CUDA kernel); every other
step is upstream's own code.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(os.environ.get("PSF_UPSTREAM", "/nonexistent"))
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (ROOT / "PanopticFCN" / "panopticfcn").is_dir(),
                                                   reason="PSF_UPSTREAM with detectron2/ and PanopticFCN/ not set")]


def _import_upstream() -> types.SimpleNamespace:
    for sub in ("detectron2", "PanopticFCN"):
        if str(ROOT / sub) not in sys.path:
            sys.path.insert(0, str(ROOT / sub))
    sys.modules.setdefault("detectron2._C", types.ModuleType("detectron2._C"))
    try:
        import detectron2.data.transforms as T
        import detectron2.layers.deform_conv as dc
        from detectron2.config import get_cfg
        from panopticfcn import add_panopticfcn_config
        from panopticfcn.panoptic_seg import PanopticFCN
    except ImportError as exc:
        pytest.skip(f"upstream Panoptic FCN not importable: {exc}")
    from torchvision.ops import deform_conv2d

    def modulated_deform_conv(x, offset, mask, weight, bias, stride, padding, dilation, groups, deformable_groups):
        assert groups == 1 and deformable_groups == 1
        pair = lambda v: v if isinstance(v, tuple) else (v, v)
        return deform_conv2d(x, offset, weight, bias, stride=pair(stride), padding=pair(padding),
                             dilation=pair(dilation), mask=mask)

    dc.modulated_deform_conv = modulated_deform_conv
    return types.SimpleNamespace(T=T, get_cfg=get_cfg, add_panopticfcn_config=add_panopticfcn_config,
                                 PanopticFCN=PanopticFCN)


def _panoptic_maps(seg: torch.Tensor, infos: list[dict], shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    cat, inst, n = np.full(shape, -1, np.int32), np.zeros(shape, np.int32), 0
    for s in infos:
        m = (seg == s["id"]).numpy()
        if s["isthing"]:
            n += 1
            inst[m], cat[m] = n, s["category_id"]
        else:
            cat[m] = 80 + s["category_id"] - 1
    return cat, inst


def test_r50_3x_equals_upstream(tmp_path: Path) -> None:
    from harness.data.transforms import prepare
    from models.baselines.panoptic_fcn import Detections
    from models.checkpoint import load_model

    up = _import_upstream()
    cfg = up.get_cfg()
    up.add_panopticfcn_config(cfg)
    cfg.merge_from_file(str(ROOT / "PanopticFCN/configs/PanopticFCN-R50-3x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    short, long, area = 160, 224, 64
    cfg.MODEL.INFERENCE.COMBINE.STUFF_AREA_LIMIT = area
    torch.manual_seed(0)
    off = up.PanopticFCN(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, buf in off.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
        for name, p in off.named_parameters():
            if "offset_mask_conv" in name:  # offsets of about a pixel on these un-normalised features
                p.copy_(torch.randn(p.shape, generator=g) * (2e-6 if name.endswith("weight") else 0.5))
        off.position_head.out_inst.bias.fill_(0.0)
        for m in (off.position_head.out_inst, off.position_head.out_sem):
            m.weight.mul_(30)
        for m in (off.thing_generator.embed_extractor, off.stuff_generator.embed_extractor):
            m.weight.mul_(100)
    pth = tmp_path / "model_final.pth"
    torch.save({"model": off.state_dict(), "iteration": 1}, pth)
    ours, _ = load_model(pth, "panoptic_fcn_r50_3x", test_short=short, test_long=long, stuff_area_limit=area)

    rng = np.random.default_rng(0)
    h, w = 141, 187
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    bgr = np.ascontiguousarray(img[..., ::-1])
    resized = up.T.ResizeShortestEdge([short, short], long).get_transform(bgr).apply_image(bgr)
    inputs = [{"image": torch.from_numpy(resized.transpose(2, 0, 1).copy()), "height": h, "width": w}]
    cap: dict = {}
    inference = off.inference

    def spy(batch, images, centers, regions, weights, encode_feat):
        cap.update(images=images.tensor.clone(), centers=[c.clone() for c in centers],
                   regions=[r.clone() for r in regions], encode=encode_feat.clone())
        return inference(batch, images, centers, regions, weights, encode_feat)

    off.inference = spy
    for key, module in (("thing", off.thing_generator), ("stuff", off.stuff_generator)):
        module.register_forward_hook(lambda m, i, o, key=key: cap.update(
            {key: (o[0].clone(), o[1][0].clone(), o[1][1].clone()) if len(o[0]) else None}))
    with torch.no_grad():
        seg, infos = off(inputs)[0]["panoptic_seg"]
    prep = prepare(ours.test_transform(), img)
    np.testing.assert_array_equal(prep.image, cap["images"][0].numpy())
    pad = torch.ones(1, *prep.image.shape[1:], dtype=torch.bool)
    pad[0, : prep.img_shape[0], : prep.img_shape[1]] = False
    with torch.no_grad():
        out = ours(torch.from_numpy(prep.image)[None], pad)
    raw = ours.dump_raw(out, 0, prep, None)
    close = {"atol": 1e-5, "rtol": 1e-5}
    for lvl in range(5):
        torch.testing.assert_close(torch.from_numpy(raw[f"center_logits_p{lvl + 3}"]), cap["centers"][lvl][0], **close)
        torch.testing.assert_close(torch.from_numpy(raw[f"region_logits_p{lvl + 3}"]), cap["regions"][lvl][0], **close)
    torch.testing.assert_close(torch.from_numpy(raw["encode_feat"]), cap["encode"][0], **close)
    thing, stuff = cap["thing"], cap["stuff"]
    assert thing is not None and thing[0].shape[1] >= 10 and stuff[0].shape[1] >= 5
    torch.testing.assert_close(torch.from_numpy(raw["thing_mask_logits"]), thing[0][0], **close)
    np.testing.assert_array_equal(raw["thing_classes"], thing[1].numpy())
    torch.testing.assert_close(torch.from_numpy(raw["thing_scores"]), thing[2], **close)
    torch.testing.assert_close(torch.from_numpy(raw["stuff_mask_logits"]), stuff[0][0], **close)
    np.testing.assert_array_equal(raw["stuff_classes"], stuff[1].numpy())
    torch.testing.assert_close(torch.from_numpy(raw["stuff_scores"]), stuff[2], **close)
    cat, inst = _panoptic_maps(seg, infos, (h, w))
    np.testing.assert_array_equal(raw["panoptic_category"], cat)
    np.testing.assert_array_equal(raw["panoptic_instance"], inst)

    # Generator outputs with distinct blobs through both post-processing paths (rescoring, resizing, combining).
    gen = torch.Generator().manual_seed(3)
    hq, wq = out["encode_feat"].shape[-2:]

    def blobs(n: int) -> torch.Tensor:
        low = torch.full((1, n, 5, 7), -6.0)
        for q in range(n):
            y, x = int(torch.randint(0, 4, (1,), generator=gen)), int(torch.randint(0, 6, (1,), generator=gen))
            low[0, q, y : y + 1 + q % 2, x : x + 2] = 6.0
        low += torch.randn(low.shape, generator=gen)
        return torch.nn.functional.interpolate(low, size=(hq, wq), mode="bilinear")

    t_logits, t_cls, t_sc = blobs(25), torch.randint(0, 80, (25,), generator=gen), torch.rand(25, generator=gen)
    s_logits, s_cls, s_sc = blobs(8), torch.tensor([0, 3, 7, 12, 20, 33, 40, 53]), torch.rand(8, generator=gen)
    off.thing_generator._forward_hooks.clear()
    off.stuff_generator._forward_hooks.clear()
    off.thing_generator.register_forward_hook(lambda m, i, o: (t_logits.clone(), [t_cls.clone(), t_sc.clone()]))
    off.stuff_generator.register_forward_hook(lambda m, i, o: (s_logits.clone(), [s_cls.clone(), s_sc.clone()]))
    with torch.no_grad():
        seg, infos = off(inputs)[0]["panoptic_seg"]
    cat, inst = _panoptic_maps(seg, infos, (h, w))
    assert len(infos) >= 8 and (inst > 0).any()
    res = ours._own(Detections(t_logits[0], t_sc, t_cls, s_logits[0], s_sc, s_cls), prep.img_shape, (h, w))
    np.testing.assert_array_equal(res.category, cat)
    np.testing.assert_array_equal(res.instance, inst)
