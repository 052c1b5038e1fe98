"""Helpers shared by the training tests (no tests here): run `python -m amodal.train` as real
processes, alone or as a gloo process group, signal them, and read what they wrote."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from amodal import checkpoint as ck
from amodal.tracking import METRICS_FILE, read_metrics

REPO = Path(__file__).resolve().parents[1]

# A tiny, fast run: U-Net with 8 base channels at 64x64 input, 4 images per step, CE loss (a mean over
# pixels, so 2 ranks x 2 images and 1 rank x 4 images average the same gradient up to batch norm).
TINY = [
    "model.name=unet", "model.base_channels=8", "loss.name=ce",
    "data.input_size=64", "data.num_workers=0", "data.make_synthetic=false",
    "train.global_batch=4", "train.log_every=1", "train.log_samples=true",
    "optim.warmup_steps=2", "optim.lr=0.002",
    "checkpoint.every_steps=4", "checkpoint.every_minutes=0", "checkpoint.keep_last=3",
    "tracking.wandb=off",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra) -> dict:
    env = dict(os.environ)
    # One thread per process: the machine has two cores, and a fixed thread count keeps CPU results
    # bitwise reproducible between an interrupted and an uninterrupted run.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SUBMITIT_EXECUTOR",
                "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID", "WANDB_MODE"):
        env.pop(key, None)
    env.update(extra)
    return env


class Launch:
    """`world` processes of `python -m amodal.train ...` with torchrun's variables (or one plain one)."""

    def __init__(self, run_dir: Path, data_root: Path, overrides: list[str], world: int = 1,
                 env: dict | None = None, torchrun: bool = False):
        args = [sys.executable, "-m", "amodal.train", "--run-dir", str(run_dir),
                "--set", f"data.root={json.dumps(str(data_root))}"]
        for o in TINY + list(overrides):
            args += ["--set", o]
        port = free_port()
        self.run_dir = Path(run_dir)
        self.procs = []
        if torchrun:  # torchrun itself starts the ranks (one process to wait for)
            args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                    *args[1:]]
            self.procs.append(subprocess.Popen(args, cwd=REPO, env=base_env(**(env or {})),
                                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            return
        for rank in range(world):
            extra = dict(env or {})
            if world > 1:
                extra.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                             MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            self.procs.append(subprocess.Popen(args, cwd=REPO, env=base_env(**extra), stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT, text=True))

    def wait(self, timeout: float = 240) -> tuple[list[int], list[str]]:
        codes, outs = [], []
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for q in self.procs:
                    q.kill()
                raise
            codes.append(p.returncode)
            outs.append(out)
        return codes, outs

    def signal_at_step(self, step: int, sig: int, ranks=(0,), timeout: float = 180) -> None:
        """Send `sig` to the given ranks once metrics.jsonl shows that step `step` is done."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if last_step(self.run_dir) >= step:
                for r in ranks:
                    os.kill(self.procs[r].pid, sig)
                return
            if any(p.poll() is not None for p in self.procs):
                raise AssertionError("training ended before it could be signalled:\n" + self.wait()[1][0])
            time.sleep(0.01)
        raise AssertionError(f"step {step} never reached")


def run(run_dir, data_root, overrides, world=1, env=None, expect=0, timeout=240) -> list[str]:
    launch = Launch(run_dir, data_root, overrides, world, env)
    codes, outs = launch.wait(timeout)
    assert codes == [expect] * world, f"exit codes {codes}, expected {expect}:\n" + "\n---\n".join(outs)
    return outs


def events(run_dir: Path, kind: str | None = None) -> list[dict]:
    return [e for e in read_metrics(Path(run_dir) / METRICS_FILE) if kind is None or e["event"] == kind]


def last_step(run_dir: Path) -> int:
    steps = [e["step"] for e in events(run_dir, "samples")]
    return max(steps) if steps else -1


def samples_by_step(run_dir: Path) -> dict[int, list[int]]:
    """Global batch (sample indices, rank order) of every step; the latest record of a step wins
    (a step redone after a resume from an older checkpoint)."""
    return {e["step"]: e["indices"] for e in events(run_dir, "samples")}


def final_state(run_dir: Path) -> dict:
    found = ck.load_latest(run_dir)
    assert found is not None, f"no checkpoint in {run_dir}"
    return found[1]


def assert_bitwise_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs (max |diff| {(a[k].double() - b[k].double()).abs().max()})"


def max_weight_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
