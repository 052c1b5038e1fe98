#!/usr/bin/env python3
"""Write one PNG panel per sample: image, ground truth and prediction of both hands, hidden parts outlined.

    python tools/visualize.py CHECKPOINT --shards DIR [--split val] -o DIR [--count 8] [--start 0]
                              [--tta-flip] [--device cpu]

CHECKPOINT is a checkpoint file or a run folder (its best.pt, else its newest checkpoint). Each panel
shows the model's input image, the ground truth left and right maps, the predicted left and right maps
(with the image's leaderboard score per hand), one colour per part with a legend, and in white the
outline of the parts of a hand that the other hand hides (synthetic data, which has a front map).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from amodal.checkpoint import CheckpointError  # noqa: E402
from amodal.config import ConfigError  # noqa: E402
from amodal.data.shards import ShardError  # noqa: E402
from amodal.predict import PredictError  # noqa: E402
from amodal.visualize import write_panels  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="visualize.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file or run folder")
    parser.add_argument("--shards", required=True, metavar="DIR", help="shard folder (manifest.json + *.h5)")
    parser.add_argument("--split", default="val", help="split to draw (default: %(default)s)")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the PNG panels")
    parser.add_argument("--count", type=int, default=8, help="number of samples (default: %(default)s)")
    parser.add_argument("--start", type=int, default=0, help="index of the first sample (default: %(default)s)")
    parser.add_argument("--tta-flip", action="store_true", help="predict with horizontal-flip test-time augmentation")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        paths = write_panels(args.checkpoint, args.shards, args.split, args.output, count=args.count,
                             start=args.start, tta_flip=args.tta_flip, device=args.device)
    except (CheckpointError, ConfigError, ShardError, PredictError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} panels to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
