"""One typed config for every job, read from a TOML recipe in jobs/ plus `--set key=value` overrides,
and the resolution of a job kind into the config it runs with (`job_config`).

A recipe is data only: it is parsed with tomllib, never executed. Every config that is loaded goes
through one validation (`check_config`): unknown keys and values of the wrong type, names outside the
set a field selects from (typed `Literal`: models, losses, encoder depths, precision, ...), numbers
outside their range (`Annotated[..., Range]`) and fields that contradict each other are errors that
name the file, the key, the value and what is allowed, with the nearest allowed name for a misspelt one.

The allowed names live here, the lowest layer, so that a recipe is refused without importing torch or
the models; tests/test_models.py and tests/test_losses.py check that they are the registries' names.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Range:
    """The numbers a field allows: low <= value (low < value when low_open), value <= high (< when
    high_open); always finite."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def allows(self, value) -> bool:
        return (math.isfinite(value) and (value > self.low if self.low_open else value >= self.low)
                and (value < self.high if self.high_open else value <= self.high))

    def __str__(self) -> str:
        if math.isinf(self.high):
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


Count = Annotated[int, Range(0)]  # 0 or more
Positive = Annotated[int, Range(1)]
NonNegative = Annotated[float, Range(0)]
Fraction = Annotated[float, Range(0, 1)]  # probabilities and ratios
Decay = Annotated[float, Range(0, 1, high_open=True)]  # moving-average decays, Adam's betas

# The sets fields select from. Models, losses and encoders must match their registries
# (amodal.models.MODEL_NAMES, amodal.models.resnet_unet.RESNET_DEPTHS / ENCODER_LAYERS,
# amodal.losses.LOSS_NAMES, amodal.labels.NUM_CLASSES): tests check it.
JobKind = Literal["train", "retrain_full", "export"]
ModelName = Literal["unet", "unet_deep", "unet_attention", "resnet_unet", "smp_unetplusplus", "smp_deeplabv3plus",
                    "smp_pspnet"]
EncoderDepth = Literal[18, 34, 50, 101]
EncoderLayers = Literal[3, 4]
LossName = Literal["ce", "dice", "dice_ce", "focal", "jaccard", "dice_topk"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Device = Literal["auto", "cpu", "cuda"]
WandbMode = Literal["auto", "online", "offline", "off"]
JOB_KINDS = typing.get_args(JobKind)
CLASSES_PER_HAND = 17  # loss.class_weights: background + 16 parts (amodal.labels.NUM_CLASSES)
# Input sides must be a multiple of the model's total downsampling: its coarsest feature map is input / this.
INPUT_STRIDES = {"unet": 16, "unet_deep": 32, "unet_attention": 16, "resnet_unet": 32, "smp_unetplusplus": 32,
                 "smp_deeplabv3plus": 16, "smp_pspnet": 8}


@dataclass
class DataConfig:
    root: str = "data/synthetic"  # shards folder (manifest.json + <split>-NNNNN.h5)
    # Where `root` holds no manifest and this is true, synthetic shards are packed there first.
    make_synthetic: bool = True
    synthetic_train: Positive = 2000
    synthetic_val: Count = 256
    synthetic_test: Count = 256
    synthetic_seed: Count = 0
    train_splits: list[str] = field(default_factory=lambda: ["train"])
    val_split: str = "val"
    test_split: str = "test"
    input_size: Positive = 128  # model input side, a multiple of the model's stride; targets are always 128x128
    num_workers: Count = 2
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
    shift: NonNegative = 0.3  # t: uniform in ±t × box size per axis
    scale: Annotated[float, Range(0, 1, high_open=True)] = 0.3  # s: 1 + clip(N(0,1), -1, 1) × s
    rotation: Annotated[float, Range(0, 180)] = 5.0  # r: clip(N(0,1), -2, 2) × r degrees, with probability rotation_prob
    rotation_prob: Fraction = 0.6
    colour: Fraction = 0.3  # c: per-channel gain in [1 - c, 1 + c]
    flip: Fraction = 0.5  # probability of a horizontal flip (swaps the hands)
    # Where the warp, colour gain and flip run: "worker" (per sample, in the loader workers), "device"
    # (the workers only read and decode; the batch is augmented on the training device,
    # amodal/data/device_augment.py), or "auto": device on CUDA, worker on the CPU (measured faster there).
    on: Literal["auto", "worker", "device"] = "auto"


@dataclass
class ModelConfig:
    name: ModelName = "resnet_unet"
    encoder_depth: EncoderDepth = 50  # ResNet depth of resnet_unet and smp_*
    encoder_layers: EncoderLayers = 4  # resnet_unet: 4 (the whole ResNet) or 3 (without layer4: for small inputs)
    base_channels: Positive = 64  # plain U-Nets
    attention: bool = False  # attention gates on the skip connections (resnet_unet)
    stage_heads: bool = True  # resnet_unet: each decoder stage predicts logits, fused at the end
    pretrained: str = ""  # path of a local torchvision encoder state dict; nothing is downloaded
    # resnet_unet: feed the encoder RGB standardised with ImageNet's mean and std, as torchvision's
    # ResNets (and any pretrained weights) expect; measured to learn sooner from scratch too
    # (docs/results/demo_budget).
    normalize_input: bool = True


@dataclass
class LossConfig:
    name: LossName = "dice_ce"
    class_weights: list[Annotated[float, Range(0, low_open=True)]] = field(default_factory=list)  # 17, or none
    dice_weight: NonNegative = 1.0
    ce_weight: NonNegative = 1.0
    focal_gamma: NonNegative = 2.0
    topk: Annotated[float, Range(0, 1, low_open=True)] = 0.1  # fraction of hardest pixels kept by top-k CE
    # Deep supervision (resnet_unet with stage heads): this weight x the mean of the same loss on each
    # decoder stage's own prediction, against the target subsampled to the stage's resolution.
    stage_weight: NonNegative = 0.0


@dataclass
class OptimConfig:
    lr: Annotated[float, Range(0, low_open=True)] = 1e-3
    weight_decay: NonNegative = 1e-4
    beta1: Decay = 0.9
    beta2: Decay = 0.999
    warmup_steps: Count = 200
    min_lr_ratio: Fraction = 0.01  # cosine decays to lr × this at the last step
    grad_clip: NonNegative = 1.0  # 0 turns clipping off


@dataclass
class TrainConfig:
    steps: Positive = 20000
    global_batch: Positive = 32  # fixed by the recipe; per-rank batch = global / world size
    seed: Count = 0
    precision: Precision = "auto"  # auto: bf16 on GPUs that have it, else fp32
    channels_last: bool = True
    compile: bool = False
    ema: Decay = 0.0  # decay of an exponential moving average of the weights; 0 turns it off
    # Steps; 0 turns validation off. Training also validates and saves at its last step, so an interval
    # longer than the run means once, at the end.
    val_every: Count = 1000
    log_every: Positive = 50  # steps between plain log lines
    tta_flip: bool = False  # validate with horizontal-flip test-time augmentation
    device: Device = "auto"
    # Record each step's global batch (sample indices, all ranks) in metrics.jsonl; for audits and the
    # tests that prove a resumed run sees the same samples. Costs one small all_gather per step.
    log_samples: bool = False


@dataclass
class CheckpointConfig:
    every_steps: Count = 1000  # 0: no periodic saves by step count
    every_minutes: NonNegative = 30.0  # 0: none by time
    keep_last: Positive = 3
    # Resuming with another data fingerprint or global batch size is refused unless this is set.
    allow_mismatch: bool = False


@dataclass
class TrackingConfig:
    wandb: WandbMode = "auto"  # auto: online with a configured key, else offline
    project: str = "amodal"
    entity: str = ""


@dataclass
class SlurmConfig:
    partition: str = ""
    hours: Annotated[float, Range(0, low_open=True)] = 24.0
    nodes: Positive = 1
    gpus_per_node: Count = 1
    tasks_per_node: Count = 0  # ranks per node; 0 means one per GPU (at least one)
    cpus_per_task: Positive = 8
    mem: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    exclude: str = ""
    signal_delay_s: Count = 300  # USR2 this long before the wall-time limit
    max_walltime_requeues: Count = 10
    array_parallelism: Positive = 8  # sweeps: elements running at once


@dataclass
class ExportConfig:
    checkpoint: str = ""  # a checkpoint file, or a run folder (its best, else newest, checkpoint)
    shards: str = ""  # the packed set to predict; default: the one the model was trained on (data.root)
    split: str = "test"
    batch_size: Positive = 64
    tta_flip: bool = False  # flip TTA measured no gain (docs/results/ablation_cpu); twice the cost
    submission: str = "test.lmdb.tar.gz"  # written in the run folder


@dataclass
class Config:
    name: str = "train"
    job: JobKind = "train"
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


def _base_type(annotation):
    """The Python type behind an annotation: int for Literal[18, 34] and for Annotated[int, Range(0)]."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _base_type(typing.get_args(annotation)[0])
    if origin is Literal:
        return type(typing.get_args(annotation)[0])
    return annotation


def _check_value(value, annotation, where: str):
    """Return value converted to the annotated type, or raise ConfigError naming `where`. Only the type:
    allowed names and ranges are check_config's."""
    annotation = _base_type(annotation)
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


def _build(cls, table: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in table.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown key {key!r}{_nearest(key, sorted(names))} "
                              f"(known: {', '.join(sorted(names))})")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{key}: expected a table, got {value!r}")
            kwargs[key] = _build(annotation, value, f"{where}.{key}")
        else:
            kwargs[key] = _check_value(value, annotation, f"{where}.{key}")
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------------
# Validation


def _nearest(value, allowed) -> str:
    """'; did you mean X?' for the allowed name (or number) nearest to a wrong one, else ''."""
    if isinstance(value, str):
        close = difflib.get_close_matches(value, [str(a) for a in allowed], n=1, cutoff=0.5)
        return f"; did you mean {close[0]!r}?" if close else ""
    numbers = [a for a in allowed if isinstance(a, (int, float))]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and numbers:
        return f"; did you mean {min(numbers, key=lambda a: abs(a - value))}?"
    return ""


def _check_allowed(value, annotation, key: str) -> None:
    """The value of one field against its Literal (allowed names) or Range; lists item by item."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation) or (typing.Any,)
        for i, v in enumerate(value):
            _check_allowed(v, item, f"{key}[{i}]")
    elif origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed or isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: expected one of {', '.join(map(str, allowed))}"
                              f"{_nearest(value, allowed)}")
    elif origin is Annotated:
        for extra in typing.get_args(annotation)[1:]:
            if isinstance(extra, Range) and not extra.allows(value):
                kind = "an integer" if _base_type(annotation) is int else "a finite number"
                raise ConfigError(f"{key} = {value!r}: expected {kind} {extra}")


def _check_fields(obj, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj), include_extras=True)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_fields(value, f"{prefix}{f.name}.")
        else:
            _check_allowed(value, hints[f.name], prefix + f.name)


def ranks_per_node(slurm: SlurmConfig) -> int:
    return slurm.tasks_per_node or max(slurm.gpus_per_node, 1)  # one task (rank) per GPU


def input_stride(model: ModelConfig) -> int:
    """The model's total downsampling: data.input_size must be a multiple of it."""
    if model.name == "resnet_unet":
        return 2 ** (model.encoder_layers + 1)  # the stem's 2, then 2 per layer after the first
    return INPUT_STRIDES[model.name]


def _check_relations(cfg: Config) -> None:
    m, t, s = cfg.model, cfg.train, cfg.slurm
    ranks = s.nodes * ranks_per_node(s)
    if t.global_batch % ranks:
        raise ConfigError(f"train.global_batch = {t.global_batch}: not divisible by the job's {ranks} ranks "
                          f"(slurm.nodes = {s.nodes} x {ranks_per_node(s)} tasks per node); each rank takes an "
                          f"equal share")
    stride = input_stride(m)
    if cfg.data.input_size % stride:
        size = max(stride, round(cfg.data.input_size / stride) * stride)
        raise ConfigError(f"data.input_size = {cfg.data.input_size}: model {m.name!r} needs a multiple of {stride} "
                          f"(e.g. {size})")
    if not cfg.data.train_splits:
        raise ConfigError("data.train_splits = []: name at least one split to train on")
    if m.encoder_layers != 4 and m.name != "resnet_unet":
        raise ConfigError(f"model.encoder_layers = {m.encoder_layers}: only resnet_unet has fewer than 4 "
                          f"(model.name = {m.name!r})")
    if m.pretrained and m.name.startswith("unet"):
        raise ConfigError(f"model.pretrained = {m.pretrained!r}: model {m.name!r} has no pretrained encoder "
                          f"(resnet_unet and smp_* have)")
    if m.attention and m.name.startswith("smp_"):
        raise ConfigError(f"model.attention = true: model {m.name!r} has no attention gates (unet* and resnet_unet have)")
    if cfg.loss.stage_weight > 0 and not (m.name == "resnet_unet" and m.stage_heads):
        raise ConfigError(f"loss.stage_weight = {cfg.loss.stage_weight}: deep supervision needs a model whose "
                          f"decoder stages predict (model.name = \"resnet_unet\", model.stage_heads = true)")
    weights = cfg.loss.class_weights
    if weights and len(weights) != CLASSES_PER_HAND:
        raise ConfigError(f"loss.class_weights: {len(weights)} weights; expected {CLASSES_PER_HAND} (background + "
                          f"16 parts) or none")
    if t.precision == "fp16" and t.device == "cpu":
        raise ConfigError("train.precision = 'fp16' needs a GPU, and train.device = 'cpu' (use bf16 or fp32)")
    if t.device == "cuda" and s.gpus_per_node == 0:
        raise ConfigError("train.device = 'cuda', but slurm.gpus_per_node = 0 asks for no GPU")


def check_config(cfg: Config, where: str = "config") -> Config:
    """The one validation of a whole config (module note): each field, then the fields against each
    other. Returns cfg; raises ConfigError naming `where`, the key, the value and what is allowed."""
    try:
        _check_fields(cfg)
        _check_relations(cfg)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg


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
    return check_config(_build(Config, table, where), where)


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
    """The config a job runs with: what its kind needs checked, retrain_full resolved."""
    if cfg.job == "export" and not (cfg.export.checkpoint or cfg.from_run):
        raise ConfigError("export.checkpoint: name a checkpoint file or a run folder, e.g. "
                          "--set export.checkpoint=runs/train")
    if cfg.job == "retrain_full" and not cfg.from_run:
        raise ConfigError("from_run: a retrain_full job needs the finished run whose recipe and step count "
                          "it retrains, e.g. --set from_run=runs/train")
    if cfg.job != "retrain_full":
        return cfg
    return check_config(resolve_retrain(cfg), f"from_run = {cfg.from_run} retrained as {cfg.name}")


def training_splits(cfg: Config) -> list[str]:
    """The splits a training run reads: what it trains on, and what it validates on."""
    splits = list(cfg.data.train_splits)
    if cfg.train.val_every > 0:
        splits.append(cfg.data.val_split)
    return list(dict.fromkeys(splits))


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
