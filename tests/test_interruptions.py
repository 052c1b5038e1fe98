"""A signal at the awkward moments, with every real part on (a ResNet-18 U-Net, a loader worker, wandb
offline): during validation, during a checkpoint save, and during the first step after a resume.

The runs are real `python -m amodal.train` process; a small driver wraps one function of it so that
the process sends itself a real USR2 or SIGTERM at that moment (a signal from outside could not be
timed to land there). The run stops at the next step boundary, saves, exits with status 75, and is
resumed by running the command again; every run ends with bitwise the weights of an uninterrupted
one, and no step of work is lost: each stop saves the step it stopped at.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from amodal.signals import EXIT_INTERRUPTED
from test_train_support import REPO, TINY, Launch, assert_bitwise_equal, base_env, events, final_state

STEPS = 8
REAL_PARTS = ["model.name=resnet_unet", "model.encoder_depth=18", "data.input_size=32", "data.num_workers=1",
              "tracking.wandb=offline", f"train.steps={STEPS}", "train.val_every=4", "checkpoint.every_steps=2"]

# python -c DRIVER WHERE SIGNAL ARGS...: `python -m amodal.train ARGS` that sends itself SIGNAL once, at WHERE.
DRIVER = r"""
import os, signal, sys
import torch
from amodal import train

where, sig, argv = sys.argv[1], getattr(signal, sys.argv[2]), sys.argv[3:]
sent = []

def send_once(what):
    if not sent:
        sent.append(what)
        print(f"driver: {sig.name} {what}", flush=True)
        os.kill(os.getpid(), sig)

if where == "validation":  # after the first batch of the run's first validation
    real_validate, real_evaluate = train.Trainer.validate, train.evaluate
    def validate(self):
        def evaluate(model, loader, *args):
            def batches():
                for i, batch in enumerate(loader):
                    if i == 1:
                        send_once(f"during the validation of step {self.step}")
                    yield batch
            return real_evaluate(model, batches(), *args)
        train.evaluate = evaluate
        try:
            return real_validate(self)
        finally:
            train.evaluate = real_evaluate
    train.Trainer.validate = validate
elif where == "save":  # as the first checkpoint's bytes are being written
    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        send_once(f"during the save of step {obj['step']}")
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
elif where == "first_step":  # inside the first step this process trains
    real_step = train.Trainer.train_step
    def train_step(self, batch):
        send_once(f"during step {self.step + 1}")
        return real_step(self, batch)
    train.Trainer.train_step = train_step
sys.exit(train.main(argv))
"""


def driven(run_dir, data_root, where: str, sig: str) -> subprocess.Popen:
    """The training command of Launch, under DRIVER."""
    args = ["--run-dir", str(run_dir), "--set", f"data.root={json.dumps(str(data_root))}"]
    for o in TINY + REAL_PARTS:
        args += ["--set", o]
    return subprocess.Popen([sys.executable, "-c", DRIVER, where, sig, *args], cwd=REPO, env=base_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, expect: int, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == expect, f"exit status {proc.returncode}, expected {expect}:\n{out}"
    assert "Traceback" not in out, out
    return out


def stopped_at(run_dir, out: str) -> int:
    """The step an interrupted run stopped at, checked against what it saved: that very step."""
    event = events(run_dir, "interrupted")[-1]
    step = event["step"]
    assert f"interrupted at step {step}" in out and event["checkpoint"].endswith(f"step-{step:08d}.pt"), out
    assert final_state(run_dir)["step"] == step
    return step


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_signals_during_a_save_a_validation_and_the_first_step_after_a_resume(synthetic_shards, tmp_path):
    """One run, interrupted three times and resumed each time by the same command, beside the
    uninterrupted reference (2 cores). Checkpoints every 2 steps, validation every 4."""
    reference = Launch(tmp_path / "reference", synthetic_shards, REAL_PARTS)
    run_dir = tmp_path / "run"

    # SIGTERM while the first periodic checkpoint (step 2) is written: the save completes (no temporary
    # file is left), and the loop stops after the step in progress.
    out = finish(driven(run_dir, synthetic_shards, "save", "SIGTERM"), EXIT_INTERRUPTED)
    assert "driver: SIGTERM during the save of step 2" in out, out
    assert not [p for p in (run_dir / "checkpoints").iterdir() if ".tmp-" in p.name]
    assert stopped_at(run_dir, out) == 3

    # USR2 during the validation of step 4: validation finishes and is logged, the step's checkpoint is
    # written, and the loop stops after the next step.
    out = finish(driven(run_dir, synthetic_shards, "validation", "SIGUSR2"), EXIT_INTERRUPTED)
    assert "driver: SIGUSR2 during the validation of step 4" in out and "resuming from" in out, out
    assert [e["step"] for e in events(run_dir, "val")] == [4]
    assert stopped_at(run_dir, out) == 5

    # USR2 during the first step after that resume: it stops at that very step.
    out = finish(driven(run_dir, synthetic_shards, "first_step", "SIGUSR2"), EXIT_INTERRUPTED)
    assert "driver: SIGUSR2 during step 6" in out, out
    assert stopped_at(run_dir, out) == 6

    out = finish(Launch(run_dir, synthetic_shards, REAL_PARTS).procs[0], 0)
    assert [e["step"] for e in events(run_dir, "start")] == [0, 3, 5, 6]
    codes, outs = reference.wait(timeout=300)
    assert codes == [0], outs[0]
    assert final_state(run_dir)["step"] == STEPS
    assert_bitwise_equal(final_state(run_dir)["model"], final_state(tmp_path / "reference")["model"],
                         "the run interrupted three times")
    assert not events(run_dir, "error"), events(run_dir, "error")
    ids = {e["wandb_run_id"] for e in events(run_dir, "start")}
    assert len(ids) == 1 and None not in ids, ids  # one wandb run across the restarts
