"""What a job will read, checked before it is submitted (amodal.launch, --dry-run too) and again as it
starts (amodal.jobs): the launcher runs on the login node, which sees the job's file systems, so a
missing input is refused there at once instead of after hours in the queue.

- training: data.root holds a readable manifest with the splits the run reads and at least one global
  batch of training samples, or will be made (synthetic shards, packed on first use); a pretrained
  encoder file exists; a retrain_full job's from_run has finished;
- export: export.checkpoint (or from_run) is a checkpoint file, or a run folder that holds one (or
  whose job, named by the launcher's --after, will write it); the packed set it predicts
  (export.shards, else the trained run's data.root) holds export.split;
- a smp_* model: segmentation_models_pytorch is installed.
Each refusal is a ConfigError naming the key.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from amodal.checkpoint import BEST_NAME, CHECKPOINT_DIR, check_finished_source, list_checkpoints
from amodal.config import Config, ConfigError, training_splits
from amodal.data.format import MANIFEST, ShardError, read_manifest, splits_of

SYNTHETIC_SPLITS = ("train", "val", "test")


def check_inputs(cfg: Config, after: str | None = None) -> None:
    """Raise ConfigError naming the key when something the job reads is missing (module note). `after`:
    the job this one waits for (launch --after), which may write what it reads."""
    if cfg.job == "export":
        check_export(cfg, after)
        return
    check_data(cfg)
    pretrained = cfg.model.pretrained
    if pretrained and not (os.path.isfile(pretrained) and os.access(pretrained, os.R_OK)):
        raise ConfigError(f"model.pretrained = {pretrained}: no such readable file (a local torchvision ResNet "
                          f"state dict; nothing is downloaded)")
    if cfg.model.name.startswith("smp_") and importlib.util.find_spec("segmentation_models_pytorch") is None:
        raise ConfigError(f"model.name = {cfg.model.name!r} needs segmentation_models_pytorch: pip install -e .[smp]")
    check_finished_source(cfg)


def check_data(cfg: Config) -> None:
    d, splits = cfg.data, training_splits(cfg)
    if not (Path(d.root) / MANIFEST).exists():
        if not d.make_synthetic:
            raise ConfigError(f"data.root = {d.root}: no {MANIFEST} there, and data.make_synthetic = false "
                              f"(pack the data first: amodal-pack, or name the packed folder)")
        unknown = [s for s in splits if s not in SYNTHETIC_SPLITS]
        if unknown:
            raise ConfigError(f"data.root = {d.root}: split {unknown[0]!r} is not one the synthetic shards made "
                              f"there will have ({', '.join(SYNTHETIC_SPLITS)})")
        if d.synthetic_train < cfg.train.global_batch:
            raise ConfigError(f"data.synthetic_train = {d.synthetic_train}: fewer than one global batch "
                              f"(train.global_batch = {cfg.train.global_batch})")
        return
    try:
        manifest = read_manifest(d.root)
        splits_of(manifest, splits)
    except ShardError as e:
        raise ConfigError(f"data.root = {d.root}: {e}") from None
    samples = sum(manifest["splits"][s]["count"] for s in d.train_splits)
    if samples < cfg.train.global_batch:
        raise ConfigError(f"data.train_splits = {d.train_splits}: {samples} samples in {d.root}, fewer than one "
                          f"global batch (train.global_batch = {cfg.train.global_batch})")


def trained_run(source: Path) -> Path:
    """The run folder of a checkpoint file or of a run folder (or its checkpoints/ folder)."""
    if source.is_file():
        return source.parent.parent if source.parent.name == CHECKPOINT_DIR else source.parent
    return source.parent if source.name == CHECKPOINT_DIR and not (source / CHECKPOINT_DIR).is_dir() else source


def launched_job(run: Path) -> str | None:
    """The id of the job last launched in a run folder (its job.json), None without one."""
    try:
        return str(json.loads((run / "job.json").read_text())["job_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_export(cfg: Config, after: str | None = None) -> None:
    key = "export.checkpoint" if cfg.export.checkpoint else "from_run"
    source = Path(cfg.export.checkpoint or cfg.from_run)
    if not source.exists():
        raise ConfigError(f"{key} = {source}: no such checkpoint file or run folder")
    run = trained_run(source)
    if source.is_dir() and not (list_checkpoints(run) or (run / CHECKPOINT_DIR / BEST_NAME).is_file()):
        job = launched_job(run)
        if after is None or job is None or after not in (job, job.split("_")[0]):
            raise ConfigError(f"{key} = {source}: no checkpoint in {run / CHECKPOINT_DIR}"
                              + (f" (its job is {job}: --after {job} waits for it)" if job else ""))
    shards, option = cfg.export.shards, "export.shards"
    if not shards:  # the trained run's own data, as its config.json says (the job reads the checkpoint's)
        try:
            shards, option = json.loads((run / "config.json").read_text())["data"]["root"], "the trained run's data.root"
        except (OSError, ValueError, KeyError, TypeError):
            return  # no readable config.json beside it: the job reads the checkpoint's own config
    try:
        splits_of(read_manifest(shards), cfg.export.split)
    except ShardError as e:
        raise ConfigError(f"{option} = {shards}, export.split = {cfg.export.split!r}: cannot export from there: "
                          f"{e}") from None
