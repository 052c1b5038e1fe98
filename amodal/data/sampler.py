"""Sample-exact batching: the global batch of step k is a fixed function of (seed, k).

Epoch e visits the samples in the order np.random.default_rng([seed, e]).permutation(n); its steps take
consecutive runs of `global_batch` of that order (the last incomplete run is dropped), so step k lies in
epoch k // (n // global_batch). Each rank takes its contiguous slice of the global batch. Nothing but
the step counter needs saving: a loader built with start_step=k on any world size that divides the
global batch continues with exactly the same global batches.
"""

from __future__ import annotations

import signal
import threading
from typing import Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from amodal.config import ConfigError


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """The recipe fixes the global batch; each of the world_size ranks takes an equal share of it."""
    if global_batch < 1 or global_batch % world_size:
        raise ConfigError(f"train.global_batch = {global_batch} is not divisible by the number of processes "
                          f"({world_size}): each rank takes an equal share, and {global_batch} is not divisible "
                          f"by world size {world_size}")
    return global_batch // world_size


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Infinite batch sampler of (epoch, index) pairs: this rank's slice of each step's global batch."""

    def __init__(self, num_samples: int, global_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, start_step: int = 0):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        self.local_batch = per_rank_batch(global_batch, world_size)
        if num_samples < global_batch:
            raise ValueError(f"{num_samples} samples cannot fill one global batch of {global_batch}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.start_step = start_step
        self.steps_per_epoch = num_samples // global_batch
        self._perm_epoch, self._perm = None, None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._perm_epoch = epoch
        return self._perm

    def global_batch_at(self, step: int) -> list[tuple[int, int]]:
        """The (epoch, index) pairs of step `step`, all ranks together, in rank order."""
        epoch, j = divmod(step, self.steps_per_epoch)
        idx = self.permutation(epoch)[j * self.global_batch:(j + 1) * self.global_batch]
        return [(epoch, int(i)) for i in idx]

    def batch_at(self, step: int) -> list[tuple[int, int]]:
        """This rank's slice of step `step`."""
        g = self.global_batch_at(step)
        return g[self.rank * self.local_batch:(self.rank + 1) * self.local_batch]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            yield self.batch_at(step)
            step += 1

    def __len__(self) -> int:
        # DataLoader asks for a length in places; the stream is endless. One epoch is the honest figure.
        return self.steps_per_epoch


# Slurm signals every process of a job step; only the training loop may act on these (docs/design.md §3).
LOOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


def worker_init(_worker_id: int) -> None:
    """Each loader worker: single-threaded OpenCV and torch (parallelism comes from the workers), and
    deaf to the loop's signals, which would otherwise kill it while the loop saves."""
    for sig in LOOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


class StepLoader:
    """Endless iterator of collated batches; `.step` counts the batches consumed (start_step included)."""

    def __init__(self, loader: DataLoader, sampler: GlobalBatchSampler):
        self.loader = loader
        self.sampler = sampler
        self.step = sampler.start_step
        self._it = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = iter(self.loader)
        batch = next(self._it)
        self.step += 1
        return batch

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the loader is garbage-collected)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


def worker_context():
    """Workers start from a fork server, not from a fork of the caller: a forked child inherits the
    caller's thread pools in whatever state they were (measured: OpenCV's pool, used by the caller
    before, hangs a forked worker in cv2.setNumThreads), and its open HDF5 handles. The server is a
    clean process that has imported the data code once, so each worker still starts quickly."""
    import multiprocessing as mp
    from multiprocessing import forkserver

    mp.set_forkserver_preload(["amodal.data.dataset"])  # only read when the server starts
    if threading.current_thread() is threading.main_thread():
        # exec keeps ignored signals ignored: a server (and its resource tracker) started now passes
        # that on to every worker it forks, so a USR2 or SIGTERM from Slurm cannot kill them.
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in LOOP_SIGNALS}
        try:
            forkserver.ensure_running()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return mp.get_context("forkserver")


def _loader_kwargs(num_workers: int, pin_memory: bool) -> dict:
    kw = {"num_workers": num_workers, "pin_memory": pin_memory}
    if num_workers > 0:
        kw.update(worker_init_fn=worker_init, prefetch_factor=4, persistent_workers=False,
                  multiprocessing_context=worker_context())
    return kw


def build_train_loader(dataset: Dataset, global_batch: int, rank: int, world_size: int, seed: int,
                       num_workers: int, start_step: int = 0, pin_memory: bool = False) -> StepLoader:
    sampler = GlobalBatchSampler(len(dataset), global_batch, rank, world_size, seed, start_step)
    loader = DataLoader(dataset, batch_sampler=sampler, **_loader_kwargs(num_workers, pin_memory))
    return StepLoader(loader, sampler)


def eval_range(num_samples: int, rank: int, world_size: int) -> range:
    """Rank `rank`'s contiguous share of num_samples (shares differ by at most one sample)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    return range(rank * num_samples // world_size, (rank + 1) * num_samples // world_size)


def build_eval_loader(dataset: Dataset, batch_size: int, rank: int, world_size: int, num_workers: int,
                      pin_memory: bool = False) -> DataLoader:
    """Every sample exactly once over all ranks, in stored order; rank r takes the r-th contiguous share.
    Ranks may get different numbers of batches (collectives belong after the loop)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    share = eval_range(len(dataset), rank, world_size)
    batches = [list(share[i:i + batch_size]) for i in range(0, len(share), batch_size)]
    return DataLoader(dataset, batch_sampler=batches, **_loader_kwargs(num_workers, pin_memory))
