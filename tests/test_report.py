"""tools/report.py on run folders written here in the trainer's format (config.json + metrics.jsonl)."""

import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

import amodal.report as report
from amodal.config import Config

REPO = Path(__file__).resolve().parents[1]


# Records as amodal/train.py writes them (its log.event calls), time stamps included.
def start_record(step, device="cpu", world_size=1):
    return {"event": "start", "time": 1.0, "step": step, "resumed_from": None, "world_size": world_size,
            "device": device, "precision": "fp32", "wandb": "off", "wandb_run_id": None}


def train_record(step, img_per_s, loss=1.0):
    return {"event": "train", "time": 2.0, "step": step, "epoch": 0, "loss": loss, "lr": 1e-3,
            "img_per_s": img_per_s, "seconds": 1.5}


def val_record(step, miou, occluded, left, right):
    return {"event": "val", "time": 3.0, "step": step, "miou": miou, "occluded_miou": occluded, "count": 64,
            "best_miou": miou, "ema": False, "seconds": 0.5, "part_iou": {"left": left, "right": right}}


def checkpoint_record(step):
    return {"event": "checkpoint", "time": 4.0, "step": step, "path": f"checkpoints/step-{step:08d}.pt",
            "best": True, "seconds": 0.1}


def make_run(folder: Path, cfg: Config, records: list[dict], tail: str = "") -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(cfg.dumps())
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    (folder / "checkpoints").mkdir()
    return folder


def parts(value, none_at=()):
    return [None if i in none_at else value + i / 100 for i in range(16)]


@pytest.fixture()
def sweep(tmp_path):
    """A sweep folder with three runs (one never validated) and a submitit folder beside them."""
    root = tmp_path / "runs" / "study"
    unet = Config(name="study-000-unet")
    unet.model.name, unet.model.base_channels, unet.loss.name = "unet", 16, "ce"
    unet.train.steps = 300
    make_run(root / "study-000-unet", unet, [
        start_record(0), train_record(100, 40.0), checkpoint_record(100), val_record(100, 0.20, 0.10, parts(0.2), parts(0.3)),
        train_record(200, 50.0), val_record(200, 0.31, 0.15, parts(0.4), parts(0.5, none_at={3})),
        train_record(300, 45.0), val_record(300, 0.29, 0.14, parts(0.1), parts(0.1)),
    ])
    res = Config(name="study-001-reference")
    res.model.encoder_depth, res.train.steps, res.train.ema, res.train.tta_flip = 18, 300, 0.99, True
    res.augment.shift, res.augment.rotation = 0.15, 2.5
    make_run(root / "study-001-reference", res, [
        start_record(0, "cpu"), train_record(100, 10.0), train_record(200, 30.0),
        start_record(200, "cuda:0", 4), train_record(300, 20.0), train_record(350, 99.0),  # resumed on 4 GPUs
        val_record(300, 0.42, None, parts(0.6), parts(0.7)), {"event": "done", "step": 350, "best_miou": 0.42},
    ], tail='{"event": "train", "step": 4')  # a last line cut short by a kill: dropped
    noval = Config(name="study-002-aug-off")
    noval.augment.enabled, noval.train.steps = False, 300
    make_run(root / "study-002-aug-off", noval, [train_record(100, 12.0), train_record(150, 14.0)])
    (root / "submitit").mkdir()  # not a run: skipped inside a sweep folder
    return root


def table_rows(md: str, first_cell: str = "#") -> list[list[str]]:
    """Rows of the first markdown table whose header starts with first_cell."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_cell} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


@pytest.mark.slow
def test_report_of_a_sweep_folder(sweep, tmp_path):
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, str(REPO / "tools" / "report.py"), str(sweep), "-o", str(out),
                             "--baseline", "unet"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    md = (out / "results.md").read_text()
    rows = table_rows(md)
    assert [r["run"] for r in rows] == ["`study-001-reference`", "`study-000-unet`", "`study-002-aug-off`"]
    ref, unet, noval = rows
    assert (ref["model"], ref["loss"], ref["aug t/s/r/c"], ref["extras"]) == (
        "resnet_unet R18", "dice_ce", "0.15/0.3/2.5/0.3", "EMA 0.99, flip TTA")
    assert (ref["steps"], ref["device"], ref["images/s"], ref["val mIoU"], ref["occluded mIoU"], ref["best step"]) == (
        "350 of 300", "cuda x4", "25.0", "0.4200", "—", "300")  # median of 10, 30, 20, 99
    assert ref["Δ mIoU vs study-000-unet"] == "+0.1100"
    # the best validation is step 200 (0.31), not the last one (0.29); occluded mIoU from that same step
    assert (unet["model"], unet["loss"], unet["steps"], unet["device"], unet["images/s"]) == (
        "unet c16", "ce", "300", "cpu", "45.0")
    assert (unet["val mIoU"], unet["occluded mIoU"], unet["best step"]) == ("0.3100", "0.1500", "200")
    assert unet["Δ mIoU vs study-000-unet"] == "+0.0000"
    assert (noval["aug t/s/r/c"], noval["steps"], noval["device"], noval["images/s"]) == ("off", "150 of 300", "—", "13.0")
    assert noval["val mIoU"] == noval["occluded mIoU"] == noval["best step"] == noval["Δ mIoU vs study-000-unet"] == "—"

    part_rows = {r["run"]: r for r in table_rows(md, "run")}
    # mean of the two hands at step 200: left 0.40 + i/100, right 0.50 + i/100 (right T3 missing: left only)
    assert part_rows["`study-000-unet`"]["palm"] == "0.45"
    assert part_rows["`study-000-unet`"]["T3"] == "0.43"
    assert part_rows["`study-001-reference`"]["L3"] == f"{(0.6 + 0.7) / 2 + 0.15:.2f}"
    assert set(part_rows["`study-002-aug-off`"].values()) == {"`study-002-aug-off`", "—"}

    data = json.loads((out / "results.json").read_text())
    assert [r["run"] for r in data] == ["study-001-reference", "study-000-unet", "study-002-aug-off"]
    assert data[1]["miou"] == 0.31 and data[0]["occluded_miou"] is None
    for name in ("miou.png", "parts.png"):
        img = cv2.imread(str(out / name))
        assert img is not None and img.shape[0] > 200 and img.shape[1] > 600, name
    assert not list(out.glob(".*tmp*"))


def test_runs_given_one_by_one_and_charts_without_any_validation(sweep, tmp_path):
    rows = report.report([sweep / "study-002-aug-off", sweep / "study-000-unet", sweep / "study-000-unet"],
                         tmp_path / "r")
    assert [r["run"] for r in rows] == ["study-000-unet", "study-002-aug-off"]
    rows = report.report([sweep / "study-002-aug-off"], tmp_path / "none")
    assert rows[0]["miou"] is None
    assert cv2.imread(str(tmp_path / "none" / "miou.png")) is not None
    assert cv2.imread(str(tmp_path / "none" / "parts.png")) is not None


def test_not_a_run_folder_is_an_error_naming_it(sweep, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main([str(sweep), str(empty), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{empty}: not a run folder (no config.json) and holds no run folders" in err
    assert not (tmp_path / "out" / "results.md").exists()
    assert report.main([str(tmp_path / "missing"), "-o", str(tmp_path / "out")]) == 2
    assert "missing: no such folder" in capsys.readouterr().err


def test_bad_files_are_errors_naming_them(sweep, tmp_path, capsys):
    metrics = sweep / "study-000-unet" / "metrics.jsonl"
    metrics.write_text('{"event": "train", "step": 1}\nnot json\n{"event": "train", "step": 2}\n')
    assert report.main([str(sweep), "-o", str(tmp_path / "out")]) == 2
    assert f"{metrics}:2: not a JSON record" in capsys.readouterr().err
    config = sweep / "study-001-reference" / "config.json"
    config.write_text(json.dumps({"model": {"name": "unet", "depth": 3}}))
    assert report.main([str(config.parent), "-o", str(tmp_path / "out")]) == 2
    assert f"{config}.model: unknown key 'depth'" in capsys.readouterr().err


def test_unknown_baseline(sweep, tmp_path, capsys):
    assert report.main([str(sweep), "-o", str(tmp_path / "out"), "--baseline", "study-00"]) == 2
    assert "--baseline 'study-00': 3 runs match" in capsys.readouterr().err


def test_learning_curves_per_image_and_per_minute(sweep, tmp_path):
    # A run resumed at step 200 validates step 200 again: the curve keeps the last record of that step.
    cfg = Config(name="resumed")
    cfg.train.global_batch, cfg.train.steps = 8, 300
    cfg.loss.stage_weight, cfg.model.normalize_input, cfg.loss.class_weights = 0.5, False, [1.0] * 17
    make_run(sweep / "resumed", cfg, [
        start_record(0), train_record(100, 10.0), val_record(100, 0.05, 0.01, parts(0.0), parts(0.0)),
        train_record(200, 10.0), val_record(200, 0.10, 0.02, parts(0.0), parts(0.0)),
        start_record(200), val_record(200, 0.11, 0.02, parts(0.0), parts(0.0)),
        train_record(300, 10.0), val_record(300, 0.20, 0.03, parts(0.0), parts(0.0)),
    ])
    out = tmp_path / "report"
    rows = {r["run"]: r for r in report.report([sweep], out)}
    assert rows["resumed"]["extras"] == "deep supervision 0.5, raw BGR input, class weights"
    assert [(p["step"], p["images"], p["minutes"], p["miou"]) for p in rows["resumed"]["curve"]] == [
        (100, 800, 0.025, 0.05), (200, 1600, 0.05, 0.11), (300, 2400, 0.075, 0.20)]
    # global batch 32 (the default); the train records hold 1.5 s each
    assert [(p["images"], p["miou"]) for p in rows["study-000-unet"]["curve"]] == [
        (3200, 0.20), (6400, 0.31), (9600, 0.29)]
    assert rows["study-002-aug-off"]["curve"] == []
    saved = {r["run"]: r for r in json.loads((out / "results.json").read_text())}
    assert saved["resumed"]["curve"] == rows["resumed"]["curve"]
    md = (out / "results.md").read_text()
    assert "- `resumed`: 800: 0.0500, 1600: 0.1100, 2400: 0.2000" in md
    assert "- `study-002-aug-off`" not in md and "![learning curves](curves.png)" in md
    img = cv2.imread(str(out / "curves.png"))
    assert img is not None and img.shape[0] > 300 and img.shape[1] > 1000
    # a line is drawn for each validated run: the chart is not blank between the axes
    assert (img[60:-60, 80:-80] < 200).any(axis=2).mean() > 0.01
