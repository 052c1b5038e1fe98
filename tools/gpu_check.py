"""The GPU acceptance check: one command that fills every GPU figure in one call (docs/gpu.md).

    python tools/gpu_check.py [--device cuda|cpu] [--quick] -o DIR [--work DIR] [--stages a,b] [--budget STAGE=S]
    python tools/gpu_check.py --fetch-wheels [--python-version 3.11] [--platform manylinux2014_x86_64]

Stages, in order, each in a child process of its own with a time budget (a crash, a CUDA error or a
hang in one stage costs that stage only; what it measured before it was stopped is kept):
  env     the card, driver, CUDA, cuDNN, NCCL, torch, the packages, the project's commit
  tests   `pytest -m gpu` (tests/test_gpu.py) on the device, one row per test
  bench   our ResNet-50 U-Net against smp's Unet-ResNet-50: bf16 and channels_last, eager and
          compiled, images/s and peak memory side by side in one process
  loader  the training loader's samples/s from N workers, next to the GPU's step rate at the default
          recipe: whether training is data-bound and how many cores per GPU it needs
  train   the default recipe (jobs/train.toml) trained for a fixed time: images/s, the validation
          mIoU curve, and what that rate means for the recipe's 30,000 steps
  export  1,000 test images predicted, written to the leaderboard file and checked, timed
The report is DIR/<card>.md, a table per stage; for a full (not --quick) run on CUDA also
docs/results/gpu/<card>.md. Before the stages, the wheels in wheels/ (fetched with --fetch-wheels)
whose packages this Python lacks are installed into <work>/site, which the stages put on their path.

--device cpu --quick is the rehearsal: every stage at a tiny size, in a few minutes on two cores,
with an installed checkout or with none (the stages get this checkout on PYTHONPATH). What only CUDA
can check is marked in the report, never passed silently.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("env", "tests", "bench", "loader", "train", "export")
TITLES = {"env": "Environment", "tests": "GPU tests (pytest -m gpu)", "bench": "Model speed: ours against smp",
          "loader": "The loader against the GPU", "train": "The default recipe, trained for a fixed time",
          "export": "Export of the test split to the leaderboard file"}
# Seconds per stage. A full run stays under 8 minutes with the wheels' 15 s: 15 + 465 = 480.
BUDGETS = {"env": 30, "tests": 120, "bench": 130, "loader": 50, "train": 100, "export": 35}
QUICK_BUDGETS = {"env": 60, "tests": 240, "bench": 150, "loader": 90, "train": 120, "export": 90}
WHEELS_BUDGET = 15
RECIPE = ROOT / "jobs" / "train.toml"
RECIPE_STEPS = 30_000


# ==================================================================================================
# Sizes: the full run and the rehearsal's tiny one


def sizes(quick: bool) -> dict:
    if quick:
        return {"data": (64, 16, 32), "depth": 18, "input": 64, "batch": 4, "bench_batch": 2, "bench_steps": 1,
                "bench_rounds": 1, "workers": [1, 2], "loader_seconds": 1.5, "rate_seconds": 2.0,
                "train_seconds": 15.0, "export": 32, "overrides": ["data.num_workers=1"]}
    return {"data": (2048, 256, 1000), "depth": 50, "input": 128, "batch": 32, "bench_batch": 32, "bench_steps": 20,
            "bench_rounds": 3, "workers": None, "loader_seconds": 3.0, "rate_seconds": 5.0,
            "train_seconds": 55.0, "export": 1000, "overrides": []}


def recipe_overrides(ctx: dict) -> list[str]:
    """The default recipe on this check's data, device and sizes; tracking off (wandb is optional here)."""
    s = sizes(ctx["quick"])
    out = [f"data.root={json.dumps(str(data_root(ctx)))}", "data.make_synthetic=false", "tracking.wandb=\"off\"",
           f"train.device=\"{ctx['device']}\""]
    if ctx["quick"]:
        out += [f"model.encoder_depth={s['depth']}", f"data.input_size={s['input']}", f"train.global_batch={s['batch']}"]
    return out + s["overrides"]


def data_root(ctx: dict) -> Path:
    train, val, test = sizes(ctx["quick"])["data"]
    return Path(ctx["work"]) / f"data-{train}-{val}-{test}"


# ==================================================================================================
# A stage's result: tables and notes, written to <work>/<stage>.json after every change


class Result:
    def __init__(self, path: Path):
        self.path = path
        self.data = {"tables": [], "notes": [], "summary": "", "error": None, "values": {}}
        self.flush()

    def table(self, title: str, columns: list[str]) -> list:
        rows: list = []
        self.data["tables"].append({"title": title, "columns": columns, "rows": rows})
        self.flush()
        return rows

    def add(self, rows: list, *row) -> list:
        rows.append([_cell(v) for v in row])
        self.flush()
        return rows[-1]

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        print(f"note: {text}", flush=True)
        self.flush()

    def value(self, key: str, value) -> None:
        self.data["values"][key] = value
        self.flush()

    def summary(self, text: str) -> None:
        self.data["summary"] = text
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}" if abs(v) < 1 else f"{v:.1f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _cpu_threads(ctx: dict) -> None:
    """On the CPU one math thread: the rehearsal shares two cores with its loader workers (and, on a
    developer's machine, with everyone else), and oversubscribed threads make every figure noise."""
    if ctx["device"] == "cpu":
        import torch

        torch.set_num_threads(1)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ensure_data(ctx: dict, res: Result) -> Path:
    """The check's synthetic set (train/val/test counts from sizes()), packed once per work folder."""
    from amodal.config import DataConfig
    from amodal.data.pack import ensure_synthetic

    root = data_root(ctx)
    if (root / "manifest.json").exists():
        return root
    train, val, test = sizes(ctx["quick"])["data"]
    began = time.monotonic()
    ensure_synthetic(DataConfig(root=str(root), make_synthetic=True, synthetic_train=train, synthetic_val=val,
                                synthetic_test=test, synthetic_seed=0))
    res.note(f"packed the synthetic set ({train} train / {val} val / {test} test) in "
             f"{time.monotonic() - began:.1f} s")
    return root


# ==================================================================================================
# Stage 1: the environment


def stage_env(ctx: dict, res: Result) -> None:
    import importlib.metadata as md

    import torch

    rows = res.table("Machine and software", ["what", "value"])
    cuda = ctx["device"] == "cuda"
    card = "cpu"
    if cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda, but torch.cuda.is_available() is False")
        props = torch.cuda.get_device_properties(0)
        card = props.name
        res.add(rows, "card", f"{props.name} ({props.total_memory / 2**30:.0f} GiB, compute capability "
                              f"{props.major}.{props.minor}, {props.multi_processor_count} SMs)")
        res.add(rows, "cards visible", torch.cuda.device_count())
        res.add(rows, "driver", _nvidia_smi("driver_version"))
        res.add(rows, "CUDA (torch built with)", torch.version.cuda)
        res.add(rows, "cuDNN", torch.backends.cudnn.version())
        res.add(rows, "NCCL", ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None)
        res.add(rows, "bf16 supported", torch.cuda.is_bf16_supported())
    else:
        res.add(rows, "card", "none: CPU rehearsal (the figures below are not GPU figures)")
        res.add(rows, "CUDA available to torch", torch.cuda.is_available())
    res.value("card", card)
    res.add(rows, "torch", torch.__version__)
    res.add(rows, "python", f"{platform.python_version()} ({sys.executable})")
    res.add(rows, "platform", platform.platform())
    res.add(rows, "CPU", f"{_cpu_model()}, {_cores()} cores usable, torch threads {torch.get_num_threads()}")
    res.add(rows, "memory", _meminfo())
    res.add(rows, "project commit", project_commit())
    packages = res.table("Packages", ["package", "version", "from"])
    for name in ("torchvision", "numpy", "h5py", "opencv-python-headless", "opencv-python", "tqdm", "matplotlib",
                 "timm", "segmentation-models-pytorch", "submitit", "wandb", "lmdb", "pytest", "pytest-timeout"):
        try:
            dist = md.distribution(name)
            where = str(dist.locate_file(""))
            res.add(packages, name, dist.version, "carried wheel" if "/site" in where and str(ctx["work"]) in where
                    else "this Python")
        except md.PackageNotFoundError:
            res.add(packages, name, "missing", "-")
    res.summary(f"{card}, torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if cuda else ""))


def _nvidia_smi(field: str) -> str:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else \
            f"nvidia-smi failed: {out.stderr.strip()[:200]}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi not available ({type(e).__name__})"


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _meminfo() -> str:
    try:
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        return f"{kb / 2**20:.0f} GiB"
    except (OSError, IndexError, ValueError):
        return "unknown"


def project_commit() -> str:
    """git's HEAD (and whether the tree differs from it); where no .git travelled, wheels/COMMIT, which
    --fetch-wheels writes."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=20)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=20).stdout.strip()
            return head.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    stamp = ROOT / "wheels" / "COMMIT"
    if stamp.exists():
        return f"{stamp.read_text().strip()} (from wheels/COMMIT: no .git here)"
    return "unknown (no .git here and no wheels/COMMIT)"


# ==================================================================================================
# Stage 2: the GPU tests


def stage_tests(ctx: dict, res: Result) -> None:
    import pytest

    rows = res.table("tests/test_gpu.py", ["test", "outcome", "seconds", "note or message"])
    notes = Path(ctx["work"]) / "test-notes.jsonl"
    notes.unlink(missing_ok=True)
    os.environ["AMODAL_GPU_NOTES"] = str(notes)
    os.environ["AMODAL_TEST_DEVICE"] = ctx["device"]
    counts: dict[str, int] = {}

    class Recorder:
        """One row per test, written as soon as the test is done (a stage stopped by its budget keeps them)."""

        def __init__(self):
            self.seconds: dict[str, float] = {}

        def pytest_runtest_logreport(self, report):
            name = report.nodeid.split("::")[-1]
            self.seconds[name] = self.seconds.get(name, 0.0) + report.duration
            done = report.when == "call" or (report.when == "setup" and not report.passed) or \
                (report.when == "teardown" and report.failed)
            if not done:
                return
            if report.skipped:
                outcome = "skipped"
                message = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
                message = message.removeprefix("Skipped: ")
            elif report.failed:
                outcome = "failed" if report.when == "call" else f"error in {report.when}"
                message = _failure_line(report.longreprtext)
            else:
                outcome, message = "passed", ""
            said = [n["note"] for n in map(json.loads, notes.read_text().splitlines()) if n["test"] == name] \
                if notes.exists() else []
            counts[outcome] = counts.get(outcome, 0) + 1
            res.add(rows, name, outcome, self.seconds[name], "; ".join(filter(None, [message, *said])))

    args = ["-m", "gpu", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra", "-W", "ignore::pytest.PytestConfigWarning",
            "--rootdir", str(ROOT), str(ROOT / "tests" / "test_gpu.py")]
    code = pytest.main(args, plugins=[Recorder()])
    res.summary(", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no test ran")
    if ctx["device"] != "cuda" and counts.get("skipped"):
        res.note("skipped rows are CUDA-only checks; they run, and must pass, on a GPU")
    if ctx["device"] == "cuda" and counts.get("skipped"):
        res.note("a test skipped on CUDA: each test should run there; see its reason")
    if code not in (0, pytest.ExitCode.OK):
        raise RuntimeError(f"pytest exit status {int(code)}"
                           + (": some tests failed" if code == pytest.ExitCode.TESTS_FAILED else ""))


def _failure_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("E ")]
    return (lines[0][1:].strip() if lines else text.strip().splitlines()[-1] if text.strip() else "")[:300]


# ==================================================================================================
# Stage 3: our model against smp's, side by side


def _bench_model_tool():
    """tools/bench_model.py as a module: its loss and its peak-memory measurement."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tools_bench_model", ROOT / "tools" / "bench_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stage_bench(ctx: dict, res: Result) -> None:
    import torch
    import torch.nn.functional as F

    from amodal.config import ModelConfig
    from amodal.labels import NUM_OUTPUTS, TARGET_SIZE
    from amodal.models import build_model

    tool = _bench_model_tool()
    _cpu_threads(ctx)
    s = sizes(ctx["quick"])
    device = torch.device(ctx["device"])
    cuda = device.type == "cuda"
    depth, batch, size = s["depth"], s["bench_batch"], s["input"]
    backend = "inductor" if cuda or not ctx["quick"] else "eager"
    if not cuda:
        res.note("CPU rehearsal: fp32 (bf16 autocast only on CUDA), peak memory is the RSS growth of a step"
                 + (", compile with backend 'eager' (dynamo capture only; inductor takes minutes on the CPU)"
                    if backend == "eager" else ""))
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    loss_fn, loss_name = tool.make_loss()
    if isinstance(loss_fn, torch.nn.Module):
        loss_fn = loss_fn.to(device)
    fmt = torch.channels_last
    x = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    target = torch.randint(0, NUM_OUTPUTS // 2, (batch, 2, TARGET_SIZE, TARGET_SIZE), device=device)
    rows = res.table(f"Training step, batch {batch} at {size}², {'bf16 autocast' if cuda else 'fp32'}, channels_last, "
                     f"AdamW{' (fused)' if cuda else ''}, loss {loss_name}; {s['bench_rounds']} rounds x "
                     f"{s['bench_steps']} steps, alternating",
                     ["model", "compiled", "images/s (median)", "peak MiB of a step", "first step s",
                      "vs smp, same mode"])

    def build(kind: str):
        torch.manual_seed(0)
        if kind == "ours":
            return build_model(ModelConfig(name="resnet_unet", encoder_depth=depth))
        try:
            import segmentation_models_pytorch as smp
        except ImportError:
            raise RuntimeError("segmentation_models_pytorch is missing: carry its wheels (docs/gpu.md)") from None
        return smp.Unet(f"resnet{depth}", encoder_weights=None, classes=NUM_OUTPUTS)

    names = {"ours": f"ours: resnet_unet (ResNet-{depth})", "smp": f"smp.Unet (resnet{depth})"}
    speed: dict = {}
    for compiled in (False, True):
        live = {}
        for kind in ("ours", "smp"):
            row = res.add(rows, names[kind], f"yes ({backend})" if compiled else "no", "not reached", None, None, None)
            try:
                model = build(kind).to(device, memory_format=fmt).train()
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=cuda or None)
                net = torch.compile(model, backend=backend) if compiled else model

                def step(net=net, opt=opt):
                    opt.zero_grad(set_to_none=True)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                        logits = net(x)
                    if logits.shape[-2:] != (TARGET_SIZE, TARGET_SIZE):  # smp answers at the input size
                        logits = F.interpolate(logits, size=(TARGET_SIZE, TARGET_SIZE), mode="bilinear",
                                               align_corners=False)
                    loss_fn(logits.float(), target).backward()
                    opt.step()

                began = time.perf_counter()
                step()
                _sync(device)
                row[4] = _cell(time.perf_counter() - began)
                row[2] = "timing"
                res.flush()
                live[kind] = (step, row)
            except Exception as e:  # noqa: BLE001 - one model's failure is a row, the other still runs
                row[2] = f"failed: {type(e).__name__}: {str(e)[:200]}"
                res.flush()
        rates: dict = {k: [] for k in live}
        for r in range(s["bench_rounds"]):
            for kind in (list(live) if r % 2 == 0 else list(live)[::-1]):
                step, _ = live[kind]
                _sync(device)
                began = time.perf_counter()
                for _ in range(s["bench_steps"]):
                    step()
                _sync(device)
                rates[kind].append(batch * s["bench_steps"] / (time.perf_counter() - began))
        for kind, (step, row) in live.items():
            with tool.PeakMemory(device) as peak:
                step()
            speed[(kind, compiled)] = statistics.median(rates[kind])
            row[2], row[3] = _cell(speed[(kind, compiled)]), _cell(peak.mib)
        if ("ours", compiled) in speed and ("smp", compiled) in speed:
            live["ours"][1][5] = f"{speed[('ours', compiled)] / speed[('smp', compiled)]:.2f}x"
        res.flush()
        del live
        if cuda:
            torch.cuda.empty_cache()
    parts = []
    for compiled in (False, True):
        if ("ours", compiled) in speed and ("smp", compiled) in speed:
            parts.append(f"ours/smp {'compiled' if compiled else 'eager'} "
                         f"{speed[('ours', compiled)] / speed[('smp', compiled)]:.2f}x")
    best = max((v for (k, _), v in speed.items() if k == "ours"), default=None)
    if best is not None:
        parts.append(f"ours best {best:,.0f} images/s")
        res.value("ours_images_per_s", best)
    res.summary("; ".join(parts) + (" (goal: >= 1.2x smp)" if cuda and not ctx["quick"] else ""))
    missing = [names[k] for k in ("ours", "smp") if (k, False) not in speed]
    if missing:
        raise RuntimeError(f"not measured: {', '.join(missing)} (see the table)")


# ==================================================================================================
# Stage 4: the loader against the GPU


def stage_loader(ctx: dict, res: Result) -> None:
    import torch

    from amodal.config import load_config
    from amodal.data.dataset import ShardDataset
    from amodal.data.sampler import build_train_loader
    from amodal.losses import build_loss
    from amodal.models import build_model

    s = sizes(ctx["quick"])
    _cpu_threads(ctx)
    device = torch.device(ctx["device"])
    cuda = device.type == "cuda"
    cfg = load_config(RECIPE, recipe_overrides(ctx))
    root = ensure_data(ctx, res)
    batch = cfg.train.global_batch
    ds = ShardDataset(root, cfg.data.train_splits, cfg.data.input_size, augment=cfg.augment, seed=cfg.train.seed)
    cores = _cores()
    counts = s["workers"] or sorted({1, 2, 4, cfg.data.num_workers, 8, max(1, cores - 1)})
    counts = [n for n in counts if n <= max(1, cores - 1)] or [1]

    # The GPU's step rate at the recipe, data already on the device: what the loader has to keep up with.
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        model = model.to(memory_format=torch.channels_last)
    loss_fn = build_loss(cfg.loss).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, fused=cuda or None)
    sample = next(iter(build_train_loader(ds, batch, 0, 1, cfg.train.seed, 0)))
    images = sample["image"].to(device)
    if cuda:
        images = images.contiguous(memory_format=torch.channels_last)
    target = sample["target"].to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = loss_fn(model(images), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()

    for _ in range(3):
        step()
    _sync(device)
    n, began = 0, time.perf_counter()
    while time.perf_counter() - began < s["rate_seconds"] or n < 2:
        step()
        n += 1
        if n % 10 == 0 or not cuda:
            _sync(device)
    _sync(device)
    gpu_rate = n * batch / (time.perf_counter() - began)
    res.value("step_images_per_s", gpu_rate)
    gpu_rows = res.table(f"{'GPU' if cuda else 'CPU'} training step at the recipe (data already on the device)",
                         ["model", "batch", "precision", "steps/s", "images/s"])
    res.add(gpu_rows, f"{cfg.model.name} (ResNet-{cfg.model.encoder_depth}), {cfg.loss.name} loss", batch,
            "bf16, channels_last, fused AdamW" if cuda else "fp32", gpu_rate / batch, gpu_rate)
    del model, opt
    if cuda:
        torch.cuda.empty_cache()

    rows = res.table(f"Loader: batches of {batch}, augmentation on, {cores} cores here",
                     ["workers", "samples/s", "per worker", "start-up s", "vs GPU step rate"])
    rates = {}
    for workers in counts:
        loader = build_train_loader(ds, batch, 0, 1, cfg.train.seed, workers, pin_memory=cuda)
        try:
            it = iter(loader)
            began = time.perf_counter()
            next(it)
            startup = time.perf_counter() - began
            for _ in range(min(4 * workers, 16)):  # drain what the workers prefetched during start-up
                next(it)
            n, began = 0, time.perf_counter()
            while time.perf_counter() - began < s["loader_seconds"] or n < 2:
                n += len(next(it)["image"])
            rates[workers] = n / (time.perf_counter() - began)
        finally:
            loader.close()
        res.add(rows, workers, rates[workers], rates[workers] / workers, startup,
                f"{rates[workers] / gpu_rate:.2f}x")
    per_worker = max(rates[w] / w for w in rates)
    recipe_workers = cfg.data.num_workers
    at_recipe = rates.get(recipe_workers)
    need = math.ceil(gpu_rate / per_worker)
    best_w = max(rates, key=rates.get)
    res.value("loader_per_worker", per_worker)
    verdict = []
    if at_recipe is not None:
        verdict.append(f"at the recipe's {recipe_workers} workers the loader gives {at_recipe:,.0f} samples/s for a "
                       f"step rate of {gpu_rate:,.0f} images/s: "
                       + ("data-bound" if at_recipe < gpu_rate else "not data-bound"))
    verdict.append(f"with {best_w} workers {rates[best_w]:,.0f} samples/s: "
                   + ("data-bound even so" if rates[best_w] < gpu_rate else "keeps up"))
    verdict.append(f"feeding one {'GPU' if cuda else 'device'} takes about {need} workers at {per_worker:,.0f} samples/s "
                   f"each, i.e. {need + 1} cores per GPU with the training process")
    res.summary("; ".join(verdict))
    res.value("cores_per_gpu", need + 1)
    if not cuda:
        res.note("CPU rehearsal: the 'GPU' rate is the CPU's own fp32 step; the verdict means nothing here")
    res.note("the step rate has no per-step host synchronisation; the trainer's rate (next stage) includes its "
             "per-step agreement on [loss finite, stop requested], which waits for the GPU")


# ==================================================================================================
# Stage 5: the default recipe for a fixed time


def stage_train(ctx: dict, res: Result) -> None:
    import torch

    from amodal.config import load_config
    from amodal.train import train

    s = sizes(ctx["quick"])
    seconds = ctx["train_seconds"] or s["train_seconds"]
    base = load_config(RECIPE, recipe_overrides(ctx))
    ensure_data(ctx, res)
    rate = _read_json(Path(ctx["work"]) / "loader.json").get("values", {}).get("step_images_per_s")
    batch = base.train.global_batch
    if rate:
        expected = max(4, int(rate / batch * seconds))  # steps the pure step rate would do in `seconds`
    else:
        expected = 3000 if ctx["device"] == "cuda" and not ctx["quick"] else 20
        res.note(f"no step rate from the loader stage: the schedule assumes {expected} steps in {seconds:.0f} s")
    # Ten validations at the pure step rate: the trainer (data-bound, say) may be several times slower
    # and still gives a curve.
    val_every = max(1, expected // 10)
    log_every = max(1, expected // 20)
    run = Path(ctx["work"]) / "train-run"
    shutil.rmtree(run, ignore_errors=True)
    cfg = load_config(RECIPE, recipe_overrides(ctx) + [
        f"train.steps={2 * expected}", f"train.val_every={val_every}", f"train.log_every={log_every}",
        "checkpoint.every_steps=0", "checkpoint.every_minutes=0", "checkpoint.keep_last=1"])
    res.note(f"recipe jobs/train.toml on the check's synthetic set; train.steps={2 * expected} (the schedule's "
             f"length), stopped by USR2 after {seconds:.0f} s; validation every {val_every} steps")
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGUSR2))
    began = time.monotonic()
    timer.start()
    try:
        result = train(cfg, run)
    finally:
        timer.cancel()
    wall = time.monotonic() - began
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trains = [e for e in events if e["event"] == "train"]
    vals = [e for e in events if e["event"] == "val"]
    start = next(e for e in events if e["event"] == "start")
    t0 = start["time"]
    curve = res.table("Validation mIoU", ["step", "seconds since start", "val mIoU", "train loss (last window)"])
    for v in vals:
        loss = next((e["loss"] for e in reversed(trains) if e["step"] <= v["step"]), None)
        res.add(curve, v["step"], v["time"] - t0, v["miou"], loss)
    steady = [e["img_per_s"] for e in trains[1:]] or [e["img_per_s"] for e in trains]
    img_s = statistics.median(steady) if steady else None
    val_s = statistics.mean([v["seconds"] for v in vals]) if vals else 0.0
    rows = res.table("Speed", ["what", "value"])
    res.add(rows, "device, precision", f"{start['device']}, {start['precision']}")
    res.add(rows, "model", f"{cfg.model.name} (ResNet-{cfg.model.encoder_depth}), input {cfg.data.input_size}², "
                           f"batch {batch}, {cfg.data.num_workers} loader workers")
    res.add(rows, "steps done", f"{result.step} in {wall:.0f} s ({'stopped by the timer' if result.interrupted else 'all'})")
    first = next((e for e in events if e["event"] == "first_step"), None)
    if first:
        res.add(rows, "first step after process start s", first["seconds_since_process_start"])
    res.add(rows, "training images/s (median of log windows after the first)", img_s)
    res.add(rows, "one validation pass s", val_s)
    res.add(rows, "best val mIoU", result.best_miou)
    if img_s:
        full = base.train
        hours = (RECIPE_STEPS * batch / img_s + RECIPE_STEPS // full.val_every * val_s) / 3600
        res.add(rows, f"the recipe's {RECIPE_STEPS:,} steps x {batch} at this rate",
                f"{hours:.2f} h (training + {RECIPE_STEPS // full.val_every} validations of this size)")
        res.value("train_images_per_s", img_s)
        res.summary(f"{img_s:,.0f} images/s; {RECIPE_STEPS:,} steps = {hours:.2f} h; best val mIoU "
                    f"{_cell(result.best_miou)} after {result.step} steps"
                    + (" (goal: >= 8,000 images/s on one H200)" if ctx["device"] == "cuda" and not ctx["quick"] else ""))
    if ctx["device"] != "cuda":
        res.note("CPU rehearsal: precision auto is fp32 on the CPU and the trainer keeps the default layout there")
    if not vals:
        raise RuntimeError("no validation happened in the time given")
    if torch.cuda.is_available():
        res.value("peak_gib", torch.cuda.max_memory_allocated() / 2**30)


# ==================================================================================================
# Stage 6: export to the leaderboard file


def stage_export(ctx: dict, res: Result) -> None:
    import torch

    from amodal.checkpoint import save_checkpoint
    from amodal.config import load_config
    from amodal.data.dataset import ShardDataset
    from amodal.models import build_model
    from amodal.predict import load_model_from_checkpoint, predict_to_file
    from amodal.submission import check_submission, write_submission

    s = sizes(ctx["quick"])
    root = ensure_data(ctx, res)
    export_cfg = load_config(ROOT / "jobs" / "export.toml", ["export.checkpoint=\"unused\""]).export
    source = Path(ctx["work"]) / "train-run"
    if not list((source / "checkpoints").glob("*.pt")):
        # The training stage left nothing: an untrained model of the recipe (export time does not depend
        # on the weights).
        cfg = load_config(RECIPE, recipe_overrides(ctx))
        source = Path(ctx["work"]) / "export-source"
        shutil.rmtree(source, ignore_errors=True)
        torch.manual_seed(0)
        state = {"model": build_model(cfg.model).state_dict(), "optimizer": {}, "scheduler": {}, "scaler": {},
                 "ema": None, "step": 0, "epoch": 0, "samples_seen": 0, "global_batch": cfg.train.global_batch,
                 "fingerprint": "gpu-check", "config": cfg.to_dict(), "wandb_run_id": None, "best_miou": None}
        save_checkpoint(state, source, keep_last=1, is_best=True)
        res.note("no checkpoint from the training stage: exported an untrained model of the recipe")
    out = Path(ctx["work"]) / "export"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rows = res.table(f"{s['export']} test images, batch {export_cfg.batch_size}, flip TTA {export_cfg.tta_flip}",
                     ["step", "seconds", "images/s"])
    began = time.perf_counter()
    model, trained, ckpt_path = load_model_from_checkpoint(source, ctx["device"])
    dataset = ShardDataset(root, "test", input_size=trained["data"]["input_size"])
    keys = dataset.keys()
    n = len(keys)
    _sync(torch.device(ctx["device"]))
    t_load = time.perf_counter() - began
    res.add(rows, "load the checkpoint and the test split", t_load, None)
    began = time.perf_counter()
    predictions = predict_to_file(model, dataset, out / "predictions.h5", export_cfg.batch_size, export_cfg.tta_flip,
                                  ctx["device"], checkpoint=ckpt_path)
    t_pred = time.perf_counter() - began
    res.add(rows, "predict to predictions.h5", t_pred, n / t_pred)
    began = time.perf_counter()
    leaderboard = write_submission(predictions, out / export_cfg.submission, test_keys=keys)
    t_write = time.perf_counter() - began
    res.add(rows, f"write {export_cfg.submission}", t_write, n / t_write)
    began = time.perf_counter()
    check_submission(leaderboard, keys)
    t_check = time.perf_counter() - began
    res.add(rows, "check it against the test keys", t_check, n / t_check)
    total = t_load + t_pred + t_write + t_check
    res.add(rows, "total", total, n / total)
    per_10k = t_load + (t_pred + t_write + t_check) * 10_000 / n
    res.add(rows, "10,000 images at this rate (estimate)", per_10k, 10_000 / per_10k)
    res.summary(f"{n} images in {total:.1f} s, file checked ({leaderboard.stat().st_size / 2**20:.1f} MiB); "
                f"10,000 would take about {per_10k:.0f} s" + (" (goal: < 60 s)" if ctx["device"] == "cuda" else ""))


STAGE_FUNCS = {"env": stage_env, "tests": stage_tests, "bench": stage_bench, "loader": stage_loader,
               "train": stage_train, "export": stage_export}


def run_stage(name: str, ctx: dict) -> int:
    """The child: one stage, its result in <work>/<name>.json; exit status 1 when it failed."""
    res = Result(Path(ctx["work"]) / f"{name}.json")
    try:
        STAGE_FUNCS[name](ctx, res)
        return 0
    except BaseException as e:  # noqa: BLE001 - recorded for the report, then the parent goes on
        res.data["error"] = f"{type(e).__name__}: {e}".strip()
        res.data["traceback"] = traceback.format_exc()[-4000:]
        res.flush()
        traceback.print_exc()
        return 1


# ==================================================================================================
# The parent: wheels, the stages in turn, the report


def wheel_project(path: Path) -> str:
    return re.sub(r"[-_.]+", "-", path.name.split("-")[0]).lower()


def install_wheels(wheels: Path, site: Path, timeout: float = WHEELS_BUDGET) -> list[list[str]]:
    """Install into `site` (--no-deps, --no-index) the wheels whose projects this Python does not have; a
    row per wheel. Without pip the wheels are unpacked, which is what installing a wheel does."""
    import importlib.metadata as md

    rows, missing = [], []
    for whl in sorted(wheels.glob("*.whl")):
        try:
            rows.append([whl.name, f"not needed: {md.version(wheel_project(whl))} installed"])
        except md.PackageNotFoundError:
            missing.append(whl)
    if not missing:
        return rows
    site.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-warn-script-location",
           "--disable-pip-version-check", "--quiet", "--upgrade", "--target", str(site), *map(str, missing)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        how = "installed" if done.returncode == 0 else None
        problem = done.stderr.strip()[-300:]
    except (OSError, subprocess.TimeoutExpired) as e:
        how, problem = None, f"{type(e).__name__}: {e}"
    if how is None:  # no pip here, or it failed: a wheel is a zip of the files as installed
        try:
            for whl in missing:
                with zipfile.ZipFile(whl) as z:
                    z.extractall(site)
            how = f"unpacked (pip: {problem or 'failed'})"
        except (OSError, zipfile.BadZipFile) as e:
            how = f"failed: {type(e).__name__}: {e}; pip: {problem}"
    rows += [[whl.name, f"{how} into {site}"] for whl in missing]
    return rows


# Projects the GPU image has (torch, torchvision, numpy, pillow, h5py, OpenCV, tqdm, matplotlib, timm, and
# what they need); never carried, so that a wheel can never replace the image's own build.
PRESENT = re.compile(r"^(torch|torchvision|triton|numpy|pillow|h5py|opencv-.*|tqdm|matplotlib|timm|huggingface-hub|"
                     r"hf-xet|httpx2|httpcore2|truststore|safetensors|pyyaml|filelock|fsspec|sympy|mpmath|networkx|"
                     r"jinja2|markupsafe|setuptools|nvidia-.*|cuda-.*)$")


def fetch_wheels(args) -> int:
    """Fill wheels/ with what the GPU machine's Python lacks (tools/gpu_wheels.txt, resolved for its Python
    version and platform, less PRESENT): pip download, one wheel per project, no dependencies."""
    out = ROOT / "wheels"
    out.mkdir(exist_ok=True)
    reqs = [line.split("#")[0].strip() for line in (ROOT / "tools" / "gpu_wheels.txt").read_text().splitlines()]
    reqs = [r for r in reqs if r and not (args.no_wandb and r.startswith("wandb"))]
    target = ["--only-binary=:all:", "--python-version", args.python_version, "--platform", args.platform]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
               str(report), "--target", str(Path(tmp) / "t"), *target, *reqs]
        print("+ " + " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            return 1
        resolved = [(i["metadata"]["name"], i["metadata"]["version"]) for i in json.loads(report.read_text())["install"]]
    keep = [f"{n}=={v}" for n, v in resolved if not PRESENT.match(re.sub(r"[-_.]+", "-", n).lower())]
    print(f"resolved {len(resolved)} projects; {len(resolved) - len(keep)} are in the GPU image; downloading "
          f"{len(keep)}: {' '.join(keep)}", flush=True)
    for stale in out.glob("*.whl"):
        stale.unlink()
    code = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(out),
                           *target, *keep]).returncode
    (out / "COMMIT").write_text(project_commit() + "\n")
    total = sum(f.stat().st_size for f in out.glob("*.whl"))
    print(f"{out}: {len(list(out.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB (what the device run carries: "
          "64 MiB in all)")
    return code


def card_slug(card: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", card).strip("-") or "unknown"


def write_report(path: Path, ctx: dict, wheel_rows: list, results: list[dict], seconds: float) -> None:
    cuda = ctx["device"] == "cuda"
    lines = [f"# GPU check: {ctx['card']}" + ("" if cuda else " (CPU rehearsal, not GPU figures)"), ""]
    lines += [f"`python tools/gpu_check.py {' '.join(ctx['argv'])}` on "
              f"{datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}, "
              f"{'quick (tiny sizes)' if ctx['quick'] else 'full sizes'}, {seconds:.0f} s in all. "
              "Stage by stage: docs/gpu.md.", ""]
    lines += ["| # | stage | status | seconds (budget) | summary |", "| ---: | --- | --- | ---: | --- |"]
    for i, r in enumerate(results, 1):
        lines.append(f"| {i} | {TITLES[r['stage']]} | {r['status']} | {r['seconds']:.0f} ({r['budget']}) | "
                     f"{_cell(r.get('summary') or r.get('error') or '')} |")
    if not cuda:
        only = [f"{r['stage']}: {n}" for r in results for n in r.get("notes", []) if "CUDA" in n or "CPU" in n]
        only += [f"tests: {row[0]} ({row[1]}): {row[3]}" for r in results if r["stage"] == "tests"
                 for t in r.get("tables", []) for row in t["rows"] if row[1] == "skipped" or row[3] not in ("", "-")]
        if only:
            lines += ["", "Checked only on CUDA (this rehearsal ran a CPU stand-in or skipped):", ""]
            lines += [f"- {text}" for text in only]
    if wheel_rows:
        lines += ["", "## Carried wheels", "", "| wheel | result |", "| --- | --- |"]
        lines += [f"| {_cell(a)} | {_cell(b)} |" for a, b in wheel_rows]
    for i, r in enumerate(results, 1):
        lines += ["", f"## {i}. {TITLES[r['stage']]}", "", f"Status: **{r['status']}** in {r['seconds']:.1f} s "
                  f"(budget {r['budget']} s)." + (f" {r['summary']}" if r.get("summary") else ""), ""]
        for t in r.get("tables", []):
            lines += [f"{t['title']}:", "", "| " + " | ".join(t["columns"]) + " |",
                      "| " + " | ".join("---" for _ in t["columns"]) + " |"]
            lines += ["| " + " | ".join(row) + " |" for row in t["rows"]] or ["| (no rows) |"]
            lines.append("")
        lines += [f"- {n}" for n in r.get("notes", [])]
        if r.get("error"):
            lines += ["", f"Error: `{_cell(r['error'])[:500]}`"]
            if r.get("log_tail"):
                lines += ["", "```", r["log_tail"], "```"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="every stage at a tiny size (the CPU rehearsal)")
    p.add_argument("-o", "--out", help="folder for the report <card>.md")
    p.add_argument("--work", help="scratch folder: data, runs, stage results (default: a folder in $TMPDIR)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    p.add_argument("--budget", action="append", default=[], metavar="STAGE=SECONDS", help="a stage's time budget")
    p.add_argument("--train-seconds", type=float, default=0.0, help="training time of the train stage")
    p.add_argument("--wheels", default=str(ROOT / "wheels"), help="folder of wheels to install first ('' for none)")
    p.add_argument("--fetch-wheels", action="store_true", help="fill wheels/ with pip download, then stop")
    p.add_argument("--python-version", default="3.11", help="with --fetch-wheels: the GPU machine's Python")
    p.add_argument("--platform", default="manylinux2014_x86_64", help="with --fetch-wheels: its platform tag")
    p.add_argument("--no-wandb", action="store_true", help="with --fetch-wheels: leave wandb out")
    p.add_argument("--stage", help=argparse.SUPPRESS)  # the child's side
    args = p.parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels(args)
    work = Path(args.work or Path(tempfile.gettempdir()) / f"amodal-gpu-check-{args.device}{'-quick' if args.quick else ''}")
    ctx = {"device": args.device, "quick": args.quick, "work": str(work.resolve()), "train_seconds": args.train_seconds}
    if args.stage:
        return run_stage(args.stage, ctx)
    if not args.out:
        p.error("-o DIR is required")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
    budgets = dict(QUICK_BUDGETS if args.quick else BUDGETS)
    for item in args.budget:
        stage, _, value = item.partition("=")
        if stage not in budgets:
            p.error(f"--budget {item}: unknown stage")
        budgets[stage] = int(float(value))

    began = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    site = work / "site"
    wheel_rows = []
    if args.wheels and Path(args.wheels).is_dir():
        wheel_rows = install_wheels(Path(args.wheels), site)
        print(f"wheels: {sum(not r[1].startswith('not needed') for r in wheel_rows)} installed into {site}, "
              f"{sum(r[1].startswith('not needed') for r in wheel_rows)} present already", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", AMODAL_TEST_DEVICE=args.device)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(site) if site.is_dir() else "",
                                                      os.environ.get("PYTHONPATH", "")]))
    child = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--work", ctx["work"]]
    child += ["--quick"] if args.quick else []
    child += ["--train-seconds", str(args.train_seconds)] if args.train_seconds else []

    results = []
    for i, stage in enumerate(stages, 1):
        result_path, log_path = work / f"{stage}.json", work / f"{stage}.log"
        result_path.unlink(missing_ok=True)
        print(f"[{i}/{len(stages)}] {stage}: {TITLES[stage]} (budget {budgets[stage]} s)", flush=True)
        t0 = time.monotonic()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(child + ["--stage", stage], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=budgets[stage])
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the stage and its loader workers
                proc.wait()
                code = None
        r = {"stage": stage, "seconds": time.monotonic() - t0, "budget": budgets[stage], **_read_json(result_path)}
        if code is None:
            r["status"] = "TIMED OUT"
            r["error"] = f"stopped after its budget of {budgets[stage]} s; the rows above are what it measured"
        elif code != 0 or r.get("error"):
            r["status"] = "FAILED"
            r.setdefault("error", None)
            r["error"] = r["error"] or f"exit status {code}"
        else:
            r["status"] = "ok"
        if r["status"] != "ok":
            r["log_tail"] = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        results.append(r)
        print(f"    {r['status']} in {r['seconds']:.1f} s: {r.get('summary') or r.get('error') or ''}", flush=True)

    env_result = next((r for r in results if r["stage"] == "env"), {})
    card = env_result.get("values", {}).get("card") or ("cpu" if args.device == "cpu" else _nvidia_smi("name"))
    ctx.update(card=card, argv=argv)
    seconds = time.monotonic() - began
    name = card_slug(card) + ("-quick" if args.quick else "") + ".md"
    report = Path(args.out) / name
    write_report(report, ctx, wheel_rows, results, seconds)
    print(f"report: {report}")
    if args.device == "cuda" and not args.quick and card != "cpu":
        copy = ROOT / "docs" / "results" / "gpu" / name
        write_report(copy, ctx, wheel_rows, results, seconds)
        print(f"report: {copy}")
    failed = [r["stage"] for r in results if r["status"] != "ok"]
    print(f"{len(results) - len(failed)} of {len(results)} stages ok in {seconds:.0f} s"
          + (f"; not ok: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
