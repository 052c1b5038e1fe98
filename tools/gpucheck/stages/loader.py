"""Stage 4: the training loader's samples/s from N workers, next to the GPU's step rate at the default
recipe: whether training is data-bound and how many cores per GPU it needs."""

from __future__ import annotations

import math
import time

from gpucheck.machine import cores as usable_cores
from gpucheck.stages.common import cpu_threads, ensure_data
from gpucheck.state import RECIPE, Check, Result


def stage_loader(check: Check, res: Result) -> None:
    import torch

    from amodal.bench import sync
    from amodal.config import load_config
    from amodal.data.dataset import ShardDataset
    from amodal.data.sampler import build_train_loader
    from amodal.step import build_step

    s = check.sizes
    cpu_threads(check)
    device = torch.device(check.device)
    cuda = device.type == "cuda"
    cfg = load_config(RECIPE, check.recipe_overrides())
    root = ensure_data(check, res)
    batch = cfg.train.global_batch
    ds = ShardDataset(root, cfg.data.train_splits, cfg.data.input_size, augment=cfg.augment, seed=cfg.train.seed)
    cores = usable_cores()
    counts = s.workers or sorted({1, 2, 4, cfg.data.num_workers, 8, max(1, cores - 1)})
    counts = [n for n in counts if n <= max(1, cores - 1)] or [1]

    # The GPU's step rate at the recipe, data already on the device: what the loader has to keep up with.
    # The trainer's own step (amodal/step.py): its model, loss, optimizer, precision and layout.
    training_step = build_step(cfg, device)
    sample = next(iter(build_train_loader(ds, batch, 0, 1, cfg.train.seed, 0)))
    images, target = training_step.to_device(sample["image"], sample["target"])

    precision = ", ".join([str(training_step.amp_dtype or "fp32").replace("torch.", "")]
                          + ["channels_last"] * training_step.channels_last + ["the trainer's fused AdamW"])

    def step():
        training_step(images, target)

    for _ in range(3):
        step()
    sync(device)
    n, began = 0, time.perf_counter()
    while time.perf_counter() - began < s.rate_seconds or n < 2:
        step()
        n += 1
        if n % 10 == 0 or not cuda:
            sync(device)
    sync(device)
    gpu_rate = n * batch / (time.perf_counter() - began)
    res.value("step_images_per_s", gpu_rate)
    gpu_rows = res.table(f"{'GPU' if cuda else 'CPU'} training step at the recipe (data already on the device)",
                         ["model", "batch", "precision", "steps/s", "images/s"])
    res.add(gpu_rows, f"{cfg.model.name} (ResNet-{cfg.model.encoder_depth}), {cfg.loss.name} loss", batch,
            precision, gpu_rate / batch, gpu_rate)
    del training_step
    if cuda:
        torch.cuda.empty_cache()

    rows = res.table(f"Loader: batches of {batch}, augmentation on, {cores} cores here; augment.on=device batches "
                     "warped on the device as they arrive (amodal/data/device_augment.py)",
                     ["augment.on", "workers", "samples/s", "per worker", "start-up s", "vs GPU step rate"])
    per_worker, verdict = {}, []
    for on in ("worker", "device"):
        ds = ShardDataset(root, cfg.data.train_splits, cfg.data.input_size, augment=cfg.augment,
                          seed=cfg.train.seed, on_device=on == "device")
        rates = {w: loader_rate(res, rows, ds, batch, cfg, w, device, s.loader_seconds, gpu_rate) for w in counts}
        per_worker[on] = max(rates[w] / w for w in rates)
        need = math.ceil(gpu_rate / per_worker[on])
        best_w = max(rates, key=rates.get)
        at_recipe = rates.get(cfg.data.num_workers)
        if at_recipe is not None:
            verdict.append(f"augment.on={on}: at the recipe's {cfg.data.num_workers} workers {at_recipe:,.0f} "
                           f"samples/s for {gpu_rate:,.0f} images/s: "
                           + ("data-bound" if at_recipe < gpu_rate else "not data-bound"))
        verdict.append(f"augment.on={on}: with {best_w} workers {rates[best_w]:,.0f} samples/s; feeding one "
                       f"{'GPU' if cuda else 'device'} takes about {need} workers at {per_worker[on]:,.0f} samples/s "
                       f"each, i.e. {need + 1} cores per GPU with the training process")
        res.value(f"cores_per_gpu_{on}", need + 1)
        if on == "device":
            warp_rate = batched_warp_rate(ds, batch, cfg, device, s.loader_seconds / 2)
            res.value("device_warp_images_per_s", warp_rate)
            warp_rows = res.table("The batched warp of augment.on=device on the training device (collated batches "
                                  "already there)", ["batch", "images/s", "share of the step time"])
            res.add(warp_rows, batch, warp_rate, f"{gpu_rate / warp_rate:.1%}")
        ds.close()
    res.value("loader_per_worker", per_worker["worker"])
    res.value("loader_per_worker_device", per_worker["device"])
    res.value("cores_per_gpu", math.ceil(gpu_rate / per_worker["worker"]) + 1)
    res.summary("; ".join(verdict))
    jpeg_decode_rows(res, root, cfg, device, s.loader_seconds / 2)
    if not cuda:
        res.note("CPU rehearsal: the 'GPU' rate is the CPU's own fp32 step; the verdict means nothing here")
    res.note("the step rate has no per-step host synchronisation; the trainer's rate (next stage) includes its "
             "per-step agreement on [loss finite, stop requested], which waits for the GPU")


def loader_rate(res: Result, rows: list, ds, batch, cfg, workers, device, seconds, gpu_rate) -> float:
    """Samples/s of the training loader with `workers` workers, each batch of augment.on=device warped on
    `device` as the trainer does; one row of the loader table."""
    from amodal.bench import sync
    from amodal.data.device_augment import augment_batch
    from amodal.data.sampler import build_train_loader

    cuda = device.type == "cuda"
    loader = build_train_loader(ds, batch, 0, 1, cfg.train.seed, workers, pin_memory=cuda)

    def take():
        b = next(it)
        return augment_batch(b, device, cfg.data.input_size) if ds.on_device else b

    try:
        it = iter(loader)
        began = time.perf_counter()
        take()
        startup = time.perf_counter() - began
        for _ in range(min(4 * workers, 16)):  # drain what the workers prefetched during start-up
            take()
        n, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds or n < 2:
            n += len(take()["image"])
        sync(device)
        rate = n / (time.perf_counter() - began)
    finally:
        loader.close()
    res.add(rows, "device" if ds.on_device else "worker", workers, rate, rate / workers, startup,
            f"{rate / gpu_rate:.2f}x")
    return rate


def batched_warp_rate(ds, batch, cfg, device, seconds) -> float:
    """Images/s of device_augment.augment_batch alone, on batches already collated (and pinned on CUDA)."""
    import torch
    from torch.utils.data import default_collate

    from amodal.bench import sync
    from amodal.data.device_augment import augment_batch

    collated = default_collate([ds[(0, i)] for i in range(min(batch, len(ds)))])
    if device.type == "cuda":
        collated = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in collated.items()}
    augment_batch(collated, device, cfg.data.input_size)
    sync(device)
    n, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds or n < 2:
        augment_batch(collated, device, cfg.data.input_size)
        n += 1
    sync(device)
    return n * len(collated["index"]) / (time.perf_counter() - began)


def jpeg_decode_rows(res: Result, root, cfg, device, seconds) -> None:
    """torchvision's batched decode_jpeg of the shards' own crops at batches of 32, 128 and 512 against
    OpenCV's one-by-one decode: samples/s and mean abs difference. On CUDA the decoder runs on a side
    stream that the main stream then waits for, and its outputs are recorded on the main stream: the
    decoder writes into memory that kernels on the caller's stream may still read (pytorch/vision #9606)."""
    import cv2
    import numpy as np
    import torch
    from torchvision.io import decode_jpeg

    from amodal.bench import sync
    from amodal.data.dataset import ShardDataset

    ds = ShardDataset(root, cfg.data.train_splits, cfg.data.input_size)
    shard = ds._shard(0)
    if shard.image_codec != "jpeg":
        res.note(f"decode_jpeg row skipped: the shards store {shard.image_codec} crops")
        return
    count = min(shard.count, 512)
    blobs = [np.asarray(shard.image.bytes(i)) for i in range(count)]
    ds.close()
    reference = [cv2.imdecode(b, cv2.IMREAD_COLOR) for b in blobs]
    cuda = device.type == "cuda"
    side = torch.cuda.Stream(device) if cuda else None

    def decode(datas):
        if not cuda:
            return decode_jpeg(datas, device="cpu")
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            out = decode_jpeg(datas, device=device)
        torch.cuda.current_stream(device).wait_stream(side)
        for t in out:
            t.record_stream(torch.cuda.current_stream(device))
        return out

    def rate(fn, n_items):
        fn()
        sync(device)
        n, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds or n < 2:
            fn()
            n += 1
        sync(device)
        return n * n_items / (time.perf_counter() - began)

    rows = res.table(f"JPEG decode of the shards' crops ({count} distinct, repeated to fill a batch): torchvision's "
                     f"batched decode_jpeg on {device.type} against OpenCV (one thread here, one crop at a time)",
                     ["decoder", "batch", "samples/s", "mean abs diff from OpenCV /255"])
    res.add(rows, "OpenCV imdecode", 1, rate(lambda: [cv2.imdecode(b, cv2.IMREAD_COLOR) for b in blobs], count), 0)
    for size in (32, 128, 512):
        datas = [torch.from_numpy(blobs[i % count]) for i in range(size)]
        try:  # a decoder that fails (no nvJPEG, out of memory at 512) is a row, not the loader stage lost
            out = decode(datas)
            sync(device)
            diff = np.mean([np.abs(out[i].permute(1, 2, 0).flip(-1).cpu().numpy().astype(np.int16)
                                   - reference[i % count]).mean() for i in range(min(size, count))])
            res.add(rows, f"decode_jpeg (device={device.type})", size, rate(lambda: decode(datas), size), diff)
        except Exception as e:
            res.add(rows, f"decode_jpeg (device={device.type})", size, f"failed: {type(e).__name__}: {e}"[:200], "")
