"""The launcher checks what the job will read before it submits or prints anything, and the job checks
it again as it starts (amodal/preflight.py, issue 23); and it refuses a run folder that another process
holds. Each refusal names the key (or the holder), exits 2 and creates nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amodal import launch
from amodal.config import ConfigError, absolute_paths, job_config, load_config
from amodal.jobs import make_job
from conftest import tiny_unet_run

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "jobs" / "smoke.toml")
EXPORT = str(REPO / "jobs" / "export.toml")
TRAIN = str(REPO / "jobs" / "train.toml")


def refused(capsys, tmp_path, *argv) -> str:
    """Run the launcher (a dry run, then a real local submission: the same checks); its error."""
    errors = []
    for mode in (["--dry-run"], ["--cluster", "local"]):
        before = sorted(tmp_path.rglob("*"))
        started = time.monotonic()
        code = launch.main([*argv, *mode])
        seconds = time.monotonic() - started
        out = capsys.readouterr()
        assert code == 2 and out.out == "", out
        assert sorted(tmp_path.rglob("*")) == before, "a refused launch must create nothing"
        assert seconds < 1.0, f"refused after {seconds:.2f} s"
        errors.append(out.err)
    assert errors[0] == errors[1]
    return errors[0]


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_missing_data_root_is_refused_unless_synthetic_shards_will_be_made(here, capsys):
    err = refused(capsys, here, TRAIN, "--set", "data.root=/nonexistent/shards", "--set", "data.make_synthetic=false")
    assert "data.root = /nonexistent/shards: no manifest.json there, and data.make_synthetic = false" in err
    assert launch.main([TRAIN, "--set", "data.root=/nonexistent/shards", "--dry-run", "--cluster", "slurm"]) == 0


def test_data_that_lacks_a_split_or_a_batch_is_refused(here, capsys, synthetic_shards):
    root = ["--set", f"data.root={synthetic_shards}", "--set", "data.make_synthetic=false"]
    err = refused(capsys, here, SMOKE, *root, "--set", 'data.train_splits=["train", "extra"]')
    assert f"data.root = {synthetic_shards}: split 'extra' is not in the manifest (have: test, train, val)" in err
    err = refused(capsys, here, SMOKE, *root, "--set", "data.val_split=valid")
    assert "split 'valid' is not in the manifest" in err
    err = refused(capsys, here, SMOKE, *root, "--set", "train.global_batch=128")
    assert f"data.train_splits = ['train']: 64 samples in {synthetic_shards}, fewer than one global batch" in err
    err = refused(capsys, here, SMOKE, "--set", "data.root=new", "--set", "data.synthetic_train=4")
    assert "data.synthetic_train = 4: fewer than one global batch (train.global_batch = 8)" in err
    (here / "broken").mkdir()
    (here / "broken" / "manifest.json").write_text("{")
    err = refused(capsys, here, SMOKE, "--set", "data.root=broken")
    assert f"data.root = {here / 'broken'}: {here / 'broken' / 'manifest.json'}: unreadable manifest" in err


def test_export_of_a_missing_or_empty_run_is_refused(here, capsys, synthetic_shards):
    err = refused(capsys, here, EXPORT, "--set", "export.checkpoint=/nonexistent/run")
    assert "export.checkpoint = /nonexistent/run: no such checkpoint file or run folder" in err
    (here / "runs" / "empty").mkdir(parents=True)
    err = refused(capsys, here, EXPORT, "--set", "export.checkpoint=runs/empty")
    assert f"export.checkpoint = {here / 'runs' / 'empty'}: no checkpoint in {here / 'runs' / 'empty' / 'checkpoints'}" in err
    # Not yet trained, but by the job that this export waits for: accepted with --after that job only.
    (here / "runs" / "empty" / "job.json").write_text('{"job_id": "77", "cluster": "slurm"}')
    code = launch.main([EXPORT, "--set", "export.checkpoint=runs/empty", "--after", "78", "--dry-run", "--cluster", "slurm"])
    err = capsys.readouterr().err
    assert code == 2 and "no checkpoint in" in err and "(its job is 77: --after 77 waits for it)" in err
    assert launch.main([EXPORT, "--set", "export.checkpoint=runs/empty", "--after", "77", "--dry-run",
                        "--cluster", "slurm"]) == 0
    capsys.readouterr()
    tiny_unet_run(here / "runs" / "model", str(synthetic_shards))
    (here / "runs" / "model" / "config.json").write_text(json.dumps({"data": {"root": str(synthetic_shards)}}))
    err = refused(capsys, here, EXPORT, "--set", "export.checkpoint=runs/model", "--set", "export.split=tset")
    assert f"the trained run's data.root = {synthetic_shards}, export.split = 'tset': cannot export from there" in err
    assert launch.main([EXPORT, "--set", "export.checkpoint=runs/model", "--dry-run", "--cluster", "slurm"]) == 0


def test_missing_pretrained_weights_and_unfinished_source_runs_are_refused(here, capsys):
    err = refused(capsys, here, TRAIN, "--set", "model.pretrained=/nonexistent/resnet50.pth")
    assert "model.pretrained = /nonexistent/resnet50.pth: no such readable file" in err
    run = here / "runs" / "chosen"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(load_config(SMOKE, ["train.steps=7"]).dumps())
    err = refused(capsys, here, str(REPO / "jobs" / "retrain_full.toml"), "--set", "from_run=runs/chosen")
    assert f"from_run = {run}: not finished (checkpoint at step 0 of 7)" in err


def test_the_job_checks_again_as_it_starts(here, synthetic_shards):
    """What was there at submission may be gone when the job starts: it stops at once, naming the key."""
    data = here / "shards"
    data.mkdir()
    for f in synthetic_shards.iterdir():
        (data / f.name).symlink_to(f)
    cfg = absolute_paths(job_config(load_config(SMOKE, [f"data.root={data}", "data.make_synthetic=false"])))
    job = make_job(cfg, cfg.run_dir)
    (data / "manifest.json").unlink()
    with pytest.raises(ConfigError, match=f"data.root = {data}: no manifest.json there"):
        job()
    assert not Path(cfg.run_dir).exists()


HOLDER = """
import sys, time
from amodal.runlock import acquire
acquire(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def test_a_run_folder_held_by_a_running_process_is_refused(here, capsys, synthetic_shards):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(here / "runs" / "busy")], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        err = refused(capsys, here, SMOKE, "--name", "busy")
        assert f"run folder {here / 'runs' / 'busy'} is held by pid {holder.pid} on " in err
        assert "one writer per run folder. Wait for it to end, or pick another --name" in err
    finally:
        holder.kill()
        holder.wait()
    assert launch.main([SMOKE, "--name", "busy", "--dry-run", "--cluster", "slurm"]) == 0  # gone: free again
