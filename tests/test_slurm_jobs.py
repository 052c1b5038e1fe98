"""The launcher's jobs on the project's real two-node Slurm cluster (slurm/local-cluster.sh), issues 5
and 11: preemption with and without a grace time, twice in one job, with every real part on (a ResNet
U-Net, a loader worker, wandb offline) and of an export job; wall time, scancel, a node failure, DDP over
two nodes and on one node, a sweep as one job array, and retrain -> export -> leaderboard-file check.

They never skip: a stopped cluster is a failure that says how to start it. They change the partitions'
GraceTime for a moment, take node n1 with a high-priority job and set a node DOWN, so run them alone
(not next to tests/test_cluster.py). To save time the slow jobs run side by side: the wall-time job and
the uninterrupted reference runs start when the module does (fixture `background`) and are checked
late; the wall-time job and the scancel job stay on n2 (--exclude n1), the preempted jobs on n1, and
the node failure comes last, on a quiet cluster.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from amodal import status
from amodal.checkpoint import list_checkpoints, load_checkpoint
from amodal.outcome import KINDS
from amodal.requeues import read_requeues
from amodal.tracking import METRICS_FILE, read_last_step, read_metrics
from conftest import sh, wait_until

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "slurm" / "local-cluster.sh"
START_HINT = f"start the cluster first: `bash {SCRIPT.relative_to(REPO)} up` (as root)"
SMOKE = str(REPO / "jobs" / "smoke.toml")
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
WALL_WORK_S = 65  # seconds of training at full speed for the wall-time job: more than a run of a 1-minute job
REAL_STEPS = 60  # the jobs with every real part on: more than their three runs' few steps each
SMALL_STEPS = 30
RESOURCES = ["--gpus-per-node", "0", "--cpus-per-task", "1"]
NO_INTERRUPTIONS = dict.fromkeys(KINDS, 0)


def tiny(shards: Path, steps: int) -> list[str]:
    """--set overrides that make jobs/smoke.toml a tiny CPU run on the session's shards."""
    sets = {"data.root": shards, "data.make_synthetic": "false", "model.base_channels": 8, "data.input_size": 32,
            "train.global_batch": 4, "data.num_workers": 0, "train.val_every": 0, "tracking.wandb": "off",
            "train.steps": steps, "checkpoint.every_steps": 25, "train.log_every": 10}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def real_parts(shards: Path, steps: int) -> list[str]:
    """--set overrides that make jobs/smoke.toml what a user runs, at a test's size: a ResNet-18 U-Net
    (32x32 input), a loader worker, wandb offline, validation and periodic checkpoints."""
    sets = {"data.root": shards, "data.make_synthetic": "false", "model.name": "resnet_unet",
            "model.encoder_depth": 18, "data.input_size": 32, "train.global_batch": 4, "data.num_workers": 1,
            "tracking.wandb": "offline", "train.val_every": 20, "train.steps": steps, "checkpoint.every_steps": 20,
            "train.log_every": 5}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


class Lab:
    """A work folder on the cluster's shared file system (this machine), the launcher, and waiting."""

    def __init__(self, root: Path, shards: Path):
        self.root, self.shards = root, shards
        self.jobs: list[str] = []
        self.references: dict[str, subprocess.Popen] = {}

    def launch(self, *args: str) -> tuple[list[str], str]:
        """python -m amodal.launch ARGS in the work folder: (job ids, output)."""
        r = subprocess.run([sys.executable, "-m", "amodal.launch", *args], cwd=self.root, env=ENV,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"launch {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
        ids = re.findall(r"submitted \S+ job (\S+) to Slurm", r.stdout)
        assert ids, r.stdout
        self.jobs += ids
        return ids, r.stdout

    def train(self, name: str, steps: int, *args: str) -> tuple[str, Path]:
        ids, _ = self.launch(SMOKE, "--name", name, *RESOURCES, *tiny(self.shards, steps), *args)
        return ids[0], self.root / "runs" / name

    def train_real(self, name: str, *args: str) -> tuple[str, Path]:
        ids, _ = self.launch(SMOKE, "--name", name, *RESOURCES, *real_parts(self.shards, REAL_STEPS), *args)
        return ids[0], self.root / "runs" / name

    def start_reference(self, name: str, sets: list[str]) -> Path:
        """The same recipe, uninterrupted, in a plain process outside Slurm."""
        run = self.root / f"reference-{name}"
        self.references[name] = subprocess.Popen(
            [sys.executable, "-m", "amodal.train", SMOKE, "--run-dir", str(run), *sets],
            cwd=self.root, env=ENV, stdout=open(self.root / f"reference-{name}.log", "w"), stderr=subprocess.STDOUT)
        return run

    def reference_weights(self, name: str, steps: int) -> dict:
        proc = self.references[name]
        assert proc.wait(timeout=600) == 0, (self.root / f"reference-{name}.log").read_text()[-3000:]
        return final_weights(self.root / f"reference-{name}", steps)


def final_state(job: str) -> str | None:
    """The job's final state once it has left the queue for good (sacct lags squeue by a moment)."""
    if sh("squeue", "-h", "-j", job, check=False).strip():
        return None
    lines = sh("sacct", "-n", "-X", "-P", "-j", job, "-o", "State", check=False).strip().splitlines()
    state = lines[-1].split()[0] if lines else ""  # "CANCELLED by 0" -> CANCELLED
    return state if state in FINAL else None


def wait_done(job: str, run: Path, timeout: float) -> str:
    return wait_until(f"job {job} to end", lambda: final_state(job), timeout, every=2, log=job_log(run))


def runs_of(job: str) -> list[dict]:
    """One dict per start of the job (sacct -D): State, Start, End (epoch s), NodeList."""
    out = sh("sacct", "-n", "-D", "-X", "-P", "-j", job, "-o", "State,Start,End,NodeList")
    rows = []
    for line in out.splitlines():
        state, start, end, nodes = line.split("|")
        stamp = lambda s: time.mktime(time.strptime(s, "%Y-%m-%dT%H:%M:%S")) if s[:1].isdigit() else None
        rows.append({"State": state.split()[0], "Start": stamp(start), "End": stamp(end), "NodeList": nodes})
    return rows


def job_log(run: Path, task: int = 0) -> Path:
    base = json.loads((run / "job.json").read_text())["log"]
    return Path(base.replace("_0_log.out", f"_{task}_log.out"))


def events(run: Path, kind: str) -> list[dict]:
    return [record for record in read_metrics(run / METRICS_FILE) if record.get("event") == kind]


def final_weights(run: Path, steps: int) -> dict:
    step, path = list_checkpoints(run)[-1]
    assert step == steps, f"{run}: newest checkpoint is at step {step}, not {steps}"
    return load_checkpoint(path)["model"]


def assert_same_weights(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{what}: {len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


def cred_expire() -> int:
    m = re.search(r"cred_expire=(\d+)", sh("scontrol", "show", "config"))
    return int(m.group(1)) if m else 120


def grace_time(partition: str) -> int:
    return int(re.search(r"GraceTime=(\d+)", sh("scontrol", "-o", "show", "partition", partition)).group(1))


# --------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def cluster() -> None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        pytest.fail(f"Slurm commands not found: {START_HINT}")
    r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %P %t"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.fail(f"sinfo does not answer ({r.stderr.strip()}): {START_HINT}")
    states = {(n, p.rstrip("*")): s for n, p, s in (line.split() for line in r.stdout.splitlines() if line.strip())}
    for node in ("n1", "n2"):
        for partition in ("cpu", "gpu", "high"):
            state = states.get((node, partition), "missing")
            if not re.fullmatch(r"(idle|mix|alloc|comp)", state):
                pytest.fail(f"node {node} of partition {partition} is {state}: {START_HINT}")


@pytest.fixture(scope="module")
def lab(cluster, synthetic_shards, tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("slurm_jobs"), synthetic_shards)
    yield lab
    for job in lab.jobs:  # whatever a failed test left behind
        subprocess.run(["scancel", job.split("_")[0]], capture_output=True, timeout=30)
    for proc in lab.references.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module", autouse=True)
def background(lab) -> dict:
    """Started first, checked by the last test: the uninterrupted references and the wall-time job.

    A 1-minute limit with USR2 5 s before it: Slurm's controller looks every 30 s and sends the signal
    at the first look within delay + 30 s of the limit, i.e. 25-55 s after the start. The job must have
    more work than that even when it runs alone on a fast machine, so its step count comes from the
    speed of a short run of the same recipe, measured here: WALL_WORK_S seconds of its steps.
    """
    lab.start_reference("real", real_parts(lab.shards, REAL_STEPS))  # for the preemption and node-failure jobs
    probe = lab.start_reference("probe", tiny(lab.shards, SMALL_STEPS))
    first, second = wait_until("the probe run's first steps", lambda: events(probe, "train")[1:] and
                               events(probe, "train")[:2], 180)  # the second window: warm
    seconds_per_step = second["seconds"] / (second["step"] - first["step"])
    wall_steps = max(200, round(WALL_WORK_S / seconds_per_step))
    print(f"\nprobe: {seconds_per_step:.3f} s/step; the wall-time job trains {wall_steps} steps")
    lab.start_reference("walltime", tiny(lab.shards, wall_steps))
    job, run = lab.train("walltime", wall_steps, "--hours", str(1 / 60), "--set", "slurm.signal_delay_s=5",
                         "--exclude", "n1")
    return {"walltime": (job, run, wall_steps)}


# --------------------------------------------------------------------------------------------------
# Tests


def take_n1(lab: Lab, name: str) -> str:
    """A high-priority job that takes node n1 for 5 s: Slurm preempts whatever runs there."""
    job = sh("sbatch", "--parsable", "-p", "high", "-w", "n1", "--exclusive", "-J", name,
             "-o", str(lab.root / f"{name}.out"), "--wrap", "sleep 5").strip()
    lab.jobs.append(job)
    return job


def trained(run: Path, steps: int):
    """Whether the job's current run has trained `steps` steps since it started (its last start event)."""
    starts, last = events(run, "start"), read_last_step(run)
    return bool(starts) and last is not None and last >= starts[-1]["step"] + steps


def assert_no_work_lost(entry: dict, kind: str, signals: list[str], requeued: str) -> int:
    """An interruption that saved the step it was signalled at and resumed there; returns that step."""
    assert (entry["kind"], entry["signals"], entry["requeued"]) == (kind, signals, requeued), entry
    assert entry["saved_at"] == entry["stopped_at"] == entry["resumed_at"] and entry["redone"] == 0, entry
    return entry["saved_at"]


def assert_clean_log(run: Path, log: str) -> None:
    """No error event, no traceback, no misleading requeue line; one wandb run across the restarts."""
    assert not events(run, "error"), events(run, "error")
    assert "Traceback" not in log and "requeue failed" not in log, log[-5000:]
    ids = {e["wandb_run_id"] for e in events(run, "start")}
    assert len(ids) == 1 and None not in ids, ids


@pytest.mark.timeout(600)
def test_preempted_twice_with_and_without_grace_time_every_real_part_on(lab):
    """Issue 11's scenario: a ResNet-18 U-Net job with a loader worker and wandb offline, on partition
    gpu and node n1, preempted twice by a high-priority job that takes n1: with GraceTime 30 (USR2: it
    saves and requeues itself), then with GraceTime 0 (USR2 and SIGTERM together, to every process of
    the step, wandb's service too: it saves within KillWait and Slurm requeues it). Each time it resumes
    at the step it was stopped at, and it ends with the uninterrupted run's weights.

    An export job beside it on n1 is preempted by the first high job too (submitit's USR2 handler): it
    starts again and writes the same leaderboard file as an uninterrupted export of the same model."""
    from amodal.config import ModelConfig
    from amodal.submission import read_submission
    from conftest import tiny_unet_run

    # The model to export: a ResNet-18 U-Net at 128x128 (as initialised), 64 images with flip TTA one by
    # one, so that the export is still predicting when the high job comes.
    for name in ("model", "model-uninterrupted"):
        tiny_unet_run(lab.root / "runs" / name, str(lab.shards), ModelConfig(name="resnet_unet", encoder_depth=18),
                      input_size=128)
    export_sets = ["--set", "export.split=train", "--set", "export.batch_size=1", "--set", "export.tta_flip=true"]
    old = {p: grace_time(p) for p in ("cpu", "gpu")}
    try:
        sh("bash", str(SCRIPT), "set-grace", "30")
        job, run = lab.train_real("preempted", "--partition", "gpu", "--exclude", "n2")
        (export,), _ = lab.launch(str(REPO / "jobs" / "export.toml"), *RESOURCES, "--partition", "gpu",
                                  "--exclude", "n2", "--set", "export.checkpoint=runs/model", *export_sets)
        export_run = lab.root / "runs" / "model" / "export"
        wait_until(f"job {job} to train", lambda: trained(run, 3), 240, log=job_log(run))
        # config.json is written once the model and the data are loaded, just before predicting.
        wait_until(f"export job {export} to predict", lambda: (export_run / "config.json").exists(), 180,
                   log=job_log(export_run))
        high = [take_n1(lab, "take-n1-grace30")]

        # Meanwhile, the same export uninterrupted, in a plain process.
        uninterrupted = subprocess.Popen(
            [sys.executable, "-m", "amodal.launch", str(REPO / "jobs" / "export.toml"), "--cluster", "debug",
             "--set", "export.checkpoint=runs/model-uninterrupted", *export_sets],
            cwd=lab.root, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_until(f"job {job} to resume and train", lambda: len(events(run, "start")) == 2 and trained(run, 3),
                   240, log=job_log(run))
        sh("scontrol", "update", "PartitionName=gpu", "GraceTime=0")
        high.append(take_n1(lab, "take-n1-grace0"))
        assert wait_done(job, run, 300) == "COMPLETED"
        assert wait_done(export, export_run, 240) == "COMPLETED"
    finally:
        sh("scontrol", "update", "PartitionName=cpu", f"GraceTime={old['cpu']}", check=False)
        sh("scontrol", "update", "PartitionName=gpu", f"GraceTime={old['gpu']}", check=False)
    assert [final_state(h) for h in high] == ["COMPLETED", "COMPLETED"]

    # The training job: requeued by itself (sacct: REQUEUED), then by Slurm (PREEMPTED).
    log = job_log(run).read_text()
    runs = runs_of(job)
    assert [r["State"] for r in runs] == ["REQUEUED", "PREEMPTED", "COMPLETED"], (runs, log[-3000:])
    record = read_requeues(run)
    assert record["counts"] == dict(NO_INTERRUPTIONS, preemption=2), record
    first, second = record["interruptions"]
    one = assert_no_work_lost(first, "preemption", ["SIGUSR2"], "job")
    two = assert_no_work_lost(second, "preemption", ["SIGTERM", "SIGUSR2"], "slurm")
    assert "requeueing after preemption (preemption 1)" in log, log[-3000:]
    assert "Slurm is requeuing the job itself (preempted; SIGTERM, SIGUSR2)" in log, log[-3000:]
    for step in (one, two):
        assert f"resuming from {run}/checkpoints/step-{step:08d}.pt at step {step}/" in log, log[-3000:]
    assert [e["step"] for e in events(run, "start")] == [0, one, two]
    assert_clean_log(run, log)
    gaps = [b["Start"] - a["End"] for a, b in zip(runs, runs[1:])]
    print(f"preempted at steps {one} (GraceTime 30) and {two} (GraceTime 0); started again after {gaps} s")
    assert all(cred_expire() - 2 <= g <= cred_expire() + 40 for g in gaps), runs
    out = subprocess.run([sys.executable, "-m", "amodal.status", str(run)], capture_output=True, text=True, env=ENV,
                         timeout=120).stdout
    assert "wall time 0, preemption 2, node failure 0, requeue by hand 0, scancel 0" in out, out
    assert f"  2. preemption (SIGTERM, SIGUSR2): stopped at step {two}, saved at step {two}; resumed at step {two}, " \
           "0 steps redone" in out, out
    assert_same_weights(final_weights(run, REAL_STEPS), lab.reference_weights("real", REAL_STEPS), f"job {job}")

    # The export job: requeued on USR2, started again, and the same leaderboard file. When it is still
    # predicting at the second preemption (a slow machine), that one is Slurm's requeue.
    export_states = [r["State"] for r in runs_of(export)]
    export_log = job_log(export_run).read_text()
    assert export_states[0] == "REQUEUED" and export_states[-1] == "COMPLETED", (export_states, export_log[-3000:])
    assert export_states[1:-1] in ([], ["PREEMPTED"]), export_states
    assert "requeueing after preemption (preemption 1)" in export_log, export_log[-3000:]
    assert read_requeues(export_run)["counts"] == dict(NO_INTERRUPTIONS, preemption=len(export_states) - 1)
    assert "Traceback" not in export_log, export_log[-3000:]
    out, _ = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, out
    keys, labels = read_submission(export_run / "test.lmdb.tar.gz")
    same_keys, same_labels = read_submission(lab.root / "runs" / "model-uninterrupted" / "export" / "test.lmdb.tar.gz")
    assert keys == same_keys and len(keys) == 64 and np.array_equal(labels, same_labels)


@pytest.mark.timeout(300)
def test_scancel_ends_the_job_without_requeue(lab):
    # With a loader worker: Slurm signals every process of the step, the workers too.
    job, run = lab.train("cancelled", 5000, "--exclude", "n1", "--set", "data.num_workers=1")
    wait_until(f"job {job} to save a checkpoint", lambda: events(run, "checkpoint"), 180, log=job_log(run))
    sh("scancel", job)
    assert wait_done(job, run, 120) == "CANCELLED"
    time.sleep(2)
    assert not sh("squeue", "-h", "-j", job, check=False).strip(), "a cancelled job came back"
    assert [r["State"] for r in runs_of(job)] == ["CANCELLED"]
    log = job_log(run).read_text()
    assert "stopped by SIGTERM (scancel): not requeued" in log, log[-3000:]
    assert read_requeues(run)["counts"] == dict(NO_INTERRUPTIONS, cancel=1)
    stopped = int(re.search(r"interrupted at step (\d+) \(SIGTERM\)", log).group(1))
    step, path = list_checkpoints(run)[-1]
    state = load_checkpoint(path)  # torch.load(weights_only=True)
    assert step == stopped == state["step"] and state["model"]


@pytest.mark.timeout(300)
def test_ddp_two_nodes_and_two_ranks_on_one_node(lab):
    jobs = {"two-nodes": lab.train("ddp-2nodes", SMALL_STEPS, "--nodes", "2", "--tasks-per-node", "1"),
            "one-node": lab.train("ddp-1node", SMALL_STEPS, "--tasks-per-node", "2")}
    digests = {}
    for layout, (job, run) in jobs.items():
        assert wait_done(job, run, 240) == "COMPLETED", job_log(run).read_text()[-3000:]
        nodes = runs_of(job)[-1]["NodeList"]
        assert nodes == "n[1-2]" if layout == "two-nodes" else nodes in ("n1", "n2"), nodes
        assert events(run, "start")[-1]["world_size"] == 2
        per_rank = []
        for task in (0, 1):
            m = re.search(rf"rank {task}: finished at step {SMALL_STEPS}, weights sha256 ([0-9a-f]{{64}})",
                          job_log(run, task).read_text())
            assert m, job_log(run, task).read_text()[-3000:]
            per_rank.append(m.group(1))
        assert per_rank[0] == per_rank[1], f"{layout}: the ranks' weights differ"
        digests[layout] = per_rank[0]
    assert digests["two-nodes"] == digests["one-node"]  # the same math, whatever the layout


@pytest.fixture(scope="module")
def sweep(lab) -> tuple[str, list[Path], str]:
    """jobs/sweep_example.toml (two learning rates) as one array, finished: (array id, run folders, output)."""
    ids, out = lab.launch(str(REPO / "jobs" / "sweep_example.toml"), *RESOURCES, *tiny(lab.shards, SMALL_STEPS))
    runs = [Path(p) for p in re.findall(r"run folder: (\S+)", out)]
    for job, run in zip(ids, runs):
        assert wait_done(job, run, 240) == "COMPLETED", job_log(run).read_text()[-3000:]
    return ids[0].split("_")[0], runs, out


@pytest.mark.timeout(300)
def test_sweep_is_one_array_job(lab, sweep):
    array, runs, out = sweep
    assert f"array job {array}: 2 elements" in out
    rows = dict(line.split("|") for line in sh("sacct", "-n", "-X", "-P", "-j", array, "-o", "JobID,State").split())
    assert rows == {f"{array}_0": "COMPLETED", f"{array}_1": "COMPLETED"}
    assert [r.parent for r in runs] == [lab.root / "runs" / "sweep_example"] * 2 and runs[0] != runs[1]
    lrs = set()
    for i, run in enumerate(runs):
        assert json.loads((run / "job.json").read_text())["job_id"] == f"{array}_{i}"
        assert list_checkpoints(run)[-1][0] == SMALL_STEPS
        lrs.add(json.loads((run / "config.json").read_text())["optim"]["lr"])
    assert lrs == {1e-3, 3e-3}


@pytest.mark.timeout(420)
def test_retrain_then_export_after_it_then_check(lab, sweep):
    chosen = sweep[1][0]
    (retrain,), _ = lab.launch(str(REPO / "jobs" / "retrain_full.toml"), "--name", "retrain", *RESOURCES,
                               "--hours", "0.25", "--set", f"from_run={chosen}", "--set", "tracking.wandb=off")
    (export,), out = lab.launch(str(REPO / "jobs" / "export.toml"), *RESOURCES, "--after", retrain,
                                "--set", "export.checkpoint=runs/retrain", "--set", "export.batch_size=8")
    retrain_run = lab.root / "runs" / "retrain"
    export_run = retrain_run / "export"
    assert f"run folder: {export_run}" in out
    assert wait_done(retrain, retrain_run, 240) == "COMPLETED", job_log(retrain_run).read_text()[-3000:]
    assert wait_done(export, export_run, 240) == "COMPLETED", job_log(export_run).read_text()[-3000:]
    assert runs_of(export)[0]["Start"] >= runs_of(retrain)[0]["End"]  # --after: it waited

    config = json.loads((retrain_run / "config.json").read_text())
    assert config["data"]["train_splits"] == ["train", "val"] and config["train"]["val_every"] == 0
    assert config["train"]["steps"] == SMALL_STEPS and config["optim"]["lr"] == 1e-3  # the chosen run's recipe
    assert list_checkpoints(retrain_run)[-1][0] == SMALL_STEPS
    result = export_run / "test.lmdb.tar.gz"
    assert f"leaderboard file: {result}" in job_log(export_run).read_text()
    check = subprocess.run([sys.executable, str(REPO / "tools" / "make_submission.py"), "--check", str(result),
                            "--test-shards", str(lab.shards)], capture_output=True, text=True, env=ENV, timeout=120)
    assert check.returncode == 0 and check.stdout.startswith("OK "), check.stdout + check.stderr
    text = status.describe(export_run)
    assert f"job        {export} on Slurm: COMPLETED" in text and f"output     {result}: " in text


@pytest.mark.timeout(600)
def test_walltime_requeues_and_resumes_bitwise(lab, background):
    """Started by `background`: a 1-minute job with more work than a minute is signalled (USR2), saves,
    requeues itself under the same job id (at most slurm.max_walltime_requeues times), resumes, and
    ends with bitwise the weights of the uninterrupted reference run."""
    job, run, steps = background["walltime"]
    assert wait_done(job, run, 540) == "COMPLETED", job_log(run).read_text()[-3000:]
    runs = runs_of(job)
    states = [r["State"] for r in runs]
    assert len(runs) >= 2, (f"job {job} finished within its first 1-minute run: this machine is faster than the "
                            f"test measured; raise WALL_WORK_S ({WALL_WORK_S})")
    assert set(states[:-1]) == {"REQUEUED"} and states[-1] == "COMPLETED", runs
    counts = read_requeues(run)["counts"]
    assert counts == dict(NO_INTERRUPTIONS, walltime=len(runs) - 1), (counts, runs)
    log = job_log(run).read_text()
    assert "requeueing after the wall-time signal (walltime 1)" in log, log[-3000:]
    assert re.search(r"resuming from \S+step-\d+\.pt at step [1-9]\d*/", log), log[-3000:]
    gaps = [b["Start"] - a["End"] for a, b in zip(runs, runs[1:])]
    lengths = [r["End"] - r["Start"] for r in runs]
    print(f"wall time: {len(runs)} runs of {lengths} s, started again after {gaps} s")
    assert all(cred_expire() - 2 <= g <= cred_expire() + 40 for g in gaps), gaps
    assert all(length <= 60 + 30 + 15 for length in lengths)  # the limit (+ Slurm's check interval + KillWait)
    out = subprocess.run([sys.executable, "-m", "amodal.status", str(run)], capture_output=True, text=True, env=ENV,
                         timeout=120).stdout
    assert f"job        {job} on Slurm: COMPLETED" in out and f"wall time {counts['walltime']}, preemption 0" in out
    assert f"checkpoint step {steps} of {steps}" in out and "last       done" in out
    assert_same_weights(final_weights(run, steps), lab.reference_weights("walltime", steps), f"job {job}")


@pytest.mark.timeout(420)
def test_node_failure_requeues_the_job_on_the_other_node(lab):
    """The job's node goes DOWN (scontrol): Slurm requeues the job (sacct: NODE_FAIL) and signals it with
    SIGTERM; the job saves the step it is at, and comes back on the other node, there resumes at that step,
    and ends with the uninterrupted run's weights. Its next start reads from Slurm's accounting that it
    was a node failure. Last in the file: the cluster is quiet, so the job starts on the first node.

    With ReturnToService=2 a node set DOWN whose slurmd still answers is back in service at once, so the
    node is also drained, as an administrator keeps a failed node out until it is repaired."""
    job, run = lab.train_real("node-failure")
    wait_until(f"job {job} to train", lambda: trained(run, 3), 240, log=job_log(run))
    node = runs_of(job)[-1]["NodeList"]
    other = {"n1": "n2", "n2": "n1"}[node]
    try:
        sh("scontrol", "update", f"NodeName={node}", "State=DOWN", "Reason=amodal-test-node-failure")
        sh("scontrol", "update", f"NodeName={node}", "State=DRAIN", "Reason=amodal-test-node-failure")
        wait_until(f"job {job} to start on {other}",
                   lambda: sh("squeue", "-h", "-j", job, "-t", "R", "-o", "%N", check=False).strip() == other, 180,
                   log=job_log(run))
    finally:
        sh("scontrol", "update", f"NodeName={node}", "State=RESUME", check=False)
    assert wait_done(job, run, 300) == "COMPLETED"
    log = job_log(run).read_text()
    runs = runs_of(job)
    assert [(r["State"], r["NodeList"]) for r in runs] == [("NODE_FAIL", node), ("COMPLETED", other)], runs
    record = read_requeues(run)
    assert record["counts"] == dict(NO_INTERRUPTIONS, node_failure=1), record
    step = assert_no_work_lost(record["interruptions"][0], "node_failure", ["SIGTERM"], "slurm")
    assert "Slurm is requeuing the job itself (requeued by hand or a node failure" in log, log[-3000:]
    assert f"restart 1 after node failure: resumed at step {step}, 0 steps trained again" in log, log[-3000:]
    assert_clean_log(run, log)
    assert_same_weights(final_weights(run, REAL_STEPS), lab.reference_weights("real", REAL_STEPS), f"job {job}")
