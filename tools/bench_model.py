"""Training-step speed of our resnet_unet (ResNet-50) against segmentation_models_pytorch's Unet.

    python tools/bench_model.py [--batch 32] [--steps N] [--rounds 3] [--device auto|cpu|cuda]

Both models get the same input (random images, 128x128 by default), the same loss (cross-entropy per
hand, summed over the two hands) and the trainer's step (amodal/step.py): the default recipe's AdamW
(fused, weight decay groups, gradients clipped) and precision. After one untimed warm-up step each,
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
import os
import statistics

import torch

from amodal.bench import PeakMemory, model_step, ours_and_smp, random_batch, time_rounds
from amodal.config import Config, LossConfig, TrainConfig
from amodal.distributed import pick_device

NAMES = {"ours": "resnet_unet", "smp": "smp.Unet"}


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
    # The trainer's step with the default recipe's optimizer and precision (bf16 autocast on CUDA),
    # cross-entropy per hand.
    cfg = Config(loss=LossConfig(name="ce"))
    x, target = random_batch(args.batch, args.size, device, channels_last)
    models = {NAMES[kind]: model_step(cfg, device, build(), channels_last) for kind, build in ours_and_smp(50).items()}

    card = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores"
    print(f"device: {card}")
    print(f"input {args.batch}x3x{args.size}x{args.size}, {'bf16 autocast' if cuda else 'fp32'}, "
          f"{'channels_last' if channels_last else 'contiguous'}, loss: {cfg.loss.name}, AdamW as the trainer's "
          f"(fused, clip {cfg.optim.grad_clip}); one warm-up step each, then {args.rounds} rounds x {steps} timed "
          f"steps per model")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for step in models.values():
        step(x, target)  # warm-up, untimed: optimizer state, allocator, oneDNN / cuDNN algorithm choice

    def report(r, name, times):
        print(f"round {r + 1} {name:12s} {args.batch * steps / times.wall[-1]:8.1f} images/s  "
              f"{times.cpu[-1] / steps:7.2f} CPU s/step", flush=True)

    # Process CPU seconds per step: less sensitive to other jobs than wall time.
    times = time_rounds({name: lambda step=step: step(x, target) for name, step in models.items()}, args.rounds,
                        steps, device, report)
    # Memory in a pass of its own: on the CPU, measuring it returns freed memory to the system, and
    # the page faults that follow would otherwise be timed too.
    memory = {}
    for name, step in models.items():
        with PeakMemory(device) as peak:
            step(x, target)
        memory[name] = peak.mib
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    mem_what = "cuda max_memory_allocated - allocated before" if cuda else "peak RSS growth (VmHWM - VmRSS before)"
    print()
    print(f"| model | images/s (median) | process CPU s/step (median) | peak memory MiB of one step ({mem_what}) |")
    print("| --- | ---: | ---: | ---: |")
    med = {n: times[n].median_rate(args.batch * steps) for n in models}
    cpu = {n: statistics.median(times[n].cpu) / steps for n in models}
    for name in models:
        print(f"| {name} | {med[name]:.1f} | {cpu[name]:.2f} | {memory[name]:.0f} |")
    print(f"\nratio ours / smp (images/s): {med['resnet_unet'] / med['smp.Unet']:.2f}x")
    if not cuda:
        print(f"ratio ours / smp (speed by process CPU time per step): {cpu['smp.Unet'] / cpu['resnet_unet']:.2f}x")


if __name__ == "__main__":
    main()
