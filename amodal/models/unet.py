"""The course's baseline U-Net and its two variants from the report.

`unet`: four down and four up levels, 64 base channels, max-pool down, bilinear up, batch norm,
double 3x3 conv blocks (Ronneberger et al. 2015 in its common bilinear form: with bilinear
upsampling the bottom level keeps the channel count of the level above it, and each up block halves
the concatenated channels in its first conv). `unet_deep`: one more level (depth 5).
`unet_attention`: the same with an attention gate (Oktay et al. 2018) on every skip connection.
"""

from __future__ import annotations

import torch
from torch import nn

from amodal.labels import NUM_OUTPUTS

from .blocks import AttentionGate, DoubleConv, to_target_size, upsample_to


class UNet(nn.Module):
    def __init__(self, base_channels: int = 64, depth: int = 4, attention: bool = False, out_channels: int = NUM_OUTPUTS):
        super().__init__()
        if depth < 1:
            raise ValueError(f"U-Net depth must be >= 1, got {depth}")
        # Channels of the skip features at levels 0..depth-1, then of the bottom level (same as the
        # last skip: the bilinear U-Net does not double at the bottom).
        skips = [base_channels * 2**i for i in range(depth)]
        self.inc = DoubleConv(3, skips[0])
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), DoubleConv(skips[i], skips[i + 1] if i + 1 < depth else skips[i]))
            for i in range(depth)
        )
        self.ups = nn.ModuleList()
        self.gates = nn.ModuleList() if attention else None
        channels = skips[-1]  # bottom
        for level in reversed(range(depth)):
            skip = skips[level]
            out = skips[level - 1] if level > 0 else base_channels
            if attention:
                self.gates.append(AttentionGate(channels, skip))
            self.ups.append(DoubleConv(channels + skip, out, mid_channels=(channels + skip) // 2))
            channels = out
        self.head = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inc(x)
        skips = [x]
        for down in self.downs:
            x = down(x)
            skips.append(x)
        skips.pop()  # the bottom is x itself
        for i, up in enumerate(self.ups):
            skip = skips.pop()
            if self.gates is not None:
                # Gate with the coarse decoder feature, before it is upsampled (Oktay et al.).
                skip = self.gates[i](skip, x)
            x = torch.cat([upsample_to(x, skip.shape[-2:]), skip], dim=1)
            x = up(x)
        return to_target_size(self.head(x))
