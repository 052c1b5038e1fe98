"""Print a markdown table of every model: parameters and forward cost at 128x128.

    python tools/model_table.py [--size 128]

Each model is built from the default ModelConfig with only `name` changed (ResNet-50 encoders,
64-channel U-Nets), then a few resnet_unet variants (encoder depth, attention, no stage heads). MACs are counted with torch.utils.flop_counter.FlopCounterMode on one forward
pass of one image in eval mode, as FLOPs / 2: convolutions and matrix products only (batch norm,
activations, pooling and resizing are not counted; they are a few percent at most). The smp_* rows
appear only where segmentation_models_pytorch is installed.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from amodal.config import ModelConfig
from amodal.models import MODEL_NAMES, build_model


def count(model: torch.nn.Module, size: int) -> tuple[float, float]:
    """(parameters in millions, forward GMACs for one size x size image)."""
    params = sum(p.numel() for p in model.parameters()) / 1e6
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.eval()(torch.zeros(1, 3, size, size))
    return params, counter.get_total_flops() / 2 / 1e9


def configs() -> list[tuple[str, ModelConfig]]:
    """Every model name at its defaults, then the resnet_unet variants of the ablation."""
    out = [(name, ModelConfig(name=name)) for name in MODEL_NAMES]
    for depth in (18, 34, 101):
        out.append((f"resnet_unet, ResNet-{depth}", ModelConfig(encoder_depth=depth)))
    out.append(("resnet_unet, attention gates", ModelConfig(attention=True)))
    out.append(("resnet_unet, no stage heads", ModelConfig(stage_heads=False)))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=128, help="input side (a multiple of 32)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows, skipped = [], []
    for label, cfg in configs():
        try:
            model = build_model(cfg)
        except ImportError:
            skipped.append(label)
            continue
        params, gmacs = count(model, args.size)
        rows.append(f"| {label} | {params:.2f} | {gmacs:.2f} |")
    print(f"| model | parameters (M) | forward GMACs at {args.size}x{args.size} |")
    print("| --- | ---: | ---: |")
    print("\n".join(rows))
    print("\nMACs = FLOPs / 2 from torch.utils.flop_counter.FlopCounterMode (convolutions and matmuls), batch 1.")
    if skipped:
        print(f"Not shown ({', '.join(skipped)}): segmentation_models_pytorch is not installed (pip install -e .[smp]).")


if __name__ == "__main__":
    main()
