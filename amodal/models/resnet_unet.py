"""The report's best model: a torchvision ResNet encoder and a U-Net decoder whose stages each predict.

Encoder: torchvision's ResNet-18/34/50/101 (built with weights=None; nothing is downloaded), its
stem (stride 2) and its four layers (strides 4, 8, 16, 32) give the five feature maps.
Decoder: five stages as in the usual ResNet U-Net (channels 256, 128, 64, 32, 16): nearest 2x
upsampling, concatenation with the skip feature of the same size (optionally through an attention
gate, Oktay et al. 2018), then two 3x3 conv-BN-ReLU. The last stage has no skip and works at the
input resolution.

`encoder_layers = 3` stops the encoder after layer3 (stride 16) and drops the decoder's coarsest
stage (channels 128, 64, 32, 16). For small inputs: at 64x64 layer4 works on 2x2 maps, where its
3x3 convolutions see mostly padding, yet it holds three quarters of a ResNet-18's weights and, with
the decoder stage that reads it, about 30% of a training step on a CPU (docs/results/demo_budget).

How we read "each decoder layer predicts a section of the final result": every decoder stage s has
a head of its own, a 1x1 conv that predicts all 34 logits p_s at the stage's resolution (S/16 .. S).
The five stage predictions (four with encoder_layers = 3) are upsampled to the output size
(128x128), concatenated (5 x 34 channels) and fused by a learned 1x1 conv into the final 34 logits:

    logits = fuse(concat(U_1(p_1), ..., U_5(p_5)))

So each stage contributes its section of the answer at its own scale: the coarse stages the global
layout (which hand, roughly where each part is, including the parts hidden by the other hand, which
needs the large receptive field), the fine stages the part boundaries; the fusion learns per class
and per stage how much to trust each scale. We chose this over the other reading, "each stage
predicts a subset of the 34 channels", because that would make some classes come only from coarse
stages (blurry boundaries for small parts such as fingertips) and others only from fine stages (no
global context for amodal completion), and which subset goes where would be arbitrary. Our reading
contains that one: the fusion can learn to take a class from one stage only.

U_s is bilinear resizing (align_corners=False) from stage s up through the sizes of the finer
stages to 128x128 (for the usual 2x steps, repeated 2x bilinear upsampling).

Cost. Materialising the 170-channel concatenation at 128x128 would make the heads the dearest part
of the decoder on a CPU. Everything after the stage features is linear, and a bilinear resize
commutes with a per-pixel linear map and keeps constants, so with W_s the fusion weight's block
for stage s, the same function is

    logits = b_fuse + U_5(W_5 p_5 + U_45(W_4 p_4 + U_34(... + U_12(W_1 p_1))))

with U_ab the resize from stage a's size to stage b's: only one 34-channel map per stage is
resized, at the next stage's size, and W_s and head_s are composed into one 1x1 conv per stage (a
34x34 by 34xC matmul of weights) so p_s is never stored. `stage_logits()` returns the p_s
themselves; the tests check forward() against the literal formula above.

`stage_heads=False` gives the plain model (one 1x1 head on the last stage) for the ablation.
Pretrained encoders come only from a local torchvision ResNet state dict (`load_resnet_weights`).
With `normalize_input` (the default) the encoder sees what torchvision's ResNets were trained on: the
BGR [0, 1] image turned to RGB and standardised with ImageNet's mean and std.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from amodal.labels import NUM_OUTPUTS

from .blocks import AttentionGate, conv_bn_relu, to_target_size, upsample_to

RESNET_DEPTHS = (18, 34, 50, 101)
ENCODER_LAYERS = (3, 4)  # how many of the ResNet's four layers the encoder keeps
DECODER_CHANNELS = (256, 128, 64, 32, 16)
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)


def make_resnet(depth: int) -> torchvision.models.ResNet:
    if depth not in RESNET_DEPTHS:
        raise ValueError(f"ResNet encoder depth must be one of {RESNET_DEPTHS}, got {depth}")
    return getattr(torchvision.models, f"resnet{depth}")(weights=None)


def _some(keys: list[str], limit: int = 12) -> str:
    """A readable key list for an error: all of them, or the first `limit` and how many more."""
    if not keys:
        return "none"
    if len(keys) <= limit:
        return str(keys)
    return f"{keys[:limit]} and {len(keys) - limit} more"


def load_resnet_weights(encoder: nn.Module, path: str | Path) -> None:
    """Load a torchvision ResNet state dict from a local file into `encoder`; `fc.*` keys are ignored.

    Any difference between the file's keys and the encoder's (missing or unexpected keys, other
    shapes) is a ValueError naming the file and the keys, so a partial or wrong file never loads
    silently.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"pretrained encoder file {path}: no such file") from None
    except Exception as e:  # a corrupt file, or one that holds more than tensors
        raise ValueError(f"pretrained encoder file {path}: cannot be read as a state dict: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"pretrained encoder file {path}: expected a torchvision ResNet state dict (name -> tensor)")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = {k: v for k, v in encoder.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(
            f"pretrained encoder file {path} does not match the ResNet encoder: "
            f"missing keys {_some(missing)}; unexpected keys {_some(unexpected)}"
        )
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items() if state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"pretrained encoder file {path}: shapes differ (file != model): {_some(wrong)}")
    encoder.load_state_dict(state, strict=False)  # strict=False only because fc.* may be absent


class DecoderStage(nn.Module):
    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, attention: bool):
        super().__init__()
        self.gate = AttentionGate(in_channels, skip_channels) if attention and skip_channels else None
        self.conv1 = conv_bn_relu(in_channels + skip_channels, out_channels)
        self.conv2 = conv_bn_relu(out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size) -> torch.Tensor:
        if skip is not None and self.gate is not None:
            skip = self.gate(skip, x)  # gated by the coarse feature, before upsampling
        # Nearest-neighbour 2x: the 3x3 convs right after it smooth as much as they need, and on a CPU
        # it costs a fraction of bilinear (forward and backward). The logits are resized bilinearly.
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class ResNetUNet(nn.Module):
    def __init__(
        self,
        encoder_depth: int = 50,
        attention: bool = False,
        stage_heads: bool = True,
        pretrained: str = "",
        normalize_input: bool = True,
        out_channels: int = NUM_OUTPUTS,
        encoder_layers: int = 4,
    ):
        super().__init__()
        if encoder_layers not in ENCODER_LAYERS:
            raise ValueError(f"model.encoder_layers must be one of {ENCODER_LAYERS}, got {encoder_layers}")
        if normalize_input:
            # Images arrive BGR in [0, 1] (docs/design.md §1); torchvision's ResNets expect RGB standardised
            # with ImageNet's statistics. Buffers, so that they travel with the weights, and so that a
            # checkpoint trained without them fails to load with their names instead of predicting wrongly.
            self.register_buffer("input_mean", torch.tensor(IMAGENET_MEAN_RGB).view(1, 3, 1, 1))
            self.register_buffer("input_std", torch.tensor(IMAGENET_STD_RGB).view(1, 3, 1, 1))
        self.normalize_input = normalize_input
        self.encoder = make_resnet(encoder_depth)
        if pretrained:
            load_resnet_weights(self.encoder, pretrained)
        # The classifier is not part of the encoder; dropping it keeps state dicts and optimizers lean.
        del self.encoder.fc, self.encoder.avgpool
        if encoder_layers == 3:
            del self.encoder.layer4
        self.encoder_layers = encoder_layers
        wide = encoder_depth >= 50  # bottleneck blocks: 4x the channels
        layers = [64 * (4 if wide else 1) * 2**i for i in range(encoder_layers)]
        skip_channels = [*reversed(layers[:-1]), 64, 0]  # stride 16 (or 8), ..., 4, 2, none
        decoder_channels = DECODER_CHANNELS[-len(skip_channels):]  # the coarsest stage goes with layer4
        self.stages = nn.ModuleList()
        channels = layers[-1]
        for skip, out in zip(skip_channels, decoder_channels):
            self.stages.append(DecoderStage(channels, skip, out, attention))
            channels = out
        self.out_channels = out_channels
        if stage_heads:
            self.heads = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in decoder_channels)
            # The fusion of the concatenated stage predictions (see the module docstring).
            self.fuse = nn.Conv2d(out_channels * len(decoder_channels), out_channels, 1)
            self.head = None
        else:
            self.heads = self.fuse = None
            self.head = nn.Conv2d(decoder_channels[-1], out_channels, 1)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        e = self.encoder
        if self.normalize_input:
            x = (x.flip(1) - self.input_mean) / self.input_std  # BGR -> RGB, then standardise
        features = [e.relu(e.bn1(e.conv1(x)))]  # the stem, stride 2
        y = e.maxpool(features[0])
        for i in range(1, self.encoder_layers + 1):
            y = getattr(e, f"layer{i}")(y)
            features.append(y)
        return features  # stride 2, 4, 8, 16 (, 32)

    def decode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The decoder stages' features, coarse (S/16, or S/8 with 3 encoder layers) to fine (S)."""
        size = x.shape[-2:]
        *skips, y = self.encode(x)
        features = []
        for stage, skip in zip(self.stages, [*reversed(skips), None]):
            y = stage(y, skip, skip.shape[-2:] if skip is not None else size)
            features.append(y)
        return features

    def stage_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each stage's own 34-channel prediction at the stage's resolution, coarse to fine."""
        return self.forward(x, stages=True)[1]

    def forward(self, x: torch.Tensor, stages: bool = False):
        """Logits (N, 34, 128, 128); with `stages`, also each stage's own logits (for deep supervision),
        computed from the same decoder pass."""
        features = self.decode(x)
        if self.heads is None:
            logits = to_target_size(self.head(features[-1]))
            return (logits, []) if stages else logits
        # fuse(concat(U_s(head_s(y_s)))) computed as in the module docstring: stage by stage at the
        # stage's resolution, one conv per stage (head_s then fusion block W_s, composed), and the
        # running 34-channel sum upsampled to the next stage's size.
        k = self.out_channels
        out = None
        for i, (head, y) in enumerate(zip(self.heads, features)):
            block = self.fuse.weight[:, i * k : (i + 1) * k, 0, 0]  # W_s: (34, 34)
            weight = torch.einsum("ok,kcij->ocij", block, head.weight)
            bias = block @ head.bias
            if out is None:
                bias = bias + self.fuse.bias  # a constant map stays constant through the resizes
                out = F.conv2d(y, weight, bias)
            else:
                out = F.conv2d(y, weight, bias).add_(upsample_to(out, y.shape[-2:]))
        logits = to_target_size(out)
        if stages:
            return logits, [head(y) for head, y in zip(self.heads, features)]
        return logits
