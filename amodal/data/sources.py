"""What the packer reads: sources that yield RawSample (full frame, hand box, [left, right] label maps
0..16) by index, so that shards can be packed in any order and a pack can resume (FORMAT.md, "Sources").

- SyntheticSource: the built-in procedural hands of amodal.data.synthetic (and synthetic_in_frame, such
  a hand pasted into a larger frame, for importer fixtures and benchmarks).
- CourseSource: the course's LMDB layout; FolderSource: images/, labels/ and boxes.json.
- write_course_layout / write_folder_layout: the same two layouts written from RawSamples (fixtures for
  the tests and tools/bench_data.py).

Every fault names the file and the sample key it was found in. Packing them is amodal.data.pack's job.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import cv2
import numpy as np
import torch

from amodal.data import synthetic
from amodal.data.codec import CodecError, decode_label_png, encode_label_png
from amodal.data.format import RawSample, SourceError
from amodal.labels import HAND_SUFFIXES, NUM_PARTS


# ---------------------------------------------------------------------------------------------------
# The built-in synthetic dataset

SYNTHETIC_OFFSETS = {"train": 0, "val": 800_000, "test": 900_000}  # generator index of a split's first sample


def synthetic_in_frame(seed: int, index: int, scene: int, frame: tuple[int, int], rng: np.random.Generator,
                       key: str) -> RawSample:
    """A synthetic scene (scene² pixels) pasted at a random place into a larger frame (w, h), whose
    background is the scene stretched: a full-frame sample like the course's, for importer fixtures
    and the course-path benchmark."""
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


# ---------------------------------------------------------------------------------------------------
# Importers: shared constants and helpers

HAND_TYPES = ("right", "left", "interacting")
COURSE_IMAGE_PREFIX = "./data/InterHand2.6M/images/"
IMAGES_LMDB = "interhand.lmdb"
LABELS_LMDB = "segm_train_val_mp.lmdb"
LEFT_OFFSET = 16  # the course stores the left hand's parts as 17..32 in its `__l` maps
COURSE_DATALISTS = {"train": "datalist_train_mp.pt", "val": "datalist_val_mp.pt", "test": "datalist_stud_test.pt"}
COURSE_PATH2ID = {"train": "path2id_train.pt", "val": "path2id_val.pt"}


def _file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class _ImportedSource:
    """What the two importers share: their samples indexed as self.entries, whose first field is the
    sample's key, and no front maps (which hand is in front is known only to the synthetic generator)."""

    has_front = False
    entries: list[tuple]

    def __len__(self) -> int:
        return len(self.entries)

    def keys(self) -> list[str]:
        return [e[0] for e in self.entries]


# ---------------------------------------------------------------------------------------------------
# Reading torch pickles without running pickled code


def _numpy_safe_globals() -> list:
    """numpy arrays and scalars, which datalists may hold (a bbox as an array): plain data, no code."""
    try:
        from numpy._core import multiarray
        names = ("numpy._core.multiarray", "numpy.core.multiarray")
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
        names = ("numpy.core.multiarray",)
    out = [np.ndarray, np.dtype]
    for mod in names:
        out += [(multiarray._reconstruct, f"{mod}._reconstruct"), (multiarray.scalar, f"{mod}.scalar")]
    out += [type(np.dtype(t)) for t in ("f4", "f8", "i4", "i8", "u1", "i2", "u2", "u4", "u8", "b1")]
    return out


def load_torch_data(path) -> object:
    """torch.load(weights_only=True): only tensors, containers, numbers, strings (and numpy arrays)."""
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler's refusal names the offending global
        text = str(e)
        m = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\. Please use|\n\nCheck|$)", text, re.S)
        reason = " ".join((m.group(1) if m else text or type(e).__name__).split())
        raise SourceError(f"{path}: not plain data (lists/dicts of numbers and strings); refused to load "
                          f"it with weights_only=True: {reason}") from None


def _plain(value):
    """numpy / tensor scalars and arrays -> python numbers and lists."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _check_bbox(bbox, where: str, key: str) -> np.ndarray:
    bbox = _plain(bbox)
    try:
        box = np.asarray([float(_plain(v)) for v in bbox], dtype=np.float32)
    except (TypeError, ValueError):
        raise SourceError(f"{where}: key {key!r}: bbox {bbox!r} is not 4 numbers") from None
    if box.shape != (4,):
        raise SourceError(f"{where}: key {key!r}: bbox {bbox!r} is not 4 numbers [x, y, w, h]")
    return box


# ---------------------------------------------------------------------------------------------------
# The course's LMDB layout


_ENVS: dict = {}  # (pid, path) -> open environment: LMDB allows one per path and process


def close_environments() -> None:
    """Close the LMDB environments this process opened (a later read reopens them)."""
    for ident in [i for i in _ENVS if i[0] == os.getpid()]:
        _ENVS.pop(ident).close()


class _Lmdb:
    """A read-only LMDB environment opened lazily in the process that reads it (never across a fork)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.exists():
            raise SourceError(f"{self.path}: no such LMDB environment")

    def _env(self):
        import lmdb

        ident = (os.getpid(), str(self.path.resolve()))
        env = _ENVS.get(ident)
        if env is None:
            try:
                env = lmdb.open(str(self.path), readonly=True, lock=False, readahead=False,
                                subdir=self.path.is_dir(), max_readers=256)
            except lmdb.Error as e:
                raise SourceError(f"{self.path}: cannot open LMDB: {e}") from None
            _ENVS[ident] = env
        return env

    def get(self, key: str) -> bytes:
        with self._env().begin(buffers=False) as txn:
            value = txn.get(key.encode())
        if value is None:
            raise SourceError(f"{self.path}: key {key!r} not found")
        return value


def decode_image(data: bytes, where: str, key: str) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise SourceError(f"{where}: key {key!r}: not a decodable image")
    return image


def decode_label(data: bytes, where: str, key: str) -> np.ndarray:
    """A label PNG: one channel, or three identical ones (the course's form), alpha ignored -> (H, W)
    uint8. The leaderboard file's maps are checked more strictly (amodal/submission.py)."""
    try:
        return decode_label_png(data, alpha_ok=True)
    except CodecError as e:
        raise SourceError(f"{where}: key {key!r}: label image {e}") from None


def course_left(raw: np.ndarray, where: str, key: str) -> np.ndarray:
    """The course's `__l` map (left parts as 17..32) -> 0..16."""
    fg = raw > 0
    bad = fg & ((raw <= LEFT_OFFSET) | (raw > LEFT_OFFSET + NUM_PARTS))
    if bad.any():
        raise SourceError(f"{where}: key {key!r}: left-hand labels must be 0 or "
                          f"{LEFT_OFFSET + 1}..{LEFT_OFFSET + NUM_PARTS}, found {sorted(np.unique(raw[bad]))[:5]}")
    out = raw.copy()
    out[fg] -= LEFT_OFFSET
    return out


def check_part_values(lab: np.ndarray, where: str, key: str) -> np.ndarray:
    if lab.max(initial=0) > NUM_PARTS:
        raise SourceError(f"{where}: key {key!r}: label values must be 0..{NUM_PARTS}, "
                          f"found {int(lab.max())}")
    return lab


class CourseSource(_ImportedSource):
    """One split (train, val or test) of the course's data folder (data/InterHand2.6M/ in the course)."""

    def __init__(self, root, split: str):
        root = Path(root)
        if split not in COURSE_DATALISTS:
            raise SourceError(f"{root}: course split {split!r}: expected one of {list(COURSE_DATALISTS)}")
        self.root, self.split = root, split
        datalist_path = root / COURSE_DATALISTS[split]
        self.datalist_path = datalist_path
        datalist = load_torch_data(datalist_path)
        if not isinstance(datalist, list):
            raise SourceError(f"{datalist_path}: expected a list of dicts, got {type(datalist).__name__}")
        self.has_labels = split in COURSE_PATH2ID
        path2id = {}
        digest = _file_digest(datalist_path)
        if self.has_labels:
            p2i_path = root / COURSE_PATH2ID[split]
            path2id = load_torch_data(p2i_path)
            if not isinstance(path2id, dict):
                raise SourceError(f"{p2i_path}: expected a dict image key -> id, got {type(path2id).__name__}")
            digest += "-" + _file_digest(p2i_path)
        self.entries = []  # (image key, lmdb image key, bbox, hand_type, label id or None)
        for n, item in enumerate(datalist):
            where = f"{datalist_path} entry {n}"
            if not isinstance(item, dict) or "img_path" not in item or "bbox" not in item:
                raise SourceError(f"{where}: expected a dict with img_path and bbox, got {item!r:.200}")
            img_path = item["img_path"]
            if not isinstance(img_path, str) or not img_path.startswith(COURSE_IMAGE_PREFIX) \
                    or not img_path.endswith(".jpg"):
                raise SourceError(f"{where}: img_path {img_path!r} does not look like "
                                  f"'{COURSE_IMAGE_PREFIX}<key>.jpg'")
            key = img_path[len(COURSE_IMAGE_PREFIX):-len(".jpg")]
            bbox = _check_bbox(item["bbox"], str(datalist_path), key)
            hand_type = item.get("hand_type", "")
            if hand_type not in HAND_TYPES:
                raise SourceError(f"{datalist_path}: key {key!r}: hand_type {hand_type!r} is not one of "
                                  f"{HAND_TYPES}")
            label_id = None
            if self.has_labels:
                if key not in path2id:
                    raise SourceError(f"{root / COURSE_PATH2ID[split]}: key {key!r} (from {datalist_path}) "
                                      "has no label id")
                label_id = str(_plain(path2id[key]))
            lmdb_key = img_path[2:]  # without the leading './'
            self.entries.append((key, lmdb_key, bbox, hand_type, label_id))
        self.images = _Lmdb(root / IMAGES_LMDB)
        self.labels = _Lmdb(root / LABELS_LMDB) if self.has_labels else None
        self.name = f"course {root.resolve()} {split} lists={digest}"
        self.where = str(datalist_path)

    def get(self, i: int) -> RawSample:
        key, lmdb_key, bbox, hand_type, label_id = self.entries[i]
        image = decode_image(self.images.get(lmdb_key), str(self.images.path), lmdb_key)
        labels = None
        if self.has_labels:
            where = str(self.labels.path)
            left_id, right_id = (label_id + suffix for suffix in HAND_SUFFIXES)
            left = course_left(decode_label(self.labels.get(left_id), where, left_id), where, left_id)
            right = check_part_values(decode_label(self.labels.get(right_id), where, right_id), where, right_id)
            if left.shape != right.shape or left.shape != image.shape[:2]:
                raise SourceError(f"{where}: key {label_id!r} (image {key!r}): label maps "
                                  f"{left.shape}/{right.shape} do not match the image {image.shape[:2]}")
            labels = np.stack([left, right])
        return RawSample(key=key, image=image, bbox=bbox, labels=labels, hand_type=hand_type)


# ---------------------------------------------------------------------------------------------------
# A plain folder

FOLDER_BOXES = "boxes.json"


class FolderSource(_ImportedSource):
    """One split of a folder: images/<key>.jpg|png, labels/<key>__l.png and <key>__r.png (0..16), and
    boxes.json = {split: [{"key", "bbox": [x, y, w, h], "hand_type" (optional)}, ...]}.
    Labels are required, except for a test split, where they may be absent altogether."""

    def __init__(self, root, split: str):
        root = Path(root)
        self.root, self.split = root, split
        boxes_path = root / FOLDER_BOXES
        try:
            table = json.loads(boxes_path.read_text())
        except FileNotFoundError:
            raise SourceError(f"{boxes_path}: no such file") from None
        except (OSError, ValueError) as e:
            raise SourceError(f"{boxes_path}: not valid JSON: {e}") from None
        if not isinstance(table, dict) or split not in table or not isinstance(table[split], list):
            have = list(table) if isinstance(table, dict) else []
            raise SourceError(f"{boxes_path}: no list for split {split!r} (have: {have})")
        self.entries = []  # (key, image path, bbox, hand_type)
        seen = set()
        for n, item in enumerate(table[split]):
            if not isinstance(item, dict) or not isinstance(item.get("key"), str) or "bbox" not in item:
                raise SourceError(f"{boxes_path}: {split}[{n}]: expected {{'key': str, 'bbox': [x, y, w, h]}}")
            key = item["key"]
            if not key or key.startswith("/") or ".." in Path(key).parts or "\\" in key:
                raise SourceError(f"{boxes_path}: {split}[{n}]: key {key!r} is not a relative path")
            if key in seen:
                raise SourceError(f"{boxes_path}: key {key!r} appears twice in split {split!r}")
            seen.add(key)
            bbox = _check_bbox(item["bbox"], str(boxes_path), key)
            hand_type = item.get("hand_type", "")
            if hand_type and hand_type not in HAND_TYPES:
                raise SourceError(f"{boxes_path}: key {key!r}: hand_type {hand_type!r} not in {HAND_TYPES}")
            image = next((p for p in (root / "images" / f"{key}.jpg", root / "images" / f"{key}.png")
                          if p.exists()), None)
            if image is None:
                raise SourceError(f"{root / 'images'}: key {key!r}: no {key}.jpg or {key}.png")
            self.entries.append((key, image, bbox, hand_type))
        present = [all(p.exists() for p in self.label_paths(k)) for k, *_ in self.entries]
        self.has_labels = all(present) and bool(present)
        if not self.has_labels:
            missing = next((e[0] for e, p in zip(self.entries, present) if not p), None)
            if split != "test" or any(present):
                if missing is not None:
                    names = " or ".join(f"{missing}{suffix}.png" for suffix in HAND_SUFFIXES)
                    raise SourceError(f"{root / 'labels'}: key {missing!r}: missing {names} (labels are optional "
                                      f"only for a whole test split)")
        self.name = f"folder {root.resolve()} {split} boxes={_file_digest(boxes_path)}"
        self.where = str(boxes_path)

    def label_paths(self, key: str) -> list[Path]:
        """labels/<key>__l.png and <key>__r.png."""
        return [self.root / "labels" / f"{key}{suffix}.png" for suffix in HAND_SUFFIXES]

    def get(self, i: int) -> RawSample:
        key, path, bbox, hand_type = self.entries[i]
        image = decode_image(path.read_bytes(), str(path), key)
        labels = None
        if self.has_labels:
            maps = []
            for p in self.label_paths(key):
                maps.append(check_part_values(decode_label(p.read_bytes(), str(p), key), str(p), key))
                if maps[-1].shape != image.shape[:2]:
                    raise SourceError(f"{p}: key {key!r}: label map is {maps[-1].shape[1]}x{maps[-1].shape[0]}, "
                                      f"image {path.name} is {image.shape[1]}x{image.shape[0]}")
            labels = np.stack(maps)
        return RawSample(key=key, image=image, bbox=bbox, labels=labels, hand_type=hand_type)


def folder_splits(root) -> list[str]:
    """The splits that a folder's boxes.json lists, in its order."""
    boxes = Path(root) / FOLDER_BOXES
    try:
        return list(json.loads(boxes.read_text()))
    except FileNotFoundError:
        raise SourceError(f"{boxes}: no such file") from None
    except (OSError, ValueError) as e:
        raise SourceError(f"{boxes}: cannot read: {e}") from None


# ---------------------------------------------------------------------------------------------------
# Writers of the same layouts (fixtures for tests and benchmarks)


def _encode(ext: str, image: np.ndarray, params=()) -> bytes:
    ok, buf = cv2.imencode(ext, image, list(params))
    if not ok:
        raise ValueError(f"cannot encode {ext}")
    return buf.tobytes()


def write_course_layout(root, splits: dict[str, list[RawSample]], jpeg_quality: int = 95) -> None:
    """The course's files for RawSamples whose keys are image keys (e.g. 'train/Capture0/.../image0001'):
    interhand.lmdb, segm_train_val_mp.lmdb (train and val labels), path2id_*.pt, datalist_*.pt."""
    import lmdb

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    next_id = 0
    env_img = lmdb.open(str(root / IMAGES_LMDB), map_size=1 << 32)
    env_seg = lmdb.open(str(root / LABELS_LMDB), map_size=1 << 32)
    with env_img.begin(write=True) as ti, env_seg.begin(write=True) as ts:
        for split, samples in splits.items():
            datalist, path2id = [], {}
            for n, s in enumerate(samples):
                img_path = f"{COURSE_IMAGE_PREFIX}{s.key}.jpg"
                ti.put(img_path[2:].encode(), _encode(".jpg", s.image, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]))
                datalist.append({"img_path": img_path, "bbox": [float(v) for v in s.bbox],
                                 "hand_type": s.hand_type or "interacting", "capture": 0, "cam": n, "frame": n})
                if split in COURSE_PATH2ID:
                    path2id[s.key] = next_id
                    left = np.where(s.labels[0] > 0, s.labels[0] + LEFT_OFFSET, 0).astype(np.uint8)
                    for suffix, label_map in zip(HAND_SUFFIXES, (left, s.labels[1])):
                        ts.put(f"{next_id}{suffix}".encode(), encode_label_png(label_map))
                    next_id += 1
            torch.save(datalist, root / COURSE_DATALISTS[split])
            if split in COURSE_PATH2ID:
                torch.save(path2id, root / COURSE_PATH2ID[split])
    env_img.close()
    env_seg.close()


def write_folder_layout(root, splits: dict[str, list[RawSample]], image_ext: str = ".png") -> None:
    """images/<key><ext>, labels/<key>__l.png / __r.png (where a sample has labels), boxes.json."""
    root = Path(root)
    boxes = {}
    for split, samples in splits.items():
        boxes[split] = []
        for s in samples:
            img = root / "images" / f"{s.key}{image_ext}"
            img.parent.mkdir(parents=True, exist_ok=True)
            img.write_bytes(_encode(image_ext, s.image))
            if s.labels is not None:
                for suffix, label_map in zip(HAND_SUFFIXES, s.labels):
                    p = root / "labels" / f"{s.key}{suffix}.png"
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.write_bytes(_encode(".png", label_map))
            entry = {"key": s.key, "bbox": [float(v) for v in s.bbox]}
            if s.hand_type:
                entry["hand_type"] = s.hand_type
            boxes[split].append(entry)
    (root / FOLDER_BOXES).write_text(json.dumps(boxes, indent=1))
