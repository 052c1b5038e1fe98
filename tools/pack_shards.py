#!/usr/bin/env python3
"""Pack a dataset into HDF5 shards (amodal/data/FORMAT.md).

  python tools/pack_shards.py synthetic --out DIR --train N --val N --test N --seed S
  python tools/pack_shards.py course --root LMDB_DIR --out DIR     (the course's data/InterHand2.6M/)
  python tools/pack_shards.py folder --root DIR --out DIR          (images/, labels/, boxes.json)

Re-running the same command keeps the shards that are already complete and intact (an interrupted pack
resumes); the manifest is written last.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amodal.data import shards  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="source", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="shard folder to write (manifest.json + *.h5)")
    common.add_argument("--shard-size", type=int, default=shards.SHARD_SIZE, help="samples per shard")
    common.add_argument("--crop-size", type=int, default=shards.CROP_SIZE, help="side of the stored crop")
    common.add_argument("--context", type=float, default=shards.CONTEXT, help="crop side / longer box side")
    common.add_argument("--image-compression", choices=shards.COMPRESSIONS, default="none")
    common.add_argument("--map-compression", choices=shards.COMPRESSIONS, default="none")
    common.add_argument("--workers", type=int, default=1, help="processes packing shards in parallel")
    common.add_argument("--no-progress", action="store_true")

    syn = sub.add_parser("synthetic", parents=[common], help="the built-in synthetic hands")
    syn.add_argument("--train", type=int, default=2000)
    syn.add_argument("--val", type=int, default=256)
    syn.add_argument("--test", type=int, default=256)
    syn.add_argument("--seed", type=int, default=0)
    course = sub.add_parser("course", parents=[common], help="the course's LMDB layout")
    course.add_argument("--root", required=True, help="folder with interhand.lmdb, datalist_*.pt, ...")
    course.add_argument("--splits", nargs="+", default=["train", "val", "test"])
    folder = sub.add_parser("folder", parents=[common], help="images/, labels/ and boxes.json")
    folder.add_argument("--root", required=True)
    folder.add_argument("--splits", nargs="+", default=None, help="default: every split in boxes.json")
    args = ap.parse_args(argv)

    try:
        kw = {"shard_size": args.shard_size, "workers": args.workers, "progress": not args.no_progress,
              "options": shards.PackOptions(crop_size=args.crop_size, context=args.context,
                                            image_compression=args.image_compression,
                                            map_compression=args.map_compression)}
        if args.source == "synthetic":
            manifest = shards.pack_synthetic(args.out, args.train, args.val, args.test, seed=args.seed, **kw)
        else:
            from amodal.data import importers

            pack = importers.pack_course if args.source == "course" else importers.pack_folder
            manifest = pack(args.root, args.out, splits=args.splits, **kw)
    except (shards.ShardError, ValueError) as e:
        print(f"pack_shards: error: {e}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{k} {v['count']}" for k, v in manifest["splits"].items())
    print(f"{args.out}: {counts}; fingerprint {manifest['fingerprint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
