"""Stage 3: our ResNet U-Net against smp's Unet, bf16 and channels_last, eager and compiled, images/s
and peak memory side by side in one process."""

from __future__ import annotations

import time

from gpucheck.stages.common import cpu_threads
from gpucheck.state import Check, Result, cell


def stage_bench(check: Check, res: Result) -> None:
    import torch

    from amodal.bench import PeakMemory, model_step, ours_and_smp, random_batch, sync, time_rounds
    from amodal.config import Config, LossConfig

    cpu_threads(check)
    s = check.sizes
    device = torch.device(check.device)
    cuda = device.type == "cuda"
    depth, batch, size = s.depth, s.bench_batch, s.input
    backend = "inductor" if cuda or not check.quick else "eager"
    if not cuda:
        res.note("CPU rehearsal: fp32 (bf16 autocast only on CUDA), peak memory is the RSS growth of a step"
                 + (", compile with backend 'eager' (dynamo capture only; inductor takes minutes on the CPU)"
                    if backend == "eager" else ""))
    # The trainer's step (amodal/step.py) with the default recipe's optimizer and precision, per-hand
    # cross-entropy, channels_last.
    cfg = Config(loss=LossConfig(name="ce"))
    x, target = random_batch(batch, size, device, channels_last=True)
    rows = res.table(f"Training step, batch {batch} at {size}², {'bf16 autocast' if cuda else 'fp32'}, channels_last, "
                     f"the trainer's AdamW (fused, clip {cfg.optim.grad_clip}), loss {cfg.loss.name}; "
                     f"{s.bench_rounds} rounds x {s.bench_steps} steps, alternating",
                     ["model", "compiled", "images/s (median)", "peak MiB of a step", "first step s",
                      "vs smp, same mode"])

    builders = ours_and_smp(depth)
    names = {"ours": f"ours: resnet_unet (ResNet-{depth})", "smp": f"smp.Unet (resnet{depth})"}
    speed: dict = {}
    for compiled in (False, True):
        live = {}
        for kind, build in builders.items():
            row = res.add(rows, names[kind], f"yes ({backend})" if compiled else "no", "not reached", None, None, None)
            try:
                step = model_step(cfg, device, build(), channels_last=True)
                if compiled:
                    step.net = torch.compile(step.model, backend=backend)
                began = time.perf_counter()
                step(x, target)
                sync(device)
                row[4] = cell(time.perf_counter() - began)
                row[2] = "timing"
                res.flush()
                live[kind] = (step, row)
            except Exception as e:  # noqa: BLE001 - one model's failure is a row, the other still runs
                row[2] = f"failed: {type(e).__name__}: {str(e)[:200]}"
                res.flush()
        rounds = time_rounds({kind: lambda step=step: step(x, target) for kind, (step, _) in live.items()},
                             s.bench_rounds, s.bench_steps, device)
        for kind, (step, row) in live.items():
            with PeakMemory(device) as peak:
                step(x, target)
            speed[(kind, compiled)] = rounds[kind].median_rate(batch * s.bench_steps)
            row[2], row[3] = cell(speed[(kind, compiled)]), cell(peak.mib)
        if ("ours", compiled) in speed and ("smp", compiled) in speed:
            live["ours"][1][5] = f"{speed[('ours', compiled)] / speed[('smp', compiled)]:.2f}x"
        res.flush()
        del live
        if cuda:
            torch.cuda.empty_cache()
    parts = []
    for compiled in (False, True):
        if ("ours", compiled) in speed and ("smp", compiled) in speed:
            parts.append(f"ours/smp {'compiled' if compiled else 'eager'} "
                         f"{speed[('ours', compiled)] / speed[('smp', compiled)]:.2f}x")
    best = max((v for (k, _), v in speed.items() if k == "ours"), default=None)
    if best is not None:
        parts.append(f"ours best {best:,.0f} images/s")
        res.value("ours_images_per_s", best)
    res.summary("; ".join(parts) + (" (goal: >= 1.2x smp)" if cuda and not check.quick else ""))
    missing = [names[k] for k in ("ours", "smp") if (k, False) not in speed]
    if missing:
        raise RuntimeError(f"not measured: {', '.join(missing)} (see the table)")
