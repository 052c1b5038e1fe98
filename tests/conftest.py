"""Shared fixtures: a small packed synthetic dataset, and frames for importer fixtures."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from amodal.data.shards import RawSample, pack_synthetic

# The shared dataset: small and fast to pack; two train shards so loaders cross a shard boundary.
SYNTHETIC_COUNTS = {"train": 64, "val": 16, "test": 16}
SYNTHETIC_SHARD_SIZE = 32
SYNTHETIC_SEED = 0


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """Path of a shard folder holding synthetic train/val/test (64/16/16 samples at the default crop size, labels
    and front maps everywhere). Read-only: copy it before changing anything."""
    root = tmp_path_factory.mktemp("synthetic_shards")
    c = SYNTHETIC_COUNTS
    pack_synthetic(root, c["train"], c["val"], c["test"], seed=SYNTHETIC_SEED,
                   shard_size=SYNTHETIC_SHARD_SIZE, progress=False)
    return root


def framed_samples(n: int, prefix: str = "train", seed: int = 0, frame=(200, 160)) -> list[RawSample]:
    """Synthetic hands (128² scenes) pasted into larger frames (w, h), keys like the course's image keys.
    Frames are small so that fixtures are quick to write and read."""
    from amodal.data.synthetic import generate

    w, h = frame
    rng = np.random.default_rng([seed, 99])
    out = []
    for i in range(n):
        d = generate(seed, 10_000 + i, 128)
        image = cv2.resize(d["image"], (w, h), interpolation=cv2.INTER_LINEAR)
        labels = np.zeros((2, h, w), np.uint8)
        x0, y0 = int(rng.integers(0, w - 128)), int(rng.integers(0, h - 128))
        image[y0:y0 + 128, x0:x0 + 128] = d["image"]
        labels[:, y0:y0 + 128, x0:x0 + 128] = d["labels"]
        bbox = d["bbox"] + np.array([x0, y0, 0, 0], np.float32)
        key = f"{prefix}/Capture{i % 2}/0001_pose/cam40{i % 3}/image{i:04d}"
        out.append(RawSample(key=key, image=image, bbox=bbox, labels=labels, hand_type=d["hand_type"]))
    return out
