"""One typed config for every job, read from a TOML recipe in jobs/ plus `--set key=value` overrides,
and the resolution of a job kind into the config it runs with (`job_config`).

A recipe is data only: it is parsed with tomllib, never executed. Unknown keys and values of the wrong
type are errors that name the key and the file they came from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    pass


JOB_KINDS = ("train", "retrain_full", "export")


@dataclass
class DataConfig:
    root: str = "data/synthetic"  # shards folder (manifest.json + <split>-NNNNN.h5)
    # Where `root` holds no manifest and this is true, synthetic shards are packed there first.
    make_synthetic: bool = True
    synthetic_train: int = 2000
    synthetic_val: int = 256
    synthetic_test: int = 256
    synthetic_seed: int = 0
    train_splits: list[str] = field(default_factory=lambda: ["train"])
    val_split: str = "val"
    test_split: str = "test"
    input_size: int = 128  # model input side; targets are always 128x128
    num_workers: int = 2
    # Node-local copy of the shards training reads (amodal/data/stage.py): "auto" ($SLURM_TMPDIR, else
    # $TMPDIR, when on another file system than root), "off", or an absolute folder; $VARS and ~ expand
    # where the job runs (a node's variables may not exist where it is submitted).
    stage: str = "auto"

    def __post_init__(self):
        if self.stage not in ("auto", "off"):
            if not self.stage.startswith(("/", "~", "$")):
                raise ConfigError(f"data.stage = {self.stage!r}: expected 'auto', 'off' or an absolute folder")
            folder = os.path.expanduser(os.path.expandvars(self.stage))
            if os.path.exists(folder) and not os.path.isdir(folder):
                raise ConfigError(f"data.stage = {self.stage!r}: {folder} is not a folder")


@dataclass
class AugmentConfig:
    enabled: bool = True
    shift: float = 0.3  # t: uniform in ±t × box size per axis
    scale: float = 0.3  # s: 1 + clip(N(0,1), -1, 1) × s
    rotation: float = 5.0  # r: clip(N(0,1), -2, 2) × r degrees, with probability rotation_prob
    rotation_prob: float = 0.6
    colour: float = 0.3  # c: per-channel gain in [1 - c, 1 + c]
    flip: float = 0.5  # probability of a horizontal flip (swaps the hands)


@dataclass
class ModelConfig:
    name: str = "resnet_unet"  # unet | unet_deep | unet_attention | resnet_unet | smp_unetplusplus | ...
    encoder_depth: int = 50  # ResNet depth for resnet_unet: 18, 34, 50, 101
    encoder_layers: int = 4  # resnet_unet: 4 (the whole ResNet) or 3 (without layer4: for small inputs)
    base_channels: int = 64  # plain U-Nets
    attention: bool = False  # attention gates on the skip connections (resnet_unet)
    stage_heads: bool = True  # resnet_unet: each decoder stage predicts logits, fused at the end
    pretrained: str = ""  # path of a local torchvision encoder state dict; nothing is downloaded
    # resnet_unet: feed the encoder RGB standardised with ImageNet's mean and std, as torchvision's
    # ResNets (and any pretrained weights) expect; measured to learn sooner from scratch too
    # (docs/results/demo_budget).
    normalize_input: bool = True


@dataclass
class LossConfig:
    name: str = "dice_ce"  # ce | dice | dice_ce | focal | jaccard | dice_topk
    class_weights: list[float] = field(default_factory=list)  # 17 weights, or empty
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    focal_gamma: float = 2.0
    topk: float = 0.1  # fraction of hardest pixels kept by the top-k cross-entropy
    # Deep supervision (resnet_unet with stage heads): this weight x the mean of the same loss on each
    # decoder stage's own prediction, against the target subsampled to the stage's resolution.
    stage_weight: float = 0.0


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 200
    min_lr_ratio: float = 0.01  # cosine decays to lr × this at the last step
    grad_clip: float = 1.0  # 0 turns clipping off


@dataclass
class TrainConfig:
    steps: int = 20000
    global_batch: int = 32  # fixed by the recipe; per-rank batch = global / world size
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on GPUs that have it, else fp32) | fp32 | bf16 | fp16
    channels_last: bool = True
    compile: bool = False
    ema: float = 0.0  # decay of an exponential moving average of the weights; 0 turns it off
    val_every: int = 1000  # steps; 0 turns validation off
    log_every: int = 50  # steps between plain log lines
    tta_flip: bool = False  # validate with horizontal-flip test-time augmentation
    device: str = "auto"  # auto | cpu | cuda
    # Record each step's global batch (sample indices, all ranks) in metrics.jsonl; for audits and the
    # tests that prove a resumed run sees the same samples. Costs one small all_gather per step.
    log_samples: bool = False


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    every_minutes: float = 30.0
    keep_last: int = 3
    # Resuming with another data fingerprint or global batch size is refused unless this is set.
    allow_mismatch: bool = False


@dataclass
class TrackingConfig:
    wandb: str = "auto"  # auto (online with a configured key, else offline) | online | offline | off
    project: str = "amodal"
    entity: str = ""


@dataclass
class SlurmConfig:
    partition: str = ""
    hours: float = 24.0
    nodes: int = 1
    gpus_per_node: int = 1
    tasks_per_node: int = 0  # ranks per node; 0 means one per GPU (at least one)
    cpus_per_task: int = 8
    mem: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    exclude: str = ""
    signal_delay_s: int = 300  # USR2 this long before the wall-time limit
    max_walltime_requeues: int = 10
    array_parallelism: int = 8  # sweeps: elements running at once


@dataclass
class ExportConfig:
    checkpoint: str = ""  # a checkpoint file, or a run folder (its best, else newest, checkpoint)
    shards: str = ""  # the packed set to predict; default: the one the model was trained on (data.root)
    split: str = "test"
    batch_size: int = 64
    tta_flip: bool = False  # flip TTA measured no gain (docs/results/ablation_cpu); twice the cost
    submission: str = "test.lmdb.tar.gz"  # written in the run folder


@dataclass
class Config:
    name: str = "train"
    job: str = "train"  # one of JOB_KINDS
    run_dir: str = ""  # default: runs/<name>
    from_run: str = ""  # retrain_full: take the step count of this finished run
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    # A sweep: dotted key -> list of values; each point of the grid is one run (a Slurm array element).
    sweep: dict[str, list] = field(default_factory=dict)
    # Explicit sweep points, run after the grid's: each a table of overrides (dotted keys or nested
    # tables, e.g. {"model.name" = "unet"}), plus an optional `name` that labels the point's run.
    points: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _check_value(value, annotation, where: str):
    """Return value converted to the annotated type, or raise ConfigError naming `where`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _check_value(value, option, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} is not {annotation}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation) or (typing.Any,)
        return [_check_value(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if annotation is typing.Any:
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
    if not isinstance(value, annotation):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
    return value


def _hints(cls):
    return typing.get_type_hints(cls)


def _build(cls, table: dict, where: str):
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in table.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(names))})")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{key}: expected a table, got {value!r}")
            kwargs[key] = _build(annotation, value, f"{where}.{key}")
        else:
            kwargs[key] = _check_value(value, annotation, f"{where}.{key}")
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], object]:
    """'train.steps=100' -> (['train', 'steps'], 100). Values are TOML; bare words are strings."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: a string
    return key.split("."), value


def apply_override(table: dict, path: list[str], value) -> None:
    node = table
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {part!r} is not a table")
    node[path[-1]] = value


def from_dict(table: dict, where: str = "config") -> Config:
    return _build(Config, table, where)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a recipe (or the defaults when path is None) and apply `key=value` overrides in order."""
    table: dict = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        where = str(path)
        try:
            table = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such recipe") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        table.setdefault("name", path.stem)
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(table, keys, value)
    if overrides:
        where += " with --set " + " ".join(overrides)
    return from_dict(table, where)


def _flatten(table: dict, prefix: str = "") -> dict:
    """{"model": {"name": "unet"}, "loss.name": "ce"} -> {"model.name": "unet", "loss.name": "ce"}."""
    flat = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _slug(overrides: dict) -> str:
    """A readable run-name suffix for a point: string values as they are, numbers with their key."""
    parts = []
    for key, value in overrides.items():
        leaf = key.split(".")[-1]
        if isinstance(value, bool):
            parts.append(leaf if value else f"no_{leaf}")
        elif isinstance(value, str):
            parts.append(Path(value).stem if "/" in value else value)
        else:
            parts.append(f"{leaf}{value}")
    text = "-".join(parts) or "base"
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def sweep_points(config: Config) -> list[Config]:
    """The runs of a sweep, one Config per point: the grid of `sweep` (row-major in the order of its
    keys), then the explicit `points`. Without either, [config] unchanged.

    Point i is named f"{name}-{i:03d}-{suffix}" (suffix: the point's `name`, else its overrides'
    values) and runs in <run_dir or runs/name>/<that name>, so one folder holds the whole sweep.
    """
    import itertools

    if not config.sweep and not config.points:
        return [config]
    overrides: list[tuple[dict, str]] = []  # (dotted key -> value, where)
    keys = list(config.sweep)
    grid = itertools.product(*(config.sweep[k] for k in keys)) if keys else []  # product() of nothing is one point
    for values in grid:
        overrides.append((dict(zip(keys, values)), f"{config.name} sweep point {len(overrides)}"))
    for j, point in enumerate(config.points):
        overrides.append((_flatten(point), f"{config.name} points[{j}]"))
    base = config.to_dict()
    base["sweep"], base["points"] = {}, []
    parent = Path(config.run_dir or Path("runs") / config.name)
    result = []
    for i, (point, where) in enumerate(overrides):
        label = point.pop("name", None)
        for key in point:
            if key.split(".")[0] in ("sweep", "points", "run_dir"):
                raise ConfigError(f"{where}: {key!r} cannot be set per point")
        if label is not None and not isinstance(label, str):
            raise ConfigError(f"{where}.name: expected a string, got {label!r}")
        name = f"{config.name}-{i:03d}-{_slug({'name': label} if label else point)}"
        table = json.loads(json.dumps(base))
        for key, value in point.items():
            apply_override(table, key.split("."), value)
        table["name"] = name
        table["run_dir"] = str(parent / name)
        result.append(from_dict(table, where))
    return result


# --------------------------------------------------------------------------------------------------
# Job kinds


def resolve_retrain(cfg: Config) -> Config:
    """retrain_full: a recipe on train + validation, without validation, for a fixed step count.

    The recipe is that of `from_run` (a finished run folder: amodal.checkpoint.check_finished_source),
    its own config.json: its data, model, loss, augmentation, optimizer and step count; the job's name,
    folder, resources, tracking and checkpointing stay those of `cfg`.
    """
    saved = Path(cfg.from_run) / "config.json"
    if not saved.is_file():
        raise ConfigError(f"from_run = {cfg.from_run}: no config.json there (not a run folder)")
    base = from_dict(json.loads(saved.read_text()), str(saved))
    base = dataclasses.replace(base, name=cfg.name, run_dir=cfg.run_dir, slurm=cfg.slurm,
                               tracking=cfg.tracking, checkpoint=cfg.checkpoint)
    splits = list(dict.fromkeys(base.data.train_splits + [base.data.val_split]))
    return dataclasses.replace(base, job="retrain_full", from_run=cfg.from_run, sweep={}, points=[],
                               data=dataclasses.replace(base.data, train_splits=splits),
                               train=dataclasses.replace(base.train, val_every=0))


def job_config(cfg: Config) -> Config:
    """The config a job runs with: its kind checked, retrain_full resolved."""
    if cfg.job not in JOB_KINDS:
        raise ConfigError(f"job = {cfg.job!r}: expected one of {', '.join(JOB_KINDS)}")
    if cfg.job == "export" and not (cfg.export.checkpoint or cfg.from_run):
        raise ConfigError("export.checkpoint: name a checkpoint file or a run folder, e.g. "
                          "--set export.checkpoint=runs/train")
    if cfg.job == "retrain_full" and not cfg.from_run:
        raise ConfigError("from_run: a retrain_full job needs the finished run whose recipe and step count "
                          "it retrains, e.g. --set from_run=runs/train")
    return resolve_retrain(cfg) if cfg.job == "retrain_full" else cfg


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve()) if path else path


def absolute_paths(cfg: Config) -> Config:
    """Relative paths of the recipe (run_dir, from_run, data.root, model.pretrained, export.checkpoint,
    export.shards) made absolute against the current folder: a submitted job may run in another one."""
    r = dataclasses.replace
    return r(cfg, run_dir=_absolute(cfg.run_dir or f"runs/{cfg.name}"), from_run=_absolute(cfg.from_run),
             data=r(cfg.data, root=_absolute(cfg.data.root)),
             model=r(cfg.model, pretrained=_absolute(cfg.model.pretrained)),
             export=r(cfg.export, checkpoint=_absolute(cfg.export.checkpoint), shards=_absolute(cfg.export.shards)))
