"""Models, selected by name from the recipe's [model] table: `build_model(cfg.model)`.

Every model maps images (N, 3, S, S), S a multiple of 32 (of 16 for resnet_unet with 3 encoder
layers), to logits (N, 34, 128, 128) laid out [left 17 | right 17] (docs/design.md §1).

| name | what |
| --- | --- |
| unet | the course's baseline U-Net: 4 levels, `base_channels` (64), bilinear up, batch norm |
| unet_deep | the same with one more encoder and decoder level |
| unet_attention | the U-Net with attention gates on the skip connections (Oktay et al. 2018) |
| resnet_unet | ResNet-`encoder_depth` encoder (its first `encoder_layers` layers), U-Net decoder whose stages each predict, fused (`stage_heads`); optional `attention` |
| smp_unetplusplus, smp_deeplabv3plus, smp_pspnet | segmentation_models_pytorch comparisons (the `smp` extra) |

`attention = true` also adds the gates to unet and unet_deep. Pretrained weights come only from a
local torchvision ResNet state dict (`pretrained = "path"`), for the ResNet-encoder models.
"""

from __future__ import annotations

from torch import nn

from amodal.config import ModelConfig

from .resnet_unet import ResNetUNet, load_resnet_weights
from .smp import SMP_MODELS, build_smp
from .unet import UNet

MODEL_NAMES = ("unet", "unet_deep", "unet_attention", "resnet_unet", *SMP_MODELS)

__all__ = ["MODEL_NAMES", "build_model", "ResNetUNet", "UNet", "load_resnet_weights"]


def build_model(cfg: ModelConfig) -> nn.Module:
    name = cfg.name
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    if cfg.encoder_layers != 4 and name != "resnet_unet":
        raise ValueError(f"model {name!r}: model.encoder_layers is for resnet_unet (got {cfg.encoder_layers})")
    if name.startswith("unet"):
        if cfg.pretrained:
            raise ValueError(f"model {name!r} has no pretrained encoder; pretrained is for resnet_unet and smp_*")
        depth = 5 if name == "unet_deep" else 4
        return UNet(cfg.base_channels, depth, attention=cfg.attention or name == "unet_attention")
    if name == "resnet_unet":
        return ResNetUNet(cfg.encoder_depth, cfg.attention, cfg.stage_heads, cfg.pretrained, cfg.normalize_input,
                          encoder_layers=cfg.encoder_layers)
    if cfg.attention:
        raise ValueError(f"model {name!r} has no attention gates; attention is for unet* and resnet_unet")
    return build_smp(name, cfg.encoder_depth, cfg.pretrained)
