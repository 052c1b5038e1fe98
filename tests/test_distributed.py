"""amodal.distributed: where ranks come from (torchrun, submitit, Slurm, alone) and real gloo groups."""

import json
import subprocess
import sys

import pytest
import torch

from amodal import distributed as d
from test_train_support import REPO, base_env, free_port

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SUBMITIT_EXECUTOR",
               "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_JOB_NODELIST",
               "SLURM_NODELIST", "SLURM_STEP_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_NODEID",
               "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")


@pytest.fixture
def clean_env(monkeypatch):
    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def slurm_vars(rank: int, ntasks: int, job_id: int, nodelist: str = "localhost") -> dict:
    return {"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(ntasks), "SLURM_LOCALID": str(rank),
            "SLURM_JOB_ID": str(job_id), "SLURM_JOB_NODELIST": nodelist, "SLURM_JOB_NUM_NODES": "1",
            "SLURM_NODEID": "0"}


def test_single_process(clean_env):
    assert d._describe_environment() == ("single", 0, 1, 0, None, None)
    info = d.init_distributed("cpu")
    assert (info.rank, info.world_size, info.device.type, info.source) == (0, 1, "cpu", "single")
    assert info.is_main
    d.barrier()  # a no-op alone
    d.cleanup()


def test_torchrun_variables(clean_env):
    clean_env.setenv("RANK", "1")
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("LOCAL_RANK", "1")
    with pytest.raises(RuntimeError, match="MASTER_ADDR or MASTER_PORT"):
        d._describe_environment()
    clean_env.setenv("MASTER_ADDR", "node7")
    clean_env.setenv("MASTER_PORT", "29400")
    assert d._describe_environment() == ("torchrun", 1, 2, 1, "node7", 29400)
    clean_env.setenv("RANK", "one")
    with pytest.raises(RuntimeError, match="RANK='one' is not an integer"):
        d._describe_environment()


def test_slurm_variables(clean_env):
    for key, value in slurm_vars(3, 4, 4242, "n[7-8]").items():
        clean_env.setenv(key, value)
    clean_env.setenv("SLURM_LOCALID", "1")
    # The first node of the job is the master; the port follows from the job id.
    assert d._describe_environment() == ("slurm", 3, 4, 1, "n7", 24242)
    clean_env.setenv("MASTER_PORT", "29500")
    assert d._describe_environment()[5] == 29500
    # One Slurm task alone (a batch script without srun) is a single process.
    clean_env.setenv("SLURM_NTASKS", "1")
    assert d._describe_environment()[0] == "single"


def test_slurm_hostnames(clean_env, tmp_path):
    assert d.slurm_hostnames("n[1-3],gpu7") == ["n1", "n2", "n3", "gpu7"]
    clean_env.setenv("PATH", str(tmp_path))  # no scontrol: submitit's parser
    assert d.slurm_hostnames("n[1-3],gpu7") == ["n1", "n2", "n3", "gpu7"]


def test_port_from_job_id():
    assert d.port_from_job_id("123") == 20123
    assert d.port_from_job_id("77_3") == 20773  # an array element
    assert all(20000 <= d.port_from_job_id(str(j)) < 60000 for j in (0, 39999, 40000, 10**9))


def test_submitit_environment(clean_env):
    for key, value in slurm_vars(1, 2, 5151, "n[3-4]").items():
        clean_env.setenv(key, value)
    clean_env.setenv("SUBMITIT_EXECUTOR", "slurm")
    assert d._describe_environment() == ("submitit", 1, 2, 1, "n3", 25151)


def test_device_choice():
    assert d.pick_device(0, "cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="train.device"):
        d.pick_device(0, "tpu")
    if not torch.cuda.is_available():
        assert d.pick_device(1, "auto") == torch.device("cpu")
        with pytest.raises(RuntimeError, match="no CUDA device"):
            d.pick_device(0, "cuda")


GROUP_SCRIPT = """
import json, torch, torch.distributed as dist
from amodal.distributed import init_distributed, barrier, cleanup
info = init_distributed("cpu")
t = torch.tensor([info.rank + 1.0])
dist.all_reduce(t)
barrier()
print(json.dumps({"source": info.source, "rank": info.rank, "world": info.world_size,
                  "backend": dist.get_backend(), "sum": t.item(), "main": info.is_main}))
cleanup()
"""


@pytest.mark.slow
@pytest.mark.parametrize("source", ["slurm", "submitit"])
def test_real_process_group_from_slurm_variables(source):
    # Two processes as srun would start them: only Slurm's variables, no MASTER_ADDR/PORT. The
    # rendezvous is the first node of SLURM_JOB_NODELIST and the port derived from the job id.
    port = free_port()
    while port >= 60000:
        port = free_port()
    job_id = port - 20000
    procs = []
    for rank in range(2):
        env = base_env(**slurm_vars(rank, 2, job_id))
        if source == "submitit":
            env["SUBMITIT_EXECUTOR"] = "slurm"
        procs.append(subprocess.Popen([sys.executable, "-c", GROUP_SCRIPT], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["source"] == source and r["world"] == 2 and r["backend"] == "gloo" for r in results)
    assert all(r["sum"] == 3.0 for r in results)  # 1 + 2: the ranks really talked
    assert [r["main"] for r in results] == [True, False]
