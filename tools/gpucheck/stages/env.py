"""Stage 1: the card, driver, CUDA, cuDNN, NCCL, torch, the packages, the project's commit."""

from __future__ import annotations

import platform
import sys

from gpucheck.machine import cores, cpu_model, meminfo, nvidia_smi, project_commit
from gpucheck.state import Check, Result


def stage_env(check: Check, res: Result) -> None:
    import importlib.metadata as md

    import torch

    rows = res.table("Machine and software", ["what", "value"])
    cuda = check.cuda
    card = "cpu"
    if cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda, but torch.cuda.is_available() is False")
        props = torch.cuda.get_device_properties(0)
        card = props.name
        res.add(rows, "card", f"{props.name} ({props.total_memory / 2**30:.0f} GiB, compute capability "
                              f"{props.major}.{props.minor}, {props.multi_processor_count} SMs)")
        res.add(rows, "cards visible", torch.cuda.device_count())
        res.add(rows, "driver", nvidia_smi("driver_version"))
        res.add(rows, "CUDA (torch built with)", torch.version.cuda)
        res.add(rows, "cuDNN", torch.backends.cudnn.version())
        res.add(rows, "NCCL", ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None)
        res.add(rows, "bf16 supported", torch.cuda.is_bf16_supported())
    else:
        res.add(rows, "card", "none: CPU rehearsal (the figures below are not GPU figures)")
        res.add(rows, "CUDA available to torch", torch.cuda.is_available())
    res.value("card", card)
    res.add(rows, "torch", torch.__version__)
    res.add(rows, "python", f"{platform.python_version()} ({sys.executable})")
    res.add(rows, "platform", platform.platform())
    res.add(rows, "CPU", f"{cpu_model()}, {cores()} cores usable, torch threads {torch.get_num_threads()}")
    res.add(rows, "memory", meminfo())
    res.add(rows, "project commit", project_commit())
    packages = res.table("Packages", ["package", "version", "from"])
    for name in ("torchvision", "numpy", "h5py", "opencv-python-headless", "opencv-python", "tqdm", "matplotlib",
                 "timm", "segmentation-models-pytorch", "submitit", "wandb", "lmdb", "pytest", "pytest-timeout"):
        try:
            dist = md.distribution(name)
            where = str(dist.locate_file(""))
            res.add(packages, name, dist.version, "carried wheel" if "/site" in where and str(check.work) in where
                    else "this Python")
        except md.PackageNotFoundError:
            res.add(packages, name, "missing", "-")
    res.summary(f"{card}, torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if cuda else ""))

