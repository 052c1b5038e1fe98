"""One writer per run folder (amodal/runlock.py, issue 23): two real training processes on one folder,
holders that are gone (taken over with one warning), the same job coming back (silently), a holder
that cannot be checked from here, and many processes racing for one folder. The Slurm cases are in
tests/test_slurm_lock.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amodal import runlock
from amodal.runlock import LOCK_NAME, RunFolderHeld, acquire, read_holder
from amodal.signals import EXIT_INTERRUPTED

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "jobs" / "smoke.toml")
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def tiny(shards: Path, steps: int) -> list[str]:
    sets = {"data.root": shards, "data.make_synthetic": "false", "model.base_channels": 8, "data.input_size": 32,
            "train.global_batch": 4, "data.num_workers": 0, "train.val_every": 0, "tracking.wandb": "off",
            "train.steps": steps, "checkpoint.every_steps": 25, "train.log_every": 10}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def gone_pid() -> int:
    """The pid of a process of this host that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(run: Path, **fields) -> dict:
    record = {"host": socket.gethostname(), "pid": gone_pid(), "start_ticks": 1, "job": None, "since": time.time(),
              "command": "python -m amodal.train old"}
    record.update(fields)
    run.mkdir(parents=True, exist_ok=True)
    (run / LOCK_NAME).write_text(json.dumps(record) + "\n")
    return record


@pytest.mark.slow
def test_second_training_process_on_a_held_folder_exits_at_once_naming_the_holder(tmp_path, synthetic_shards):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "amodal.train", SMOKE, "--run-dir", str(run)]
    first = subprocess.Popen(command + tiny(synthetic_shards, 400), env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists():  # the holder writes only once it holds the folder
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
            time.sleep(0.2)
        holder = read_holder(run)
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        second = subprocess.run(command + tiny(synthetic_shards, 400), env=ENV, capture_output=True, text=True,
                                timeout=120)
        assert first.poll() is None, "the first run must still be training when the second is refused"
        assert second.returncode == 1, second.stdout + second.stderr
        assert f"run folder {run} is held by pid {first.pid} on {socket.gethostname()}" in second.stderr
        assert "amodal.train" in second.stderr and f"remove {run / LOCK_NAME}" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)  # enough seen: it saves and stops
        out, _ = first.communicate(timeout=600)
    assert first.returncode == EXIT_INTERRUPTED, out
    starts = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(line).get("event") == "start"]
    assert len(starts) == 1, "the second process wrote into the held folder"
    assert not (run / LOCK_NAME).exists(), "the lock is released when the run ends"


def test_the_recorded_command_is_the_one_typed(tmp_path):
    """An installed command (pip writes an executable without .py, as for amodal-train) is recorded by its
    name, `python -m` by the module, a script by its path: what a user would type again."""
    show = "from amodal.runlock import this_process; print(this_process()['command'])"
    script = tmp_path / "amodal-train"
    script.write_text(f"#!{sys.executable}\n{show}\n")
    script.chmod(0o755)
    (tmp_path / "show.py").write_text(show + "\n")
    (tmp_path / "showmod.py").write_text(show + "\n")

    def recorded(*argv):
        env = dict(ENV, PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}")
        return subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout.strip()

    assert recorded(str(script), "jobs/smoke.toml") == "amodal-train jobs/smoke.toml"
    assert recorded(sys.executable, "-m", "showmod", "x") == "python -m showmod x"
    assert recorded(sys.executable, str(tmp_path / "show.py"), "x") == f"python {tmp_path / 'show.py'} x"


def test_a_holder_that_is_gone_is_taken_over_with_one_warning(tmp_path):
    lines = []
    old = write_lock(tmp_path / "run")
    lock = acquire(tmp_path / "run", warn=lines.append)
    assert len(lines) == 1 and f"taking it over from pid {old['pid']} on {old['host']}" in lines[0]
    assert lines[0].endswith("which is gone")
    assert read_holder(tmp_path / "run")["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_a_damaged_lock_is_taken_over_with_one_warning(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_NAME).write_text("{not json")
    lines = []
    acquire(tmp_path / "run", warn=lines.append).release()
    assert len(lines) == 1


def test_the_same_job_coming_back_takes_its_folder_silently(tmp_path, monkeypatch):
    """A requeue or restart: the same Slurm job id, its old process gone (here, on another node)."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    write_lock(tmp_path / "run", job="4242", host="node-that-ran-it-before")
    lines = []
    lock = acquire(tmp_path / "run", warn=lines.append)
    assert lines == [] and read_holder(tmp_path / "run")["job"] == "4242"
    lock.release()


def test_a_live_holder_of_the_same_job_is_still_a_second_writer(tmp_path, monkeypatch):
    """Two processes of one allocation (by hand in salloc) are two writers: the holder runs, here."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path / "run", job="4242", pid=holder.pid, start_ticks=runlock._start_ticks(holder.pid))
        with pytest.raises(RunFolderHeld, match=f"held by Slurm job 4242, pid {holder.pid}"):
            acquire(tmp_path / "run")
    finally:
        holder.kill()
        holder.wait()


def test_a_holder_on_another_host_outside_slurm_stays_held(tmp_path):
    write_lock(tmp_path / "run", host="elsewhere", pid=1)
    with pytest.raises(RunFolderHeld, match=r"held by pid 1 on elsewhere .*if it is gone, remove .*run\.lock"):
        acquire(tmp_path / "run")


def test_a_reused_pid_is_not_the_holder(tmp_path):
    """pid alive but started at another time: another process that got the number, so the holder is gone."""
    lines = []
    write_lock(tmp_path / "run", pid=os.getppid(), start_ticks=-5)
    acquire(tmp_path / "run", warn=lines.append).release()
    assert len(lines) == 1


def test_release_leaves_another_holders_lock(tmp_path):
    lock = acquire(tmp_path / "run")
    other = write_lock(tmp_path / "run", pid=1, host="elsewhere")
    lock.release()
    assert read_holder(tmp_path / "run") == other


RACER = """
import sys, time
from pathlib import Path
from amodal.runlock import RunFolderHeld, acquire
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
try:
    acquire(sys.argv[1])
    print("held", flush=True)
    time.sleep(3)
except RunFolderHeld:
    print("refused", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("stale", [False, True])
def test_racing_processes_one_wins(tmp_path, stale):
    """Eight processes start for one folder at the same moment (with a gone holder too: all take over
    at once): exactly one holds it."""
    run = tmp_path / "run"
    if stale:
        write_lock(run)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(run), str(go)], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(8)]
    time.sleep(3)  # all started and waiting
    go.touch()
    results = [p.communicate(timeout=120) for p in procs]
    assert sorted(out.strip() for out, _ in results) == ["held"] + ["refused"] * 7, results
    warnings = [line for _, err in results for line in err.splitlines()]
    assert len(warnings) == stale and all("which is gone" in w for w in warnings), warnings
