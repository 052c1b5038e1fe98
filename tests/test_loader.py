"""Dataset, sampler and loaders: sample-exact resume on any world size, lazy HDF5 in workers."""

import pickle

import cv2
import numpy as np
import pytest
import torch

from amodal.config import AugmentConfig
from amodal.data.dataset import ShardDataset
from amodal.data.sampler import GlobalBatchSampler, build_eval_loader, build_train_loader

G = 8  # global batch: 64 training samples make 8 steps per epoch


@pytest.fixture(scope="module")
def train_set(synthetic_shards):
    return ShardDataset(synthetic_shards, "train", augment=AugmentConfig(), seed=7)


def test_samples_have_the_contract_s_types(synthetic_shards, train_set):
    assert len(train_set) == 64 and train_set.has_labels and train_set.has_front
    s = train_set[(2, 5)]
    assert set(s) == {"image", "target", "front", "index", "key"}
    assert s["image"].dtype == torch.float32 and s["image"].shape == (3, 128, 128)
    assert 0.0 <= s["image"].min() and s["image"].max() <= 1.0
    assert s["target"].dtype == torch.int64 and s["target"].shape == (2, 128, 128)
    assert s["target"].max() <= 16 and s["target"].min() >= 0
    assert s["front"].dtype == torch.uint8 and s["front"].shape == (128, 128)
    assert s["index"] == 5 and s["key"] == "synthetic/000005" == train_set.keys()[5]
    assert train_set.fingerprint == ShardDataset(synthetic_shards, "val").fingerprint
    # a function of (seed, epoch, index): equal when asked again, different in another epoch
    again = train_set[(2, 5)]
    assert all(torch.equal(s[k], again[k]) for k in ("image", "target", "front"))
    assert not torch.equal(train_set[(3, 5)]["image"], s["image"])
    assert torch.equal(train_set[5]["image"], train_set[(0, 5)]["image"])
    # input size is free; targets stay 128²
    big = ShardDataset(synthetic_shards, "val", input_size=160)[0]
    assert big["image"].shape == (3, 160, 160) and big["target"].shape == (2, 128, 128)


def test_eval_mode_is_the_plain_crop(synthetic_shards):
    ds = ShardDataset(synthetic_shards, "val")
    off = ShardDataset(synthetic_shards, "val", augment=AugmentConfig(enabled=False), seed=3)
    a, b = ds[(0, 4)], off[(9, 4)]
    assert all(torch.equal(a[k], b[k]) for k in ("image", "target", "front"))
    both = ShardDataset(synthetic_shards, ["train", "val"])
    assert len(both) == 80 and both.keys()[64:] == ds.keys() and torch.equal(both[68]["target"], a["target"])


def test_dataset_pickles_without_handles(synthetic_shards):
    ds = ShardDataset(synthetic_shards, "val")
    ds.keys()
    assert ds._files == {}  # building the dataset and listing keys leave no file open
    ds[0]  # opens a shard in this process
    assert len(ds._files) == 1
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._files == {} and torch.equal(clone[1]["image"], ds[1]["image"])


def test_sampler_epochs_are_permutations():
    s = GlobalBatchSampler(num_samples=20, global_batch=6, seed=1)
    assert s.steps_per_epoch == 3  # 18 of 20 samples per epoch, the rest dropped
    epoch0 = [p for k in range(3) for p in s.global_batch_at(k)]
    epoch1 = [p for k in range(3, 6) for p in s.global_batch_at(k)]
    assert {e for e, _ in epoch0} == {0} and {e for e, _ in epoch1} == {1}
    assert len({i for _, i in epoch0}) == 18 and [i for _, i in epoch0] != [i for _, i in epoch1]
    assert GlobalBatchSampler(20, 6, seed=2).global_batch_at(0) != s.global_batch_at(0)
    ranks = [GlobalBatchSampler(20, 6, rank=r, world_size=3, seed=1).batch_at(4) for r in range(3)]
    assert sum(ranks, []) == s.global_batch_at(4) and all(len(b) == 2 for b in ranks)
    with pytest.raises(ValueError, match="not divisible by world size 4"):
        GlobalBatchSampler(20, 6, world_size=4)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        GlobalBatchSampler(5, 6)


def run(dataset, world_size, start_step, steps, seed=7, num_workers=0):
    """Per step: the global batch's keys (ranks concatenated in order) and images; plus rank 0's state."""
    loaders = [build_train_loader(dataset, G, rank, world_size, seed, num_workers, start_step=start_step)
               for rank in range(world_size)]
    keys, images = [], []
    for _ in range(steps):
        batches = [next(loader) for loader in loaders]
        for b in batches:
            assert len(b["key"]) == G // world_size
        keys.append([k for b in batches for k in b["key"]])
        images.append(torch.cat([b["image"] for b in batches]))
    states = [{"step": loader.step, "seed": loader.sampler.seed, "global_batch": loader.sampler.global_batch,
               "num_samples": loader.sampler.num_samples} for loader in loaders]
    assert all(s == states[0] for s in states)
    for loader in loaders:
        loader.close()
    return keys, images, states[0]


@pytest.mark.parametrize("before,after", [(1, 2), (2, 1), (4, 2)])
def test_resume_on_another_world_size_gives_the_same_global_batches(train_set, before, after):
    k, m = 5, 6  # the resumed part crosses into epoch 1
    ref_keys, ref_images, _ = run(train_set, 1, 0, k + m)
    keys, _, state = run(train_set, before, 0, k)
    assert state == {"step": k, "seed": 7, "global_batch": G, "num_samples": 64}
    assert keys == ref_keys[:k]
    resumed_keys, resumed_images, state = run(train_set, after, state["step"], m)
    assert state["step"] == k + m
    assert resumed_keys == ref_keys[k:]
    for a, b in zip(resumed_images, ref_images[k:]):  # same augmentation too, whoever loads a sample
        assert torch.equal(a, b)
    assert len(set(sum(ref_keys[:8], []))) == 64  # epoch 0 visits every sample once


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_workers_open_hdf5_lazily_and_match_the_in_process_loader(train_set):
    train_set[(0, 0)]  # the parent has opened a shard before the workers start: they must not reuse it
    # ... and has used OpenCV's thread pool (a worker forked from here hung in cv2.setNumThreads)
    cv2.setNumThreads(2)
    cv2.resize(np.zeros((1500, 1500, 3), np.uint8), (500, 500), interpolation=cv2.INTER_AREA)
    ref_keys, ref_images, _ = run(train_set, 1, 3, 4)
    keys, images, state = run(train_set, 1, 3, 4, num_workers=2)
    assert keys == ref_keys and state["step"] == 7
    assert all(torch.equal(a, b) for a, b in zip(images, ref_images))


@pytest.mark.timeout(180)
def test_workers_survive_the_signals_slurm_sends_to_every_process(train_set):
    """Slurm sends USR2/SIGTERM to every process of a job step; the loop saves after that, so the
    workers (and the fork server they come from) must keep serving batches."""
    import os
    import signal
    import time

    loader = build_train_loader(train_set, G, 0, 1, seed=7, num_workers=1)
    next(loader)
    worker_pids = [w.pid for w in loader._it._workers]
    from multiprocessing import forkserver

    server_pid = forkserver._forkserver._forkserver_pid
    try:
        for pid in worker_pids + [server_pid]:
            os.kill(pid, signal.SIGUSR2)
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)
        for _ in range(6):  # more batches than were prefetched before the signals
            assert len(next(loader)["key"]) == G
        assert all(w.is_alive() for w in loader._it._workers)
        os.kill(server_pid, 0)  # the fork server is alive too (raises if not)
    finally:
        loader.close()


def test_eval_loader_gives_every_sample_once_in_order(synthetic_shards):
    ds = ShardDataset(synthetic_shards, "val")
    per_rank = []
    for rank in range(3):
        keys = []
        for batch in build_eval_loader(ds, 4, rank, 3, num_workers=0):
            assert batch["image"].shape[1:] == (3, 128, 128) and len(batch["key"]) <= 4
            keys += batch["key"]
        per_rank.append(keys)
    assert [len(k) for k in per_rank] == [5, 5, 6]
    assert sum(per_rank, []) == ds.keys()
