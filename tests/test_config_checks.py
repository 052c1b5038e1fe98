"""The one validation of a config at load (amodal/config.py, issue 23): allowed names, ranges and the
relations between fields, each refused with the key, the value and what is allowed; the allowed names
are the registries' own."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import torch
from torch import nn

from amodal import config as config_module
from amodal.config import ConfigError, ModelConfig, input_stride, load_config, sweep_points
from amodal.jobs import JOBS
from amodal.labels import NUM_CLASSES
from amodal.losses import LOSS_NAMES
from amodal.models import MODEL_NAMES, build_model
from amodal.models.resnet_unet import ENCODER_LAYERS, RESNET_DEPTHS
from amodal.tracking import MODES

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "jobs" / "train.toml"


# (--set override, what the message must say). The first seven are issue 23's.
REFUSED = [
    ("model.name=resnt_unet", "model.name = 'resnt_unet': expected one of unet, unet_deep, unet_attention, "
                              "resnet_unet, smp_unetplusplus, smp_deeplabv3plus, smp_pspnet; did you mean 'resnet_unet'?"),
    ("train.precision=fp61", "train.precision = 'fp61': expected one of auto, fp32, bf16, fp16; did you mean 'fp16'?"),
    ("loss.name=dicece", "loss.name = 'dicece': expected one of ce, dice, dice_ce, focal, jaccard, dice_topk; "
                         "did you mean 'dice_ce'?"),
    ("model.encoder_depth=19", "model.encoder_depth = 19: expected one of 18, 34, 50, 101; did you mean 18?"),
    ("data.num_workers=-1", "data.num_workers = -1: expected an integer >= 0"),
    ("optim.lr=-1", "optim.lr = -1.0: expected a finite number > 0"),
    ("tracking.wandb=maybe", "tracking.wandb = 'maybe': expected one of auto, online, offline, off"),
    # more names
    ("job=exprt", "job = 'exprt': expected one of train, retrain_full, export; did you mean 'export'?"),
    ("train.device=gpu", "train.device = 'gpu': expected one of auto, cpu, cuda"),
    ("model.encoder_layers=5", "model.encoder_layers = 5: expected one of 3, 4; did you mean 4?"),
    ("train.stepz=3", "unknown key 'stepz'; did you mean 'steps'?"),
    # ranges
    ("optim.lr=nan", "optim.lr = nan: expected a finite number > 0"),
    ("optim.beta2=1.0", "optim.beta2 = 1.0: expected a finite number in [0, 1)"),
    ("train.ema=1", "train.ema = 1.0: expected a finite number in [0, 1)"),
    ("train.steps=0", "train.steps = 0: expected an integer >= 1"),
    ("train.log_every=0", "train.log_every = 0: expected an integer >= 1"),
    ("train.val_every=-5", "train.val_every = -5: expected an integer >= 0"),
    ("checkpoint.every_steps=-1", "checkpoint.every_steps = -1: expected an integer >= 0"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last = 0: expected an integer >= 1"),
    ("augment.flip=1.5", "augment.flip = 1.5: expected a finite number in [0, 1]"),
    ("loss.topk=0", "loss.topk = 0.0: expected a finite number in (0, 1]"),
    ("loss.class_weights=[1, 0]", "loss.class_weights[1] = 0.0: expected a finite number > 0"),
    ("slurm.cpus_per_task=0", "slurm.cpus_per_task = 0: expected an integer >= 1"),
    ("export.batch_size=0", "export.batch_size = 0: expected an integer >= 1"),
    # relations
    ("train.global_batch=30", "train.global_batch = 30: not divisible by the job's 4 ranks (slurm.nodes = 2 x 2 "
                              "tasks per node)"),
    ("data.input_size=100", "data.input_size = 100: model 'resnet_unet' needs a multiple of 32 (e.g. 96)"),
    ("loss.class_weights=[1, 2]", "loss.class_weights: 2 weights; expected 17"),
    ("model.pretrained=/w.pth", "model.pretrained = '/w.pth': model 'unet' has no pretrained encoder"),
    ("model.encoder_layers=3", "model.encoder_layers = 3: only resnet_unet has fewer than 4 (model.name = 'unet')"),
    ("loss.stage_weight=0.5", "loss.stage_weight = 0.5: deep supervision needs a model whose decoder stages predict"),
    ("train.device=cpu", "train.precision = 'fp16' needs a GPU, and train.device = 'cpu'"),
    ("slurm.gpus_per_node=0", "train.device = 'cuda', but slurm.gpus_per_node = 0 asks for no GPU"),
]
# What some relations are checked against: 2 nodes x 2 GPUs, a plain U-Net, fp16 on cuda.
CONTEXT = {"train.global_batch=30": ["slurm.nodes=2", "slurm.gpus_per_node=2"],
           "model.pretrained=/w.pth": ["model.name=unet"], "model.encoder_layers=3": ["model.name=unet"],
           "loss.stage_weight=0.5": ["model.name=unet"], "train.device=cpu": ["train.precision=fp16"],
           "slurm.gpus_per_node=0": ["train.device=cuda"]}


@pytest.mark.parametrize("override, message", REFUSED, ids=[o for o, _ in REFUSED])
def test_refused_at_load_naming_key_value_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(TRAIN, CONTEXT.get(override, []) + [override])
    assert message in str(e.value), str(e.value)
    assert str(e.value).startswith(f"{TRAIN} with --set "), str(e.value)  # and the recipe it came from


def test_the_issue_cases_are_refused_by_the_launcher_before_it_prints_a_script(tmp_path, monkeypatch, capsys):
    from amodal import launch

    monkeypatch.chdir(tmp_path)
    for override, message in REFUSED[:7]:
        code = launch.main([str(TRAIN), "--partition", "gpu", "--hours", "24", "--dry-run", "--set", override])
        out = capsys.readouterr()
        assert code == 2 and out.out == "" and message in out.err, (override, out)
    assert list(tmp_path.iterdir()) == []


def test_sweep_points_are_checked_each():
    base = load_config(REPO / "jobs" / "sweep_example.toml")
    bad = dataclasses.replace(base, points=[{"name": "typo", "loss.name": "focla"}])
    with pytest.raises(ConfigError, match=r"points\[0\]: loss.name = 'focla'.*did you mean 'focal'\?"):
        sweep_points(bad)


def test_every_recipe_loads():
    for recipe in sorted((REPO / "jobs").glob("*.toml")):
        for point in sweep_points(load_config(recipe)):
            assert point.name


def test_allowed_names_are_the_registries():
    hints = typing.get_type_hints(config_module.Config, include_extras=True)
    model, loss = typing.get_type_hints(config_module.ModelConfig), typing.get_type_hints(config_module.LossConfig)
    assert typing.get_args(model["name"]) == MODEL_NAMES
    assert typing.get_args(model["encoder_depth"]) == RESNET_DEPTHS
    assert typing.get_args(model["encoder_layers"]) == ENCODER_LAYERS
    assert typing.get_args(loss["name"]) == LOSS_NAMES
    assert set(typing.get_args(typing.get_type_hints(config_module.TrackingConfig)["wandb"])) == set(MODES)
    assert typing.get_args(hints["job"]) == config_module.JOB_KINDS
    assert set(config_module.JOB_KINDS) == set(JOBS)
    assert config_module.CLASSES_PER_HAND == NUM_CLASSES
    assert set(config_module.INPUT_STRIDES) == set(MODEL_NAMES)


def _coarsest_side(model: nn.Module, side: int) -> int:
    """The smallest spatial side of any convolution's output for a (1, 3, side, side) input."""
    sides = []
    hooks = [m.register_forward_hook(lambda m, i, o: sides.append(min(o.shape[-2:])))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, side, side))
    for h in hooks:
        h.remove()
    return min(sides)


@pytest.mark.parametrize("name, layers", [("unet", 4), ("unet_deep", 4), ("unet_attention", 4), ("resnet_unet", 4),
                                          ("resnet_unet", 3)])
def test_input_stride_is_the_models_downsampling(name, layers):
    """At twice the stride, the coarsest feature map is 2x2: the stride is the model's real one."""
    cfg = ModelConfig(name=name, encoder_depth=18, encoder_layers=layers, base_channels=4)
    stride = input_stride(cfg)
    assert _coarsest_side(build_model(cfg).eval(), 2 * stride) == 2


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n.startswith("smp_")])
def test_input_stride_of_smp_models_is_what_smp_requires(name):
    """segmentation_models_pytorch refuses inputs that are not a multiple of its output stride."""
    cfg = ModelConfig(name=name, encoder_depth=18)
    stride, model = input_stride(cfg), build_model(cfg).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, stride, stride)).shape[-1] == 128
        with pytest.raises(RuntimeError, match="divisible"):
            model(torch.zeros(1, 3, stride + stride // 2, stride + stride // 2))
