"""Stage 5: the default recipe (jobs/train.toml) trained for a fixed time: images/s, the validation
mIoU curve, and what that rate means for the recipe's 30,000 steps."""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import threading
import time

from gpucheck.stages.common import ensure_data
from gpucheck.state import RECIPE, RECIPE_STEPS, Check, Result, StageRecord, cell


def stage_train(check: Check, res: Result) -> None:
    import torch

    from amodal.config import load_config
    from amodal.tracking import read_metrics
    from amodal.train import train

    s = check.sizes
    seconds = check.train_seconds or s.train_seconds
    base = load_config(RECIPE, check.recipe_overrides())
    ensure_data(check, res)
    rate = StageRecord.read(check.work / "loader.json").values.get("step_images_per_s")
    batch = base.train.global_batch
    if rate:
        expected = max(4, int(rate / batch * seconds))  # steps the pure step rate would do in `seconds`
    else:
        expected = 3000 if check.cuda and not check.quick else 20
        res.note(f"no step rate from the loader stage: the schedule assumes {expected} steps in {seconds:.0f} s")
    # Ten validations at the pure step rate: the trainer (data-bound, say) may be several times slower
    # and still gives a curve.
    val_every = max(1, expected // 10)
    log_every = max(1, expected // 20)
    run = check.work / "train-run"
    shutil.rmtree(run, ignore_errors=True)
    cfg = load_config(RECIPE, check.recipe_overrides() + [
        f"train.steps={2 * expected}", f"train.val_every={val_every}", f"train.log_every={log_every}",
        "checkpoint.every_steps=0", "checkpoint.every_minutes=0", "checkpoint.keep_last=1"])
    res.note(f"recipe jobs/train.toml on the check's synthetic set; train.steps={2 * expected} (the schedule's "
             f"length), stopped by USR2 after {seconds:.0f} s; validation every {val_every} steps")
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGUSR2))
    began = time.monotonic()
    timer.start()
    try:
        result = train(cfg, run)
    finally:
        timer.cancel()
    wall = time.monotonic() - began
    events = read_metrics(run / "metrics.jsonl")
    trains = [e for e in events if e["event"] == "train"]
    vals = [e for e in events if e["event"] == "val"]
    start = next(e for e in events if e["event"] == "start")
    t0 = start["time"]
    curve = res.table("Validation mIoU", ["step", "seconds since start", "val mIoU", "train loss (last window)"])
    for v in vals:
        loss = next((e["loss"] for e in reversed(trains) if e["step"] <= v["step"]), None)
        res.add(curve, v["step"], v["time"] - t0, v["miou"], loss)
    steady = [e["img_per_s"] for e in trains[1:]] or [e["img_per_s"] for e in trains]
    img_s = statistics.median(steady) if steady else None
    val_s = statistics.mean([v["seconds"] for v in vals]) if vals else 0.0
    rows = res.table("Speed", ["what", "value"])
    res.add(rows, "device, precision", f"{start['device']}, {start['precision']}")
    res.add(rows, "model", f"{cfg.model.name} (ResNet-{cfg.model.encoder_depth}), input {cfg.data.input_size}², "
                           f"batch {batch}, {cfg.data.num_workers} loader workers")
    res.add(rows, "steps done", f"{result.step} in {wall:.0f} s ({'stopped by the timer' if result.interrupted else 'all'})")
    first = next((e for e in events if e["event"] == "first_step"), None)
    if first:
        res.add(rows, "first step after process start s", first["seconds_since_process_start"])
    res.add(rows, "training images/s (median of log windows after the first)", img_s)
    res.add(rows, "one validation pass s", val_s)
    res.add(rows, "best val mIoU", result.best_miou)
    if img_s:
        full = base.train
        hours = (RECIPE_STEPS * batch / img_s + RECIPE_STEPS // full.val_every * val_s) / 3600
        res.add(rows, f"the recipe's {RECIPE_STEPS:,} steps x {batch} at this rate",
                f"{hours:.2f} h (training + {RECIPE_STEPS // full.val_every} validations of this size)")
        res.value("train_images_per_s", img_s)
        res.summary(f"{img_s:,.0f} images/s; {RECIPE_STEPS:,} steps = {hours:.2f} h; best val mIoU "
                    f"{cell(result.best_miou)} after {result.step} steps"
                    + (" (goal: >= 8,000 images/s on one H200)" if check.cuda and not check.quick else ""))
    if not check.cuda:
        res.note("CPU rehearsal: precision auto is fp32 on the CPU and the trainer keeps the default layout there")
    if not vals:
        raise RuntimeError("no validation happened in the time given")
    if torch.cuda.is_available():
        res.value("peak_gib", torch.cuda.max_memory_allocated() / 2**30)

