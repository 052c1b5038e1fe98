"""Process group set-up: one process per device, from whatever launched us.

Sources, first match wins:
1. torchrun (or anything that sets RANK and WORLD_SIZE, MASTER_ADDR and MASTER_PORT),
2. a submitit job (SUBMITIT_EXECUTOR set: submitit.JobEnvironment gives ranks and hosts),
3. plain Slurm tasks started by srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST),
4. a single process.
For 2 and 3 the master is the first node of the job (`scontrol show hostnames`) and the port is
derived from the job id, so every task of a job (and of its requeued runs) finds the same rendezvous.
MASTER_ADDR / MASTER_PORT in the environment win over the derived ones.

Backend: NCCL when the ranks use GPUs, gloo on CPU. Each rank uses one device, cuda:<local rank>.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from amodal import slurm


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    source: str = "single"  # torchrun | submitit | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        if default is None:
            raise RuntimeError(f"environment variable {name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def slurm_hostnames(nodelist: str) -> list[str]:
    """Expand a Slurm node list ('n[1-3],gpu7') with `scontrol show hostnames`, which knows every
    syntax; where scontrol is not installed, our own expansion of the common one (prefix[ranges]suffix,
    zero padding kept). submitit's parser would do, but it is private."""
    hosts = slurm.hostnames(nodelist)
    if hosts:
        return hosts
    hosts = []
    for prefix, ranges, suffix in re.findall(r"([^,\[]*)(?:\[([^\]]*)\])?([^,\[]*)", nodelist):
        if not ranges:
            if prefix + suffix:
                hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            for i in range(int(first), int(last or first) + 1):
                hosts.append(f"{prefix}{i:0{len(first)}d}{suffix}")
    return hosts


def port_from_job_id(job_id: str) -> int:
    """A port in [20000, 60000) that every task of the job derives alike (the digits of the job id;
    an array element has its own SLURM_JOB_ID, so array elements on one node do not collide)."""
    digits = "".join(c for c in str(job_id) if c.isdigit()) or "0"
    return 20000 + int(digits) % 40000


def _describe_environment() -> tuple[str, int, int, int, str | None, int | None]:
    """(source, rank, world_size, local_rank, master_addr, master_port) from the environment."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _env_int("WORLD_SIZE")
        addr = env.get("MASTER_ADDR")
        port = env.get("MASTER_PORT")
        if world > 1 and (not addr or not port):
            raise RuntimeError("RANK and WORLD_SIZE are set but MASTER_ADDR or MASTER_PORT is not")
        return ("torchrun", _env_int("RANK"), world, _env_int("LOCAL_RANK", 0), addr,
                int(port) if port else None)
    if env.get("SUBMITIT_EXECUTOR"):
        import submitit

        job = submitit.JobEnvironment()
        hosts = list(job.hostnames)
        addr = env.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1")
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else port_from_job_id(job.job_id)
        return "submitit", job.global_rank, job.num_tasks, job.local_rank, addr, port
    if "SLURM_PROCID" in env and _env_int("SLURM_NTASKS", 1) > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
        addr = env.get("MASTER_ADDR") or (slurm_hostnames(nodelist)[0] if nodelist else "127.0.0.1")
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else port_from_job_id(env.get("SLURM_JOB_ID", "0"))
        return ("slurm", _env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS"), _env_int("SLURM_LOCALID", 0), addr, port)
    return "single", 0, 1, 0, None, None


def pick_device(local_rank: int, device: str = "auto") -> torch.device:
    """cuda:<local rank> when CUDA is there (and not refused), else the CPU."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"train.device: {device!r} is not one of auto, cpu, cuda")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    # Where the launcher already narrowed CUDA_VISIBLE_DEVICES to one GPU per task, index 0 is ours.
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Join (or reuse) the process group described by the environment; returns this rank's DistInfo."""
    source, rank, world, local_rank, addr, port = _describe_environment()
    dev = pick_device(local_rank, device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {}
        if backend == "nccl":
            kwargs["device_id"] = dev  # binds the communicator to our GPU at once
        # Under torchrun, env:// lets the ranks use the agent's store (TORCHELASTIC_USE_AGENT_STORE);
        # elsewhere rank 0 hosts the store at the derived address.
        init_method = "env://" if source == "torchrun" else f"tcp://{addr}:{port}"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs)
    elif dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev, source=source)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def cleanup() -> None:
    """Leave the process group (the next init_distributed starts a fresh one)."""
    if dist.is_initialized():
        dist.destroy_process_group()
