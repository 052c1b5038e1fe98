"""Explicit sweep points (`points` in a recipe): parsing, type checks, names, run folders, and the
study recipes in jobs/ themselves."""

import dataclasses
from pathlib import Path

import pytest

from amodal.config import ConfigError, load_config, sweep_points
from amodal.models import MODEL_NAMES

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text, name="study.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_grid_then_points_in_order(tmp_path):
    path = write(tmp_path, """
[train]
steps = 100
[sweep]
"train.seed" = [1, 2]

[[points]]
name = "course"
"model.name" = "unet"
loss.name = "ce"           # a TOML dotted key: a nested table, same meaning
augment.enabled = false

[[points]]
"train.ema" = 0.99
"train.tta_flip" = true
""")
    cfg = load_config(path)
    assert cfg.points[0]["model.name"] == "unet"
    points = sweep_points(cfg)
    assert [p.name for p in points] == [
        "study-000-seed1", "study-001-seed2", "study-002-course", "study-003-ema0.99-tta_flip"]
    assert [p.train.seed for p in points] == [1, 2, 0, 0]
    course, extras = points[2], points[3]
    assert (course.model.name, course.loss.name, course.augment.enabled) == ("unet", "ce", False)
    assert (extras.train.ema, extras.train.tta_flip) == (0.99, True)
    assert isinstance(extras.train.ema, float)
    # everything not overridden comes from the recipe; no point carries the sweep along
    assert all(p.train.steps == 100 and not p.sweep and not p.points for p in points)
    # one folder holds the whole sweep: runs/<sweep>/<point>
    assert [Path(p.run_dir) for p in points] == [Path("runs/study") / p.name for p in points]


def test_points_only_and_run_dir(tmp_path):
    path = write(tmp_path, 'run_dir = "out/abl"\n[[points]]\nname = "reference"\n[[points]]\n"loss.name" = "dice"\n')
    points = sweep_points(load_config(path))
    assert [p.name for p in points] == ["study-000-reference", "study-001-dice"]
    assert points[1].run_dir == str(Path("out/abl") / "study-001-dice")


def test_no_sweep_is_the_config_itself(tmp_path):
    cfg = load_config(write(tmp_path, "[train]\nsteps = 5\n"))
    assert sweep_points(cfg) == [cfg]


@pytest.mark.parametrize("point, message", [
    ('"model.nme" = "unet"', "unknown key 'nme'"),
    ('"modle.name" = "unet"', "unknown key 'modle'"),
    ('"train.steps" = "many"', "points[0].train.steps: expected int"),
    ('"train.tta_flip" = 1', "points[0].train.tta_flip: expected bool"),
    ('"sweep.x" = [1]', "'sweep.x' cannot be set per point"),
    ('"run_dir" = "x"', "'run_dir' cannot be set per point"),
    ('name = 3', "points[0].name: expected a string"),
])
def test_bad_point_names_the_key(tmp_path, point, message):
    cfg = load_config(write(tmp_path, f"[[points]]\n{point}\n"))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        sweep_points(cfg)
    assert "study points[0]" in str(err.value)


def test_points_must_be_tables(tmp_path):
    with pytest.raises(ConfigError, match=r"points\[0\]"):
        load_config(write(tmp_path, 'points = ["unet"]\n'))


@pytest.mark.parametrize("recipe", ["ablation.toml", "ablation_cpu.toml"])
def test_study_recipes_parse(recipe):
    """Every point of the shipped studies is a valid config naming a known model, with one budget."""
    points = sweep_points(load_config(REPO / "jobs" / recipe))
    assert len(points) >= 12
    assert len({p.name for p in points}) == len(points)
    assert {p.model.name for p in points} >= {"unet", "unet_deep", "unet_attention", "resnet_unet"}
    assert all(p.model.name in MODEL_NAMES for p in points)
    assert {p.loss.name for p in points} >= {"ce", "dice", "dice_ce", "focal", "jaccard"}
    assert any(p.train.ema > 0 for p in points) and any(p.train.tta_flip for p in points)
    # same budget and seed for every element, so the comparison is fair; only the reference runs again
    # with another seed, to show the spread that a difference must clear
    assert len({(p.train.steps, p.train.global_batch, p.data.input_size) for p in points}) == 1
    reruns = [p for p in points if p.name.endswith("-reference-seed1")]
    assert len(reruns) == 1 and reruns[0].train.seed == 1
    assert {p.train.seed for p in points if p not in reruns} == {0}
    assert not any(p.model.pretrained for p in points)  # only where the user has a file: not by default
    if recipe == "ablation.toml":  # the GPU study also tries what the demo's budget could not decide
        assert any(p.loss.class_weights for p in points) and any(p.loss.stage_weight > 0 for p in points)
        assert any(not p.model.normalize_input for p in points)


def test_cpu_study_changes_one_thing_of_the_cpu_recipe():
    """jobs/study_cpu.toml: its reference is the CPU recipe at a shorter budget (its own cosine over
    fewer steps), and each other point changes what its name says and nothing else the reference sets."""
    reference_recipe = load_config(REPO / "jobs" / "cpu.toml")
    points = {p.name.split("-", 2)[-1]: p for p in sweep_points(load_config(REPO / "jobs" / "study_cpu.toml"))}
    ref = points["reference"]
    for section in ("data", "loss", "augment"):
        assert getattr(ref, section) == getattr(reference_recipe, section), section
    # base_channels is the plain U-Net's width only (the course-unet-ce point)
    assert dataclasses.replace(ref.model, base_channels=0) == dataclasses.replace(reference_recipe.model, base_channels=0)
    assert ref.optim == reference_recipe.optim
    assert ref.train.global_batch == reference_recipe.train.global_batch
    assert ref.train.steps < reference_recipe.train.steps
    assert len({(p.train.steps, p.train.global_batch, p.data.input_size) for p in points.values()}) == 1
    assert points["reference-seed1"].train.seed == 1 and {p.train.seed for n, p in points.items() if n != "reference-seed1"} == {0}
    assert (points["course-unet-ce"].model.name, points["course-unet-ce"].loss.name) == ("unet", "ce")
    assert points["aug-report"].augment.enabled and (points["aug-report"].augment.shift, points["aug-report"].augment.rotation) == (0.3, 5.0)
    assert points["loss-ce"].loss.name == "ce" and points["loss-ce"].loss.class_weights == ref.loss.class_weights
    assert not points["one-head"].model.stage_heads
