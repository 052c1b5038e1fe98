"""Score a checkpoint on a labelled split with the leaderboard mIoU, with and without flip TTA.

    amodal-evaluate CHECKPOINT [--shards DIR] [--split val] [--tta-flip both|on|off]

CHECKPOINT is a checkpoint file or a run folder (its best.pt, else its newest checkpoint). The weights
are those validation scored (the EMA copy when the run kept one). The shards default to the ones the
checkpoint was trained on (its data.root). The scores come from the trainer's own validation
(amodal.metrics.evaluate), so for the same weights and split they equal the run's val records. One line
per setting: mIoU, occluded-region mIoU and the number of (image, hand) pairs scored.
"""

from __future__ import annotations

import argparse
import sys

import torch

from amodal.metrics import evaluate


def score(checkpoint, shards=None, split: str = "val", tta: str = "both", batch_size: int = 32) -> list[dict]:
    """One row per flip-TTA setting: the checkpoint's leaderboard mIoU on `split` of `shards`."""
    from amodal.config import ConfigError
    from amodal.data.dataset import ShardDataset
    from amodal.data.format import ShardError
    from amodal.predict import load_model_from_checkpoint

    model, cfg, ckpt_path = load_model_from_checkpoint(checkpoint, "cpu")
    data = cfg.get("data", {})
    shards = shards or data.get("root")
    if not shards:
        raise ConfigError(f"{ckpt_path}: its config names no data.root; pass --shards")
    dataset = ShardDataset(shards, split, input_size=int(data.get("input_size", 128)))
    if not dataset.has_labels:
        raise ShardError(f"{shards}: split {split!r} has no labels to score against")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    rows = []
    for flip in {"both": (False, True), "on": (True,), "off": (False,)}[tta]:
        scores = evaluate(model, loader, torch.device("cpu"), None, False, flip)
        rows.append({"checkpoint": str(ckpt_path), "weights": model.weights_name, "split": split, "tta_flip": flip,
                     "miou": scores["miou"], "occluded_miou": scores["occluded_miou"], "count": scores["count"]})
    dataset.close()
    return rows


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.4f}"


def main(argv: list[str] | None = None) -> int:
    from amodal.checkpoint import CheckpointError
    from amodal.config import ConfigError
    from amodal.data.format import ShardError
    from amodal.predict import PredictError

    parser = argparse.ArgumentParser(prog="amodal-evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file or run folder")
    parser.add_argument("--shards", metavar="DIR", help="shard folder (default: the checkpoint's data.root)")
    parser.add_argument("--split", default="val", help="labelled split to score (default: %(default)s)")
    parser.add_argument("--tta-flip", choices=["both", "on", "off"], default="both",
                        help="score without and with flip test-time augmentation (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    try:
        rows = score(args.checkpoint, args.shards, args.split, args.tta_flip, args.batch_size)
    except (CheckpointError, ConfigError, ShardError, PredictError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{rows[0]['checkpoint']} ({rows[0]['weights']} weights), split {args.split}")
    for r in rows:
        print(f"  flip TTA {'on ' if r['tta_flip'] else 'off'}  mIoU {_fmt(r['miou'])}  "
              f"occluded mIoU {_fmt(r['occluded_miou'])}  ({r['count']} image-hand pairs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
