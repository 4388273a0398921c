"""Checkpoint conversion: official key lists (old and new names) load strictly; mismatches are reported clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _helpers import meta_state, read_key_list

from harness.cli import main
from models.checkpoint import (
    CheckpointMismatchError,
    load_model,
    load_state_dict_strict,
    read_checkpoint,
    save_checkpoint,
)
from models.configs import get_config, panoptic_segformer_tiny
from models.convert_official import HEAD_RENAMES, convert_state_dict, to_official_names
from models.panoptic_segformer import PanopticSegFormer

FILES = {
    "panoptic_segformer_r50": "panoptic_segformer_r50.txt",
    "panoptic_segformer_r101": "panoptic_segformer_r101.txt",
    "panoptic_segformer_pvtv2_b5": "panoptic_segformer_pvtv2b5.txt",
    "panoptic_segformer_swin_l": "panoptic_segformer_swinl.txt",
}
OLD = {new: old for old, new in HEAD_RENAMES.items()}


def to_old_names(keys: dict[str, list[int]]) -> dict[str, list[int]]:
    """HEAD names -> release names (whole second path segment)."""
    out = {}
    for k, v in keys.items():
        parts = k.split(".")
        if parts[0] == "bbox_head" and parts[1] in OLD:
            parts[1] = OLD[parts[1]]
        out[".".join(parts)] = v
    return out


@pytest.mark.parametrize("model_name", sorted(FILES))
@pytest.mark.parametrize("naming", ["new", "old"])
def test_official_key_lists_load_strictly(model_name: str, naming: str) -> None:
    """Every key and shape of the official layout maps onto our model, nothing left over (meta tensors)."""
    keys = read_key_list(FILES[model_name])
    if naming == "old":
        keys = to_old_names(keys)
        assert any(".mask_head2." in k for k in keys) and not any("stuff_mask_head" in k for k in keys)
    cfg = get_config(model_name)
    with torch.device("meta"):
        model = PanopticSegFormer(cfg)
    # Without conversion the old names do not load.
    if naming == "old":
        with pytest.raises(CheckpointMismatchError) as err:
            load_state_dict_strict(model, meta_state(keys), "raw")
        assert "bbox_head.mask_head2.attnen.k.bias" in err.value.unexpected
    converted = convert_state_dict(meta_state(keys), cfg.backbone)
    load_state_dict_strict(model, converted, f"{model_name} ({naming} names)")
    dropped = len(keys) - len(converted)
    assert dropped == (24 if model_name == "panoptic_segformer_swin_l" else 0)  # Swin relative_position_index


def test_r50_values_land_in_the_right_modules() -> None:
    """Real tensors through the converter: each official tensor ends up in the module of the same role."""
    keys = to_old_names(read_key_list(FILES["panoptic_segformer_r50"]))
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=g) if s else torch.tensor(7)) for k, s in keys.items()}
    model = PanopticSegFormer(get_config("panoptic_segformer_r50"))
    load_state_dict_strict(model, convert_state_dict(state, "resnet50"))
    head = model.bbox_head
    assert torch.equal(head.stuff_mask_head.blocks[5].self_attention.qkv.weight,
                       state["bbox_head.mask_head2.blocks.5.self_attention.qkv.weight"])
    assert torch.equal(head.things_mask_head.attnen.linear[0].weight,
                       state["bbox_head.mask_head.attnen.linear.0.weight"])
    assert torch.equal(head.cls_thing_branches[3].bias, state["bbox_head.cls_branches2.3.bias"])
    assert torch.equal(head.transformer.decoder.layers[2].attentions[0].attn.in_proj_weight,
                       state["bbox_head.transformer.decoder.layers.2.attentions.0.attn.in_proj_weight"])
    assert torch.equal(model.backbone.layer4[2].conv3.weight, state["backbone.layer4.2.conv3.weight"])
    assert torch.equal(model.neck.extra_convs[0].conv.weight, state["neck.extra_convs.0.conv.weight"])


def test_segment_rename_is_not_a_substring_replace() -> None:
    state = {"bbox_head.mask_head2.attnen.q.bias": torch.zeros(1), "bbox_head.mask_head.attnen.q.bias": torch.ones(1),
             "bbox_head.cls_branches.0.bias": torch.zeros(1), "bbox_head.cls_branches2.0.bias": torch.ones(1),
             "module.neck.convs.0.gn.bias": torch.zeros(1)}
    out = convert_state_dict(state, "resnet50")
    assert sorted(out) == ["bbox_head.cls_branches.0.bias", "bbox_head.cls_thing_branches.0.bias",
                           "bbox_head.stuff_mask_head.attnen.q.bias", "bbox_head.things_mask_head.attnen.q.bias",
                           "neck.convs.0.gn.bias"]


def test_mismatch_lists_every_offending_key() -> None:
    model = PanopticSegFormer(panoptic_segformer_tiny(num_things=3, num_stuff=2))
    state = dict(model.state_dict())
    state.pop("bbox_head.stuff_query.weight")
    state["bbox_head.extra.weight"] = torch.zeros(1)
    state["bbox_head.cls_branches.0.weight"] = torch.zeros(5, 64)
    with pytest.raises(CheckpointMismatchError) as err:
        load_state_dict_strict(model, state, "x.pth")
    e = err.value
    assert e.missing == ["bbox_head.stuff_query.weight"]
    assert e.unexpected == ["bbox_head.extra.weight"]
    assert e.mismatched == [("bbox_head.cls_branches.0.weight", (5, 64), (3, model.cfg.d_model))]
    msg = str(e)
    for text in ("x.pth", "bbox_head.stuff_query.weight", "bbox_head.extra.weight", "[5, 64]", f"[3, {model.cfg.d_model}]"):
        assert text in msg


def _official_tiny(tmp_path: Path, old: bool = True) -> tuple[PanopticSegFormer, Path]:
    torch.manual_seed(0)
    cfg = panoptic_segformer_tiny()
    model = PanopticSegFormer(cfg).eval()
    sd = to_official_names(model.state_dict(), cfg.backbone, old_names=old)
    path = tmp_path / "official.pth"
    torch.save({"state_dict": sd, "meta": {"mmdet_version": "2.12.0"}}, path)
    return model, path


def test_convert_cli_roundtrip(tmp_path: Path) -> None:
    """`harness convert` writes safetensors + JSON; loading it gives the same model outputs."""
    model, pth = _official_tiny(tmp_path)
    out = tmp_path / "ours"
    assert main(["convert", "-q", "--from", "official-psf", "--model", "panoptic_segformer_tiny",
                 "--in", str(pth), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "model.json").is_file()
    state, cfg = read_checkpoint(out)
    assert cfg is not None and cfg.name == "panoptic_segformer_tiny"
    loaded, _ = load_model(out)
    also, _ = load_model(pth, "panoptic_segformer_tiny")  # official file converted on the fly
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        for other in (loaded, also):
            got = other(x)
            assert torch.equal(got["thing_scores"], ref["thing_scores"])
            assert torch.equal(got["stuff_masks"], ref["stuff_masks"])


def test_convert_cli_mismatch_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, pth = _official_tiny(tmp_path)
    sd = torch.load(pth, weights_only=True)
    sd["state_dict"].pop("bbox_head.cls_stuff_branches.1.bias")
    sd["state_dict"]["bbox_head.surprise.weight"] = torch.zeros(2)
    torch.save(sd, pth)
    rc = main(["convert", "--model", "panoptic_segformer_tiny", "--in", str(pth), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "bbox_head.cls_stuff_branches.1.bias" in err and "bbox_head.surprise.weight" in err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()
    # A checkpoint of another class count: the shape mismatches are listed.
    _, pth = _official_tiny(tmp_path)
    rc = main(["convert", "--model", "panoptic_segformer_tiny", "--num-things", "5", "--in", str(pth),
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "shape mismatches" in err and "bbox_head.cls_branches.0.weight" in err
    rc = main(["convert", "--model", "panoptic_segformer_tiny", "--in", str(tmp_path / "missing.pth"),
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "missing.pth" in capsys.readouterr().err


def test_save_load_our_format_single_file(tmp_path: Path) -> None:
    cfg = panoptic_segformer_tiny(num_things=2, num_stuff=1)
    model = PanopticSegFormer(cfg)
    path = save_checkpoint(model.state_dict(), cfg, tmp_path / "m.safetensors")
    assert path.with_suffix(".json").is_file()
    loaded, cfg2 = load_model(path)
    assert cfg2 == cfg
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_reads_the_training_engines_weights(tmp_path: Path) -> None:
    """`harness train` writes model.safetensors + model.json; our loader (and so `predict`) reads it."""
    from harness.engine.train import save_weights

    model = PanopticSegFormer(panoptic_segformer_tiny(num_things=2, num_stuff=2)).eval()
    save_weights(model, tmp_path)
    for path in (tmp_path, tmp_path / "model.safetensors"):
        loaded, cfg = load_model(path)
        assert cfg == model.cfg
        assert torch.equal(loaded.bbox_head.stuff_query.weight, model.bbox_head.stuff_query.weight)
