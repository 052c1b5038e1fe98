"""Timing training steps side by side: the benchmarks' one harness (tools/bench_step.py,
tools/bench_model.py, the GPU check's bench and loader stages).

The steps are the trainer's own (amodal/step.py). `time_rounds` runs several of them in one process,
round by round, the order reversed every other round (A B, B A, A B, ...), so that a change in the
machine's load hits all of them and none always follows another; the figures are medians over rounds.
`PeakMemory` measures what one step adds to the memory in use.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from amodal.config import Config, ModelConfig
from amodal.labels import NUM_CLASSES, NUM_OUTPUTS, TARGET_SIZE
from amodal.models import build_model
from amodal.models.smp import SMPModel, import_smp
from amodal.step import TrainingStep, build_step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batch(n: int, size: int, device: torch.device, channels_last: bool = False):
    """n random images of size² and targets (n, 2, 128, 128), on the device."""
    images = torch.rand(n, 3, size, size, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, NUM_CLASSES, (n, 2, TARGET_SIZE, TARGET_SIZE), device=device)


def ours_and_smp(depth: int) -> dict[str, Callable[[], nn.Module]]:
    """Builders of our resnet_unet and smp's Unet on the same ResNet depth (smp's logits resized to
    128x128 like every model's), each from seed 0."""

    def ours() -> nn.Module:
        torch.manual_seed(0)
        return build_model(ModelConfig(name="resnet_unet", encoder_depth=depth))

    def smp() -> nn.Module:
        smp_package = import_smp()  # a clear error when the smp extra is missing
        torch.manual_seed(0)
        return SMPModel(smp_package.Unet(f"resnet{depth}", encoder_weights=None, classes=NUM_OUTPUTS))

    return {"ours": ours, "smp": smp}


def model_step(cfg: Config, device: torch.device, model: nn.Module, channels_last: bool) -> TrainingStep:
    """`model` in training mode, stepped with the loss, optimizer and precision of `cfg`."""
    return build_step(cfg, device, model=model.train(), channels_last=channels_last)


@dataclass
class Rounds:
    """Per round: wall-clock and process CPU seconds of its steps."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def median_rate(self, per_round: float) -> float:
        """The median over rounds of `per_round` (images in a round, say) per wall-clock second."""
        return statistics.median(per_round / s for s in self.wall)


def time_rounds(steps: dict[str, Callable[[], object]], rounds: int, steps_per_round: int, device: torch.device,
                on_round: Callable[[int, str, Rounds], None] | None = None) -> dict[str, Rounds]:
    """`rounds` rounds of `steps_per_round` calls of each step, taking turns (see the module note);
    `on_round(round, name, times)` after each."""
    times = {name: Rounds() for name in steps}
    for r in range(rounds):
        for name in list(steps) if r % 2 == 0 else list(steps)[::-1]:
            sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(steps_per_round):
                steps[name]()
            sync(device)
            times[name].wall.append(time.perf_counter() - wall)
            times[name].cpu.append(time.process_time() - cpu)
            if on_round is not None:
                on_round(r, name, times[name])
    return times


try:
    _libc = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    _libc = None


def _status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakMemory:
    """Peak memory a block adds to what was allocated before it, in MiB (CUDA allocator or CPU RSS)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            # Give the memory freed by earlier steps back to the system first (glibc keeps it
            # otherwise, and the RSS would never fall), then reset VmHWM to the current RSS.
            gc.collect()
            if _libc is not None:
                _libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.rss0 = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.start) / 2**20
        else:
            self.mib = (_status_kb("VmHWM") - self.rss0) / 1024
