#!/usr/bin/env python3
"""Samples per second of one loader worker: shards vs the course's path, on the same frames.

Builds, in a temporary folder, InterHand-sized frames (512×334, a synthetic hand pasted into each) in
the course's LMDB layout, packs them into shards with the course importer, then times in one process
(OpenCV and torch single-threaded) what one DataLoader worker does per sample, collating batches:

  course path: LMDB get, decode the full-frame JPEG and the two 3-channel label PNGs, warp + augment
  shard path:  read the context crop and its label maps from HDF5, warp + augment

Both use the same augmentation code (amodal.data.augment, training mode, default factors), so the
difference is reading and decoding. Example: python tools/bench_data.py --samples 512

Two more measurements behind the format's defaults (FORMAT.md):
  --what storage   size and read time of one sample per storage choice (raw, lzf, gzip, JPEG, PNG)
  --what crops     agreement of training warps from stored crops of several sides with the same
                   warps from the full frames
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import default_collate

from amodal.config import AugmentConfig
from amodal.data import augment
from amodal.data.format import COMPRESSIONS, CROP_SIZE, PackOptions, RawSample
from amodal.data.pack import _filters, pack_course
from amodal.data.sources import (IMAGES_LMDB, LABELS_LMDB, CourseSource, synthetic_in_frame,
                                 write_course_layout)

FRAME_W, FRAME_H = 512, 334  # InterHand2.6M's frame size in the course data


def interhand_like_frames(n: int, seed: int = 0) -> list[RawSample]:
    """Synthetic hands (256² scenes) pasted at random places into 512×334 frames."""
    rng = np.random.default_rng([seed, 12345])
    return [synthetic_in_frame(seed, i, 256, (FRAME_W, FRAME_H), rng,
                                      f"train/Capture{i % 4}/0000_bench/cam{400000 + i % 7}/image{i:05d}")
            for i in range(n)]


class CoursePath:
    """What the course's dataset did per sample: full-frame decodes from LMDB, then one warp."""

    def __init__(self, root: Path, cfg: AugmentConfig, input_size: int, seed: int = 0):
        import lmdb

        self.src = CourseSource(root, "train")  # its parsed datalist and path2id
        self.img_txn = lmdb.open(str(root / IMAGES_LMDB), readonly=True, lock=False).begin()
        self.seg_txn = lmdb.open(str(root / LABELS_LMDB), readonly=True, lock=False).begin()
        self.cfg, self.input_size, self.seed = cfg, input_size, seed

    def _label(self, key: str) -> np.ndarray:
        png = np.frombuffer(self.seg_txn.get(key.encode()), np.uint8)
        return np.ascontiguousarray(cv2.imdecode(png, cv2.IMREAD_UNCHANGED)[:, :, 0])

    def __getitem__(self, item):
        epoch, i = item
        key, lmdb_key, bbox, _, label_id = self.src.entries[i]
        image = cv2.imdecode(np.frombuffer(self.img_txn.get(lmdb_key.encode()), np.uint8), cv2.IMREAD_COLOR)
        # the course's label reading, without the importer's checks: decode, channel 0, left - 16
        left = self._label(f"{label_id}__l")
        left[left > 0] -= 16
        right = self._label(f"{label_id}__r")
        r = augment.augment(image, bbox, self.cfg, self.seed, epoch, i, self.input_size, np.stack([left, right]))
        return {"image": torch.from_numpy(r["image"]), "target": torch.from_numpy(r["labels"].astype(np.int64)),
                "index": i, "key": key}


def rate(dataset, order, batch: int) -> tuple[float, float]:
    """(samples per wall-clock second, samples per CPU second of this process): get each sample,
    collate every `batch` of them. On a shared machine the CPU-time rate is what one dedicated core
    would give; the wall-clock rate also counts the time other processes held the core."""
    t, c = time.perf_counter(), time.process_time()
    for start in range(0, len(order), batch):
        default_collate([dataset[(0, int(i))] for i in order[start:start + batch]])
    return len(order) / (time.perf_counter() - t), len(order) / (time.process_time() - c)


def cpu_per_item(fn, items, rounds: int = 3) -> float:
    """Best CPU microseconds per item of fn over items."""
    best = float("inf")
    for _ in range(rounds):
        c = time.process_time()
        for x in items:
            fn(x)
        best = min(best, time.process_time() - c)
    return best / len(items) * 1e6


def bench_storage(n: int, crop_size: int, tmp: Path) -> None:
    import h5py

    from amodal.data.pack import make_record
    from amodal.data.read import ChunkReader
    from amodal.data.sources import SyntheticSource

    src = SyntheticSource("train", n, seed=0)
    recs = [make_record(src.get(i), crop_size) for i in range(n)]
    arrays = {name: np.stack([r[name] for r in recs]) for name in ("image", "labels", "front")}
    print(f"one sample of a {crop_size}² crop ({n} synthetic samples; CPU us per read, best of 3)")
    print("| storage | KiB / sample | read us (ChunkReader) | read us (h5py ds[i]) |")
    print("| --- | --- | --- | --- |")
    for name, filt in [("image", "none"), ("image", "lzf"), ("image", "gzip"), ("labels", "none"),
                       ("labels", "gzip"), ("labels", "lzf"), ("front", "none"), ("front", "gzip")]:
        data = arrays[name]
        path = tmp / f"{name}-{filt}.h5"
        kw = _filters(filt)
        with h5py.File(path, "w", libver="latest") as f:
            f.create_dataset("x", data=data, chunks=(1, *data.shape[1:]), **kw)
        with h5py.File(path, "r") as f:
            reader, ds = ChunkReader(f["x"]), f["x"]
            fast = cpu_per_item(lambda i: reader[i], range(n))
            slow = cpu_per_item(lambda i: ds[i], range(n))
        label = filt if filt != "gzip" else "gzip-1"
        print(f"| {name} {label} | {path.stat().st_size / n / 1024:.1f} | {fast:.0f} | {slow:.0f} |")
    for name, ext, params in [("JPEG q95", ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95]),
                              ("PNG", ".png", [cv2.IMWRITE_PNG_COMPRESSION, 1])]:
        enc = [cv2.imencode(ext, im, params)[1] for im in arrays["image"]]
        t = cpu_per_item(lambda e: cv2.imdecode(e, cv2.IMREAD_COLOR), enc)
        err = np.mean([np.abs(cv2.imdecode(e, cv2.IMREAD_COLOR).astype(int) - im).mean()
                       for e, im in zip(enc, arrays["image"])])
        size = np.mean([e.nbytes for e in enc]) / 1024
        print(f"| image {name} (decode only; mean abs error {err:.2f}/255) | {size:.1f} | {t:.0f} | - |")


def bench_crops(n: int) -> None:
    from amodal.data.pack import make_record
    from amodal.data.sources import SyntheticSource

    cfg = AugmentConfig()
    sets = {"InterHand-like 512x334": interhand_like_frames(n, seed=3),
            "synthetic 256x256": [SyntheticSource("train", n, 5).get(i) for i in range(n)]}
    for name, frames in sets.items():
        sides = np.array([max(f.bbox[2], f.bbox[3]) for f in frames])
        print(f"{name}: {n} frames, longer box side {sides.min():.0f}..{sides.max():.0f} px; "
              "training warps (3 per frame) from the crop vs from the frame")
        for size in (192, 256, 320, 384):
            equal, fg_equal, err = [], [], []
            for i, f in enumerate(frames):
                rec = make_record(f, size)
                for epoch in range(3):
                    p = augment.params_for(cfg, 0, epoch, i)
                    a = augment.apply(rec["image"], rec["bbox"], p, 128, rec["labels"])
                    b = augment.apply(f.image, f.bbox, p, 128, f.labels)
                    fg = (a["labels"] > 0) | (b["labels"] > 0)
                    equal.append(np.mean(a["labels"] == b["labels"]))
                    fg_equal.append(np.mean(a["labels"][fg] == b["labels"][fg]))
                    err.append(np.abs(a["image"] - b["image"]).mean() * 255)
            print(f"  crop {size}: label pixels equal {np.mean(equal) * 100:.2f}%, foreground "
                  f"{np.mean(fg_equal) * 100:.1f}%, image mean abs diff {np.mean(err):.2f}/255")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", choices=("loader", "storage", "crops"), default="loader")
    ap.add_argument("--samples", type=int, default=512, help="frames to build and time (default 512)")
    ap.add_argument("--batch", type=int, default=32, help="collate batch size (default 32)")
    ap.add_argument("--input-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="timed passes; the best is reported")
    ap.add_argument("--workdir", default=None, help="build here instead of a temporary folder")
    ap.add_argument("--crop-size", type=int, default=CROP_SIZE, help="stored crop side of the shards")
    ap.add_argument("--image-compression", choices=COMPRESSIONS, default="none")
    ap.add_argument("--map-compression", choices=COMPRESSIONS, default="none")
    args = ap.parse_args(argv)

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    from amodal.data.dataset import ShardDataset

    if args.what == "crops":
        bench_crops(min(args.samples, 60))
        return 0
    if args.what == "storage":
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            bench_storage(min(args.samples, 200), args.crop_size, Path(tmp))
        return 0

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        frames = interhand_like_frames(args.samples)
        write_course_layout(tmp / "course", {"train": frames})
        del frames
        options = PackOptions(crop_size=args.crop_size, image_compression=args.image_compression,
                              map_compression=args.map_compression)
        pack_course(tmp / "course", tmp / "shards", splits=("train",), progress=False, options=options)
        print(f"built {args.samples} frames of {FRAME_W}x{FRAME_H} (course layout) and their shards "
              f"({options}) in {time.perf_counter() - t:.1f}s")
        size_course = sum(p.stat().st_size for p in (tmp / "course").rglob("*") if p.is_file())
        size_shards = sum(p.stat().st_size for p in (tmp / "shards").glob("*.h5"))
        print(f"on disk: course layout {size_course / args.samples / 1024:.1f} KiB/sample, "
              f"shards {size_shards / args.samples / 1024:.1f} KiB/sample")

        cfg = AugmentConfig()
        course = CoursePath(tmp / "course", cfg, args.input_size)
        shard_ds = ShardDataset(tmp / "shards", "train", args.input_size, augment=cfg)
        order = np.random.default_rng(0).permutation(args.samples)
        rate(course, order[: 2 * args.batch], args.batch)  # warm both (page cache, lazy opens)
        rate(shard_ds, order[: 2 * args.batch], args.batch)
        course_r, shard_r = [], []
        for _ in range(args.rounds):  # interleaved, so both see the same machine load
            course_r.append(rate(course, order, args.batch))
            shard_r.append(rate(shard_ds, order, args.batch))
        wall_c, cpu_c = (max(r[i] for r in course_r) for i in (0, 1))
        wall_s, cpu_s = (max(r[i] for r in shard_r) for i in (0, 1))
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"one worker process (1 thread), training augmentation, {args.input_size}x{args.input_size} input, "
              f"128x128 targets, batches of {args.batch}; best of {args.rounds} passes; "
              f"{os.cpu_count()} CPUs, load average {load:.1f}")
        print("                                                          wall-clock    per CPU-second")
        print(f"  course path (LMDB + full-frame JPEG/PNG decode + warp): {wall_c:8.0f}/s    {cpu_c:8.0f}/s")
        print(f"  shard path  (HDF5 context crop + warp):                 {wall_s:8.0f}/s    {cpu_s:8.0f}/s")
        print(f"  ratio shard / course:                                   {wall_s / wall_c:8.2f}x    "
              f"{cpu_s / cpu_c:8.2f}x")
        shard_ds.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
