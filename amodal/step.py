"""The training step: one recipe's model, loss and optimizer, built and run the way the trainer does.

The trainer (amodal/train.py) takes its steps through `TrainingStep`, and the benchmarks
(tools/bench_step.py, tools/bench_model.py, the GPU check) build theirs with `build_step`, so they time
exactly the step that trains: the model of `model.*` from train.seed, the loss of `loss.*` (with deep
supervision when loss.stage_weight > 0), AdamW as amodal/optim.py makes it, autocast per
train.precision, and channels_last where the trainer uses it (train.channels_last, on CUDA).
"""

from __future__ import annotations

import torch
from torch import nn

from amodal.config import Config, ConfigError
from amodal.losses import build_loss, stage_loss
from amodal.models import build_model
from amodal.optim import make_optimizer


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether a grad scaler is needed)."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16, False
        return None, False
    if precision == "fp32":
        return None, False
    if precision == "bf16":
        return torch.bfloat16, False
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError("train.precision = 'fp16' needs a GPU (use bf16 or fp32 on the CPU)")
        return torch.float16, True
    raise ConfigError(f"train.precision: {precision!r} is not one of auto, fp32, bf16, fp16")


class TrainingStep:
    """Forward, loss, backward and the optimizer's update of one model, in the trainer's way.

    `net` is what the forward pass calls: the model itself, or the trainer's DDP / compiled wrapper of
    it (set after construction); `model` is the module whose parameters the optimizer updates."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, amp_dtype: torch.dtype | None = None, use_scaler: bool = False,
                 channels_last: bool = False, grad_clip: float = 0.0, stage_weight: float = 0.0):
        self.model = self.net = model
        self.loss_fn, self.optimizer, self.device = loss_fn, optimizer, device
        self.amp_dtype, self.use_scaler, self.channels_last = amp_dtype, use_scaler, channels_last
        self.grad_clip, self.stage_weight = grad_clip, stage_weight
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    def autocast(self):
        amp = self.amp_dtype
        return torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None)

    def to_device(self, images: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, target.to(self.device, non_blocking=True)

    def forward(self, images: torch.Tensor):
        """The logits, or (logits, the decoder stages' logits) with deep supervision."""
        with self.autocast():
            return self.net(images, stages=True) if self.stage_weight > 0 else self.net(images)

    def loss(self, output, target: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            if self.stage_weight > 0:
                logits, stages = output
                return self.loss_fn(logits, target) + self.stage_weight * stage_loss(self.loss_fn, stages, target)
            return self.loss_fn(output, target)

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of `loss` (scaled for fp16), the last step's set to None first."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()

    def clip(self) -> torch.Tensor | None:
        """The gradients clipped to optim.grad_clip; their norm before clipping, or None when clipping
        is off."""
        if self.grad_clip <= 0:
            return None
        self.scaler.unscale_(self.optimizer)
        return nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)

    def update(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def __call__(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One whole step on a batch already on the device (what the benchmarks time); the loss."""
        loss = self.loss(self.forward(images), target)
        self.backward(loss)
        self.clip()
        self.update()
        return loss


def use_cuda_math(device: torch.device) -> None:
    """The trainer's CUDA settings, which the benchmarks must share to time its step: cuDNN picks the
    fastest kernels for the fixed input size, and float32 matrix work may use TF32 tensor cores."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def build_step(cfg: Config, device: torch.device, model: nn.Module | None = None,
               channels_last: bool | None = None) -> TrainingStep:
    """The recipe's step on `device`: its model (built from train.seed, unless `model` is given), loss,
    optimizer, precision and layout as the trainer builds them. `channels_last` None: the trainer's
    rule (train.channels_last, on CUDA only)."""
    t = cfg.train
    use_cuda_math(device)
    if channels_last is None:
        # A layout for tensor cores, kept to CUDA: on the CPU the demo's whole step (forward, loss,
        # backward, clip, fused AdamW) took 6.3x as long with it, measured side by side with
        # `tools/bench_step.py --against train.channels_last=false` and this rule lifted (docs/benchmarks.md).
        channels_last = t.channels_last and device.type == "cuda"
    if model is None:
        torch.manual_seed(t.seed)  # every rank builds the same initial weights
        model = build_model(cfg.model)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.loss.stage_weight > 0 and getattr(model, "heads", None) is None:
        raise ConfigError(f"loss.stage_weight = {cfg.loss.stage_weight}: deep supervision needs a model whose "
                          f"decoder stages predict (model.name = \"resnet_unet\", model.stage_heads = true)")
    amp_dtype, use_scaler = resolve_precision(t.precision, device)
    return TrainingStep(model, build_loss(cfg.loss).to(device), make_optimizer(model, cfg.optim), device,
                        amp_dtype, use_scaler, channels_last, cfg.optim.grad_clip, cfg.loss.stage_weight)
