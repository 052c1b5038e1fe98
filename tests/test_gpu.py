"""The GPU acceptance tests: `pytest -m gpu` (tools/gpu_check.py runs them; the default run leaves them out).

The device comes from AMODAL_TEST_DEVICE (cuda | cpu; default: cuda when there is one). On the CPU
(the rehearsal) each test runs what the CPU can check. What only CUDA can check is never passed
silently: a test that is CUDA-only through and through skips with a reason that starts "CUDA only",
and a test that checks a CPU stand-in (gloo for NCCL, a compile backend without code generation, a
checkpoint saved on the CPU) says so in a note: printed, and appended to the JSON-lines file named by
AMODAL_GPU_NOTES, which gpu_check puts in its table.

The models are small so that the tests take seconds: a ResNet-18 U-Net (the recipe's architecture)
at 64² on CUDA, an 8-channel plain U-Net on the CPU, where a ResNet step in bf16 takes seconds.
"""

from __future__ import annotations

import functools
import json
import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from amodal.checkpoint import load_checkpoint
from amodal.config import Config, load_config
from amodal.labels import NUM_CLASSES
from amodal.metrics import MIoUAccumulator
from amodal.models import build_model
from amodal.predict import load_model_from_checkpoint
from amodal.train import train

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]
_requested = os.environ.get("AMODAL_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
DEVICE = torch.device("cuda", 0) if _requested == "cuda" else torch.device(_requested)
CUDA = DEVICE.type == "cuda"
if CUDA and not torch.cuda.is_available():
    raise RuntimeError("AMODAL_TEST_DEVICE=cuda but torch.cuda.is_available() is False")
# The model every test trains, as --set overrides (see the module note).
MODEL = {"model.name": "resnet_unet", "model.encoder_depth": 18} if CUDA else \
    {"model.name": "unet", "model.base_channels": 8}


def cuda_only(what: str) -> None:
    if not CUDA:
        pytest.skip(f"CUDA only: {what}")


@pytest.fixture
def note(request):
    """note(text): what this test checked instead of the CUDA path, into gpu_check's table."""

    def add(text: str) -> None:
        print(f"note: {text}")
        path = os.environ.get("AMODAL_GPU_NOTES")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps({"test": request.node.name, "note": text}) + "\n")

    return add


def recipe(root, **sets) -> Config:
    """A few-step training recipe on the shared synthetic shards, on DEVICE, tracking off."""
    values = {"data.root": str(root), "data.make_synthetic": False, "data.input_size": 64,
              "data.num_workers": 0, "train.global_batch": 8 if CUDA else 4, "train.steps": 3 if CUDA else 2,
              "train.val_every": 3 if CUDA else 2,
              "train.log_every": 1, "train.device": DEVICE.type, "tracking.wandb": "off",
              "checkpoint.every_minutes": 0, **MODEL}
    values.update({k.replace("__", "."): v for k, v in sets.items()})
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in values.items()])


def events(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def check_finished(cfg: Config, run: Path, result) -> dict:
    """The run did all its steps with finite losses and a validation score; its start event."""
    assert not result.interrupted and result.step == cfg.train.steps
    assert result.best_miou is not None and math.isfinite(result.best_miou)
    losses = [e["loss"] for e in events(run, "train")]
    assert losses and all(math.isfinite(v) for v in losses), losses
    (start,) = events(run, "start")
    assert start["device"].startswith(DEVICE.type), start
    return start


@pytest.fixture(scope="module")
def bf16_run(synthetic_shards, tmp_path_factory):
    """The recipe's GPU path: bf16 autocast, channels_last, loader workers (pinned memory on CUDA)."""
    run = tmp_path_factory.mktemp("bf16") / "run"
    cfg = recipe(synthetic_shards, train__precision="bf16", train__channels_last=True,
                 data__num_workers=2 if CUDA else 0)
    return cfg, run, train(cfg, run)


def test_train_bf16(bf16_run, note):
    cfg, run, result = bf16_run
    start = check_finished(cfg, run, result)
    assert start["precision"] == "torch.bfloat16"
    if not CUDA:
        note("bf16 autocast ran on the CPU's kernels, without loader workers; cuDNN bf16, pinned memory "
             "and worker-fed steps only on CUDA")


def test_train_checkpoint_channels_last_and_fused_adamw(bf16_run):
    cuda_only("the trainer turns channels_last on only on CUDA; the checkpoint's weight layout is checked "
              "there (fused AdamW, used on the CPU too, is checked by test_train.py as well)")
    _, _, result = bf16_run
    state = load_checkpoint(result.last_checkpoint)
    convs = [t for t in state["model"].values() if t.dim() == 4 and t.shape[-1] > 1]
    assert convs and all(t.is_contiguous(memory_format=torch.channels_last) for t in convs)
    assert not all(t.is_contiguous() for t in convs), "weights saved in the default layout"
    assert all(g.get("fused") for g in state["optimizer"]["param_groups"]), "AdamW was not fused"


def test_train_fp16_grad_scaler(synthetic_shards, tmp_path):
    cuda_only("train.precision = 'fp16' with the grad scaler: train() refuses fp16 on the CPU")
    run = tmp_path / "run"
    cfg = recipe(synthetic_shards, train__precision="fp16", train__steps=4, train__val_every=4)
    result = train(cfg, run)
    start = check_finished(cfg, run, result)
    assert start["precision"] == "torch.float16"
    scaler = load_checkpoint(result.last_checkpoint)["scaler"]
    assert scaler and math.isfinite(scaler["scale"]) and scaler["scale"] > 0, scaler


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in MODEL.items()])
    return build_model(cfg.model).to(DEVICE)


def test_channels_last_matches_contiguous(note):
    """One training step's output and gradients in channels_last equal the default layout's."""
    amp = torch.bfloat16 if CUDA else None
    x = torch.rand(4, 3, 64, 64, device=DEVICE)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        model = _model().to(memory_format=layout).train()
        with torch.autocast(DEVICE.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(x.contiguous(memory_format=layout)).float()
        out.square().mean().backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters()]).float()
        results.append((out.detach(), grad))
    (out_a, grad_a), (out_b, grad_b) = results
    assert torch.isfinite(out_b).all() and torch.isfinite(grad_b).all()
    # Another layout is another kernel (and summation order): bf16 on CUDA rounds far more than fp32.
    out_tol, grad_tol = (5e-2, 1e-1) if CUDA else (1e-4, 1e-2)
    assert (out_a - out_b).abs().max() <= out_tol * out_a.abs().max().clamp(min=1)
    assert (grad_a - grad_b).norm() <= grad_tol * grad_a.norm()
    if not CUDA:
        note("channels_last compared in fp32 on the CPU; bf16 with cuDNN's channels_last kernels only on CUDA")


def test_fused_adamw_matches_foreach(note):
    models = [_model(), _model()]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=1e-4, fused=fused)
            for m, fused in zip(models, (True, False))]
    x = torch.rand(2, 3, 32, 32, device=DEVICE)
    for _ in range(3 if CUDA else 2):
        for m, opt in zip(models, opts):
            opt.zero_grad(set_to_none=True)
            m(x).float().square().mean().backward()
            opt.step()
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    if not CUDA:
        note("fused AdamW ran its CPU kernel; the CUDA kernel only on CUDA")


def test_train_compile(synthetic_shards, tmp_path, monkeypatch, note):
    """train.compile = true: the step model goes through torch.compile (inductor on CUDA)."""
    if not CUDA:
        # Inductor's C++ code generation takes minutes on two cores: trace and partition only.
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
        note("compiled with backend aot_eager (dynamo + AOTAutograd, no code generation); inductor only on CUDA")
    from torch import _dynamo

    _dynamo.reset()
    run = tmp_path / "run"
    cfg = recipe(synthetic_shards, train__compile=True, model__name="unet", model__base_channels=8)
    result = train(cfg, run)
    check_finished(cfg, run, result)
    assert _dynamo.utils.counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    model, _, _ = load_model_from_checkpoint(run, "cpu")  # no _orig_mod. prefixes in what was saved
    assert torch.isfinite(model(torch.rand(1, 3, 64, 64))).all()


def test_checkpoint_loads_on_cpu(bf16_run, tmp_path, note):
    """The checkpoint written on DEVICE loads on the CPU and predicts what the DEVICE model predicts; on
    CUDA the load runs in a process that sees no GPU at all."""
    _, run, _ = bf16_run
    torch.manual_seed(1)
    x = torch.rand(2, 3, 64, 64)
    model, _, _ = load_model_from_checkpoint(run, DEVICE)
    with torch.no_grad():
        expected = model(x.to(DEVICE)).float().cpu()
    if CUDA:
        torch.save(x, tmp_path / "x.pt")
        code = ("import sys, torch\n"
                "assert not torch.cuda.is_available()\n"
                "from amodal.predict import load_model_from_checkpoint\n"
                "model, _, _ = load_model_from_checkpoint(sys.argv[1], 'cpu')\n"
                "with torch.no_grad():\n"
                "    torch.save(model(torch.load(sys.argv[2])), sys.argv[3])\n")
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        subprocess.run([sys.executable, "-c", code, str(run), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                       check=True, env=env, timeout=300)
        got = torch.load(tmp_path / "y.pt")
    else:
        cpu_model, _, _ = load_model_from_checkpoint(run, "cpu")
        with torch.no_grad():
            got = cpu_model(x)
        note("the checkpoint was saved on the CPU; one saved on a GPU and loaded without one only on CUDA")
    scale = expected.abs().max().clamp(min=1)
    assert (got - expected).abs().max() <= 2e-2 * scale  # TF32 and cuDNN against the CPU's fp32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_process_group_ddp_and_metric_all_reduce(synthetic_shards, tmp_path, note):
    """A world of one rank: the process group (NCCL on CUDA), a DDP step, the metric accumulator's
    all_reduce, and train() inside the group (it reuses it, and validation all-reduces through it)."""
    backend = "nccl" if CUDA else "gloo"
    kwargs = {"device_id": DEVICE} if CUDA else {}
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            **kwargs)
    try:
        assert dist.get_backend() == backend
        layout = torch.channels_last if CUDA else torch.contiguous_format  # the trainer's layout there
        model = _model().to(memory_format=layout).train()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[DEVICE.index] if CUDA else None)
            x = torch.rand(2, 3, 64, 64, device=DEVICE).contiguous(memory_format=layout)
            ddp(x).float().square().mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        strides = [str(w.message) for w in caught if "stride" in str(w.message).lower()]
        if strides:  # DDP copies such gradients through a bucket of another layout: slower, not wrong
            note(f"DDP warned about gradient strides with {layout}: {strides[0][:300]}")

        g = torch.Generator().manual_seed(0)
        target = torch.randint(0, NUM_CLASSES, (3, 2, 128, 128), generator=g)
        pred = torch.where(torch.rand(target.shape, generator=g) < 0.8, target, torch.zeros_like(target))
        acc = MIoUAccumulator(DEVICE)
        acc.update(pred.to(DEVICE), target.to(DEVICE))
        alone = acc.compute()
        acc.all_reduce()  # one rank: the sums must come back unchanged
        assert acc.state.device.type == DEVICE.type
        assert acc.compute() == alone and alone["miou"] is not None

        run = tmp_path / "run"
        cfg = recipe(synthetic_shards)
        check_finished(cfg, run, train(cfg, run))
        assert dist.is_initialized(), "train() left a process group it did not make"
    finally:
        dist.destroy_process_group()
    if not CUDA:
        note("process group on gloo (CPU); NCCL only on CUDA")
