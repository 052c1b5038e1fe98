"""Stage 3: our ResNet U-Net against smp's Unet, bf16 and channels_last, eager and compiled, images/s
and peak memory side by side in one process."""

from __future__ import annotations

import statistics
import time

from gpucheck.stages.common import cpu_threads, sync
from gpucheck.state import ROOT, Check, Result, cell


def _bench_model_tool():
    """tools/bench_model.py as a module: its loss and its peak-memory measurement."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tools_bench_model", ROOT / "tools" / "bench_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stage_bench(check: Check, res: Result) -> None:
    import torch
    import torch.nn.functional as F

    from amodal.config import ModelConfig
    from amodal.labels import NUM_OUTPUTS, TARGET_SIZE
    from amodal.models import build_model

    tool = _bench_model_tool()
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
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    loss_fn, loss_name = tool.make_loss()
    if isinstance(loss_fn, torch.nn.Module):
        loss_fn = loss_fn.to(device)
    fmt = torch.channels_last
    x = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    target = torch.randint(0, NUM_OUTPUTS // 2, (batch, 2, TARGET_SIZE, TARGET_SIZE), device=device)
    rows = res.table(f"Training step, batch {batch} at {size}², {'bf16 autocast' if cuda else 'fp32'}, channels_last, "
                     f"AdamW{' (fused)' if cuda else ''}, loss {loss_name}; {s.bench_rounds} rounds x "
                     f"{s.bench_steps} steps, alternating",
                     ["model", "compiled", "images/s (median)", "peak MiB of a step", "first step s",
                      "vs smp, same mode"])

    def build(kind: str):
        torch.manual_seed(0)
        if kind == "ours":
            return build_model(ModelConfig(name="resnet_unet", encoder_depth=depth))
        try:
            import segmentation_models_pytorch as smp
        except ImportError:
            raise RuntimeError("segmentation_models_pytorch is missing: carry its wheels (docs/gpu.md)") from None
        return smp.Unet(f"resnet{depth}", encoder_weights=None, classes=NUM_OUTPUTS)

    names = {"ours": f"ours: resnet_unet (ResNet-{depth})", "smp": f"smp.Unet (resnet{depth})"}
    speed: dict = {}
    for compiled in (False, True):
        live = {}
        for kind in ("ours", "smp"):
            row = res.add(rows, names[kind], f"yes ({backend})" if compiled else "no", "not reached", None, None, None)
            try:
                model = build(kind).to(device, memory_format=fmt).train()
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=cuda or None)
                net = torch.compile(model, backend=backend) if compiled else model

                def step(net=net, opt=opt):
                    opt.zero_grad(set_to_none=True)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                        logits = net(x)
                    if logits.shape[-2:] != (TARGET_SIZE, TARGET_SIZE):  # smp answers at the input size
                        logits = F.interpolate(logits, size=(TARGET_SIZE, TARGET_SIZE), mode="bilinear",
                                               align_corners=False)
                    loss_fn(logits.float(), target).backward()
                    opt.step()

                began = time.perf_counter()
                step()
                sync(device)
                row[4] = cell(time.perf_counter() - began)
                row[2] = "timing"
                res.flush()
                live[kind] = (step, row)
            except Exception as e:  # noqa: BLE001 - one model's failure is a row, the other still runs
                row[2] = f"failed: {type(e).__name__}: {str(e)[:200]}"
                res.flush()
        rates: dict = {k: [] for k in live}
        for r in range(s.bench_rounds):
            for kind in (list(live) if r % 2 == 0 else list(live)[::-1]):
                step, _ = live[kind]
                sync(device)
                began = time.perf_counter()
                for _ in range(s.bench_steps):
                    step()
                sync(device)
                rates[kind].append(batch * s.bench_steps / (time.perf_counter() - began))
        for kind, (step, row) in live.items():
            with tool.PeakMemory(device) as peak:
                step()
            speed[(kind, compiled)] = statistics.median(rates[kind])
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

