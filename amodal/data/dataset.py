"""A map-style dataset over HDF5 shards (one split, or several concatenated in the order given).

`ds[i]` is sample i of epoch 0, `ds[(epoch, i)]` sample i as augmented in that epoch; without an
augmentation config (or with it disabled) a sample is the plain crop of its box and its targets are the
exact 128×128 maps stored for evaluation. With augmentation and on_device=True (augment.on = "device")
a sample is what amodal.data.device_augment.augment_batch warps on the training device: the decoded
crop on a fixed canvas, its maps and its drawn parameters. HDF5 files are opened on first read in each process, never
before a DataLoader forks its workers (a handle opened in another process is dropped, not reused).
"""

from __future__ import annotations

import bisect
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from amodal.config import AugmentConfig
from amodal.data import augment, device_augment
from amodal.data.format import MANIFEST, ShardError, read_manifest, splits_of
from amodal.data.read import ShardFile


class ShardDataset(torch.utils.data.Dataset):
    def __init__(self, root, split: str | Sequence[str], input_size: int = 128,
                 augment: AugmentConfig | None = None, seed: int = 0, on_device: bool = False,
                 reduced_decode: bool = True):
        """on_device: return samples for device_augment.augment_batch when augmenting; reduced_decode:
        there, decode JPEG crops at 1/2 or 1/4 where the warp needs no more (device_augment.reduction)."""
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.splits = splits_of(self.manifest, split)
        self.input_size = int(input_size)
        if self.input_size < 8:
            raise ValueError(f"input_size {input_size} is too small")
        self.augment = augment if augment is not None and augment.enabled else None
        self.seed = int(seed)
        self.on_device = on_device and self.augment is not None
        self.reduced_decode = reduced_decode
        self.canvas = int(self.manifest["layout"]["crop_size"])  # every stored crop fits
        self.fingerprint: str = self.manifest["fingerprint"]
        infos = [self.manifest["splits"][s] for s in self.splits]
        self.has_labels = all(s["has_labels"] for s in infos)
        self.has_front = all(s["has_front"] for s in infos)
        if self.on_device and not self.has_labels:
            raise ValueError(f"{self.root}: {self.splits} hold no labels to augment on the device")
        # (split, manifest entry) per shard, and the global index of each shard's first sample
        self._entries: list[tuple[str, dict]] = []
        self._starts: list[int] = []
        n = 0
        for name, info in zip(self.splits, infos):
            for e in info["shards"]:
                path = self.root / e["file"]
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    raise ShardError(f"{path}: missing shard (listed in {self.root / MANIFEST})") from None
                if size != e["bytes"]:
                    raise ShardError(f"{path}: {size} bytes, manifest says {e['bytes']} (truncated or "
                                     "replaced; run amodal-verify)")
                self._entries.append((name, e))
                self._starts.append(n)
                n += e["count"]
        self._len = n
        self._files: dict[int, ShardFile] = {}
        self._pid = None
        self._keys: list[str] | None = None

    def __len__(self) -> int:
        return self._len

    # -- files ----------------------------------------------------------------------------------------

    def _shard(self, j: int) -> ShardFile:
        if self._pid != os.getpid():
            # a fresh process (a forked worker): never touch handles opened by the parent
            self._files = {}
            self._pid = os.getpid()
        f = self._files.get(j)
        if f is None:
            split, entry = self._entries[j]
            f = self._files[j] = ShardFile(self.root, entry, split, self.manifest)
        return f

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self._len:
            raise IndexError(f"index {i} out of range for {self._len} samples")
        j = bisect.bisect_right(self._starts, i) - 1
        return j, i - self._starts[j]

    def keys(self) -> list[str]:
        """Sample keys in stored order (opens each shard briefly; nothing stays open)."""
        if self._keys is None:
            keys = []
            for split, entry in self._entries:
                shard = ShardFile(self.root, entry, split, self.manifest)
                try:
                    keys.extend(shard.keys())
                finally:
                    shard.close()
            self._keys = keys
        return self._keys

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"], state["_pid"] = {}, None  # h5py handles never cross a process boundary
        return state

    # -- samples --------------------------------------------------------------------------------------

    def __getitem__(self, item) -> dict:
        if isinstance(item, tuple):
            epoch, i = item
        else:
            epoch, i = 0, item
        i, epoch = int(i), int(epoch)
        j, local = self._locate(i)
        shard = self._shard(j)
        try:
            bbox = shard.bbox[local]
            out = {"index": i, "key": self._key(shard, local)}
            if self.on_device:
                out.update(self._canvas_sample(shard, local, bbox, epoch, i))
            elif self.augment is None:
                image = shard.image[local]
                m = augment.box_affine(bbox, self.input_size)
                out["image"] = torch.from_numpy(augment.image_to_chw(
                    augment.warp_image_fast(image, m, self.input_size)))
                if self.has_labels:
                    out["target"] = torch.from_numpy(shard.eval_labels[local].astype(np.int64))
                if self.has_front:
                    out["front"] = torch.from_numpy(shard.eval_front[local].copy())
            else:
                image = shard.image[local]
                params = augment.params_for(self.augment, self.seed, epoch, i)
                labels = shard.labels[local] if self.has_labels else None
                front = shard.front[local] if self.has_front else None
                r = augment.apply(image, bbox, params, self.input_size, labels, front)
                out["image"] = torch.from_numpy(r["image"])
                if labels is not None:
                    out["target"] = torch.from_numpy(r["labels"].astype(np.int64))
                if front is not None:
                    out["front"] = torch.from_numpy(r["front"])
        except (OSError, KeyError, ValueError) as e:
            raise ShardError(f"{shard.path}: cannot read sample {local} (global index {i}): {e}") from None
        return out

    def _canvas_sample(self, shard: ShardFile, local: int, bbox, epoch: int, i: int) -> dict:
        params = augment.params_for(self.augment, self.seed, epoch, i)
        want = device_augment.reduction(bbox, params, self.input_size) if self.reduced_decode else 1
        image, reduce = shard.image_reduced(local, want)
        front = shard.front[local] if self.has_front else None
        return device_augment.canvas_sample(image, reduce, bbox, params, self.input_size, self.canvas,
                                            shard.labels[local], front)

    def _key(self, shard: ShardFile, local: int) -> str:
        return shard.keys()[local]
