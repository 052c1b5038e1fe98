"""The report's comparison architectures through segmentation_models_pytorch (the `smp` extra).

U-Net++, DeepLabV3+ and PSPNet on a ResNet encoder (cfg.encoder_depth), built with
encoder_weights=None so nothing is downloaded; a local torchvision ResNet state dict
(cfg.pretrained) loads into the encoder, whose parameter names are torchvision's.
"""

from __future__ import annotations

import torch
from torch import nn

from amodal.labels import NUM_OUTPUTS

from .blocks import to_target_size
from .resnet_unet import RESNET_DEPTHS, load_resnet_weights

# model name -> smp class name
SMP_MODELS = {
    "smp_unetplusplus": "UnetPlusPlus",
    "smp_deeplabv3plus": "DeepLabV3Plus",
    "smp_pspnet": "PSPNet",
}


def import_smp():
    try:
        import segmentation_models_pytorch
    except ImportError:
        raise ImportError(
            "segmentation_models_pytorch is not installed; the smp_* models need it: pip install -e .[smp]"
        ) from None
    return segmentation_models_pytorch


class SMPModel(nn.Module):
    """An smp model whose logits are resized to 128x128 like every other model's."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_target_size(self.net(x))


def build_smp(name: str, encoder_depth: int = 50, pretrained: str = "") -> nn.Module:
    if encoder_depth not in RESNET_DEPTHS:
        raise ValueError(f"ResNet encoder depth must be one of {RESNET_DEPTHS}, got {encoder_depth}")
    smp = import_smp()
    cls = getattr(smp, SMP_MODELS[name])
    net = cls(encoder_name=f"resnet{encoder_depth}", encoder_weights=None, in_channels=3, classes=NUM_OUTPUTS)
    if pretrained:
        load_resnet_weights(net.encoder, pretrained)
    return SMPModel(net)
