"""Neck: mmdet ``ChannelMapper`` as configured by the official code.

Three 1x1 convs (no bias) + GroupNorm(32) map C3/C4/C5 to ``d_model`` channels; one extra 3x3 stride-2 conv
+ GN on the **raw** C5 (not the mapped one) adds the stride-64 level. No activation anywhere.
Parameter names (``convs.{i}.conv``, ``convs.{i}.gn``, ``extra_convs.0.{conv,gn}``) match the checkpoints.
"""

from __future__ import annotations

from torch import Tensor, nn


class ConvGN(nn.Module):
    """Conv2d without bias followed by GroupNorm (mmcv ``ConvModule`` with ``act_cfg=None``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
        self.gn = nn.GroupNorm(groups, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, Cin, H, W) -> (B, Cout, H', W')``."""
        return self.gn(self.conv(x))


class ChannelMapper(nn.Module):
    """Map backbone features to a common width and add extra strided levels.

    Args:
        in_channels: Channels of the backbone outputs, e.g. ``(512, 1024, 2048)``.
        out_channels: ``d_model``.
        num_outs: Number of output levels (``len(in_channels)`` + extra levels).
        gn_groups: GroupNorm groups.
    """

    def __init__(self, in_channels: tuple[int, ...], out_channels: int = 256, num_outs: int = 4,
                 gn_groups: int = 32) -> None:
        super().__init__()
        self.convs = nn.ModuleList(ConvGN(c, out_channels, 1, 1, gn_groups) for c in in_channels)
        extra = []
        for i in range(num_outs - len(in_channels)):
            # The first extra level reads the raw last backbone feature (official behaviour).
            cin = in_channels[-1] if i == 0 else out_channels
            extra.append(ConvGN(cin, out_channels, 3, 2, gn_groups))
        self.extra_convs = nn.ModuleList(extra)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        """``[(B, C_i, H_i, W_i)] -> [(B, D, H_l, W_l)]`` for every level, finest first."""
        outs = [conv(f) for conv, f in zip(self.convs, feats)]
        for i, conv in enumerate(self.extra_convs):
            outs.append(conv(feats[-1] if i == 0 else outs[-1]))
        return outs
