"""Smoke tests of the project's local Slurm cluster (slurm/local-cluster.sh): real sbatch, srun,
preemption and sacct. They never skip: a missing or stopped cluster is a failure that says how to
start it (`bash slurm/local-cluster.sh up`, as root)."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import sh, wait_until

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "slurm" / "local-cluster.sh"
START_HINT = f"start the cluster first: `bash {SCRIPT.relative_to(REPO)} up` (as root)"


@pytest.fixture(scope="module")
def cluster() -> None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        pytest.fail(f"Slurm commands not found: {START_HINT}")
    r = subprocess.run(["sinfo", "-h", "-N", "-p", "cpu", "-o", "%N %t"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.fail(f"sinfo does not answer ({r.stderr.strip()}): {START_HINT}")
    states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
    for node in ("n1", "n2"):
        if not re.fullmatch(r"(idle|mix|alloc|comp)", states.get(node, "missing")):
            pytest.fail(f"node {node} is {states.get(node, 'missing')}: {START_HINT}")


def sbatch(*args: str, script: str) -> str:
    """Submit a batch script given as text; return the job id."""
    r = subprocess.run(["sbatch", "--parsable", *args], input=script, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"sbatch {' '.join(args)} failed: {r.stderr.strip()}"
    return r.stdout.strip().split(";")[0]


def job_info(job: str) -> dict[str, str]:
    """`scontrol show job` as a dict (empty once the controller forgot the job)."""
    r = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return {}
    return dict(tok.split("=", 1) for tok in r.stdout.split() if "=" in tok)


def wait_state(job: str, states: set[str], timeout: float) -> dict[str, str]:
    return wait_until(f"job {job} in {sorted(states)}", lambda: (i := job_info(job)).get("JobState") in states and i, timeout)


def sacct_state(job: str) -> str:
    """'STATE|EXITCODE' of the job's latest run according to the accounting database."""
    out = sh("sacct", "-n", "-X", "-P", "-j", job, "-o", "State,ExitCode", check=False)
    return out.strip().splitlines()[-1] if out.strip() else ""


def grace_time(partition: str) -> int:
    out = sh("scontrol", "-o", "show", "partition", partition)
    return int(re.search(r"GraceTime=(\d+)", out).group(1))


def set_grace(seconds: int) -> None:
    sh("bash", str(SCRIPT), "set-grace", str(seconds))
    assert grace_time("cpu") == seconds and grace_time("gpu") == seconds


def cred_expire() -> int:
    m = re.search(r"cred_expire=(\d+)", sh("scontrol", "show", "config"))
    return int(m.group(1)) if m else 120  # Slurm's default


@pytest.mark.timeout(60)
def test_status_says_up(cluster):
    out = sh("bash", str(SCRIPT), "status")
    assert "is up" in out and "sacct answers" in out, out


@pytest.mark.timeout(180)
def test_batch_job_runs_on_each_node(cluster, tmp_path):
    jobs = {}
    for node in ("n1", "n2"):
        jobs[node] = sbatch("-w", node, "-J", f"smoke-{node}", "-o", str(tmp_path / f"{node}.out"),
                            script="#!/bin/bash\necho \"$SLURMD_NODENAME $SLURM_JOB_NODELIST $SLURM_JOB_PARTITION\"\n")
    for node, job in jobs.items():
        wait_until(f"job {job} to finish", lambda: sacct_state(job).startswith(("COMPLETED", "FAILED", "CANCELLED")), 120)
        assert sacct_state(job) == "COMPLETED|0:0"
        assert (tmp_path / f"{node}.out").read_text().split() == [node, node, "cpu"]


@pytest.mark.timeout(180)
def test_two_node_job_one_task_per_node(cluster, tmp_path):
    out = tmp_path / "ranks.out"
    script = (
        "#!/bin/bash\n"
        "srun bash -c 'echo $SLURM_NODEID $SLURM_PROCID $SLURM_NTASKS $SLURMD_NODENAME "
        "$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1)'\n"
    )
    job = sbatch("-N", "2", "--ntasks-per-node=1", "-J", "smoke-2node", "-o", str(out), script=script)
    wait_until(f"job {job} to finish", lambda: sacct_state(job).startswith(("COMPLETED", "FAILED", "CANCELLED")), 120)
    assert sacct_state(job) == "COMPLETED|0:0", out.read_text() if out.exists() else "no output"
    rows = sorted(line.split() for line in out.read_text().splitlines() if line.strip())
    assert rows == [["0", "0", "2", "n1", "n1"], ["1", "1", "2", "n2", "n1"]], rows
    # Rank 0's node name is the rendezvous address of multi-node jobs: it must resolve.
    assert socket.gethostbyname("n1") == "127.0.0.1"


# The low-priority job records every signal it gets (with the time) and exits on SIGTERM, so the
# preemption does not wait for KillWait. The time is bash's own $EPOCHREALTIME: a `date` child would
# get Slurm's signals too and, killed, leave a line without its time. `--signal=B:USR2@60` names the user signal (for the batch
# shell); preempt_send_user_signal makes Slurm send it when preemption starts.
LOW_JOB = """#!/bin/bash
F={log}
trap 'echo USR2 $EPOCHREALTIME >> $F' USR2
trap 'echo TERM $EPOCHREALTIME >> $F; exit 0' TERM
echo start ${{SLURM_RESTART_COUNT:-0}} $EPOCHREALTIME >> $F
while true; do sleep 1 & wait $!; done
"""


def signal_log(path: Path) -> list[tuple[str, str]]:
    if not path.exists():
        return []
    return [tuple(line.split()[:2]) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("grace", [5, 0])
def test_preemption_signals_and_requeues(cluster, tmp_path, grace):
    log = tmp_path / "signals.txt"
    old_grace = grace_time("cpu")
    set_grace(grace)
    low = high = None
    try:
        low = sbatch("-p", "cpu", "-w", "n1", "--exclusive", "--requeue", "--time=10", "--signal=B:USR2@60",
                     "-J", "smoke-low", "-o", str(tmp_path / "low.out"), script=LOW_JOB.format(log=log))
        wait_until(f"low job {low} to start", lambda: ("start", "0") in signal_log(log), 120)

        high = sbatch("-p", "high", "-w", "n1", "--exclusive", "-J", "smoke-high", "-o", str(tmp_path / "high.out"),
                      script="#!/bin/bash\nsleep 1\n")
        wait_until("USR2 in the preempted job", lambda: any(s == "USR2" for s, _ in signal_log(log)), 60)
        # SIGTERM follows GraceTime later, at the controller's next periodic check (every ~30 s).
        wait_until("SIGTERM in the preempted job", lambda: any(s == "TERM" for s, _ in signal_log(log)), grace + 60)
        info = wait_state(low, {"PENDING"}, 60)

        times = {s: float(t) for s, t in signal_log(log) if s in ("USR2", "TERM")}
        gap = times["TERM"] - times["USR2"]
        if grace:
            assert gap >= grace - 1, f"SIGTERM only {gap:.1f} s after USR2 with GraceTime={grace}"
        else:
            assert gap < 3, f"with GraceTime=0, USR2 and SIGTERM should arrive together; gap {gap:.1f} s"

        # Requeued under the same id, held until the credential lifetime has passed.
        assert int(info["Restarts"]) >= 1, info
        assert info["Reason"] == "BeginTime", info
        fmt = "%Y-%m-%dT%H:%M:%S"
        hold = time.mktime(time.strptime(info["EligibleTime"], fmt)) - time.mktime(time.strptime(info["SubmitTime"], fmt))
        assert cred_expire() <= hold <= cred_expire() + 5, f"requeued job held {hold:.0f} s, cred_expire={cred_expire()}"
        wait_until(f"high job {high} to finish", lambda: sacct_state(high) == "COMPLETED|0:0", 60)
        out = sh("sacct", "-n", "-D", "-X", "-P", "-j", low, "-o", "State")
        assert "PREEMPTED" in out.split(), f"sacct -D for job {low}: {out!r}"
    finally:
        for job in (low, high):
            if job:
                sh("scancel", job, check=False)
        set_grace(old_grace)


@pytest.mark.timeout(120)
def test_sacct_reports_finished_job(cluster, tmp_path):
    job = sbatch("-J", "smoke-exit3", "-o", str(tmp_path / "exit3.out"), script="#!/bin/bash\nexit 3\n")
    # Accounting lags the controller by a moment: poll.
    assert wait_until(f"sacct to report job {job}", lambda: sacct_state(job) == "FAILED|3:0" and sacct_state(job), 60)
