"""The training loop: recipes, the run folder, refusals, a non-finite loss, a full disk, the progress
bar, and the tracking mode. Runs are real (in this process through amodal.train.main, or as
`python -m amodal.train` processes where a terminal or a resource limit is needed)."""

import fcntl
import json
import os
import pty
import resource
import shutil
import struct
import subprocess
import sys
import signal
import termios
import time
from pathlib import Path

import pytest
import torch

from amodal import checkpoint as ck
from amodal import tracking
from amodal.config import ConfigError, load_config
from amodal.data.pack import pack_synthetic
from amodal.data.sampler import per_rank_batch
from amodal.models import build_model
from amodal.optim import make_optimizer, warmup_cosine
from amodal.signals import EXIT_INTERRUPTED
from amodal.distributed import DistInfo
from amodal.train import NonFiniteLossError, Trainer, main, train
from test_train_support import REPO, TINY, base_env, events

RECIPES = REPO / "jobs"


def cli(run_dir, data_root, *overrides) -> list[str]:
    args = ["--run-dir", str(run_dir), "--set", f"data.root={json.dumps(str(data_root))}"]
    for o in TINY + list(overrides):
        args += ["--set", o]
    return args


def tiny_config(data_root, *overrides):
    return load_config(None, [f"data.root={json.dumps(str(data_root))}", *TINY, *overrides])


# -- recipes and small pieces --------------------------------------------------------------------------


def test_recipes():
    best = load_config(RECIPES / "train.toml")
    assert (best.model.name, best.model.encoder_depth, best.model.stage_heads) == ("resnet_unet", 50, True)
    assert best.loss.name == "dice_ce"
    a = best.augment
    assert (a.enabled, a.shift, a.scale, a.rotation, a.colour) == (True, 0.3, 0.3, 5.0, 0.3)
    baseline = load_config(RECIPES / "baseline.toml")
    assert (baseline.model.name, baseline.loss.name, baseline.augment.enabled) == ("unet", "ce", False)
    demo = load_config(RECIPES / "demo.toml")  # the measured choices of its header
    assert (demo.model.name, demo.model.normalize_input, demo.augment.enabled) == ("resnet_unet", True, False)
    assert len(demo.loss.class_weights) == 17
    cpu = load_config(RECIPES / "cpu.toml")  # the report's design at a laptop's size (its header)
    assert (cpu.model.name, cpu.model.encoder_depth, cpu.model.stage_heads, cpu.loss.name) == ("resnet_unet", 18, True, "dice_ce")
    assert cpu.model.encoder_layers == demo.model.encoder_layers == 3 and best.model.encoder_layers == 4
    assert cpu.loss.class_weights == demo.loss.class_weights and not cpu.augment.enabled
    assert cpu.train.steps * cpu.train.global_batch <= 2 * cpu.data.synthetic_train  # fresh images: at most two passes
    smoke = load_config(RECIPES / "smoke.toml")
    assert smoke.data.make_synthetic and smoke.train.device == "auto" and smoke.train.val_every > 0
    assert smoke.train.steps * smoke.train.global_batch <= 1000  # a minute on two cores


def test_per_rank_batch():
    assert per_rank_batch(32, 4) == 8
    with pytest.raises(ConfigError, match=r"train.global_batch = 6 is not divisible by the number of processes \(4\)"):
        per_rank_batch(6, 4)


def test_warmup_cosine_schedule():
    f = warmup_cosine(warmup=10, total=110, min_ratio=0.01)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.505)
    assert f(110) == pytest.approx(0.01) and f(1000) == pytest.approx(0.01)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))


@pytest.mark.slow
def test_optimizer_fused_with_decay_groups():
    """The trainer's AdamW runs the fused kernel (on the CPU too), keeps biases and norm weights out of
    weight decay, and steps like the for-each AdamW it replaced."""
    cfg = load_config(None, ["model.name=\"resnet_unet\"", "model.encoder_depth=18", "optim.weight_decay=0.05"])
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_model(cfg.model))
    fused = make_optimizer(models[0], cfg.optim)
    assert all(g["fused"] for g in fused.param_groups)
    decay, no_decay = fused.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    params = list(models[1].parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.05},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    foreach = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), foreach=True)
    x = torch.rand(2, 3, 64, 64)
    for _ in range(3):
        # The same gradients for both (Adam's first steps move even a near-zero gradient by about lr, so
        # gradients computed apart could differ in sign by rounding): only the kernels differ.
        fused.zero_grad(set_to_none=True)
        models[0](x).square().mean().backward()
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            q.grad = p.grad.clone()
        fused.step()
        foreach.step()
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_tracking_mode(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert tracking.resolve_mode("auto") == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password not-a-real-key\n")
    assert tracking.resolve_mode("auto") == "online"
    (tmp_path / "netrc").write_text("machine example.org\n  login user\n  password x\n")
    assert tracking.resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "not-a-real-key")
    assert tracking.resolve_mode("auto") == "online"
    assert tracking.resolve_mode("offline") == "offline" and tracking.resolve_mode("off") == "off"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.resolve_mode("auto") == "off"
    with pytest.raises(ValueError, match="tracking.wandb"):
        tracking.resolve_mode("sometimes")


# -- one finished run, then what may and may not follow it ----------------------------------------------


@pytest.fixture(scope="module")
def finished_run(synthetic_shards, tmp_path_factory):
    """A 4-step run (validation and a save at steps 2 and 4), made in this process by the CLI's main()."""
    run_dir = tmp_path_factory.mktemp("train") / "run"
    code = main(cli(run_dir, synthetic_shards, "train.steps=4", "train.val_every=2", "checkpoint.every_steps=2"))
    assert code == 0
    return run_dir


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


@pytest.mark.slow
def test_run_folder(finished_run, synthetic_shards):
    run_dir = finished_run
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train"]["steps"] == 4 and config["data"]["root"] == str(synthetic_shards)
    kinds = [e["event"] for e in events(run_dir)]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert kinds.count("train") == 4 and kinds.count("val") == 2 and "first_step" in kinds
    val = events(run_dir, "val")[-1]
    assert 0.0 <= val["miou"] <= 1.0 and val["count"] > 0 and len(val["part_iou"]["left"]) == 16
    assert [s for s, _ in ck.list_checkpoints(run_dir)] == [2, 4]
    state = torch.load(ck.step_path(run_dir, 4), weights_only=True)  # plain torch.load, no pickle
    assert set(ck.REQUIRED_KEYS) <= set(state)
    assert state["step"] == 4 and state["samples_seen"] == 16 and state["global_batch"] == 4
    assert state["config"]["train"]["steps"] == 4 and state["config"]["model"]["name"] == "unet"
    assert state["fingerprint"] == json.loads((synthetic_shards / "manifest.json").read_text())["fingerprint"]
    best = ck.best_checkpoint(run_dir)
    assert ck.load_checkpoint(best)["best_miou"] == max(e["miou"] for e in events(run_dir, "val"))
    log = (run_dir / "log.txt").read_text()
    assert "step 4/4" in log and "val step 4" in log and "finished at step 4" in log


@pytest.mark.slow
def test_resume_refuses_another_global_batch(finished_run, tmp_path, synthetic_shards):
    run_dir = copy_run(finished_run, tmp_path)
    cfg = tiny_config(synthetic_shards, "train.steps=6", "train.global_batch=8")
    with pytest.raises(ck.CheckpointError, match=r"train.global_batch 4 in the checkpoint, 8 now.*allow_mismatch"):
        train(cfg, run_dir)
    # The override exists, and then the run goes on from its checkpoint.
    cfg = tiny_config(synthetic_shards, "train.steps=5", "train.global_batch=8", "train.val_every=0",
                      "checkpoint.allow_mismatch=true")
    result = train(cfg, run_dir)
    assert result.step == 5 and not result.interrupted


@pytest.mark.slow
def test_resume_refuses_other_data(finished_run, tmp_path):
    other = tmp_path / "other-data"
    pack_synthetic(other, 8, 4, 0, seed=1, progress=False)
    run_dir = copy_run(finished_run, tmp_path)
    code = main(cli(run_dir, other, "train.steps=6"))
    assert code == 1
    with pytest.raises(ck.CheckpointError, match="data fingerprint .* in the checkpoint, .* now"):
        train(tiny_config(other, "train.steps=6"), run_dir)
    assert [s for s, _ in ck.list_checkpoints(run_dir)] == [2, 4]  # nothing written


@pytest.mark.slow
def test_resume_extends_the_run_with_a_progress_bar_on_a_terminal(finished_run, tmp_path, synthetic_shards):
    run_dir = copy_run(finished_run, tmp_path)
    args = [sys.executable, "-m", "amodal.train", *cli(run_dir, synthetic_shards, "train.steps=6",
                                                        "train.val_every=0")]
    primary, secondary = pty.openpty()
    # A terminal of 120 columns (a fresh pseudo-terminal has none, and tqdm would draw nothing).
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(args, cwd=REPO, env=base_env(), stdout=secondary, stderr=secondary)
    os.close(secondary)
    chunks = []
    while True:
        try:
            data = os.read(primary, 65536)
        except OSError:  # EIO: the terminal closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(primary)
    assert proc.wait(timeout=120) == 0
    out = b"".join(chunks).decode(errors="replace")
    assert "resuming from" in out and "step-00000004.pt" in out
    assert "6/6" in out and "step/s" in out and "img_s=" in out  # tqdm's bar, not plain lines
    assert "step 5/6  loss" not in out
    assert [e["step"] for e in events(run_dir, "train")][-2:] == [5, 6]
    assert json.loads((run_dir / "config.json").read_text())["train"]["steps"] == 6


@pytest.mark.slow
def test_full_disk_during_a_save_is_a_clear_error(finished_run, tmp_path, synthetic_shards):
    run_dir = copy_run(finished_run, tmp_path)
    before = ck.step_path(run_dir, 4).read_bytes()

    def limit_file_size():
        # Real write failures: no file of this process may grow past 256 kB (a checkpoint is ~3 MB,
        # the logs stay far smaller). Python ignores SIGXFSZ, so a write fails with EFBIG.
        resource.setrlimit(resource.RLIMIT_FSIZE, (256_000, 256_000))

    args = [sys.executable, "-m", "amodal.train", *cli(run_dir, synthetic_shards, "train.steps=6",
                                                        "train.val_every=0", "checkpoint.every_steps=1")]
    proc = subprocess.run(args, cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=180,
                          preexec_fn=limit_file_size)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "could not write checkpoint" in proc.stderr and "step-00000005.pt" in proc.stderr
    assert "File too large" in proc.stderr
    # The previous checkpoint is untouched and is what a resume picks; no temporary file is left.
    assert [s for s, _ in ck.list_checkpoints(run_dir)] == [2, 4]
    assert ck.step_path(run_dir, 4).read_bytes() == before
    assert ck.latest_checkpoint(run_dir) == ck.step_path(run_dir, 4)
    assert not [p for p in (run_dir / "checkpoints").iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_non_finite_loss_stops_with_the_step_and_saves_nothing_bad(synthetic_shards, tmp_path, capsys):
    # A learning rate of 1e30 makes the weights huge after step 1 and the loss NaN at step 2.
    run_dir = tmp_path / "run"
    code = main(cli(run_dir, synthetic_shards, "train.steps=6", "train.val_every=0", "optim.lr=1e30",
                    "optim.warmup_steps=0", "checkpoint.every_steps=1"))
    assert code == 1 and code != EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "non-finite loss or gradient at step 2" in err
    saved = ck.list_checkpoints(run_dir)
    assert [s for s, _ in saved] == [1]
    state = ck.load_checkpoint(saved[-1][1])
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    (error,) = events(run_dir, "error")
    assert "NonFiniteLossError" in error["error"] and "step 2" in error["error"]
    # In a Python caller it is an exception of its own kind.
    with pytest.raises(NonFiniteLossError, match="step 2"):
        train(tiny_config(synthetic_shards, "train.steps=6", "train.val_every=0", "optim.lr=1e30",
                          "optim.warmup_steps=0"), tmp_path / "again")


def test_fit_without_set_up_is_a_clear_error(synthetic_shards, tmp_path):
    log = tracking.RunLog(tmp_path, main=True)
    try:
        trainer = Trainer(tiny_config(synthetic_shards, "train.steps=1"), tmp_path, DistInfo(0, 1, 0, torch.device("cpu")),
                          log)
        with pytest.raises(RuntimeError, match=r"Trainer.fit\(\) before Trainer.set_up\(\)"):
            trainer.fit()
    finally:
        log.close()


@pytest.mark.slow
def test_periodic_saves_by_minutes(synthetic_shards, tmp_path):
    # Saves by time alone (no step interval): a tiny interval saves after every step.
    cfg = tiny_config(synthetic_shards, "train.steps=3", "train.val_every=0", "checkpoint.every_steps=0",
                      "checkpoint.every_minutes=1e-9", "checkpoint.keep_last=5")
    assert train(cfg, tmp_path / "often").step == 3
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "often")] == [1, 2, 3]
    # Neither interval: only the final save.
    cfg = tiny_config(synthetic_shards, "train.steps=3", "train.val_every=0", "checkpoint.every_steps=0",
                      "checkpoint.every_minutes=0")
    assert train(cfg, tmp_path / "final").step == 3
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "final")] == [3]


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process below pid, read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            try:
                cmdline = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            found.append((child, cmdline))
            todo.append(child)
    return found


@pytest.mark.slow
def test_wandb_service_killed_mid_run_costs_one_warning_and_no_step(tmp_path, synthetic_shards):
    """What a user runs (wandb offline, a loader worker, a ResNet U-Net): the wandb service dies mid-run,
    as Slurm's SIGTERM can kill it; training goes on to the end with one warning, metrics.jsonl keeps
    every record, and the checkpoint keeps the run id for the next start."""
    from test_train_support import Launch, last_step

    launch = Launch(tmp_path / "run", synthetic_shards,  # the demo's and the CPU recipe's model
                    ["tracking.wandb=offline", "data.num_workers=1", "model.name=resnet_unet",
                     "model.encoder_depth=18", "model.encoder_layers=3", "train.steps=30", "train.val_every=10"])
    trainer = launch.procs[0]
    deadline = time.monotonic() + 180
    while last_step(launch.run_dir) < 3:
        assert trainer.poll() is None and time.monotonic() < deadline, launch.wait()[1][0]
        time.sleep(0.05)
    services = [pid for pid, cmd in descendants(trainer.pid) if "wandb" in cmd]
    assert services, f"no wandb process under the trainer: {descendants(trainer.pid)}"
    killed_at = last_step(launch.run_dir)
    for pid in services:
        os.kill(pid, signal.SIGKILL)
    codes, outs = launch.wait()
    assert codes == [0], outs[0]
    warnings = [line for line in outs[0].splitlines() if line.startswith("warning: wandb")]
    assert len(warnings) == 1, outs[0]
    assert killed_at < 30 and [e["step"] for e in events(launch.run_dir, "done")] == [30]
    assert [e["step"] for e in events(launch.run_dir, "val")] == [10, 20, 30]
    start = events(launch.run_dir, "start")[0]
    assert ck.load_latest(launch.run_dir)[1]["wandb_run_id"] == start["wandb_run_id"] is not None


@pytest.mark.slow
def test_cpu_threads_leave_no_core_idle_for_loader_workers(tmp_path, synthetic_shards, monkeypatch):
    """On the CPU the math gets every CPU of this rank's share, with loader workers on: a worker reads
    thousands of samples/s and idles at CPU training rates (tools/bench_train.py --workers)."""
    from amodal.train import cpu_threads

    cpus = len(os.sched_getaffinity(0))
    for name in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    assert cpu_threads() == cpus
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on this node share it
    assert cpu_threads() == max(1, cpus // 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's choice wins
    assert cpu_threads() is None
    monkeypatch.delenv("OMP_NUM_THREADS")

    before = torch.get_num_threads()
    try:
        train(tiny_config(synthetic_shards, "train.steps=2", "train.val_every=0", "data.num_workers=1"),
              tmp_path / "run")
    finally:
        torch.set_num_threads(before)
    assert events(tmp_path / "run", "start")[0]["cpu_threads"] == cpus


@pytest.mark.slow
def test_deep_supervision_trains_a_resnet_and_is_refused_for_a_plain_model(synthetic_shards, tmp_path):
    run = tmp_path / "deep"
    code = main(cli(run, synthetic_shards, "train.steps=2", "train.val_every=2", "model.name=resnet_unet",
                    "model.encoder_depth=18", "loss.name=dice_ce", "loss.stage_weight=0.5"))
    assert code == 0
    (val,) = events(run, "val")
    assert 0.0 <= val["miou"] <= 1.0
    with pytest.raises(ConfigError, match="loss.stage_weight"):
        train(tiny_config(synthetic_shards, "train.steps=1", "loss.stage_weight=0.5"), tmp_path / "plain")
