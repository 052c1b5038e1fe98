"""Shared fixtures: a small packed synthetic dataset, and frames for importer fixtures."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from amodal.checkpoint import save_checkpoint
from amodal.config import Config, ModelConfig
from amodal.data.format import RawSample
from amodal.data.pack import pack_synthetic
from amodal.data.sources import synthetic_in_frame
from amodal.models import build_model

# pytester runs pytest inside a test (tests/test_time_limit.py); time_limit fails a test of the fast set
# that runs too long.
pytest_plugins = ["pytester", "time_limit"]

TOOLS = Path(__file__).resolve().parents[1] / "tools"

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


def tiny_unet_run(run, data_root: str | None = None, model: ModelConfig | None = None,
                  input_size: int = 64) -> torch.nn.Module:
    """Make `run` a run folder whose best.pt is a 4-channel U-Net (or `model`; seed 0, input 64) in the
    trainer's checkpoint format; returns the model in eval mode."""
    cfg = Config(model=model or ModelConfig(name="unet", base_channels=4))
    cfg.data.input_size = input_size
    if data_root is not None:
        cfg.data.root = data_root
    torch.manual_seed(0)
    model = build_model(cfg.model)
    state = {"model": model.state_dict(), "optimizer": {}, "scheduler": {}, "scaler": {}, "ema": None,
             "step": 7, "epoch": 0, "samples_seen": 56, "global_batch": 8, "fingerprint": "test",
             "config": cfg.to_dict(), "wandb_run_id": None, "best_miou": 0.0}
    save_checkpoint(state, run, keep_last=1, is_best=True)
    return model.eval()


def load_tool(name: str):
    """tools/<name>.py as a module, to call its functions in the test's own process."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    if str(TOOLS) not in sys.path:  # as when it runs as a script: its folder is on the path (gpucheck)
        sys.path.append(str(TOOLS))
    spec.loader.exec_module(module)
    return module


# ---- Slurm tests (test_cluster.py, test_slurm_jobs.py): commands and waiting on the real cluster


def sh(*cmd: str, check: bool = True, timeout: float = 60) -> str:
    """Run a command; its stdout. With check, a failure is an AssertionError carrying its message."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def wait_until(what: str, pred, timeout: float, every: float = 0.5, log: Path | None = None):
    """Poll pred until it returns something true, and return that. On timeout an AssertionError shows
    squeue and the tail of log (a job's output), which is what one needs to see why."""
    end = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > end:
            queue = sh("squeue", "-o", "%i %P %T %r %N", check=False)
            tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; squeue:\n{queue}\n{tail}")
        time.sleep(every)
