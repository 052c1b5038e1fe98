"""Batched inference of one split to a predictions file, and loading a trained model for it.

The predictions file (HDF5), which amodal.submission turns into the leaderboard file:
  keys    variable-length UTF-8 strings, (N,), in the dataset's stored (test-list) order
  labels  uint8 (N, 2, 128, 128), [left, right] label maps, values 0..16
  attrs   checkpoint (the checkpoint file the weights came from, or ""), fingerprint (the shards'),
          tta_flip (bool), weights ("ema" or "model")

Flip test-time augmentation follows amodal.metrics.predict_logits, the rule validation uses too.
One process predicts the whole split (an export of 10,000 images takes minutes, not hours).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from amodal.checkpoint import CHECKPOINT_DIR, load_best, load_checkpoint, load_latest
from amodal.config import from_dict
from amodal.data.sampler import build_eval_loader
from amodal.distributed import pick_device
from amodal.fileio import commit
from amodal.labels import NUM_CLASSES, TARGET_SIZE
from amodal.metrics import predict_labels, predict_logits
from amodal.models import build_model

LABELS_SHAPE = (2, TARGET_SIZE, TARGET_SIZE)


class PredictError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------------
# Loading a model


def load_trained(path_or_run_dir: str | Path) -> tuple[Path, dict]:
    """(checkpoint path, state) of a checkpoint file as given, or for a run folder of its best.pt when
    that loads, else of its newest checkpoint that loads. The file is read once."""
    path = Path(path_or_run_dir)
    if path.is_file():
        return path, load_checkpoint(path)
    if not path.is_dir():
        raise PredictError(f"{path}: no such checkpoint file or run folder")
    run_dir = path.parent if path.name == CHECKPOINT_DIR and not (path / CHECKPOINT_DIR).is_dir() else path
    found = load_best(run_dir) or load_latest(run_dir)
    if found is None:
        raise PredictError(f"{path}: no loadable checkpoint in {run_dir / CHECKPOINT_DIR}")
    return found


def model_from_state(state: dict, ckpt_path: Path) -> nn.Module:
    """The trained model of a checkpoint, in eval mode on the CPU.

    It is rebuilt from the checkpoint's own config (its `model` table; `pretrained` is ignored: the
    weights come from the checkpoint). When the checkpoint holds EMA weights (`ema` not None, kept
    when train.ema > 0) those are loaded, since they are what validation scored; otherwise the raw
    `model` weights. The model gets an attribute `weights_name` ("ema" or "model") that
    predict_to_file records.
    """
    cfg_dict = state.get("config")
    if not isinstance(cfg_dict, dict):
        raise PredictError(f"{ckpt_path}: checkpoint holds no config dict")
    cfg = from_dict(cfg_dict, f"config of {ckpt_path}")
    model = build_model(dataclasses.replace(cfg.model, pretrained=""))
    ema = state.get("ema")
    weights_name = "ema" if ema else "model"
    try:
        model.load_state_dict(ema if ema else state["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise PredictError(f"{ckpt_path}: {weights_name} weights do not fit model {cfg.model.name!r}: {e}") from None
    model.weights_name = weights_name  # recorded in the predictions file
    return model.eval()


def load_model_from_checkpoint(path_or_run_dir: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode on device, config dict, checkpoint path) from a checkpoint file or a run
    folder (see load_trained and model_from_state)."""
    ckpt_path, state = load_trained(path_or_run_dir)
    return model_from_state(state, ckpt_path).to(device), state["config"], ckpt_path


# ---------------------------------------------------------------------------------------------------
# Inference


def predict_batch(model: nn.Module, images: torch.Tensor, tta_flip: bool = False) -> torch.Tensor:
    """(N, 3, S, S) images -> (N, 2, 128, 128) int64 labels. Call under torch.inference_mode."""
    logits = predict_logits(model, images, tta_flip)
    if logits.shape[1:] != (2 * NUM_CLASSES, TARGET_SIZE, TARGET_SIZE):
        raise PredictError(f"model output has shape {tuple(logits.shape)}, expected (N, 34, 128, 128)")
    return predict_labels(logits)


def predict_to_file(model: nn.Module, dataset, out_path: str | Path, batch_size: int = 64,
                    tta_flip: bool = False, device: str | torch.device = "cpu", checkpoint: str | Path = "",
                    num_workers: int = 0) -> Path:
    """Predict every sample of dataset (a ShardDataset without augmentation) into out_path.

    Writes atomically (temporary name, fsync, rename). Under torch.inference_mode with model.eval();
    bf16 autocast on CUDA devices that support it. `checkpoint` is recorded in the file's attrs.
    """
    out_path = Path(out_path)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not out_path.parent.is_dir():
        raise PredictError(f"{out_path}: folder {out_path.parent} does not exist")
    device = pick_device(0, str(device)) if str(device) in ("auto", "cpu", "cuda") else torch.device(device)
    model = model.to(device).eval()
    loader = build_eval_loader(dataset, batch_size, 0, 1, num_workers)
    autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()
    keys: list[str] = []
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            labels = f.create_dataset("labels", shape=(0, *LABELS_SHAPE), maxshape=(None, *LABELS_SHAPE),
                                      dtype=np.uint8, chunks=(1, *LABELS_SHAPE), compression="gzip",
                                      compression_opts=1)  # label maps are mostly background: tiny at level 1
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                for batch in loader:
                    images = batch["image"].to(device, non_blocking=True)
                    pred = predict_batch(model, images, tta_flip).to(torch.uint8).cpu().numpy()
                    start = labels.shape[0]
                    labels.resize(start + len(pred), axis=0)
                    labels[start:] = pred
                    keys.extend(str(k) for k in batch["key"])
            if keys != list(dataset.keys()):
                raise PredictError(f"{out_path}: predicted keys differ from the dataset's keys (order or count)")
            f.create_dataset("keys", data=np.array(keys, dtype=object), dtype=h5py.string_dtype("utf-8"))
            f.attrs.update({"checkpoint": str(checkpoint), "fingerprint": str(getattr(dataset, "fingerprint", "")),
                            "tta_flip": bool(tta_flip), "weights": str(getattr(model, "weights_name", "model"))})
        commit(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path
