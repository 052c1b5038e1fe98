#!/usr/bin/env python3
"""Bytes per sample and samples per second of one loader worker: each shard layout vs the course's
path, on the same frames.

Builds, in a temporary folder, InterHand-sized frames (512×334, a synthetic hand pasted into each) in
the course's LMDB layout, packs them with the course importer into shards of each layout (FORMAT.md:
version 1 raw arrays; version 2 with JPEG, PNG or raw crops), then times in one process (OpenCV and
torch single-threaded) what one DataLoader worker does per sample, collating batches:

  course path: LMDB get, decode the full-frame JPEG and the two 3-channel label PNGs, warp + augment
  shard path:  read the context crop and its label maps from HDF5 (decoding them: version 2), warp + augment

Both use the same augmentation code (amodal.data.augment, training mode, default factors), so the
difference is reading and decoding. With the default layout, one more row: the worker's share of
augment.on = "device" (read, decode, canvas; amodal.data.device_augment), whose batches are then warped
on the training device; the cost per sample of that batched warp on this CPU (1 thread) is printed
below the table, with both paths' worker samples per CPU-second as multiples of the course's. The course path and every layout are timed in turns, in each
round, so that a shared machine's load falls on all of them. "image error" is the mean absolute
difference of the training images (epoch 0) from the shards and from the course's frames.
Example: python tools/bench_data.py --samples 512

Two more measurements behind the format's defaults (FORMAT.md):
  --what storage   size and decode time of one crop or map per codec (JPEG qualities, PNG, zlib levels)
  --what crops     agreement of training warps from stored crops of several sides with the same
                   warps from the full frames
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import default_collate

from amodal.config import AugmentConfig
from amodal.data import augment
from amodal.data.device_augment import augment_batch
from amodal.data.format import CROP_SIZE, PackOptions, RawSample
from amodal.data.pack import pack_course
from amodal.data.sources import (IMAGES_LMDB, LABELS_LMDB, CourseSource, synthetic_in_frame,
                                 write_course_layout)

FRAME_W, FRAME_H = 512, 334  # InterHand2.6M's frame size in the course data

# Every layout tried (FORMAT.md, "Measurements"); the first of version 2 is the default.
LAYOUTS = {
    "v1-raw": PackOptions(format_version=1, image_codec="raw", map_codec="raw"),
    "v2-jpeg95": PackOptions(),
    "v2-jpeg90": PackOptions(jpeg_quality=90),
    "v2-png": PackOptions(image_codec="png"),
    "v2-raw": PackOptions(image_codec="raw"),
    "v2-raw-maps": PackOptions(image_codec="raw", map_codec="raw"),
}


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


def training_samples(dataset, items, input_size: int) -> list[dict]:
    """Samples as training sees them: augment.on = "device" batches warped here, on the CPU."""
    if not dataset.on_device:
        return [dataset[x] for x in items]
    b = augment_batch(default_collate([dataset[x] for x in items]), torch.device("cpu"), input_size)
    return [{"image": b["image"][k], "target": b["target"][k]} for k in range(len(items))]


def batched_warp_us(dataset, order, batch: int, input_size: int, rounds: int) -> float:
    """Best CPU microseconds per sample of augment_batch on this CPU, batches of `batch`."""
    batches = [default_collate([dataset[(0, int(i))] for i in order[s:s + batch]])
               for s in range(0, len(order) - batch + 1, batch)]
    cpu = torch.device("cpu")
    return cpu_per_item(lambda b: augment_batch(b, cpu, input_size), batches, rounds) / batch


def cpu_per_item(fn, items, rounds: int = 3) -> float:
    """Best CPU microseconds per item of fn over items."""
    best = float("inf")
    for _ in range(rounds):
        c = time.process_time()
        for x in items:
            fn(x)
        best = min(best, time.process_time() - c)
    return best / len(items) * 1e6


def read_bytes(blobs: list[np.ndarray], tmp: Path) -> None:
    """CPU us to read one sample's bytes: a slice of one contiguous byte dataset (format version 2)
    against one element of an HDF5 variable-length dataset."""
    import h5py

    path = tmp / "bytes.h5"
    offsets = np.cumsum([0] + [b.size for b in blobs])
    with h5py.File(path, "w", libver="latest") as f:
        f.create_dataset("flat", data=np.concatenate(blobs))
        vlen = f.create_dataset("vlen", (len(blobs),), dtype=h5py.vlen_dtype(np.uint8))
        for i, b in enumerate(blobs):
            vlen[i] = b
    with h5py.File(path, "r") as f:
        flat, vlen = f["flat"], f["vlen"]
        a = cpu_per_item(lambda i: flat[offsets[i]:offsets[i + 1]], range(len(blobs)))
        b = cpu_per_item(lambda i: vlen[i], range(len(blobs)))
    print(f"reading one JPEG crop's bytes: {a:.0f} us as a slice of a contiguous byte dataset, "
          f"{b:.0f} us as an element of a variable-length dataset")


def bench_storage(n: int, crop_size: int, tmp: Path) -> None:
    from amodal.data import codec
    from amodal.data.pack import make_record

    recs = [make_record(f, crop_size, tight=True) for f in interhand_like_frames(n)]
    sides = [r["side"] for r in recs]
    print(f"one tight crop (version 2) of {n} InterHand-like frames, sides {min(sides)}..{max(sides)} px; "
          "CPU us per decode, best of 3")
    images = [r["image"] for r in recs]
    areas = np.mean([im.shape[0] ** 2 for im in images]) / crop_size ** 2
    print(f"tight crops hold {areas * 100:.0f}% of the pixels of {crop_size}² crops")
    read_bytes([np.frombuffer(codec.encode_image(im, "jpeg", 95), np.uint8) for im in images], tmp)
    print("| array | codec | KiB | decode us | mean abs error /255 |")
    print("| --- | --- | --- | --- | --- |")
    images = [r["image"] for r in recs]
    rows = [("raw", "raw", 95, cv2.IMREAD_COLOR), ("png", "png", 95, cv2.IMREAD_COLOR)]
    rows += [(f"jpeg q{q}", "jpeg", q, cv2.IMREAD_COLOR) for q in (85, 90, 95, 98)]
    rows += [("jpeg q95, decoded at half size (IMREAD_REDUCED_COLOR_2)", "jpeg", 95, cv2.IMREAD_REDUCED_COLOR_2)]
    for label, name, q, flag in rows:
        enc = [np.frombuffer(codec.encode_image(im, name, q), np.uint8) for im in images]
        if flag == cv2.IMREAD_COLOR:
            t = cpu_per_item(lambda ie: codec.decode_image(ie[1], name, ie[0].shape[0]), list(zip(images, enc)))
            err = np.mean([np.abs(codec.decode_image(e, name, im.shape[0]).astype(int) - im).mean()
                           for e, im in zip(enc, images)])
        else:
            t, err = cpu_per_item(lambda e: cv2.imdecode(e, flag), enc), float("nan")
        print(f"| image | {label} | {np.mean([e.nbytes for e in enc]) / 1024:.1f} | {t:.0f} | {err:.2f} |")
    plain = [cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, 95])[1] for im in images]
    t = cpu_per_item(lambda e: cv2.imdecode(e, cv2.IMREAD_COLOR), plain)
    print(f"| image | jpeg q95 without optimized Huffman tables | {np.mean([e.nbytes for e in plain]) / 1024:.1f} "
          f"| {t:.0f} | as q95 |")
    for name, level in (("raw", 0), ("zlib", 1), ("zlib", 6)):
        maps = [r["labels"] for r in recs]
        enc = [np.frombuffer(zlib.compress(m.tobytes(), level) if name == "zlib" else m.tobytes(), np.uint8)
               for m in maps]
        t = cpu_per_item(lambda me: codec.decode_map(me[1], name, me[0].shape), list(zip(maps, enc)))
        label = f"zlib level {level}" if name == "zlib" else "raw"
        print(f"| labels (2 maps) | {label} | {np.mean([e.nbytes for e in enc]) / 1024:.1f} | {t:.0f} | 0 |")


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
    ap.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS),
                    help="shard layouts to pack and time (default: all)")
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
        size_course = sum(p.stat().st_size for p in (tmp / "course").rglob("*") if p.is_file()) / args.samples
        sizes, sets = {}, {}
        for name in args.layouts:
            options = dataclasses.replace(LAYOUTS[name], crop_size=args.crop_size)
            pack_course(tmp / "course", tmp / name, splits=("train",), progress=False, options=options)
            sizes[name] = sum(p.stat().st_size for p in (tmp / name).glob("*.h5")) / args.samples
            sets[name] = ShardDataset(tmp / name, "train", args.input_size, augment=AugmentConfig())
        device_row = "v2-jpeg95, augment.on=device"
        if "v2-jpeg95" in sets:
            sizes[device_row] = sizes["v2-jpeg95"]
            sets[device_row] = ShardDataset(tmp / "v2-jpeg95", "train", args.input_size, augment=AugmentConfig(),
                                            on_device=True)
        print(f"built {args.samples} frames of {FRAME_W}x{FRAME_H} (course layout) and their shards in "
              f"{len(args.layouts)} layouts in {time.perf_counter() - t:.1f}s")

        cfg = AugmentConfig()
        course = CoursePath(tmp / "course", cfg, args.input_size)
        order = np.random.default_rng(0).permutation(args.samples)
        errors = {}
        check = order[: min(64, args.samples)]
        for name, ds in sets.items():  # against the frames, with each sample's epoch-0 augmentation
            a = [course[(0, int(i))] for i in check]
            b = training_samples(ds, [(0, int(i)) for i in check], args.input_size)
            errors[name] = (np.mean([(x["image"] - y["image"]).abs().mean().item() for x, y in zip(a, b)]) * 255,
                            np.mean([(x["target"] == y["target"]).float().mean().item() for x, y in zip(a, b)]))
        rate(course, order[: 2 * args.batch], args.batch)  # warm all (page cache, lazy opens)
        for ds in sets.values():
            rate(ds, order[: 2 * args.batch], args.batch)
        rates = {name: [] for name in ["course", *sets]}
        for _ in range(args.rounds):  # in turns, so that all see the same machine load
            rates["course"].append(rate(course, order, args.batch))
            for name, ds in sets.items():
                rates[name].append(rate(ds, order, args.batch))
        best = {name: tuple(max(r[i] for r in rs) for i in (0, 1)) for name, rs in rates.items()}
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"one worker process (1 thread), training augmentation, {args.input_size}x{args.input_size} input, "
              f"128x128 targets, batches of {args.batch}; best of {args.rounds} passes; "
              f"{os.cpu_count()} CPUs, load average {load:.1f}")
        print("| path | KiB / sample | x course bytes | samples/s wall | per CPU-s | x course wall / CPU "
              "| image error /255 | label pixels equal |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        wc, cc = best["course"]
        print(f"| course (LMDB, full-frame JPEG + 2 PNG) | {size_course / 1024:.1f} | 1.00 | {wc:.0f} | {cc:.0f} "
              f"| 1.00 / 1.00 | 0 | 100% |")
        for name in sets:
            w, c = best[name]
            err, eq = errors[name]
            print(f"| shards {name} | {sizes[name] / 1024:.1f} | {sizes[name] / size_course:.2f} | {w:.0f} | {c:.0f} "
                  f"| {w / wc:.2f} / {c / cc:.2f} | {err:.2f} | {eq * 100:.2f}% |")
        if device_row in sets:
            warp = batched_warp_us(sets[device_row], order, args.batch, args.input_size, args.rounds)
            c_dev, c_worker = best[device_row][1], best["v2-jpeg95"][1]
            print(f"batched warp of augment.on=device on this CPU (augment_batch, 1 thread, batches of "
                  f"{args.batch}): {warp:.0f} us per sample")
            print(f"worker samples per CPU-second as multiples of the course's: augment.on=device "
                  f"{c_dev / cc:.1f}x, augment.on=worker {c_worker / cc:.1f}x (v2-jpeg95, "
                  f"{sizes['v2-jpeg95'] / size_course:.2f}x the course's bytes per sample); with the batched "
                  f"warp counted: {1e6 / (1e6 / c_dev + warp) / cc:.1f}x")
        for ds in sets.values():
            ds.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
