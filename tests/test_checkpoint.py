"""amodal.checkpoint: atomic saves, retention, resume choice, and real failures (kill -9, full disk)."""

import multiprocessing
import os
import random
import resource
import signal
import time

import pytest
import torch

from amodal import checkpoint as ck


def make_state(step: int, size: int = 1000, **extra) -> dict:
    # The tensor's value encodes the step, so a loaded file proves which save it came from.
    state = {
        "model": {"w": torch.full((size,), float(step))},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0]}]},
        "scheduler": {"last_epoch": step},
        "scaler": {},
        "ema": None,
        "step": step,
        "epoch": 0,
        "samples_seen": step * 4,
        "global_batch": 4,
        "fingerprint": "abc",
        "config": {"train": {"steps": 10, "seed": 0}, "name": "t"},
        "wandb_run_id": None,
        "best_miou": None,
    }
    state.update(extra)
    return state


def test_save_load_retention_and_best(tmp_path):
    for step in range(1, 6):
        ck.save_checkpoint(make_state(step), tmp_path, keep_last=2, is_best=(step == 2))
    steps = [s for s, _ in ck.list_checkpoints(tmp_path)]
    assert steps == [4, 5]
    assert ck.latest_checkpoint(tmp_path) == ck.step_path(tmp_path, 5)
    best = ck.best_checkpoint(tmp_path)
    assert best is not None and best.name == "best.pt"
    assert ck.load_checkpoint(best)["step"] == 2  # kept although step 2's file was pruned
    # Plain torch.load with weights_only=True reads it: tensors and plain values only.
    state = torch.load(ck.step_path(tmp_path, 5), weights_only=True)
    assert state["model"]["w"][0].item() == 5.0 and state["config"]["train"]["steps"] == 10
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if ".tmp-" in p.name]


def test_missing_keys_refused(tmp_path):
    state = make_state(1)
    del state["fingerprint"]
    with pytest.raises(ck.CheckpointError, match="fingerprint"):
        ck.save_checkpoint(state, tmp_path)


def test_truncated_and_corrupt_files_are_skipped(tmp_path):
    for step in (1, 2, 3):
        ck.save_checkpoint(make_state(step), tmp_path, keep_last=5)
    newest = ck.step_path(tmp_path, 3)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    ck.step_path(tmp_path, 2).write_bytes(b"not a checkpoint at all")  # garbage
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        found = ck.load_latest(tmp_path)
    assert found is not None
    path, state = found
    assert path == ck.step_path(tmp_path, 1) and state["step"] == 1
    with pytest.raises(ck.CheckpointError, match=str(newest.name)):
        ck.load_checkpoint(newest)


def test_no_checkpoint(tmp_path):
    assert ck.load_latest(tmp_path) is None
    assert ck.latest_checkpoint(tmp_path) is None
    assert ck.best_checkpoint(tmp_path) is None


def test_compatibility_check():
    state = make_state(1)
    assert ck.check_compatible(state, fingerprint="abc", global_batch=4) == []
    with pytest.raises(ck.CheckpointError, match=r"train.global_batch 4 in the checkpoint, 8 now.*allow_mismatch"):
        ck.check_compatible(state, fingerprint="abc", global_batch=8)
    with pytest.raises(ck.CheckpointError, match="data fingerprint 'abc' in the checkpoint, 'xyz' now"):
        ck.check_compatible(state, fingerprint="xyz", global_batch=4)
    problems = ck.check_compatible(state, fingerprint="xyz", global_batch=8, allow_mismatch=True)
    assert len(problems) == 2


def _save_forever(run_dir: str, start: int) -> None:
    # A child process that keeps saving 4 MB checkpoints until it is killed.
    torch.set_num_threads(1)  # a forked child must not use the parent's OpenMP pool
    step = start
    while True:
        step += 1
        ck.save_checkpoint(make_state(step, size=1_000_000), run_dir, keep_last=2, is_best=(step % 3 == 0))


@pytest.mark.slow
def test_kill_9_while_saving_never_loses_the_checkpoint(tmp_path):
    ck.save_checkpoint(make_state(1, size=1_000_000), tmp_path, keep_last=2)
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(1234)
    last_step, mid_write = 1, 0
    for trial in range(60):
        child = ctx.Process(target=_save_forever, args=(str(tmp_path), last_step))
        child.start()
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        mid_write += any(".tmp-" in p.name for p in (tmp_path / "checkpoints").iterdir())
        found = ck.load_latest(tmp_path)
        assert found is not None, f"trial {trial}: no loadable checkpoint"
        path, state = found
        assert path.name.startswith("step-"), f"trial {trial}: newest step file did not load"
        # The newest complete save is never older than what an earlier trial already found.
        assert state["step"] >= last_step
        assert torch.equal(state["model"]["w"], torch.full((1_000_000,), float(state["step"])))
        last_step = state["step"]
    assert last_step > 1  # the children did save
    assert mid_write >= 1, "no kill landed inside a save; the test did not exercise the crash path"


def _save_under_file_size_limit(run_dir: str, state: dict, queue) -> None:
    # A real OS-level write failure: with RLIMIT_FSIZE, writing past the limit fails with EFBIG
    # (Python ignores SIGXFSZ), as a write on a full disk fails with ENOSPC.
    torch.set_num_threads(1)  # a forked child must not use the parent's OpenMP pool
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    try:
        ck.save_checkpoint(state, run_dir, keep_last=1)
        queue.put("saved")
    except ck.CheckpointError as e:
        queue.put(f"error: {e}")


def test_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path):
    ck.save_checkpoint(make_state(1), tmp_path, keep_last=1)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    # The state is built before the fork: the child only writes.
    child = ctx.Process(target=_save_under_file_size_limit, args=(str(tmp_path), make_state(2, size=1_000_000), queue))
    child.start()
    message = queue.get(timeout=60)
    child.join(10)
    assert message.startswith("error: could not write checkpoint")
    assert "step-00000002.pt" in message and "File too large" in message
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [1]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if ".tmp-" in p.name]
    path, state = ck.load_latest(tmp_path)
    assert state["step"] == 1


def test_unusable_checkpoint_folder_is_a_clear_error(tmp_path):
    # Root ignores permission bits, so the unwritable folder is a path that cannot be a folder.
    (tmp_path / "checkpoints").write_text("a file where the folder should be")
    with pytest.raises(ck.CheckpointError, match="checkpoint folder .*checkpoints"):
        ck.save_checkpoint(make_state(1), tmp_path)
