"""Building blocks shared by the models: conv-BN-ReLU, the U-Net double conv, the attention gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from amodal.labels import TARGET_SIZE


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    # No conv bias: the batch norm right after it has its own shift.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DoubleConv(nn.Sequential):
    """(3x3 conv, batch norm, ReLU) twice: the U-Net's unit at every level."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None):
        mid_channels = mid_channels or out_channels
        super().__init__(conv_bn_relu(in_channels, mid_channels), conv_bn_relu(mid_channels, out_channels))


class AttentionGate(nn.Module):
    """Additive attention gate of Oktay et al. 2018 ("Attention U-Net").

    The decoder's coarser feature map g (the gating signal) decides which pixels of the skip
    connection x pass: alpha = sigmoid(psi(relu(W_x x + W_g g))), output = x * alpha, with alpha one
    weight per pixel in [0, 1]. W_g is applied at g's (coarse) resolution and its result upsampled
    bilinearly to x's size, which is cheaper than upsampling g itself and works for any size ratio.
    """

    def __init__(self, gate_channels: int, skip_channels: int, inter_channels: int | None = None):
        super().__init__()
        inter_channels = inter_channels or max(skip_channels // 2, 1)
        self.W_g = nn.Sequential(nn.Conv2d(gate_channels, inter_channels, 1, bias=False), nn.BatchNorm2d(inter_channels))
        self.W_x = nn.Sequential(nn.Conv2d(skip_channels, inter_channels, 1, bias=False), nn.BatchNorm2d(inter_channels))
        self.psi = nn.Sequential(nn.Conv2d(inter_channels, 1, 1, bias=False), nn.BatchNorm2d(1))

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        g = self.W_g(g)
        if g.shape[-2:] != x.shape[-2:]:
            g = F.interpolate(g, size=x.shape[-2:], mode="bilinear", align_corners=False)
        alpha = torch.sigmoid(self.psi(F.relu(self.W_x(x) + g)))
        return x * alpha


def upsample_to(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize to `size` (H, W); a no-op when x already has it."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def to_target_size(logits: torch.Tensor) -> torch.Tensor:
    """Logits at any resolution -> (N, C, 128, 128), the size every target has."""
    return upsample_to(logits, (TARGET_SIZE, TARGET_SIZE))
