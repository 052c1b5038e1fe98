"""The launcher without a Slurm cluster: --dry-run output, config errors, a real run with submitit's
local executor (wall-time signal, requeue by exit status 144, resume), the export job, and status.
The real-cluster tests are in tests/test_slurm_jobs.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from amodal import jobs, launch, requeues, status
from amodal.checkpoint import list_checkpoints
from amodal.config import load_config
from amodal.outcome import KINDS

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "jobs" / "smoke.toml")


def tiny(shards: Path, steps: int) -> list[str]:
    """--set overrides that make jobs/smoke.toml a few seconds of training on the shared shards."""
    sets = {"data.root": shards, "data.make_synthetic": "false", "model.base_channels": 8, "data.input_size": 32,
            "train.global_batch": 4, "data.num_workers": 0, "train.val_every": 0, "tracking.wandb": "off",
            "train.steps": steps, "checkpoint.every_steps": 25, "train.log_every": 10}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def run_main(capsys, *argv) -> tuple[int, str, str]:
    code = launch.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_exit_status_matches_the_trainer():
    from amodal.signals import EXIT_INTERRUPTED

    assert jobs.EXIT_INTERRUPTED == EXIT_INTERRUPTED


def test_dry_run_prints_batch_script_and_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_main(capsys, SMOKE, "--cluster", "slurm", "--dry-run", "--partition", "gpu", "--hours", "2",
                            "--gpus-per-node", "0", "--cpus-per-task", "1", "--exclude", "n9", "--mem", "2G",
                            "--set", "data.root=data/here")
    assert code == 0
    script = out.split("# config of")[0]
    for line in ("#SBATCH --requeue", "#SBATCH --signal=USR2@300", "#SBATCH --time=120", "#SBATCH --partition=gpu",
                 "#SBATCH --cpus-per-task=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --exclude=n9", "#SBATCH --mem=2G",
                 "#SBATCH --open-mode=append", f"export PYTHONPATH={REPO}", "srun ", "submitit.core._submit"):
        assert line in script, f"{line!r} missing from the batch script:\n{script}"
    assert "--gpus-per-node" not in script and "--dependency" not in script
    config = json.loads(out.split("# config of")[1].split("\n", 1)[1])
    assert config["data"]["root"] == str(tmp_path / "data" / "here")  # relative paths made absolute
    assert config["run_dir"] == str(tmp_path / "runs" / "smoke")
    assert config["slurm"]["hours"] == 2.0 and config["slurm"]["partition"] == "gpu"
    assert list(tmp_path.iterdir()) == [], "a dry run must create nothing"


def test_dry_run_short_limit_halves_the_signal_delay(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_main(capsys, SMOKE, "--cluster", "slurm", "--dry-run", "--hours", "0.0167")
    assert code == 0 and "#SBATCH --time=1\n" in out and "#SBATCH --signal=USR2@30\n" in out


def test_dry_run_sweep_is_one_array_and_after_is_a_dependency(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_main(capsys, str(REPO / "jobs" / "sweep_example.toml"), "--cluster", "slurm", "--dry-run",
                            "--after", "123", "--set", "slurm.array_parallelism=1")
    assert code == 0
    assert "#SBATCH --array=0-1%1" in out and "%A_%a_0_log.out" in out
    assert "#SBATCH --dependency=afterok:123" in out and "#SBATCH --kill-on-invalid-dep=yes" in out
    run_dirs = [json.loads(part.split("\n", 1)[1])["run_dir"] for part in out.split("# config of")[1:]]
    assert run_dirs == [str(tmp_path / "runs" / "sweep_example" / f"sweep_example-00{i}-lr{lr}")
                        for i, lr in ((0, "0.001"), (1, "0.003"))]


def test_default_recipe_and_no_sbatch_means_local(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch (nor anything else) on the PATH
    code, out, _ = run_main(capsys, "--dry-run")
    assert code == 0
    assert out.count("no sbatch on this machine") == 1
    assert "# --cluster local: 1 job(s)" in out
    assert json.loads(out.split("# config of")[1].split("\n", 1)[1])["name"] == "train"  # jobs/train.toml


def test_retrain_takes_the_recipe_and_steps_of_a_finished_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "chosen"
    (run / "checkpoints").mkdir(parents=True)
    chosen = load_config(SMOKE, ["train.steps=7", "model.base_channels=8", "data.root=/data/x"])
    (run / "config.json").write_text(chosen.dumps())
    retrain = str(REPO / "jobs" / "retrain_full.toml")
    code, _, err = run_main(capsys, retrain, "--set", "from_run=runs/chosen", "--dry-run")
    assert code == 2 and "not finished" in err  # no checkpoint at step 7 yet
    (run / "checkpoints" / "step-00000007.pt").write_bytes(b"")  # list_checkpoints goes by the name
    code, out, _ = run_main(capsys, retrain, "--set", "from_run=runs/chosen", "--dry-run", "--cluster", "local")
    assert code == 0
    config = json.loads(out.split("# config of")[1].split("\n", 1)[1])
    assert config["job"] == "retrain_full" and config["name"] == "retrain_full"
    assert config["train"]["steps"] == 7 and config["train"]["val_every"] == 0
    assert config["model"]["base_channels"] == 8 and config["data"]["root"] == "/data/x"
    assert config["data"]["train_splits"] == ["train", "val"]
    assert config["run_dir"] == str(tmp_path / "runs" / "retrain_full")


def test_export_goes_next_to_the_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "a" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "checkpoints" / "step-00000010.pt").write_bytes(b"")  # the launcher checks it is there
    code, out, _ = run_main(capsys, str(REPO / "jobs" / "export.toml"), "--dry-run", "--cluster", "local",
                            "--set", "export.checkpoint=runs/a/checkpoints/step-00000010.pt")
    assert code == 0
    config = json.loads(out.split("# config of")[1].split("\n", 1)[1])
    assert config["run_dir"] == str(tmp_path / "runs" / "a" / "export")
    assert config["export"]["checkpoint"] == str(tmp_path / "runs" / "a" / "checkpoints" / "step-00000010.pt")


@pytest.mark.parametrize("argv, message", [
    (["jobs/nope.toml"], "no such recipe"),
    ([SMOKE, "--set", "train.stepz=3"], "unknown key 'stepz'"),
    ([SMOKE, "--set", "job=evaluate"], "job = 'evaluate'"),
    ([SMOKE, "--hours", "0"], "slurm.hours = 0.0"),
    ([SMOKE, "--cluster", "local", "--after", "12"], "--after 12: only Slurm"),
    ([SMOKE, "--cluster", "local", "--nodes", "2"], "slurm.nodes = 2"),
    ([str(REPO / "jobs" / "export.toml"), "--cluster", "local"], "export.checkpoint"),
    ([str(REPO / "jobs" / "retrain_full.toml"), "--set", "from_run=nowhere"], "no config.json"),
])
def test_config_errors_name_the_key(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(capsys, *argv, "--dry-run")
    assert code == 2 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_slurm_without_sbatch_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    code, _, err = run_main(capsys, SMOKE, "--cluster", "slurm")
    assert code == 2 and "no sbatch" in err


def test_walltime_requeues_are_bounded(tmp_path):
    cfg = load_config(SMOKE, ["slurm.max_walltime_requeues=2"])
    job = jobs.TrainJob(cfg, tmp_path)
    assert [job.interruption(cfg, {"SIGUSR2"}) for _ in range(3)] == ["job", "job", "no"]
    assert job.interruption(cfg, {"SIGTERM"}) == "no"  # scancel: never requeued
    record = requeues.read_requeues(tmp_path)
    assert record["counts"] == dict(dict.fromkeys(KINDS, 0), walltime=3, cancel=1)
    assert [(e["kind"], e["requeued"]) for e in record["interruptions"]] == [
        ("walltime", "job"), ("walltime", "job"), ("walltime", "no"), ("cancel", "no")]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_local_executor_requeues_on_walltime_then_exports(tmp_path, monkeypatch, capsys, synthetic_shards):
    """A local job with a 40 s limit gets USR2 20 s in, saves, exits with 144 (submitit's local requeue),
    is started again and resumes; its second signal is one more than slurm.max_walltime_requeues = 1
    allows, so it stops there. (More work than two runs can do, so this does not depend on the speed.)
    Then the export job, in this process, writes a leaderboard file that passes --check."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code, out, err = run_main(capsys, SMOKE, "--cluster", "local", "--hours", str(40 / 3600), "--name", "loc",
                              "--set", "slurm.signal_delay_s=20", "--set", "slurm.max_walltime_requeues=1",
                              *tiny(synthetic_shards, 5000))
    run = tmp_path / "runs" / "loc"
    assert code == 1 and re.search(r"job \d+ did not finish", err), out[-3000:] + err
    assert re.search(r"submitted train job \d+ on this machine", out)
    assert f"follow it:  amodal-status {run}" in out
    assert "requeueing after the wall-time signal (walltime 1)" in out, out[-3000:]
    first = int(re.search(r"interrupted at step (\d+) \(SIGUSR2\)", out).group(1))
    assert f"resuming from {run}/checkpoints/step-{first:08d}.pt at step {first}/5000" in out, out[-3000:]
    assert "wall-time signal 2 times (slurm.max_walltime_requeues = 1): not requeued" in out, out[-3000:]
    last = list_checkpoints(run)[-1][0]
    assert first < last < 5000
    record = requeues.read_requeues(run)
    assert record["counts"] == dict(dict.fromkeys(KINDS, 0), walltime=2)
    # The second run of the job resumed where the signal stopped the first: no step trained twice.
    one, two = record["interruptions"]
    assert (one["saved_at"], one["stopped_at"], one["resumed_at"], one["redone"]) == (first, first, first, 0)
    assert one["attempt"]["number"] == 0 and two["attempt"]["number"] == 1 and one["requeued"] == "job"
    assert (two["saved_at"], two["requeued"], two["resumed_at"]) == (last, "no", None)
    assert f"restart 1 after wall time: resumed at step {first}, 0 steps trained again" in out

    assert status.main([str(run)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"job +\d+ \(local\): not running", text), text
    assert "wall time 2, preemption 0, node failure 0, requeue by hand 0, scancel 0" in text, text
    assert f"  1. wall time (SIGUSR2): stopped at step {first}, saved at step {first}; resumed at step {first}, " \
           "0 steps redone" in text, text
    assert f"  2. wall time (SIGUSR2): stopped at step {last}, saved at step {last}; not requeued" in text, text
    assert f"checkpoint step {last} of 5000" in text
    assert f"last       interrupted at step {last}: SIGUSR2" in text

    code, out, err = run_main(capsys, str(REPO / "jobs" / "export.toml"), "--cluster", "debug",
                              "--set", "export.checkpoint=runs/loc", "--set", "export.batch_size=8")
    assert code == 0, err
    result = run / "export" / "test.lmdb.tar.gz"
    assert f"leaderboard file: {result}" in out and "validation mIoU: none" in out
    check = subprocess.run([sys.executable, str(REPO / "tools" / "make_submission.py"), "--check", str(result),
                            "--test-shards", str(synthetic_shards)], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert check.returncode == 0 and check.stdout.startswith("OK"), check.stdout + check.stderr
    assert status.main([str(run / "export")]) == 0
    assert f"output     {result}: " in capsys.readouterr().out


def test_status_of_a_missing_run(tmp_path, capsys):
    assert status.main([str(tmp_path / "nothing")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_export_predicts_another_packed_set(tmp_path, monkeypatch, capsys, synthetic_shards):
    """export.shards: a model trained on one set exports a folder of new images packed later with the
    folder importer, at the checkpoint's input size; a folder that is not a packed set, or lacks the
    split, is an error naming the option."""
    from amodal.data.pack import pack_folder
    from amodal.data.sources import write_folder_layout
    from amodal.submission import check_submission, read_submission
    from conftest import framed_samples, tiny_unet_run

    monkeypatch.chdir(tmp_path)
    tiny_unet_run(tmp_path / "runs" / "m", str(synthetic_shards))  # trained at input 64 on synthetic_shards
    new = [s for s in framed_samples(5, prefix="new", seed=3)]
    for s in new:
        s.labels = s.front = None  # new images: no labels
    write_folder_layout(tmp_path / "images", {"test": new})
    pack_folder(tmp_path / "images", tmp_path / "new-shards", progress=False)

    export = str(REPO / "jobs" / "export.toml")
    code, out, err = run_main(capsys, export, "--cluster", "debug", "--set", "export.checkpoint=runs/m",
                              "--set", "export.shards=new-shards", "--set", "export.batch_size=2")
    assert code == 0, err
    result = tmp_path / "runs" / "m" / "export" / "test.lmdb.tar.gz"
    keys, labels = read_submission(result)
    assert keys == [s.key for s in new] and labels.shape == (5, 2, 128, 128)
    check_submission(result, keys)

    for sets, expected in ((["--set", "export.shards=nowhere"], f"export.shards = {tmp_path / 'nowhere'}"),
                           (["--set", "export.shards=new-shards", "--set", "export.split=val"],
                            "export.split = 'val': cannot export from there: split 'val' is not in the manifest")):
        code, out, err = run_main(capsys, export, "--cluster", "debug", "--set", "export.checkpoint=runs/m", *sets)
        assert code != 0 and expected in out + err, out + err


@pytest.mark.slow
def test_a_signal_after_the_training_job_finished_does_not_kill_it(tmp_path, synthetic_shards):
    """A wall-time or preemption signal that comes while a finished training job exits must not end it
    by that signal (Slurm would record the finished job as FAILED, or requeue it)."""
    script = f"""
import os, signal, sys
from amodal.config import absolute_paths, load_config
from amodal.jobs import make_job
cfg = absolute_paths(load_config({str(SMOKE)!r}, {tiny(synthetic_shards, 3)!r}[1::2] + ["run_dir={tmp_path / 'run'}"]))
make_job(cfg, cfg.run_dir)()
# Signals until this process is gone, as Slurm's come at any moment of the exit: a Python handler
# is taken down during the interpreter's shutdown, and a signal after that would end the process.
import subprocess
subprocess.Popen(["sh", "-c", f"while kill -USR2 {{os.getpid()}} && kill -TERM {{os.getpid()}}; do :; done"],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # no pipe of ours: it ends once we are reaped
print("still here")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0 and "still here" in done.stdout, done.stdout + done.stderr
