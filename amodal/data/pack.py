"""Packing: RawSamples in, shards and a manifest out (FORMAT.md beside this).

- make_record: a sample's stored form (its context crop, crop_geometry, and the evaluation targets);
  check_raw: the faults a source's sample can have.
- write_shard: one shard file, in format version 2 (encoded crops and maps, amodal.data.codec) or 1
  (raw arrays); pack: every split of a dataset, with a journal and optionally a pool of processes;
  progress is a tqdm bar.
- pack_synthetic / pack_course / pack_folder: pack one kind of source (amodal.data.sources);
  ensure_synthetic: the synthetic set where a config's data.root has none yet.
- main: the command line (`amodal-pack`).

Writing is crash-safe: every file is written under a temporary name, fsynced and renamed; a journal
records each finished shard's hash so that an interrupted pack resumes where it stopped; the manifest
is written last, so a folder with a manifest is complete. amodal.data.read.verify_shards re-hashes
everything.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import cv2
import h5py
import numpy as np

from amodal.data import augment, codec
from amodal.data.format import (CONTEXT, CROP_SIZE, FORMAT_NAME, FORMAT_VERSION, IMAGE_CODECS, JOURNAL, MANIFEST,
                                MAP_CODECS, READABLE_VERSIONS, SHARD_SIZE, PackOptions, RawSample, ShardError,
                                Source, SourceError, blob_names, fingerprint_of, layout, layout_v2, manifest_layout,
                                read_manifest, sha256_file, shard_name)
from amodal.data.sources import (CourseSource, FolderSource, SyntheticSource, close_environments,
                                 folder_splits)
from amodal.fileio import commit
from amodal.labels import NUM_PARTS, TARGET_SIZE

_TMP_SUFFIX = ".tmp"


# ---------------------------------------------------------------------------------------------------
# Crops: the stored form of a sample


def crop_side(bbox, crop_size: int = CROP_SIZE, context: float = CONTEXT) -> int:
    """Side of a tight crop (format version 2): `context` × the longer box side, plus a pixel each side
    for the bilinear warp, at most crop_size. The default augmentation reaches 1.053 box sides from the
    box centre (FORMAT.md), inside the crop's context / 2 = 1.1, so a larger crop would only hold pixels
    that no training sample reads."""
    return min(crop_size, math.ceil(context * max(float(bbox[2]), float(bbox[3]))) + 2)


def crop_geometry(bbox, crop_size: int = CROP_SIZE, context: float = CONTEXT, side: int | None = None):
    """(2x3 frame -> crop matrix, box in crop pixels). The crop is a square of `side` (default
    crop_size) centred on the box centre, scaled so that crop_size holds at least `context` × the
    longer box side. It only scales and shifts, so the box stays axis-aligned. Where that fits at the
    frame's own resolution (box side <= crop_size / context), the crop is an unscaled, integer-aligned
    window of the frame: stored pixels and labels are then exact copies, and any later warp of the
    crop equals the same warp of the frame."""
    side = crop_size if side is None else side
    x, y, w, h = (float(v) for v in bbox)
    k = min(1.0, crop_size / (context * max(w, h)))
    tx, ty = side / 2 - k * (x + w / 2), side / 2 - k * (y + h / 2)
    if k == 1.0:
        tx, ty = float(round(tx)), float(round(ty))
    m = np.array([[k, 0.0, tx], [0.0, k, ty]])
    box = np.array([k * x + tx, k * y + ty, k * w, k * h], dtype=np.float32)
    return m, box


def _area_warp(image: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    """warpAffine with an area filter first where the crop shrinks the frame (bilinear alone aliases)."""
    k = m[0, 0]
    if k >= 1.0:
        return augment.warp_image(image, m, size)
    h, w = image.shape[:2]
    small = cv2.resize(image, (max(1, round(w * k)), max(1, round(h * k))), interpolation=cv2.INTER_AREA)
    fx, fy = small.shape[1] / w, small.shape[0] / h
    # resize maps p -> (p + 0.5) f - 0.5; undo it before m
    undo = np.array([[1 / fx, 0, 0.5 / fx - 0.5], [0, 1 / fy, 0.5 / fy - 0.5], [0, 0, 1]])
    return augment.warp_image(small, m @ undo, size)


def check_raw(sample: RawSample, where: str) -> None:
    """Clear errors for the faults a source can have; `where` names the source file."""
    key = sample.key
    img = sample.image
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise SourceError(f"{where}: key {key!r}: image must be uint8 (H, W, 3), got "
                         f"{getattr(img, 'dtype', type(img))} {getattr(img, 'shape', '')}")
    h, w = img.shape[:2]
    box = np.asarray(sample.bbox, dtype=np.float64)
    if box.shape != (4,) or not np.all(np.isfinite(box)) or box[2] <= 0 or box[3] <= 0:
        raise SourceError(f"{where}: key {key!r}: bad bbox {sample.bbox!r} (want [x, y, w, h], w, h > 0)")
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
    if not (0 <= cx <= w and 0 <= cy <= h):
        raise SourceError(f"{where}: key {key!r}: bbox {box.tolist()} lies outside the {w}x{h} frame "
                         "(its centre is not in the frame)")
    if sample.labels is not None:
        lab = sample.labels
        if lab.shape != (2, h, w):
            raise SourceError(f"{where}: key {key!r}: labels have shape {lab.shape}, image is {h}x{w} "
                             f"(want (2, {h}, {w}))")
        if lab.dtype != np.uint8 or lab.max(initial=0) > NUM_PARTS:
            raise SourceError(f"{where}: key {key!r}: label values must be 0..{NUM_PARTS}, "
                             f"got max {int(lab.max(initial=0))}")
    if sample.front is not None:
        if sample.front.shape != (h, w) or sample.front.dtype != np.uint8 or sample.front.max(initial=0) > 2:
            raise SourceError(f"{where}: key {key!r}: front map must be uint8 {h}x{w} with values 0..2")


def make_record(sample: RawSample, crop_size: int = CROP_SIZE, context: float = CONTEXT,
                tight: bool = False) -> dict:
    """The stored form of one sample (see FORMAT.md): a crop of side crop_size (format version 1) or,
    with tight, of crop_side() (version 2)."""
    side = crop_side(sample.bbox, crop_size, context) if tight else crop_size
    m, box = crop_geometry(sample.bbox, crop_size, context, side)
    rec = {"key": sample.key, "hand_type": sample.hand_type, "bbox": box, "side": side,
           "frame_bbox": np.asarray(sample.bbox, np.float32),
           "image": _area_warp(sample.image, m, side)}
    eval_m = augment.box_affine(sample.bbox, TARGET_SIZE)
    if sample.labels is not None:
        rec["labels"] = augment.warp_labels(sample.labels, m, side, flip=False)
        rec["eval_labels"] = augment.warp_labels(sample.labels, eval_m, TARGET_SIZE, flip=False)
    if sample.front is not None:
        rec["front"] = augment.warp_map(sample.front, m, side)
        rec["eval_front"] = augment.warp_map(sample.front, eval_m, TARGET_SIZE)
    return rec


# ---------------------------------------------------------------------------------------------------
# Shard files


def _filters(compression: str) -> dict:
    """HDF5 filter arguments of a version-1 dataset (and of the evaluation targets, gzip)."""
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 1}
    if compression == "lzf":
        return {"compression": "lzf"}
    return {}


def write_json_atomic(path: Path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    commit(tmp, path)


def _spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _create_fixed(f: h5py.File, shapes: dict, count: int, opt: PackOptions) -> dict:
    """The fixed-size datasets of a shard (all of version 1's, version 2's targets, boxes and sides)."""
    ds = {}
    for name, shape in shapes.items():
        dtype = np.float32 if name.endswith("bbox") else np.uint16 if name == "side" else np.uint8
        kw = {}  # bbox arrays and sides: small, contiguous, read whole when a shard opens
        if name == "image":
            kw = {"chunks": (1, *shape)}
        elif name in ("labels", "front"):
            kw = {"chunks": (1, *shape), **_filters("gzip" if opt.map_codec == "zlib" else "none")}
        elif name.startswith("eval_"):  # read once per evaluation sample: small, compress well
            kw = {"chunks": (1, *shape), **_filters("gzip")}
        ds[name] = f.create_dataset(name, (count, *shape), dtype=dtype, **kw)
    return ds


def _encode_blob(name: str, rec: dict, opt: PackOptions) -> bytes:
    if name == "image":
        return codec.encode_image(rec["image"], opt.image_codec, opt.jpeg_quality)
    return codec.encode_map(rec[name], opt.map_codec)


def write_shard(path: Path, records: Iterable[dict], count: int, spec: dict, opt: PackOptions,
                has_labels: bool, has_front: bool, on_sample: Callable[[], None] | None = None) -> dict:
    """Write `count` records to `path` atomically; returns the manifest entry {file, count, sha256, bytes}."""
    path = Path(path)
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    v1 = opt.format_version == 1
    shapes = layout(opt.crop_size, has_labels, has_front) if v1 else layout_v2(has_labels, has_front)
    blobs = [] if v1 else blob_names(has_labels, has_front)
    str_type = h5py.string_dtype("utf-8")
    with h5py.File(tmp, "w", libver="latest") as f:
        ds = _create_fixed(f, shapes, count, opt)
        parts: dict[str, list[bytes]] = {name: [] for name in blobs}  # 33 MB a shard (JPEG), 224 MB (raw)
        keys, hand_types = [], []
        n = 0
        for rec in records:
            if n >= count:
                raise ShardError(f"{path}: more than {count} records")
            for name in shapes:
                ds[name][n] = rec[name]
            for name in blobs:
                parts[name].append(_encode_blob(name, rec, opt))
            keys.append(rec["key"])
            hand_types.append(rec["hand_type"])
            n += 1
            if on_sample is not None:
                on_sample()
        if n != count:
            raise ShardError(f"{path}: got {n} records, expected {count}")
        for name in blobs:
            # contiguous and unfiltered: a sample is one read of exactly its bytes
            f.create_dataset(name, data=np.frombuffer(b"".join(parts[name]), np.uint8))
            f.create_dataset(f"{name}_offsets", data=np.cumsum([0] + [len(b) for b in parts[name]], dtype=np.int64))
        f.create_dataset("key", data=np.array(keys, dtype=object), dtype=str_type)
        f.create_dataset("hand_type", data=np.array(hand_types, dtype=object), dtype=str_type)
        f.attrs["format"] = FORMAT_NAME
        f.attrs["format_version"] = opt.format_version
        f.attrs["spec"] = json.dumps(spec, sort_keys=True)
    digest = sha256_file(tmp)
    size = tmp.stat().st_size
    commit(tmp, path)
    return {"file": path.name, "first": spec["first"], "count": count, "sha256": digest, "bytes": size,
            "spec": _spec_hash(spec)}


# ---------------------------------------------------------------------------------------------------
# Packing


def _plan(source: Source, split: str, shard_size: int, opt: PackOptions) -> list[dict]:
    """The shards of one split: file name and spec (everything the shard's content depends on)."""
    n = len(source)
    out = []
    for i, first in enumerate(range(0, n, shard_size)):
        spec = {"format_version": opt.format_version, "split": split, "source": source.name, "first": first,
                "count": min(shard_size, n - first), "options": dataclasses.asdict(opt),
                "has_labels": source.has_labels, "has_front": source.has_front}
        out.append({"file": shard_name(split, i), "spec": spec})
    return out


def _known_entries(root: Path) -> dict:
    """Finished shards recorded by an earlier pack (manifest or journal): file -> entry."""
    known = {}
    with contextlib.suppress(ShardError):
        for s in read_manifest(root)["splits"].values():
            for e in s["shards"]:
                known[e["file"]] = e
    journal = root / JOURNAL
    if journal.exists():
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            for e in json.loads(journal.read_text())["shards"]:
                known[e["file"]] = e
    return known


def _is_intact(root: Path, item: dict, known: dict) -> bool:
    """True when the shard file exists, was made from the same spec and still has its recorded hash."""
    old = known.get(item["file"])
    path = root / item["file"]
    if old is None or old.get("spec") != _spec_hash(item["spec"]) or not path.exists():
        return False
    if path.stat().st_size != old.get("bytes"):
        return False
    return sha256_file(path) == old.get("sha256")


def _pack_one(root: Path, source: Source, item: dict, opt: PackOptions, on_sample=None) -> dict:
    spec = item["spec"]
    first, count = spec["first"], spec["count"]
    where = getattr(source, "where", source.name)  # the file a bad sample came from

    def records():
        for i in range(first, first + count):
            raw = source.get(i)
            check_raw(raw, where)
            yield make_record(raw, opt.crop_size, opt.context, tight=opt.format_version >= 2)

    return write_shard(root / item["file"], records(), count, spec, opt, source.has_labels,
                       source.has_front, on_sample)


def _pack_job(args) -> dict:  # a pool worker's task
    return _pack_one(*args)


def pack(root, sources: dict[str, Source], shard_size: int = SHARD_SIZE, options: PackOptions = PackOptions(),
         workers: int = 1, progress: bool = True, description: str = "") -> dict:
    """Pack each split's source into shards under root; returns the manifest.

    Re-running is safe: shards whose spec and hash match an earlier pack are kept (an interrupted pack
    resumes), others are rewritten, stray temporary files are removed, and the manifest comes last.
    """
    from tqdm import tqdm

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    for tmp in root.glob("*" + _TMP_SUFFIX):  # left by a pack that was killed
        tmp.unlink()
    known = _known_entries(root)
    plans = {split: _plan(src, split, shard_size, options) for split, src in sources.items()}
    todo, done = [], {}
    for split, items in plans.items():
        for item in items:
            if _is_intact(root, item, known):
                done[item["file"]] = known[item["file"]]
            else:
                todo.append((split, item))
    wanted = {item["file"] for items in plans.values() for item in items}
    stray = [path for split in sources for path in root.glob(f"{split}-*.h5") if path.name not in wanted]
    old_manifest = root / MANIFEST
    if todo or stray:
        # The folder is about to change: without a manifest nobody reads a half-updated dataset.
        old_manifest.unlink(missing_ok=True)
    for path in stray:  # shards of a larger earlier pack of these splits
        path.unlink()

    total = sum(item["spec"]["count"] for _, item in todo)
    bar = tqdm(total=total, unit="sample", desc=f"packing {root}", disable=not progress or total == 0)
    journal = {"shards": list(done.values())}

    def finished(entry):
        done[entry["file"]] = entry
        journal["shards"].append(entry)
        write_json_atomic(root / JOURNAL, journal)

    if workers > 1 and len(todo) > 1:
        from amodal.data.sampler import worker_context  # clean processes, as for loader workers

        jobs = [(root, sources[split], item, options) for split, item in todo]
        with worker_context().Pool(min(workers, len(jobs))) as pool:
            for (_, item), entry in zip(todo, pool.imap(_pack_job, jobs)):
                finished(entry)
                bar.update(item["spec"]["count"])
            # Let the workers leave on their own: they ignore SIGTERM (worker_context), and the with
            # block's terminate() holds the task queue's lock, so an idle worker could wait forever
            # for the sentinel that ends it (seen: 3 hangs in 17 runs of test_ensure_synthetic_packs_once).
            pool.close()
            pool.join()
    else:
        for split, item in todo:
            finished(_pack_one(root, sources[split], item, options, on_sample=lambda: bar.update(1)))
    bar.close()

    manifest = {
        "format": FORMAT_NAME,
        "format_version": options.format_version,
        "description": description,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "layout": manifest_layout(options),
        "splits": {
            split: {"count": len(src), "has_labels": src.has_labels, "has_front": src.has_front,
                    "source": src.name, "shards": [done[item["file"]] for item in plans[split]]}
            for split, src in sources.items()
        },
    }
    manifest["fingerprint"] = fingerprint_of(manifest)
    if old_manifest.exists():
        # nothing was rewritten; keep the file (and its creation time) when it says the same
        with contextlib.suppress(ShardError):
            old = read_manifest(root)
            if old["fingerprint"] == manifest["fingerprint"]:
                (root / JOURNAL).unlink(missing_ok=True)
                return old
    write_json_atomic(old_manifest, manifest)
    (root / JOURNAL).unlink(missing_ok=True)
    return manifest


# ---------------------------------------------------------------------------------------------------
# Packing one kind of source


def pack_synthetic(root, train: int, val: int, test: int, seed: int = 0, **kw) -> dict:
    """Synthetic train/val/test splits (keyword arguments go to pack())."""
    sources = {split: SyntheticSource(split, n, seed) for split, n in
               (("train", train), ("val", val), ("test", test))}
    return pack(root, sources, description=f"synthetic amodal hands, seed {seed}", **kw)


def pack_course(root, out, splits=("train", "val", "test"), **kw) -> dict:
    sources = {s: CourseSource(root, s) for s in splits}
    try:
        return pack(out, sources, description=f"course data from {Path(root).resolve()}", **kw)
    finally:
        close_environments()


def pack_folder(root, out, splits=None, **kw) -> dict:
    if splits is None:
        splits = folder_splits(root)
    sources = {s: FolderSource(root, s) for s in splits}
    return pack(out, sources, description=f"folder {Path(root).resolve()}", **kw)


def ensure_synthetic(data_cfg) -> None:
    """Pack the synthetic dataset into data_cfg.root unless it already holds a manifest."""
    root = Path(data_cfg.root)
    if (root / MANIFEST).exists():
        return
    if not data_cfg.make_synthetic:
        raise ShardError(f"{root / MANIFEST}: no manifest, and data.make_synthetic is off")
    pack_synthetic(root, data_cfg.synthetic_train, data_cfg.synthetic_val, data_cfg.synthetic_test,
                   seed=data_cfg.synthetic_seed, workers=min(4, os.cpu_count() or 1))


# ---------------------------------------------------------------------------------------------------
# The command line

PACK_USAGE = """Pack a dataset into HDF5 shards (amodal/data/FORMAT.md).

  amodal-pack synthetic --out DIR --train N --val N --test N --seed S
  amodal-pack course --root LMDB_DIR --out DIR     (the course's data/InterHand2.6M/)
  amodal-pack folder --root DIR --out DIR          (images/, labels/, boxes.json)

Shards are written in format version 2 (JPEG q95 crops, zlib maps: ~33 KiB per InterHand-sized
sample); --image-codec raw reads faster at ~7x the bytes, --format-version 1 writes what older amodal
reads (FORMAT.md: the measurements). Re-running the same command keeps the shards that are already
complete and intact (an interrupted pack resumes); the manifest is written last.
"""


def main(argv=None) -> int:
    """The pack command line (PACK_USAGE)."""
    ap = argparse.ArgumentParser(prog="amodal-pack", description=PACK_USAGE,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="source", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="shard folder to write (manifest.json + *.h5)")
    common.add_argument("--shard-size", type=int, default=SHARD_SIZE, help="samples per shard")
    common.add_argument("--crop-size", type=int, default=CROP_SIZE, help="side of the stored crop")
    common.add_argument("--context", type=float, default=CONTEXT, help="crop side / longer box side")
    common.add_argument("--format-version", type=int, choices=READABLE_VERSIONS, default=FORMAT_VERSION,
                        help="1: raw arrays (what older amodal reads); 2: encoded crops (default)")
    common.add_argument("--image-codec", choices=IMAGE_CODECS, default="jpeg",
                        help="version 2: how crops are stored (FORMAT.md: the measurements)")
    common.add_argument("--jpeg-quality", type=int, default=95)
    common.add_argument("--map-codec", choices=MAP_CODECS, default="zlib",
                        help="label and front maps: zlib (lossless) or raw")
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
              "options": PackOptions(crop_size=args.crop_size, context=args.context,
                                     format_version=args.format_version,
                                     image_codec="raw" if args.format_version == 1 else args.image_codec,
                                     jpeg_quality=args.jpeg_quality, map_codec=args.map_codec)}
        if args.source == "synthetic":
            manifest = pack_synthetic(args.out, args.train, args.val, args.test, seed=args.seed, **kw)
        else:
            pack_source = pack_course if args.source == "course" else pack_folder
            manifest = pack_source(args.root, args.out, splits=args.splits, **kw)
    except (ShardError, ValueError) as e:
        print(f"pack_shards: error: {e}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{k} {v['count']}" for k, v in manifest["splits"].items())
    print(f"{args.out}: {counts}; fingerprint {manifest['fingerprint']}")
    return 0
