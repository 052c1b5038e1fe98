"""Batched inference of one split to a predictions file, and loading a trained model for it.

The predictions file (HDF5), which amodal.submission turns into the leaderboard file:
  keys    variable-length UTF-8 strings, (N,), in the dataset's stored (test-list) order
  labels  uint8 (N, 2, 128, 128), [left, right] label maps, values 0..16
  attrs   checkpoint (the checkpoint file the weights came from, or ""), fingerprint (the shards'),
          tta_flip (bool), weights ("ema" or "model")

Flip test-time augmentation averages the logits of the image and of its mirror image (per hand, the
argmax of mean logits is that of the mean log-probabilities); the mirror's output is flipped back and
its two hands swapped (a mirrored left hand looks like a right hand), which is the rule the training
augmentation uses for labels (docs/design.md §1). `predict_batch` is the one place that rule lives.

With world_size > 1 (an initialized torch.distributed group) each rank predicts its contiguous range
of samples (build_eval_loader) into a part file next to the output, then rank 0 joins the parts in rank
order into the output and removes them.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from amodal.fileio import commit
from amodal.labels import NUM_CLASSES, TARGET_SIZE, swap_logits

LABELS_SHAPE = (2, TARGET_SIZE, TARGET_SIZE)
COPY_CHUNK = 256  # samples copied at once when joining part files


class PredictError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------------
# Loading a model


def resolve_checkpoint(path_or_run_dir: str | Path) -> Path:
    """A checkpoint file as given, or for a run folder its best.pt when that loads, else its newest
    checkpoint that loads."""
    from amodal.checkpoint import CHECKPOINT_DIR, best_checkpoint, latest_checkpoint

    path = Path(path_or_run_dir)
    if path.is_file():
        return path
    if not path.is_dir():
        raise PredictError(f"{path}: no such checkpoint file or run folder")
    run_dir = path.parent if path.name == CHECKPOINT_DIR and not (path / CHECKPOINT_DIR).is_dir() else path
    found = best_checkpoint(run_dir) or latest_checkpoint(run_dir)
    if found is None:
        raise PredictError(f"{path}: no loadable checkpoint in {run_dir / CHECKPOINT_DIR}")
    return Path(found)


def _clean_state_dict(state: dict) -> dict:
    """Strip the wrappers' prefixes (DistributedDataParallel 'module.', torch.compile '_orig_mod.') and
    the step counter of torch.optim.swa_utils.AveragedModel, so the bare model loads it."""
    out = {}
    for key, value in state.items():
        if key == "n_averaged":
            continue
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def load_model_from_checkpoint(path_or_run_dir: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode on device, config dict, checkpoint path) from a checkpoint file or a run folder.

    The model is rebuilt from the checkpoint's own config (its `model` table; `pretrained` is ignored:
    the weights come from the checkpoint). When the checkpoint holds EMA weights (`ema` not None: the
    state dict of the trainer's moving-average copy of the model, kept when train.ema > 0) those are
    loaded, since they are what validation scored; otherwise the raw `model` weights. The model gets an
    attribute `weights_name` ("ema" or "model") that predict_to_file records.
    """
    from amodal.checkpoint import load_checkpoint
    from amodal.config import from_dict
    from amodal.models import build_model

    ckpt_path = resolve_checkpoint(path_or_run_dir)
    state = load_checkpoint(ckpt_path)
    cfg_dict = state.get("config")
    if not isinstance(cfg_dict, dict):
        raise PredictError(f"{ckpt_path}: checkpoint holds no config dict")
    cfg = from_dict(cfg_dict, f"config of {ckpt_path}")
    model = build_model(dataclasses.replace(cfg.model, pretrained=""))
    ema = state.get("ema")
    weights_name = "ema" if ema else "model"
    weights = ema if ema else state["model"]
    try:
        model.load_state_dict(_clean_state_dict(weights))
    except (RuntimeError, TypeError, AttributeError) as e:
        raise PredictError(f"{ckpt_path}: {weights_name} weights do not fit model {cfg.model.name!r}: {e}") from None
    model.weights_name = weights_name  # recorded in the predictions file
    return model.to(device).eval(), cfg_dict, ckpt_path


# ---------------------------------------------------------------------------------------------------
# Inference


def flip_back(output: torch.Tensor) -> torch.Tensor:
    """The output for a mirrored image, mapped back onto the original: flip the columns and swap hands."""
    return swap_logits(output.flip(-1))


def predict_batch(model: nn.Module, images: torch.Tensor, tta_flip: bool = False) -> torch.Tensor:
    """(N, 3, S, S) images -> (N, 2, 128, 128) int64 labels. Call under torch.inference_mode."""
    from amodal.metrics import predict_labels

    logits = model(images).float()
    if logits.shape[1:] != (2 * NUM_CLASSES, TARGET_SIZE, TARGET_SIZE):
        raise PredictError(f"model output has shape {tuple(logits.shape)}, expected (N, 34, 128, 128)")
    if not tta_flip:
        return predict_labels(logits)
    mirrored = flip_back(model(images.flip(-1)).float())
    # Mean of the logits: per hand the same argmax as the mean of the log-probabilities (they differ by
    # a per-pixel constant). Unlike a mean of softmaxes it is exact for a mirror-equivariant model
    # ((a + a) / 2 == a), where rounding in softmax could turn two close logits into a tie.
    return predict_labels((logits + mirrored) / 2)


def _device(device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)



def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _create(f: h5py.File, n: int | None) -> h5py.Dataset:
    return f.create_dataset(
        "labels",
        shape=(n or 0, *LABELS_SHAPE),
        maxshape=(None, *LABELS_SHAPE),
        dtype=np.uint8,
        chunks=(1, *LABELS_SHAPE),
        compression="gzip",
        compression_opts=1,  # label maps are mostly background: tiny at the lowest level
    )


def _finish(f: h5py.File, keys: list[str], attrs: dict) -> None:
    f.create_dataset("keys", data=np.array(keys, dtype=object), dtype=h5py.string_dtype("utf-8"))
    for name, value in attrs.items():
        f.attrs[name] = value


def _predict_part(model, dataset, path: Path, batch_size, tta_flip, device, rank, world_size, num_workers, attrs):
    """Write this rank's predictions to path (atomically); returns the keys written."""
    from amodal.data.sampler import build_eval_loader

    loader = build_eval_loader(dataset, batch_size, rank, world_size, num_workers)
    autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()
    keys: list[str] = []
    tmp = _tmp_name(path)
    try:
        with h5py.File(tmp, "w") as f:
            labels = _create(f, None)
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                for batch in loader:
                    images = batch["image"].to(device, non_blocking=True)
                    pred = predict_batch(model, images, tta_flip).to(torch.uint8).cpu().numpy()
                    start = labels.shape[0]
                    labels.resize(start + len(pred), axis=0)
                    labels[start:] = pred
                    keys.extend(str(k) for k in batch["key"])
            if len(keys) != labels.shape[0]:
                raise PredictError(f"{path}: the loader gave {len(keys)} keys for {labels.shape[0]} images")
            _finish(f, keys, attrs)
        commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return keys


def _all_ok(ok: bool, device: torch.device) -> bool:
    """True when every rank says ok (one all-reduce; a failing rank must still take part)."""
    flag = torch.tensor([1 if ok else 0], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _join_parts(parts: list[Path], out_path: Path, expected_keys: list[str], attrs: dict) -> None:
    tmp = _tmp_name(out_path)
    try:
        with h5py.File(tmp, "w") as f:
            labels = _create(f, len(expected_keys))
            keys: list[str] = []
            for part in parts:
                with h5py.File(part, "r") as p:
                    part_keys = p["keys"].asstr()[()].tolist()
                    start = len(keys)
                    if start + len(part_keys) > len(expected_keys):
                        raise PredictError(f"{part}: more predictions than the dataset has samples")
                    for i in range(0, len(part_keys), COPY_CHUNK):
                        block = p["labels"][i : i + COPY_CHUNK]
                        labels[start + i : start + i + len(block)] = block
                    keys.extend(part_keys)
            if keys != expected_keys:
                raise PredictError(f"{out_path}: the ranks' parts do not add up to the dataset's keys in order")
            _finish(f, keys, attrs)
        commit(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)


def predict_to_file(
    model: nn.Module,
    dataset,
    out_path: str | Path,
    batch_size: int = 64,
    tta_flip: bool = False,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    checkpoint: str | Path = "",
    num_workers: int = 0,
) -> Path:
    """Predict every sample of dataset (a ShardDataset without augmentation) into out_path.

    Writes atomically (temporary name, fsync, rename). Under torch.inference_mode with model.eval();
    bf16 autocast on CUDA devices that support it. `checkpoint` is recorded in the file's attrs.
    With world_size > 1 every rank must call this with the same arguments; rank 0 writes out_path.
    """
    out_path = Path(out_path)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size > 1 and not dist.is_initialized():
        raise PredictError(f"world_size {world_size} needs an initialized torch.distributed process group")
    if not out_path.parent.is_dir():
        raise PredictError(f"{out_path}: folder {out_path.parent} does not exist")
    device = _device(device)
    model = model.to(device).eval()
    attrs = {
        "checkpoint": str(checkpoint),
        "fingerprint": str(getattr(dataset, "fingerprint", "")),
        "tta_flip": bool(tta_flip),
        "weights": str(getattr(model, "weights_name", "model")),
    }
    expected = list(dataset.keys())

    if world_size == 1:
        keys = _predict_part(model, dataset, out_path, batch_size, tta_flip, device, 0, 1, num_workers, attrs)
        if keys != expected:
            out_path.unlink(missing_ok=True)
            raise PredictError(f"{out_path}: predicted keys differ from the dataset's keys (order or count)")
        return out_path

    parts = [out_path.with_name(f".{out_path.name}.part-{r:03d}-of-{world_size:03d}") for r in range(world_size)]
    error: BaseException | None = None
    try:
        _predict_part(model, dataset, parts[rank], batch_size, tta_flip, device, rank, world_size, num_workers, attrs)
    except Exception as e:  # noqa: BLE001 - reported to every rank below, re-raised here
        error = e
    if not _all_ok(error is None, device):
        parts[rank].unlink(missing_ok=True)
        if error is not None:
            raise error
        raise PredictError(f"{out_path}: another rank failed to predict its part")
    if rank == 0:
        try:
            _join_parts(parts, out_path, expected, attrs)
        except Exception as e:  # noqa: BLE001
            error = e
    ok = _all_ok(error is None, device)
    if rank == 0:
        for part in parts:
            part.unlink(missing_ok=True)
    if error is not None:
        raise error
    if not ok:
        raise PredictError(f"{out_path}: rank 0 failed to join the parts")
    return out_path
