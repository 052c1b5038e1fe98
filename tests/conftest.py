"""Shared fixtures: a small packed synthetic dataset, and frames for importer fixtures."""

from __future__ import annotations

import numpy as np
import pytest

from amodal.data.shards import RawSample, pack_synthetic, synthetic_in_frame

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
    rng = np.random.default_rng([seed, 99])
    return [synthetic_in_frame(seed, 10_000 + i, 128, frame, rng,
                               f"{prefix}/Capture{i % 2}/0001_pose/cam40{i % 3}/image{i:04d}")
            for i in range(n)]
