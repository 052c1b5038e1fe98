"""HDF5 shards: the one on-disk form of every dataset the loader reads (format: FORMAT.md beside this).

A dataset is a folder holding `manifest.json` and `<split>-<NNNNN>.h5` files. Each sample is stored once
as a square context crop of side crop_size around its hand box (at least CONTEXT × the longer box side;
an unscaled window of the frame where that fits), its two label maps and front map cropped the same
way, the exact 128×128 evaluation targets, the box in crop pixels and its key.

Writing is crash-safe: every file is written under a temporary name, fsynced and renamed; a journal
records each finished shard's hash so that an interrupted pack resumes where it stopped; the manifest
is written last, so a folder with a manifest is complete. `verify_shards` re-hashes everything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

import cv2
import h5py
import numpy as np

from amodal.data import augment
from amodal.fileio import commit
from amodal.labels import HANDS, NUM_CLASSES, NUM_PARTS, TARGET_SIZE

FORMAT_NAME = "amodal-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
JOURNAL = "pack-journal.json"  # progress of an unfinished pack; removed once the manifest is written
CROP_SIZE = 320  # side of the stored context crop: S / CONTEXT >= 128 (FORMAT.md: why)
CONTEXT = 2.2  # crop side / longer box side: covers the default augmentation range (FORMAT.md)
SHARD_SIZE = 1024  # samples per shard
COMPRESSIONS = ("none", "gzip", "lzf")  # HDF5 filters a pack may use; gzip at level 1
_TMP_SUFFIX = ".tmp"


class ShardError(Exception):
    """A shard folder, file or sample that is missing, damaged or does not match its manifest."""


class SourceError(ShardError):
    """Bad input in a dataset being packed; the message names the source file and the sample key."""


@dataclass(frozen=True)
class PackOptions:
    """How samples are stored. The defaults were chosen by measurement (FORMAT.md)."""

    crop_size: int = CROP_SIZE
    context: float = CONTEXT
    image_compression: str = "none"  # lzf/gzip save <= 44% and read 15-25x slower (measured)
    map_compression: str = "none"  # gzip shrinks maps ~80x; costs 10-25% of loader throughput (measured)

    def __post_init__(self):
        for name in ("image_compression", "map_compression"):
            if getattr(self, name) not in COMPRESSIONS:
                raise ValueError(f"{name} {getattr(self, name)!r}: expected one of {COMPRESSIONS}")
        if self.crop_size < 32:
            raise ValueError(f"crop_size {self.crop_size} is too small")
        if not 1.0 <= self.context <= 8.0:
            raise ValueError(f"context {self.context} is not in [1, 8]")


# ---------------------------------------------------------------------------------------------------
# Samples and crops


@dataclass
class RawSample:
    """One sample as a source yields it: a full frame and the hand box in frame pixels."""

    key: str
    image: np.ndarray  # (H, W, 3) uint8 BGR
    bbox: np.ndarray  # float32 [x, y, w, h]
    labels: np.ndarray | None = None  # (2, H, W) uint8 [left, right], 0..16
    front: np.ndarray | None = None  # (H, W) uint8, 0 none / 1 left / 2 right
    hand_type: str = ""


class Source(Protocol):
    """What the packer reads: random access, so that a resumed pack can skip finished shards."""

    name: str  # identifies the content (seed, files): a shard made from another source is rewritten
    has_labels: bool
    has_front: bool

    def __len__(self) -> int: ...

    def get(self, i: int) -> RawSample: ...


def crop_geometry(bbox, crop_size: int = CROP_SIZE, context: float = CONTEXT):
    """(2x3 frame -> crop matrix, box in crop pixels). The crop is a square centred on the box centre
    holding at least `context` × the longer box side. It only scales and shifts, so the box stays
    axis-aligned. Where that fits at the frame's own resolution (box side <= crop_size / context), the
    crop is an unscaled, integer-aligned window of the frame: stored pixels and labels are then exact
    copies, and any later warp of the crop equals the same warp of the frame."""
    x, y, w, h = (float(v) for v in bbox)
    k = min(1.0, crop_size / (context * max(w, h)))
    tx, ty = crop_size / 2 - k * (x + w / 2), crop_size / 2 - k * (y + h / 2)
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


def make_record(sample: RawSample, crop_size: int = CROP_SIZE, context: float = CONTEXT) -> dict:
    """The stored form of one sample (see FORMAT.md)."""
    m, box = crop_geometry(sample.bbox, crop_size, context)
    rec = {"key": sample.key, "hand_type": sample.hand_type, "bbox": box,
           "frame_bbox": np.asarray(sample.bbox, np.float32),
           "image": _area_warp(sample.image, m, crop_size)}
    eval_m = augment.box_affine(sample.bbox, TARGET_SIZE)
    if sample.labels is not None:
        rec["labels"] = augment.warp_labels(sample.labels, m, crop_size, flip=False)
        rec["eval_labels"] = augment.warp_labels(sample.labels, eval_m, TARGET_SIZE, flip=False)
    if sample.front is not None:
        rec["front"] = augment.warp_map(sample.front, m, crop_size)
        rec["eval_front"] = augment.warp_map(sample.front, eval_m, TARGET_SIZE)
    return rec


# ---------------------------------------------------------------------------------------------------
# Layout: which datasets a shard holds, their shapes and filters


def layout(crop_size: int, has_labels: bool, has_front: bool) -> dict:
    """Per-sample shapes of a shard's datasets (the leading sample axis left out)."""
    s, t = crop_size, TARGET_SIZE
    out = {"image": [s, s, 3], "bbox": [4], "frame_bbox": [4]}
    if has_labels:
        out["labels"] = [2, s, s]
        out["eval_labels"] = [2, t, t]
    if has_front:
        out["front"] = [s, s]
        out["eval_front"] = [t, t]
    return out


def _filters(compression: str) -> dict:
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 1}
    if compression == "lzf":
        return {"compression": "lzf"}
    return {}


def manifest_layout(opt: PackOptions) -> dict:
    """The part of the manifest (and fingerprint) that says how samples are laid out."""
    return {
        "crop_size": opt.crop_size,
        "context": opt.context,
        "target_size": TARGET_SIZE,
        "image": {"dtype": "uint8", "order": "BGR", "axes": "HWC", "compression": opt.image_compression},
        "labels": {"dtype": "uint8", "channels": list(HANDS), "classes": NUM_CLASSES, "background": 0,
                   "compression": opt.map_compression, "eval_compression": "gzip"},
        "front": {"dtype": "uint8", "values": {"0": "none", "1": "left in front", "2": "right in front"}},
        "bbox": "x, y, w, h of the hand box in crop pixels (OpenCV pixel centres)",
    }


# ---------------------------------------------------------------------------------------------------
# Files: atomic writes and hashes


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    commit(tmp, path)


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:05d}.h5"


def _spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def write_shard(path: Path, records: Iterable[dict], count: int, spec: dict, opt: PackOptions,
                has_labels: bool, has_front: bool, on_sample: Callable[[], None] | None = None) -> dict:
    """Write `count` records to `path` atomically; returns the manifest entry {file, count, sha256, bytes}."""
    path = Path(path)
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    shapes = layout(opt.crop_size, has_labels, has_front)
    str_type = h5py.string_dtype("utf-8")
    with h5py.File(tmp, "w", libver="latest") as f:
        ds = {}
        for name, shape in shapes.items():
            dtype = np.float32 if name.endswith("bbox") else np.uint8
            kw = {}  # bbox arrays: small, contiguous, read whole when a shard opens
            if name == "image":
                kw = {"chunks": (1, *shape), **_filters(opt.image_compression)}
            elif name in ("labels", "front"):
                kw = {"chunks": (1, *shape), **_filters(opt.map_compression)}
            elif name.startswith("eval_"):  # read once per evaluation sample: small, compress well
                kw = {"chunks": (1, *shape), **_filters("gzip")}
            ds[name] = f.create_dataset(name, (count, *shape), dtype=dtype, **kw)
        keys, hand_types = [], []
        n = 0
        for rec in records:
            if n >= count:
                raise ShardError(f"{path}: more than {count} records")
            for name in shapes:
                ds[name][n] = rec[name]
            keys.append(rec["key"])
            hand_types.append(rec["hand_type"])
            n += 1
            if on_sample is not None:
                on_sample()
        if n != count:
            raise ShardError(f"{path}: got {n} records, expected {count}")
        f.create_dataset("key", data=np.array(keys, dtype=object), dtype=str_type)
        f.create_dataset("hand_type", data=np.array(hand_types, dtype=object), dtype=str_type)
        f.attrs["format"] = FORMAT_NAME
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["spec"] = json.dumps(spec, sort_keys=True)
    digest = sha256_file(tmp)
    size = tmp.stat().st_size
    commit(tmp, path)
    return {"file": path.name, "first": spec["first"], "count": count, "sha256": digest, "bytes": size,
            "spec": _spec_hash(spec)}


# ---------------------------------------------------------------------------------------------------
# Manifest


def fingerprint_of(manifest: dict) -> str:
    """Hash over the layout and every shard's hash: what a checkpoint remembers of its data."""
    core = {
        "format": FORMAT_NAME,
        "format_version": manifest["format_version"],
        "layout": manifest["layout"],
        "splits": {
            name: {"count": s["count"], "has_labels": s["has_labels"], "has_front": s["has_front"],
                   "shards": [e["sha256"] for e in s["shards"]]}
            for name, s in sorted(manifest["splits"].items())
        },
    }
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


def read_manifest(root) -> dict:
    """The manifest of a shard folder, checked for the fields the loader relies on."""
    path = Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"{path}: no manifest (pack the data first: tools/pack_shards.py)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: unreadable manifest: {e}") from None
    try:
        if manifest["format"] != FORMAT_NAME:
            raise ShardError(f"{path}: format {manifest['format']!r} is not {FORMAT_NAME!r}")
        if manifest["format_version"] != FORMAT_VERSION:
            raise ShardError(f"{path}: format version {manifest['format_version']} is not {FORMAT_VERSION}")
        manifest["layout"]["crop_size"], manifest["fingerprint"]
        for name, s in manifest["splits"].items():
            total = 0
            for e in s["shards"]:
                e["file"], e["sha256"], e["bytes"], e["first"]
                if e["first"] != total:
                    raise ShardError(f"{path}: split {name!r}: shard {e['file']} starts at {e['first']}, "
                                     f"expected {total}")
                total += e["count"]
            if total != s["count"]:
                raise ShardError(f"{path}: split {name!r}: shards hold {total} samples, count says "
                                 f"{s['count']}")
            s["has_labels"], s["has_front"]
    except (KeyError, TypeError) as e:
        raise ShardError(f"{path}: malformed manifest (missing or bad field {e})") from None
    if fingerprint_of(manifest) != manifest["fingerprint"]:
        raise ShardError(f"{path}: fingerprint does not match the manifest's contents")
    return manifest


# ---------------------------------------------------------------------------------------------------
# Packing


def _plan(source: Source, split: str, shard_size: int, opt: PackOptions) -> list[dict]:
    """The shards of one split: file name and spec (everything the shard's content depends on)."""
    n = len(source)
    out = []
    for i, first in enumerate(range(0, n, shard_size)):
        spec = {"format_version": FORMAT_VERSION, "split": split, "source": source.name, "first": first,
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
            yield make_record(raw, opt.crop_size, opt.context)

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
    else:
        for split, item in todo:
            finished(_pack_one(root, sources[split], item, options, on_sample=lambda: bar.update(1)))
    bar.close()

    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
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
# Reading


class ShardFile:
    """One open shard, checked against its manifest entry when opened. Not fork-safe: open it in the
    process that reads it (ShardDataset does this lazily per worker)."""

    def __init__(self, root, entry: dict, split: str, manifest: dict):
        self.path = Path(root) / entry["file"]
        self.count = entry["count"]
        lay = manifest["layout"]
        s = manifest["splits"][split]
        try:
            self.f = h5py.File(self.path, "r")
        except FileNotFoundError:
            raise ShardError(f"{self.path}: missing shard (listed in {MANIFEST})") from None
        except OSError as e:
            raise ShardError(f"{self.path}: cannot open shard: {e}") from None
        try:
            self._check(lay, s)
        except ShardError:
            self.f.close()
            raise
        except (KeyError, OSError, ValueError) as e:
            self.f.close()
            raise ShardError(f"{self.path}: damaged shard: {e}") from None
        f = self.f
        self.image = ChunkReader(f["image"])
        self.labels = ChunkReader(f["labels"]) if s["has_labels"] else None
        self.front = ChunkReader(f["front"]) if s["has_front"] else None
        self.eval_labels = ChunkReader(f["eval_labels"]) if s["has_labels"] else None
        self.eval_front = ChunkReader(f["eval_front"]) if s["has_front"] else None
        self.bbox = f["bbox"][()]  # small: kept in memory
        self._keys: list[str] | None = None

    def _check(self, lay: dict, s: dict) -> None:
        f = self.f
        if f.attrs.get("format_version") != FORMAT_VERSION:
            raise ShardError(f"{self.path}: attribute format_version is {f.attrs.get('format_version')}, "
                             f"expected {FORMAT_VERSION}")
        expect = layout(lay["crop_size"], s["has_labels"], s["has_front"])
        expect["key"] = []
        for name, shape in expect.items():
            if name not in f:
                raise ShardError(f"{self.path}: dataset {name!r} is missing")
            got = f[name].shape
            if got != (self.count, *shape):
                raise ShardError(f"{self.path}: dataset {name!r} has shape {got}, expected "
                                 f"{(self.count, *shape)} (manifest count {self.count})")

    def keys(self) -> list[str]:
        if self._keys is None:
            self._keys = [k.decode() if isinstance(k, bytes) else k for k in self.f["key"][()]]
        return self._keys

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.f.close()


class ChunkReader:
    """Reads sample i of a dataset chunked one sample per chunk.

    The chunk's bytes are fetched directly (HDF5's read_direct_chunk) and inflated here with zlib when
    gzip-compressed: measured 1.5-3x faster than h5py's general selection path (FORMAT.md).
    """

    def __init__(self, ds: h5py.Dataset):
        self.ds = ds
        self.shape = ds.shape[1:]
        self.dtype = ds.dtype
        self.zero = (0,) * len(self.shape)
        plain = ds.chunks == (1, *self.shape) and not ds.shuffle and not ds.fletcher32 and not ds.scaleoffset
        self.mode = "getitem"
        if plain and ds.compression is None:
            self.mode = "raw"
        elif plain and ds.compression == "gzip":
            self.mode = "gzip"

    def __getitem__(self, i: int) -> np.ndarray:
        if self.mode == "getitem":
            return self.ds[i]
        mask, data = self.ds.id.read_direct_chunk((i, *self.zero))
        if mask:
            return self.ds[i]  # a filter was skipped for this chunk: let HDF5 decode it
        if self.mode == "gzip":
            data = zlib.decompress(data)
        return np.frombuffer(data, dtype=self.dtype).reshape(self.shape)


def verify_shards(root) -> list[str]:
    """Every problem found in a shard folder (empty when all is well): manifest, file sizes and hashes,
    and each shard's structure against the manifest."""
    root = Path(root)
    problems = []
    try:
        manifest = read_manifest(root)
    except ShardError as e:
        return [str(e)]
    listed = set()
    for split, s in manifest["splits"].items():
        for e in s["shards"]:
            listed.add(e["file"])
            path = root / e["file"]
            if not path.exists():
                problems.append(f"{path}: missing shard (listed in {root / MANIFEST})")
                continue
            size = path.stat().st_size
            if size != e["bytes"]:
                problems.append(f"{path}: {size} bytes, manifest says {e['bytes']} (truncated or replaced)")
                continue
            digest = sha256_file(path)
            if digest != e["sha256"]:
                problems.append(f"{path}: sha256 {digest[:16]}… does not match the manifest's "
                                f"{e['sha256'][:16]}… (the file changed since it was packed)")
                continue
            try:
                shard = ShardFile(root, e, split, manifest)
            except ShardError as err:
                problems.append(str(err))
                continue
            try:
                keys = shard.keys()
                if len(set(keys)) != len(keys):
                    problems.append(f"{path}: duplicate sample keys")
            finally:
                shard.close()
    for path in sorted(root.glob("*.h5")):
        if path.name not in listed:
            problems.append(f"{path}: shard not listed in {root / MANIFEST}")
    return problems


# ---------------------------------------------------------------------------------------------------
# The built-in synthetic dataset

SYNTHETIC_OFFSETS = {"train": 0, "val": 800_000, "test": 900_000}  # generator index of a split's first sample


def synthetic_in_frame(seed: int, index: int, scene: int, frame: tuple[int, int], rng: np.random.Generator,
                       key: str) -> RawSample:
    """A synthetic scene (scene² pixels) pasted at a random place into a larger frame (w, h), whose
    background is the scene stretched: a full-frame sample like the course's, for importer fixtures
    and the course-path benchmark."""
    from amodal.data import synthetic

    d = synthetic.generate(seed, index, scene)
    w, h = frame
    image = cv2.resize(d["image"], (w, h), interpolation=cv2.INTER_LINEAR)
    labels = np.zeros((2, h, w), np.uint8)
    x0, y0 = int(rng.integers(0, w - scene)), int(rng.integers(0, h - scene))
    image[y0:y0 + scene, x0:x0 + scene] = d["image"]
    labels[:, y0:y0 + scene, x0:x0 + scene] = d["labels"]
    bbox = d["bbox"] + np.array([x0, y0, 0, 0], np.float32)
    return RawSample(key=key, image=image, bbox=bbox, labels=labels, hand_type=d["hand_type"])


class SyntheticSource:
    """Samples of amodal.data.synthetic: split `split` holds generator indices offset + 0 .. count - 1,
    so validation and test samples do not change when the training set grows."""

    has_labels = True
    has_front = True

    def __init__(self, split: str, count: int, seed: int = 0, size: int = 256):
        from amodal.data import synthetic

        if split not in SYNTHETIC_OFFSETS:
            raise ValueError(f"synthetic split {split!r}: expected one of {sorted(SYNTHETIC_OFFSETS)}")
        room = {"train": 800_000, "val": 100_000, "test": 100_000}[split]
        if not 0 <= count <= room:
            raise ValueError(f"synthetic split {split!r}: count {count} is not in 0..{room}")
        self.split, self.count, self.seed, self.size = split, count, seed, size
        self.offset = SYNTHETIC_OFFSETS[split]
        self._generate = synthetic.generate
        self.where = f"amodal.data.synthetic (seed {seed}, split {split})"
        # A change to the generator's code changes this name, so its old shards are not reused.
        code = hashlib.sha256(Path(synthetic.__file__).read_bytes()).hexdigest()[:16]
        self.name = f"synthetic seed={seed} size={size} offset={self.offset} generator={code}"

    def __len__(self) -> int:
        return self.count

    def get(self, i: int) -> RawSample:
        index = self.offset + i
        d = self._generate(self.seed, index, self.size)
        return RawSample(key=f"synthetic/{index:06d}", image=d["image"], bbox=d["bbox"], labels=d["labels"],
                         front=d["front"], hand_type=d["hand_type"])


def pack_synthetic(root, train: int, val: int, test: int, seed: int = 0, **kw) -> dict:
    """Synthetic train/val/test splits (keyword arguments go to pack())."""
    sources = {split: SyntheticSource(split, n, seed) for split, n in
               (("train", train), ("val", val), ("test", test))}
    return pack(root, sources, description=f"synthetic amodal hands, seed {seed}", **kw)


def ensure_synthetic(data_cfg) -> None:
    """Pack the synthetic dataset into data_cfg.root unless it already holds a manifest."""
    root = Path(data_cfg.root)
    if (root / MANIFEST).exists():
        return
    if not data_cfg.make_synthetic:
        raise ShardError(f"{root / MANIFEST}: no manifest, and data.make_synthetic is off")
    pack_synthetic(root, data_cfg.synthetic_train, data_cfg.synthetic_val, data_cfg.synthetic_test,
                   seed=data_cfg.synthetic_seed, workers=min(4, os.cpu_count() or 1))


def splits_of(manifest: dict, names: str | Sequence[str]) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        if n not in manifest["splits"]:
            raise ShardError(f"split {n!r} is not in the manifest (have: {', '.join(manifest['splits'])})")
    return names
