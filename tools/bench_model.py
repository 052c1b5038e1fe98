"""Training-step speed of our resnet_unet (ResNet-50) against segmentation_models_pytorch's Unet.

    python tools/bench_model.py [--batch 32] [--steps N] [--rounds 3] [--device auto|cpu|cuda]

Both models get the same input (random images, 128x128 by default), the same loss (cross-entropy per
hand, summed over the two hands) and the same optimizer (AdamW). After one untimed warm-up step each,
they alternate in one process, round by round (A B, B A, A B, ...), so that a change in the
machine's load hits both and neither always follows the other; each round times `--steps` training
steps per model, and the report gives the medians over rounds and the ratio ours / smp. Besides
wall-clock images/s it prints the process CPU seconds per step (on a CPU shared with other jobs,
the steadier figure; with --threads 1 it is the work done).

Both models and the input are channels_last unless --no-channels-last (the trainer's default).
Peak memory is measured in one more step per model after the timed rounds.
On CUDA: bf16 autocast; peak memory is torch.cuda.max_memory_allocated during that step minus
torch.cuda.memory_allocated before it (both models' weights and optimizer states stay on the
card, so they are left out: the figure is the training step's working memory).
On CPU: fp32; peak memory is the growth of the process's
peak resident set size (VmHWM in /proc/self/status, reset before the step through
/proc/self/clear_refs, after glibc's malloc_trim has returned freed memory) over the RSS before the
step: the working memory of the training steps (activations, gradients, temporaries) on top of the
weights and optimizer state, which the warm-up step allocated.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import time

import torch
import torch.nn.functional as F

from amodal.config import LossConfig, ModelConfig, TrainConfig
from amodal.distributed import pick_device
from amodal.labels import NUM_CLASSES, NUM_OUTPUTS
from amodal.models import build_model


def make_loss():
    """Cross-entropy per hand, summed: amodal.losses' when it exists, else the same thing here."""
    try:
        from amodal.losses import build_loss

        return build_loss(LossConfig(name="ce")), "amodal.losses ce"
    except ImportError:

        def ce(logits, target):
            return sum(F.cross_entropy(logits[:, h * NUM_CLASSES : (h + 1) * NUM_CLASSES], target[:, h]) for h in range(2))

        return ce, "local per-hand cross-entropy"


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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default 20 on CUDA, 2 on CPU)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=TrainConfig().channels_last,
                   help="both models and the input in channels_last (default: the trainer's default, %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default; on a CPU shared with other jobs 1 is steadier)")
    args = p.parse_args(argv)

    device = pick_device(0, args.device)
    cuda = device.type == "cuda"
    steps = args.steps or (20 if cuda else 2)
    channels_last = args.channels_last
    if args.threads:
        torch.set_num_threads(args.threads)
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    models = {
        "resnet_unet": build_model(ModelConfig(name="resnet_unet", encoder_depth=50)),
        "smp.Unet": smp.Unet("resnet50", encoder_weights=None, classes=NUM_OUTPUTS),
    }
    opts = {}
    for name, m in models.items():
        models[name] = m.to(device, memory_format=fmt).train()
        opts[name] = torch.optim.AdamW(m.parameters(), lr=1e-3)
    loss_fn, loss_name = make_loss()
    if isinstance(loss_fn, torch.nn.Module):
        loss_fn = loss_fn.to(device)
    x = torch.rand(args.batch, 3, args.size, args.size, device=device).to(memory_format=fmt)
    target = torch.randint(0, NUM_CLASSES, (args.batch, 2, 128, 128), device=device)

    def step(name):
        m, opt = models[name], opts[name]
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = m(x)
        if logits.shape[-2:] != (128, 128):  # smp's Unet answers at the input size
            logits = F.interpolate(logits, size=(128, 128), mode="bilinear", align_corners=False)
        loss = loss_fn(logits.float(), target)
        loss.backward()
        opt.step()

    card = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores"
    print(f"device: {card}")
    print(f"input {args.batch}x3x{args.size}x{args.size}, {'bf16 autocast' if cuda else 'fp32'}, "
          f"{'channels_last' if channels_last else 'contiguous'}, loss: {loss_name}, AdamW; "
          f"one warm-up step each, then {args.rounds} rounds x {steps} timed steps per model")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    speed = {n: [] for n in models}
    cpu = {n: [] for n in models}  # process CPU seconds per step: less sensitive to other jobs than wall time
    memory = {}
    for name in models:
        step(name)  # warm-up, untimed: optimizer state, allocator, oneDNN / cuDNN algorithm choice
    for r in range(args.rounds):
        # A B, then B A, ...: neither model always runs right after the other.
        for name in list(models) if r % 2 == 0 else list(models)[::-1]:
            if cuda:
                torch.cuda.synchronize()
            t, c = time.perf_counter(), time.process_time()
            for _ in range(steps):
                step(name)
            if cuda:
                torch.cuda.synchronize()
            dt, dc = time.perf_counter() - t, time.process_time() - c
            speed[name].append(args.batch * steps / dt)
            cpu[name].append(dc / steps)
            print(f"round {r + 1} {name:12s} {speed[name][-1]:8.1f} images/s  {cpu[name][-1]:7.2f} CPU s/step", flush=True)
    # Memory in a pass of its own: on the CPU, measuring it returns freed memory to the system, and
    # the page faults that follow would otherwise be timed too.
    for name in models:
        with PeakMemory(device) as peak:
            step(name)
        memory[name] = peak.mib
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    mem_what = "cuda max_memory_allocated - allocated before" if cuda else "peak RSS growth (VmHWM - VmRSS before)"
    print()
    print(f"| model | images/s (median) | process CPU s/step (median) | peak memory MiB of one step ({mem_what}) |")
    print("| --- | ---: | ---: | ---: |")
    for name in models:
        print(f"| {name} | {statistics.median(speed[name]):.1f} | {statistics.median(cpu[name]):.2f} | "
              f"{memory[name]:.0f} |")
    med = {n: statistics.median(speed[n]) for n in models}
    print(f"\nratio ours / smp (images/s): {med['resnet_unet'] / med['smp.Unet']:.2f}x")
    if not cuda:
        ratio_cpu = statistics.median(cpu["smp.Unet"]) / statistics.median(cpu["resnet_unet"])
        print(f"ratio ours / smp (speed by process CPU time per step): {ratio_cpu:.2f}x")


if __name__ == "__main__":
    main()
