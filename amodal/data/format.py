"""The shard format (FORMAT.md beside this): its name and version, constants, errors, the sample a
source yields, the datasets a shard holds, and the manifest that lists the shards (reading, checking,
fingerprint).

A dataset is a folder holding `manifest.json` and `<split>-<NNNNN>.h5` files. Each sample is stored once
as a square context crop around its hand box (CONTEXT × the longer box side, at most crop_size; an
unscaled window of the frame where that fits), its two label maps and front map cropped the same way,
the exact 128×128 evaluation targets, the box in crop pixels and its key. Version 2 (written by
default) stores the crop JPEG-encoded and the maps zlib-compressed, each sample's bytes one after
another in a flat dataset; version 1 (still read) stored fixed-size raw arrays.

Who uses it: amodal.data.pack writes shards, amodal.data.read reads and verifies them,
amodal.data.sources yields the samples that are packed, amodal.data.dataset serves them to training.
This module imports none of those.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from amodal.labels import HANDS, NUM_CLASSES, TARGET_SIZE

FORMAT_NAME = "amodal-shards"
FORMAT_VERSION = 2  # what pack writes by default
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
JOURNAL = "pack-journal.json"  # progress of an unfinished pack; removed once the manifest is written
CROP_SIZE = 320  # side of the stored context crop: S / CONTEXT >= 128 (FORMAT.md: why)
CONTEXT = 2.2  # crop side / longer box side: covers the default augmentation range (FORMAT.md)
SHARD_SIZE = 1024  # samples per shard
IMAGE_CODECS = ("jpeg", "png", "raw")  # version 2: how a crop's pixels are stored
MAP_CODECS = ("zlib", "raw")  # version 2: how label and front maps are stored (zlib at level 1)


class ShardError(Exception):
    """A shard folder, file or sample that is missing, damaged or does not match its manifest."""


class SourceError(ShardError):
    """Bad input in a dataset being packed; the message names the source file and the sample key."""


@dataclass(frozen=True)
class PackOptions:
    """How samples are stored. The defaults were chosen by measurement (FORMAT.md)."""

    crop_size: int = CROP_SIZE
    context: float = CONTEXT
    format_version: int = FORMAT_VERSION
    image_codec: str = "jpeg"  # version 1 stores raw pixels only
    jpeg_quality: int = 95
    map_codec: str = "zlib"  # version 1: zlib is HDF5's gzip filter at level 1, raw no filter

    def __post_init__(self):
        if self.format_version not in READABLE_VERSIONS:
            raise ValueError(f"format_version {self.format_version}: expected one of {READABLE_VERSIONS}")
        if self.image_codec not in IMAGE_CODECS:
            raise ValueError(f"image_codec {self.image_codec!r}: expected one of {IMAGE_CODECS}")
        if self.map_codec not in MAP_CODECS:
            raise ValueError(f"map_codec {self.map_codec!r}: expected one of {MAP_CODECS}")
        if self.format_version == 1 and self.image_codec != "raw":
            raise ValueError(f"image_codec {self.image_codec!r}: format version 1 stores raw images only")
        if not 50 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality {self.jpeg_quality} is not in [50, 100]")
        if self.crop_size < 32:
            raise ValueError(f"crop_size {self.crop_size} is too small")
        if not 1.0 <= self.context <= 8.0:
            raise ValueError(f"context {self.context} is not in [1, 8]")


# ---------------------------------------------------------------------------------------------------
# Samples


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


# ---------------------------------------------------------------------------------------------------
# Layout: which datasets a shard holds and their shapes


BLOBS = ("image", "labels", "front")  # version 2: per-sample encoded bytes, one after another


def layout(crop_size: int, has_labels: bool, has_front: bool) -> dict:
    """Version 1: per-sample shapes of a shard's datasets (the leading sample axis left out)."""
    s, t = crop_size, TARGET_SIZE
    out = {"image": [s, s, 3], "bbox": [4], "frame_bbox": [4]}
    if has_labels:
        out["labels"] = [2, s, s]
        out["eval_labels"] = [2, t, t]
    if has_front:
        out["front"] = [s, s]
        out["eval_front"] = [t, t]
    return out


def blob_names(has_labels: bool, has_front: bool) -> list[str]:
    """Version 2: the flat byte datasets of a shard; each has `<name>_offsets` beside it (count + 1)."""
    return [name for name, there in zip(BLOBS, (True, has_labels, has_front)) if there]


def layout_v2(has_labels: bool, has_front: bool) -> dict:
    """Version 2: per-sample shapes of the fixed-size datasets (blobs and their offsets apart)."""
    t = TARGET_SIZE
    out = {"side": [], "bbox": [4], "frame_bbox": [4]}
    if has_labels:
        out["eval_labels"] = [2, t, t]
    if has_front:
        out["eval_front"] = [t, t]
    return out


def manifest_layout(opt: PackOptions) -> dict:
    """The part of the manifest (and fingerprint) that says how samples are laid out."""
    if opt.format_version == 1:
        maps = "gzip" if opt.map_codec == "zlib" else "none"
        return {
            "crop_size": opt.crop_size,
            "context": opt.context,
            "target_size": TARGET_SIZE,
            "image": {"dtype": "uint8", "order": "BGR", "axes": "HWC", "compression": "none"},
            "labels": {"dtype": "uint8", "channels": list(HANDS), "classes": NUM_CLASSES, "background": 0,
                       "compression": maps, "eval_compression": "gzip"},
            "front": {"dtype": "uint8", "values": {"0": "none", "1": "left in front", "2": "right in front"}},
            "bbox": "x, y, w, h of the hand box in crop pixels (OpenCV pixel centres)",
        }
    image = {"codec": opt.image_codec, "order": "BGR", "axes": "HWC"}
    if opt.image_codec == "jpeg":
        image["quality"] = opt.jpeg_quality
    return {
        "crop_size": opt.crop_size,
        "context": opt.context,
        "crop": "side min(crop_size, ceil(context x longer box side) + 2), per sample in `side`",
        "target_size": TARGET_SIZE,
        "image": image,
        "labels": {"codec": opt.map_codec, "dtype": "uint8", "axes": "CHW", "channels": list(HANDS),
                   "classes": NUM_CLASSES, "background": 0, "eval_compression": "gzip"},
        "front": {"codec": opt.map_codec, "dtype": "uint8",
                  "values": {"0": "none", "1": "left in front", "2": "right in front"}},
        "bbox": "x, y, w, h of the hand box in crop pixels (OpenCV pixel centres)",
    }


# ---------------------------------------------------------------------------------------------------
# Files and the manifest


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:05d}.h5"


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
        raise ShardError(f"{path}: no manifest (pack the data first: amodal-pack)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: unreadable manifest: {e}") from None
    try:
        if manifest["format"] != FORMAT_NAME:
            raise ShardError(f"{path}: format {manifest['format']!r} is not {FORMAT_NAME!r}")
        if manifest["format_version"] not in READABLE_VERSIONS:
            raise ShardError(f"{path}: format version {manifest['format_version']} is not one of "
                             f"{READABLE_VERSIONS} (packed by a newer amodal?)")
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


def splits_of(manifest: dict, names: str | Sequence[str]) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        if n not in manifest["splits"]:
            raise ShardError(f"split {n!r} is not in the manifest (have: {', '.join(manifest['splits'])})")
    return names
