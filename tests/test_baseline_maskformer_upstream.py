"""MaskFormer against the official code on the same (random) weights and image. Skipped unless the upstream sources
are available: set ``PSF_UPSTREAM`` to a folder holding checkouts ``detectron2/`` (source; no build needed: its
``_C`` extension is stubbed here) and ``MaskFormer/`` (facebookresearch), with ``fvcore``, ``iopath`` and
``omegaconf`` installed. Upstream and ours run the same float32 CPU kernels, so the outputs are compared exactly.
"""

from __future__ import annotations

import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(os.environ.get("PSF_UPSTREAM", "/nonexistent"))
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (ROOT / "MaskFormer" / "mask_former").is_dir(),
                                                   reason="PSF_UPSTREAM with detectron2/ and MaskFormer/ not set")]


def _import_upstream() -> types.SimpleNamespace:
    for sub in ("detectron2", "MaskFormer", "detectron2/projects/DeepLab"):
        if str(ROOT / sub) not in sys.path:
            sys.path.insert(0, str(ROOT / sub))
    sys.modules.setdefault("detectron2._C", types.ModuleType("detectron2._C"))
    try:
        import detectron2.data.transforms as T
        from detectron2.config import get_cfg
        from detectron2.modeling import build_model
        from detectron2.projects.deeplab import add_deeplab_config
        from mask_former import add_mask_former_config
    except ImportError as exc:
        pytest.skip(f"upstream MaskFormer not importable: {exc}")
    return types.SimpleNamespace(T=T, get_cfg=get_cfg, build_model=build_model, add_deeplab_config=add_deeplab_config,
                                 add_mask_former_config=add_mask_former_config)


def _panoptic_maps(seg: torch.Tensor, infos: list[dict], shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    cat, inst, n = np.full(shape, -1, np.int32), np.zeros(shape, np.int32), 0
    for s in infos:
        m = (seg == s["id"]).numpy()
        cat[m] = s["category_id"]
        if s["isthing"]:
            n += 1
            inst[m] = n
    return cat, inst


@pytest.mark.parametrize("old_names", [False, True])
def test_r50_equals_upstream(tmp_path: Path, old_names: bool) -> None:
    from harness.data.transforms import prepare
    from models.checkpoint import load_model

    up = _import_upstream()
    cfg = up.get_cfg()
    up.add_deeplab_config(cfg)
    up.add_mask_former_config(cfg)
    cfg.merge_from_file(str(ROOT / "MaskFormer/configs/coco-panoptic/maskformer_panoptic_R50_bs64_554k.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    short, long = 160, 224
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = short, long
    torch.manual_seed(0)
    off = up.build_model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, buf in off.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
        off.sem_seg_head.predictor.class_embed.weight.mul_(40)
    state = {k: v.numpy() for k, v in off.state_dict().items()}
    if old_names:
        state = {k.replace("sem_seg_head.pixel_decoder.", "sem_seg_head."): v for k, v in state.items()}
    pkl = tmp_path / "model_final.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": state, "__author__": "test"}, f)
    ours, _ = load_model(pkl, "maskformer_r50_panoptic", test_short=short, test_long=long)

    rng = np.random.default_rng(0)
    h, w = 141, 187
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    resized = up.T.ResizeShortestEdge([short, short], long).get_transform(img).apply_image(img)
    prep = prepare(ours.test_transform(), img)
    x_up = (torch.from_numpy(resized.transpose(2, 0, 1).copy()).float() - off.pixel_mean) / off.pixel_std
    np.testing.assert_array_equal(prep.image, x_up.numpy())
    inputs = [{"image": torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))), "height": h, "width": w}]
    captured: dict = {}
    handle = off.sem_seg_head.register_forward_hook(lambda m, i, o: captured.update(o))
    with torch.no_grad():
        off(inputs)
        out = ours(torch.from_numpy(prep.image)[None])
    handle.remove()
    torch.testing.assert_close(out["pred_logits"][0], captured["pred_logits"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["pred_masks"][0], captured["pred_masks"][0], atol=1e-5, rtol=1e-5)
    for i, aux in enumerate(captured["aux_outputs"]):
        torch.testing.assert_close(out["aux_masks"][i][0], aux["pred_masks"][0], atol=1e-5, rtol=1e-5)

    # Head outputs with distinct blobs through both post-processing paths (resize, crop, panoptic_inference).
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 100, 134, generator=gen) * 4
    choice = torch.tensor([3, 7, 90, 90, 100, 100, 5, 120, 3, 90])
    logits[0, torch.arange(30), choice[torch.randint(0, 10, (30,), generator=gen)]] += 12
    low = torch.full((1, 100, 6, 8), -6.0)
    for q in range(100):
        y, x = int(torch.randint(0, 5, (1,), generator=gen)), int(torch.randint(0, 7, (1,), generator=gen))
        low[0, q, y : y + 1 + q % 2, x : x + 2] = 6.0
    low += torch.randn(low.shape, generator=gen)
    masks = torch.nn.functional.interpolate(low, size=captured["pred_masks"].shape[-2:], mode="bilinear")
    handle = off.sem_seg_head.register_forward_hook(lambda m, i, o: {**o, "pred_logits": logits, "pred_masks": masks})
    with torch.no_grad():
        seg, infos = off(inputs)[0]["panoptic_seg"]
    handle.remove()
    cat, inst = _panoptic_maps(seg, infos, (h, w))
    assert len(infos) >= 5 and (cat == -1).any()
    raw = ours.dump_raw({**out, "pred_logits": logits, "pred_masks": masks}, 0, prep, None)
    np.testing.assert_array_equal(raw["panoptic_category"], cat)
    np.testing.assert_array_equal(raw["panoptic_instance"], inst)
