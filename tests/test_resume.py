"""Exact resume after a real signal, on 1 and 2 processes, and resume on another number of processes.

Every run here is real: `python -m amodal.train` processes (two of them form a gloo process group with
torchrun's variables), interrupted with os.kill while they train, resumed by running the command again.
Runs that do not depend on each other run at the same time (the machine has two cores).
"""

import shutil
import signal
import threading

import pytest
import torch

from test_train_support import (Launch, assert_bitwise_equal, events, final_state, max_weight_diff,
                                samples_by_step)

# Every test here shares the module's real training runs (minutes in all).
pytestmark = pytest.mark.slow

STEPS = 12
SIGNAL_AT = 3  # the signal is sent once step 3 is done; the run stops at the next step boundary
KILL_AT = 6  # kill -9 once step 6 is done: between the periodic checkpoints of steps 4 and 8
# Validation (with the EMA weights) and periodic saves happen between the interruption and the end.
COMMON = [f"train.steps={STEPS}", "train.val_every=4", "train.ema=0.9"]
DUMMY_KEY = "0123456789abcdef0123456789abcdefdummykey"


def _interrupted(launch: Launch, outs: list[str], codes: list[int]) -> int:
    """The step at which an interrupted run stopped (checked against what it printed and saved)."""
    assert codes == [75] * len(codes), f"exit codes {codes}:\n" + "\n---\n".join(outs)
    (event,) = events(launch.run_dir, "interrupted")
    step = event["step"]
    assert SIGNAL_AT <= step < STEPS
    assert f"interrupted at step {step}" in outs[0]
    assert event["checkpoint"].endswith(f"step-{step:08d}.pt")
    return step


def _optimizer_tensors(state: dict) -> dict:
    return {f"{i}.{k}": v for i, s in state["optimizer"]["state"].items() for k, v in s.items()}


@pytest.fixture(scope="module")
def one_process(synthetic_shards, tmp_path_factory):
    """Uninterrupted 1-process run; a 1-process run stopped by SIGUSR2 (tracked by wandb offline, with a
    dummy API key in the environment) and resumed; a copy of the stopped run resumed by 2 processes
    under torchrun; and a run killed with SIGKILL, started again."""
    base = tmp_path_factory.mktemp("resume1")
    full = Launch(base / "full", synthetic_shards, COMMON)
    wandb_env = {"WANDB_API_KEY": DUMMY_KEY}
    cut = Launch(base / "cut", synthetic_shards, COMMON + ["tracking.wandb=offline"], env=wandb_env)
    killed = Launch(base / "killed", synthetic_shards, COMMON)
    # Both watches run at once: watching one run after the other let the second run finish first.
    killer = threading.Thread(target=killed.signal_at_step, args=(KILL_AT, signal.SIGKILL))  # no warning:
    killer.start()  # the last periodic checkpoint before the kill is step 4
    cut.signal_at_step(SIGNAL_AT, signal.SIGUSR2)
    killer.join()
    full_codes, full_outs = full.wait()
    assert full_codes == [0], full_outs[0]
    codes, outs = cut.wait()
    stopped = _interrupted(cut, outs, codes)
    assert killed.wait()[0] == [-signal.SIGKILL]
    shutil.copytree(base / "cut", base / "to_two")
    resumed = Launch(base / "cut", synthetic_shards, COMMON + ["tracking.wandb=offline"], env=wandb_env)
    to_two = Launch(base / "to_two", synthetic_shards, COMMON, world=2, torchrun=True)  # torchrun itself
    restarted = Launch(base / "killed", synthetic_shards, COMMON)
    resumed_codes, resumed_outs = resumed.wait()
    to_two_codes, to_two_outs = to_two.wait()
    restarted_codes, restarted_outs = restarted.wait()
    assert resumed_codes == [0], resumed_outs[0]
    assert to_two_codes == [0], to_two_outs[0]
    assert restarted_codes == [0], restarted_outs[0]
    return {"full": base / "full", "cut": base / "cut", "to_two": base / "to_two", "stopped": stopped,
            "killed": base / "killed"}


@pytest.fixture(scope="module")
def two_processes(synthetic_shards, tmp_path_factory):
    """The same with 2 processes: SIGTERM goes to rank 1 only, so rank 0 stops by agreement; a copy of
    the stopped run is resumed by 1 process."""
    base = tmp_path_factory.mktemp("resume2")
    full = Launch(base / "full", synthetic_shards, COMMON, world=2)
    cut = Launch(base / "cut", synthetic_shards, COMMON, world=2)
    cut.signal_at_step(SIGNAL_AT, signal.SIGTERM, ranks=(1,))
    full_codes, full_outs = full.wait()
    assert full_codes == [0, 0], full_outs[0]
    codes, outs = cut.wait()
    stopped = _interrupted(cut, outs, codes)
    assert "signal on another rank" in outs[0]
    shutil.copytree(base / "cut", base / "to_one")
    resumed = Launch(base / "cut", synthetic_shards, COMMON, world=2)
    to_one = Launch(base / "to_one", synthetic_shards, COMMON, world=1)
    resumed_codes, resumed_outs = resumed.wait()
    to_one_codes, to_one_outs = to_one.wait()
    assert resumed_codes == [0, 0], resumed_outs[0]
    assert to_one_codes == [0], to_one_outs[0]
    return {"full": base / "full", "cut": base / "cut", "to_one": base / "to_one", "stopped": stopped}


def _assert_exact(full_dir, resumed_dir, stopped: int):
    full, resumed = final_state(full_dir), final_state(resumed_dir)
    assert full["step"] == resumed["step"] == STEPS
    assert_bitwise_equal(full["model"], resumed["model"], "model")
    assert_bitwise_equal(full["ema"], resumed["ema"], "EMA weights")
    assert_bitwise_equal(_optimizer_tensors(full), _optimizer_tensors(resumed), "optimizer state")
    assert full["scheduler"]["last_epoch"] == resumed["scheduler"]["last_epoch"] == STEPS
    assert full["best_miou"] == resumed["best_miou"]
    # The resumed run started from the checkpoint of the interruption, not from an older one.
    (start,) = [e for e in events(resumed_dir, "start") if e["resumed_from"]]
    assert start["step"] == stopped
    # Every step's global batch is the same, before and after the interruption.
    samples = samples_by_step(full_dir)
    assert sorted(samples) == list(range(1, STEPS + 1))
    assert samples_by_step(resumed_dir) == samples


def test_one_process_resume_is_bitwise_exact(one_process):
    _assert_exact(one_process["full"], one_process["cut"], one_process["stopped"])


def test_kill_9_resumes_from_the_last_periodic_checkpoint_exactly(one_process):
    run_dir = one_process["killed"]
    _, again = events(run_dir, "start")
    done_before_kill = max(e["step"] for e in events(run_dir, "samples") if e["time"] < again["time"])
    # Started again from a periodic checkpoint (every 4 steps) made before the kill, redoing the steps
    # done after it.
    assert again["step"] % 4 == 0 and KILL_AT - 2 <= again["step"] <= done_before_kill
    assert again["resumed_from"].endswith(f"step-{again['step']:08d}.pt")
    full, restarted = final_state(one_process["full"]), final_state(run_dir)
    assert_bitwise_equal(full["model"], restarted["model"], "model")
    assert_bitwise_equal(full["ema"], restarted["ema"], "EMA weights")
    assert samples_by_step(run_dir) == samples_by_step(one_process["full"])


def test_two_process_resume_is_bitwise_exact(two_processes):
    _assert_exact(two_processes["full"], two_processes["cut"], two_processes["stopped"])


@pytest.mark.parametrize("case", ["2 -> 1", "1 -> 2"])
def test_resume_on_another_world_size_sees_the_same_samples(case, one_process, two_processes):
    if case == "2 -> 1":
        reference, resumed, stopped = two_processes["full"], two_processes["to_one"], two_processes["stopped"]
        other_world = 1
    else:
        reference, resumed, stopped = one_process["full"], one_process["to_two"], one_process["stopped"]
        other_world = 2
    (start,) = [e for e in events(resumed, "start") if e["resumed_from"]]
    assert start["step"] == stopped and start["world_size"] == other_world
    # Exactly the same samples in every global batch, whichever number of processes drew them.
    samples = samples_by_step(reference)
    assert sorted(samples) == list(range(1, STEPS + 1))
    assert samples_by_step(resumed) == samples
    # The weights differ only through batch norm, whose statistics are per process (2 images instead
    # of 4 after the switch): within a few AdamW steps' worth of change (an update moves a weight by
    # about lr at most), and small against how far training moved the weights after the switch.
    ref, res = final_state(reference), final_state(resumed)
    params = {k: v for k, v in ref["model"].items() if "running_" not in k and v.is_floating_point()}
    other = {k: res["model"][k] for k in params}
    at_switch = final_state_at(resumed, stopped)  # the checkpoint both runs share
    lr_sum = 0.002 * (STEPS - stopped)  # an upper bound on the sum of the scheduled learning rates
    assert max_weight_diff(params, other) <= 2 * lr_sum
    moved = torch.cat([(v.double() - at_switch[k].double()).flatten()
                       for k, v in params.items()]).norm()
    apart = torch.cat([(v.double() - other[k].double()).flatten() for k, v in params.items()]).norm()
    assert apart < moved


def final_state_at(run_dir, step: int) -> dict:
    from amodal import checkpoint as ck

    return ck.load_checkpoint(ck.step_path(run_dir, step))["model"]


def test_wandb_offline_resume_keeps_the_run_id(one_process):
    run_dir = one_process["cut"]
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs  # the interrupted start and the resumed one
    ids = {p.name.rsplit("-", 1)[1] for p in runs}
    assert len(ids) == 1
    (run_id,) = ids
    assert final_state(run_dir)["wandb_run_id"] == run_id
    starts = events(run_dir, "start")
    assert [e["wandb_run_id"] for e in starts] == [run_id, run_id]
    assert all(e["wandb"] == "offline" for e in starts)
    assert (runs[1] / f"run-{run_id}.wandb").exists()
    # The API key in the environment is never written anywhere in the run folder.
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert DUMMY_KEY.encode() not in path.read_bytes(), f"API key written to {path}"
