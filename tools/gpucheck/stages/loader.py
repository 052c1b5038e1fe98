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
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
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

    rows = res.table(f"Loader: batches of {batch}, augmentation on, {cores} cores here",
                     ["workers", "samples/s", "per worker", "start-up s", "vs GPU step rate"])
    rates = {}
    for workers in counts:
        loader = build_train_loader(ds, batch, 0, 1, cfg.train.seed, workers, pin_memory=cuda)
        try:
            it = iter(loader)
            began = time.perf_counter()
            next(it)
            startup = time.perf_counter() - began
            for _ in range(min(4 * workers, 16)):  # drain what the workers prefetched during start-up
                next(it)
            n, began = 0, time.perf_counter()
            while time.perf_counter() - began < s.loader_seconds or n < 2:
                n += len(next(it)["image"])
            rates[workers] = n / (time.perf_counter() - began)
        finally:
            loader.close()
        res.add(rows, workers, rates[workers], rates[workers] / workers, startup,
                f"{rates[workers] / gpu_rate:.2f}x")
    per_worker = max(rates[w] / w for w in rates)
    recipe_workers = cfg.data.num_workers
    at_recipe = rates.get(recipe_workers)
    need = math.ceil(gpu_rate / per_worker)
    best_w = max(rates, key=rates.get)
    res.value("loader_per_worker", per_worker)
    verdict = []
    if at_recipe is not None:
        verdict.append(f"at the recipe's {recipe_workers} workers the loader gives {at_recipe:,.0f} samples/s for a "
                       f"step rate of {gpu_rate:,.0f} images/s: "
                       + ("data-bound" if at_recipe < gpu_rate else "not data-bound"))
    verdict.append(f"with {best_w} workers {rates[best_w]:,.0f} samples/s: "
                   + ("data-bound even so" if rates[best_w] < gpu_rate else "keeps up"))
    verdict.append(f"feeding one {'GPU' if cuda else 'device'} takes about {need} workers at {per_worker:,.0f} samples/s "
                   f"each, i.e. {need + 1} cores per GPU with the training process")
    res.summary("; ".join(verdict))
    res.value("cores_per_gpu", need + 1)
    if not cuda:
        res.note("CPU rehearsal: the 'GPU' rate is the CPU's own fp32 step; the verdict means nothing here")
    res.note("the step rate has no per-step host synchronisation; the trainer's rate (next stage) includes its "
             "per-step agreement on [loss finite, stop requested], which waits for the GPU")

