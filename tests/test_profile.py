"""FLOP counting (both conventions) against hand counts, and the `harness profile` command."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.flops import count_flops, count_mmcv_flops, count_parameters, flop_formulas
from models.ops import MSDeformAttn, available_backends


class Toy(nn.Module):
    """conv(3->8, 3x3, bias) -> BN -> ReLU -> flatten -> linear(8*4*4 -> 10) -> LayerNorm; plus a bilinear resize."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.fc = nn.Linear(8 * 4 * 4, 10)
        self.norm = nn.LayerNorm(10)
        self.gelu = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(self.conv(x)))  # (2, 8, 4, 4)
        up = F.interpolate(y, size=(6, 7), mode="bilinear", align_corners=False)  # (2, 8, 6, 7)
        z = self.gelu(self.norm(self.fc(y.flatten(1))))  # (2, 10)
        return z.sum() + up.sum()


def test_toy_hand_counts_both_conventions() -> None:
    model = Toy().eval()
    x = torch.randn(2, 3, 4, 4)
    conv_macs = 2 * 4 * 4 * 8 * (3 * 3 * 3)  # positions x out channels x kernel x in channels
    fc_macs = 2 * 10 * 128
    resize_macs = 4 * 2 * 8 * 6 * 7  # 4 multiply-adds per bilinear output value
    ours = count_flops(model, lambda: model(x))
    assert ours.total == 2 * (conv_macs + fc_macs + resize_macs)
    assert ours.by_op["aten.convolution"] == 2 * conv_macs
    assert ours.by_op["aten.upsample_bilinear2d"] == 2 * resize_macs
    assert ours.by_module["conv"] == 2 * conv_macs and ours.by_module["fc"] == 2 * fc_macs
    mm = count_mmcv_flops(model, lambda: model(x))
    # mmcv: conv MACs + bias per output value; BN, LayerNorm x2 (affine); ReLU output values; linear without
    # bias; F.interpolate and GELU nothing.
    expect = {
        "conv": conv_macs + 2 * 4 * 4 * 8,
        "bn": 2 * (2 * 8 * 4 * 4),
        "act": 2 * 8 * 4 * 4,
        "fc": fc_macs,
        "norm": 2 * (2 * 10),
    }
    assert mm.by_module == expect
    assert mm.total == sum(expect.values())
    assert "GELU" not in mm.by_op


def test_multihead_attention_both_paths_and_mmcv_skips_it() -> None:
    """nn.MultiheadAttention: the fused eval path (q = k = v) and the plain path count the same; mmcv counts 0 (its
    out_proj is not exactly nn.Linear and the matmuls are functional)."""
    attn = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(1, 5, 16)
    y = torch.randn(1, 5, 16)
    proj = 2 * 5 * 16 * 16 * 4  # q, k, v and out projections
    matmuls = 2 * 2 * (5 * 5 * 8) * 2  # q k^T and attn v, 2 heads of width 8
    fused = count_flops(attn, lambda: attn(x, x, x, need_weights=False))
    assert "aten._native_multi_head_attention" in fused.by_op
    plain = count_flops(attn, lambda: attn(x, x, y, need_weights=False))
    assert fused.total == plain.total == proj + matmuls
    assert count_mmcv_flops(attn, lambda: attn(x, x, y, need_weights=False)).total == 0


def test_transformer_encoder_layer_fused_path() -> None:
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, batch_first=True).eval()
    x = torch.randn(1, 5, 16)
    ours = count_flops(layer, lambda: layer(x))
    assert ours.total == 2 * 5 * 16 * 16 * 4 + 2 * 2 * (5 * 5 * 8) * 2 + 2 * 2 * 5 * 16 * 24


@pytest.mark.parametrize("backend", ["pytorch", "cpp"])
def test_deformable_attention_formula(backend: str) -> None:
    if backend not in available_backends("cpu"):
        pytest.skip("compiled CPU kernel not built")
    n, d_model, heads, levels, points = 1, 32, 4, 2, 3
    shapes = [(6, 5), (3, 3)]
    s = sum(h * w for h, w in shapes)
    lq = 7
    attn = MSDeformAttn(d_model, heads, levels, points).eval()
    attn.backend = backend
    query = torch.randn(n, lq, d_model)
    value = torch.randn(n, s, d_model)
    ref = torch.rand(n, lq, levels, 2)
    spatial = torch.tensor(shapes, dtype=torch.long)
    start = torch.tensor([0, shapes[0][0] * shapes[0][1]], dtype=torch.long)
    ours = count_flops(attn, lambda: attn(query, ref, value, spatial, start))
    d = d_model // heads
    linears = 2 * (s * d_model * d_model  # value_proj
                   + lq * d_model * heads * levels * points * 2  # sampling_offsets
                   + lq * d_model * heads * levels * points  # attention_weights
                   + lq * d_model * d_model)  # output_proj
    samples = n * lq * heads * levels * points * d
    # Compiled op: 4 (bilinear) + 1 (weighting) multiply-adds per sample and channel. Fallback: grid_sample's
    # 4 per output value; its weighting is elementwise (not counted).
    core = 2 * (5 if backend == "cpp" else 4) * samples
    assert ours.total == linears + core
    if backend == "cpp":
        assert ours.by_op["psf_ops.ms_deform_attn_forward"] == 2 * 5 * samples
    else:
        assert ours.by_op["aten.grid_sampler_2d"] == 2 * 4 * samples
    # mmcv sees the four nn.Linear layers only.
    mm = count_mmcv_flops(attn, lambda: attn(query, ref, value, spatial, start))
    assert mm.total == linears // 2


def test_formulas_registered() -> None:
    keys = {str(k) for k in flop_formulas()}
    assert "aten.grid_sampler_2d" in keys and "aten.upsample_bilinear2d" in keys
    if "cpp" in available_backends("cpu"):
        assert "psf_ops.ms_deform_attn_forward" in keys


def test_tiny_model_breakdown_adds_up() -> None:
    from models.zoo import build_model, get_config

    torch.manual_seed(0)
    model = build_model(get_config("panoptic_segformer_tiny", num_things=3, num_stuff=2)).eval()
    x = torch.randn(1, 3, 64, 96)
    ours = count_flops(model, lambda: model(x), depth=1)
    assert ours.total == sum(ours.by_op.values()) > 0
    top = {k: v for k, v in ours.by_module.items() if "." not in k}
    assert set(top) >= {"backbone", "neck", "bbox_head"}
    assert sum(top.values()) == ours.total
    mm = count_mmcv_flops(model, lambda: model(x), depth=1)
    assert sum(mm.by_module.values()) == mm.total > 0
    # mmcv counts 1 per multiply-add and skips matmuls / deformable sampling: fewer than ours / 2 plus norms.
    assert mm.total < ours.total


# ----------------------------------------------------------------------------- the command


def test_profile_cli_csv_and_json(tmp_path, capsys) -> None:
    from harness.cli import main
    from harness.commands.profile import COLUMNS

    csv = tmp_path / "p.csv"
    rc = main(["profile", "--model", "panoptic_segformer_tiny", "--size", "64x96", "--warmup", "0", "--iters", "1",
               "--threads", "1", "--out", str(csv)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "GFLOPs mmcv" in printed and "images/s" in printed
    df = pd.read_csv(csv)
    assert list(df.columns) == COLUMNS and len(df) == 1
    row = df.iloc[0]
    assert row["height"] == 64 and row["width"] == 96 and row["threads"] == 1
    assert row["gflops"] > row["gflops_mmcv"] > 0 and row["images_per_s"] > 0 and row["params_m"] > 0
    js = tmp_path / "p.json"
    rc = main(["profile", "--model", "panoptic_segformer_tiny", "--size", "64x64", "--no-speed", "--threads", "1",
               "--out", str(js)])
    assert rc == 0
    doc = json.loads(js.read_text())
    assert doc["images_per_s"] is None and doc["gflops"] > 0


def test_profile_post_process_timing(tmp_path) -> None:
    from harness.cli import main

    out = tmp_path / "m.json"
    rc = main(["profile", "--model", "panoptic_segformer_tiny", "--size", "64x64", "--no-flops", "--warmup", "0",
               "--iters", "1", "--post-process", "m", "--out", str(out)])
    assert rc == 0 and json.loads(out.read_text())["post_process"] == "m"


@pytest.mark.parametrize("argv, message", [
    (["--model", "no_such_model"], "unknown model"),
    (["--model", "panoptic_segformer_tiny", "--size", "64by64"], "--size must be HxW"),
    (["--model", "panoptic_segformer_tiny", "--out", "x.txt"], "must end in .csv or .json"),
    (["--model", "panoptic_segformer_tiny", "--weights", "/nonexistent/w.safetensors"], "weights not found"),
])
def test_profile_bad_input(argv, message, capsys) -> None:
    from harness.cli import main

    assert main(["profile", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_paper_parameter_counts() -> None:
    """Table 1's #P is mmcv's count (parameters with requires_grad: frozen stem, layer1 and BatchNorm excluded)."""
    from models.zoo import build_model, get_config

    for name, paper in (("panoptic_segformer_r50", 51.0), ("panoptic_segformer_r101", 69.9)):
        model = build_model(get_config(name))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
        assert round(trainable, 1) == paper, name
        assert count_parameters(model) / 1e6 > trainable


@pytest.mark.slow
def test_r50_flops_match_table_1() -> None:
    """Table 1 / 5: R50 214.2 GFLOPs = mmcv's counter at the official get_flops.py input 1200x800, mask decoders
    included (within 5 %; measured 214.21)."""
    from models.zoo import build_model, get_config

    torch.manual_seed(0)
    model = build_model(get_config("panoptic_segformer_r50")).eval()
    x = torch.randn(1, 3, 1200, 800)
    mm = count_mmcv_flops(model, lambda: model(x))
    assert abs(mm.total / 1e9 - 214.2) / 214.2 < 0.05
