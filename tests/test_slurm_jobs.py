"""The launcher's jobs on the project's real two-node Slurm cluster (slurm/local-cluster.sh), issue 5:
wall time, preemption with and without a grace time, scancel, DDP over two nodes and on one node, a
sweep as one job array, and retrain -> export -> leaderboard-file check.

They never skip: a stopped cluster is a failure that says how to start it. They change the partitions'
GraceTime for a moment and take node n1 with a high-priority job, so run them alone (not next to
tests/test_cluster.py). To save time the slow jobs run side by side: the wall-time job and the
uninterrupted reference runs start when the module does (fixture `background`) and are checked last;
the wall-time job and the scancel job stay on n2 (--exclude n1), the preempted jobs on n1.
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

import pytest
import torch

from amodal import status
from amodal.checkpoint import list_checkpoints, load_checkpoint
from amodal.jobs import KINDS, read_requeues
from conftest import sh, wait_until

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "slurm" / "local-cluster.sh"
START_HINT = f"start the cluster first: `bash {SCRIPT.relative_to(REPO)} up` (as root)"
SMOKE = str(REPO / "jobs" / "smoke.toml")
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
WALL_WORK_S = 65  # seconds of training at full speed for the wall-time job: more than a run of a 1-minute job
PREEMPT_STEPS = 300  # enough that Slurm preempts the jobs before they finish, on a quiet machine too
SMALL_STEPS = 30
RESOURCES = ["--gpus-per-node", "0", "--cpus-per-task", "1"]
NO_INTERRUPTIONS = dict.fromkeys(KINDS, 0)


def tiny(shards: Path, steps: int) -> list[str]:
    """--set overrides that make jobs/smoke.toml a tiny CPU run on the session's shards."""
    sets = {"data.root": shards, "data.make_synthetic": "false", "model.base_channels": 8, "data.input_size": 32,
            "train.global_batch": 4, "data.num_workers": 0, "train.val_every": 0, "tracking.wandb": "off",
            "train.steps": steps, "checkpoint.every_steps": 25, "train.log_every": 10}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


class Lab:
    """A work folder on the cluster's shared file system (this machine), the launcher, and waiting."""

    def __init__(self, root: Path, shards: Path):
        self.root, self.shards = root, shards
        self.jobs: list[str] = []
        self.references: dict[int, subprocess.Popen] = {}

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

    def start_reference(self, steps: int) -> None:
        """The same recipe, uninterrupted, in a plain process outside Slurm."""
        run = self.root / f"reference-{steps}"
        self.references[steps] = subprocess.Popen(
            [sys.executable, "-m", "amodal.train", SMOKE, "--run-dir", str(run), *tiny(self.shards, steps)],
            cwd=self.root, env=ENV, stdout=open(self.root / f"reference-{steps}.log", "w"), stderr=subprocess.STDOUT)

    def reference_weights(self, steps: int) -> dict:
        proc = self.references[steps]
        assert proc.wait(timeout=600) == 0, (self.root / f"reference-{steps}.log").read_text()[-3000:]
        return final_weights(self.root / f"reference-{steps}", steps)


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
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == kind:
            found.append(record)
    return found


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
    speed of the preemption test's reference run, measured here: WALL_WORK_S seconds of its steps.
    """
    lab.start_reference(PREEMPT_STEPS)
    log = lab.root / f"reference-{PREEMPT_STEPS}"
    first, second = wait_until("the reference run's first steps", lambda: events(log, "train")[1:] and
                               events(log, "train")[:2], 180)  # the second window: warm
    seconds_per_step = second["seconds"] / (second["step"] - first["step"])
    wall_steps = max(200, round(WALL_WORK_S / seconds_per_step))
    print(f"\nreference: {seconds_per_step:.3f} s/step; the wall-time job trains {wall_steps} steps")
    lab.start_reference(wall_steps)
    job, run = lab.train("walltime", wall_steps, "--hours", str(1 / 60), "--set", "slurm.signal_delay_s=5",
                         "--exclude", "n1")
    return {"walltime": (job, run, wall_steps)}


# --------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.timeout(420)
def test_preemption_with_and_without_grace_time(lab):
    """Both jobs on n1: `cpu` with GraceTime=30 (USR2 first: the job saves and requeues itself), `gpu`
    with GraceTime=0 (USR2 and SIGTERM together: the job saves within KillWait and Slurm requeues it).
    A high-priority job takes n1; both come back under their job ids and end with the weights of an
    uninterrupted run."""
    old = {p: grace_time(p) for p in ("cpu", "gpu")}
    try:
        sh("bash", str(SCRIPT), "set-grace", "30")
        sh("scontrol", "update", "PartitionName=gpu", "GraceTime=0")
        jobs = {grace: lab.train(f"preempt-grace{grace}", PREEMPT_STEPS, "--partition", partition, "--exclude", "n2")
                for grace, partition in ((30, "cpu"), (0, "gpu"))}
        for job, run in jobs.values():
            wait_until(f"job {job} to train", lambda: any(e["step"] >= 10 for e in events(run, "train")), 180,
                       log=job_log(run))
        high = sh("sbatch", "--parsable", "-p", "high", "-w", "n1", "--exclusive", "-J", "take-n1",
                  "-o", str(lab.root / "high.out"), "--wrap", "sleep 5").strip()
        lab.jobs.append(high)
        for job, run in jobs.values():
            assert wait_done(job, run, 300) == "COMPLETED"
    finally:
        sh("scontrol", "update", "PartitionName=cpu", f"GraceTime={old['cpu']}", check=False)
        sh("scontrol", "update", "PartitionName=gpu", f"GraceTime={old['gpu']}", check=False)
    assert final_state(high) == "COMPLETED"
    reference = lab.reference_weights(PREEMPT_STEPS)
    for grace, (job, run) in jobs.items():
        log = job_log(run).read_text()
        runs = runs_of(job)
        # With a grace time the job requeued itself (sacct: REQUEUED); without one Slurm did (PREEMPTED).
        assert [r["State"] for r in runs] == ["REQUEUED" if grace else "PREEMPTED", "COMPLETED"], (runs, log[-3000:])
        assert read_requeues(run)["counts"] == dict(NO_INTERRUPTIONS, preemption=1)
        assert ("requeueing after preemption" if grace else "Slurm requeues the job") in log, log[-3000:]
        stopped = re.search(r"interrupted at step (\d+) \((.*?)\)", log)
        assert stopped and stopped.group(2) == ("SIGUSR2" if grace else "SIGTERM, SIGUSR2"), log[-3000:]
        assert f"resuming from {run}/checkpoints/step-{int(stopped.group(1)):08d}.pt" in log
        held = runs[1]["Start"] - runs[0]["End"]
        print(f"grace {grace}: stopped at step {stopped.group(1)}, started again {held:.0f} s after the requeue")
        assert cred_expire() - 2 <= held <= cred_expire() + 40, runs
        assert_same_weights(final_weights(run, PREEMPT_STEPS), reference, f"job {job} (GraceTime={grace})")


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
    assert_same_weights(final_weights(run, steps), lab.reference_weights(steps), f"job {job}")
