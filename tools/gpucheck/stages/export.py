"""Stage 6: 1,000 test images predicted, written to the leaderboard file and checked, timed."""

from __future__ import annotations

import shutil
import time

from gpucheck.stages.common import ensure_data
from gpucheck.state import RECIPE, ROOT, Check, Result


def stage_export(check: Check, res: Result) -> None:
    import torch

    from amodal.bench import sync
    from amodal.checkpoint import save_checkpoint
    from amodal.config import load_config
    from amodal.data.dataset import ShardDataset
    from amodal.models import build_model
    from amodal.predict import load_model_from_checkpoint, predict_to_file
    from amodal.submission import check_submission, write_submission

    s = check.sizes
    root = ensure_data(check, res)
    export_cfg = load_config(ROOT / "jobs" / "export.toml", ["export.checkpoint=\"unused\""]).export
    source = check.work / "train-run"
    if not list((source / "checkpoints").glob("*.pt")):
        # The training stage left nothing: an untrained model of the recipe (export time does not depend
        # on the weights).
        cfg = load_config(RECIPE, check.recipe_overrides())
        source = check.work / "export-source"
        shutil.rmtree(source, ignore_errors=True)
        torch.manual_seed(0)
        state = {"model": build_model(cfg.model).state_dict(), "optimizer": {}, "scheduler": {}, "scaler": {},
                 "ema": None, "step": 0, "epoch": 0, "samples_seen": 0, "global_batch": cfg.train.global_batch,
                 "fingerprint": "gpu-check", "config": cfg.to_dict(), "wandb_run_id": None, "best_miou": None}
        save_checkpoint(state, source, keep_last=1, is_best=True)
        res.note("no checkpoint from the training stage: exported an untrained model of the recipe")
    out = check.work / "export"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rows = res.table(f"{s.export} test images, batch {export_cfg.batch_size}, flip TTA {export_cfg.tta_flip}",
                     ["step", "seconds", "images/s"])
    began = time.perf_counter()
    model, trained, ckpt_path = load_model_from_checkpoint(source, check.device)
    dataset = ShardDataset(root, "test", input_size=trained["data"]["input_size"])
    keys = dataset.keys()
    n = len(keys)
    sync(torch.device(check.device))
    t_load = time.perf_counter() - began
    res.add(rows, "load the checkpoint and the test split", t_load, None)
    began = time.perf_counter()
    predictions = predict_to_file(model, dataset, out / "predictions.h5", export_cfg.batch_size, export_cfg.tta_flip,
                                  check.device, checkpoint=ckpt_path)
    t_pred = time.perf_counter() - began
    res.add(rows, "predict to predictions.h5", t_pred, n / t_pred)
    began = time.perf_counter()
    leaderboard = write_submission(predictions, out / export_cfg.submission, test_keys=keys)
    t_write = time.perf_counter() - began
    res.add(rows, f"write {export_cfg.submission}", t_write, n / t_write)
    began = time.perf_counter()
    check_submission(leaderboard, keys)
    t_check = time.perf_counter() - began
    res.add(rows, "check it against the test keys", t_check, n / t_check)
    total = t_load + t_pred + t_write + t_check
    res.add(rows, "total", total, n / total)
    per_10k = t_load + (t_pred + t_write + t_check) * 10_000 / n
    res.add(rows, "10,000 images at this rate (estimate)", per_10k, 10_000 / per_10k)
    res.summary(f"{n} images in {total:.1f} s, file checked ({leaderboard.stat().st_size / 2**20:.1f} MiB); "
                f"10,000 would take about {per_10k:.0f} s" + (" (goal: < 60 s)" if check.cuda else ""))

