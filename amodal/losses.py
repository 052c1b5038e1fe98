"""Training losses on the two 17-way heads (docs/design.md §1; issue 3).

Every loss is computed per hand on that hand's 17 logits ([left 17 | right 17], labels.split_logits)
against that hand's target map, and the two hand losses are summed.

Definitions (p = softmax of one hand's logits, g = one-hot target, sums over the batch's pixels):
- ce: mean pixel cross-entropy; with class weights w the weighted mean sum_i w[y_i] ce_i / sum_i w[y_i]
  (PyTorch's convention).
- dice: soft Dice over all 17 classes (background included) with the sums taken over the whole batch
  ("batch Dice"), smoothed: dice_c = (2 sum(p_c g_c) + 1) / (sum(p_c) + sum(g_c) + 1),
  loss = sum_c w_c (1 - dice_c) / sum_c w_c (w = 1 without class weights). All classes count, also the
  ones absent from the batch: an absent class costs 1 - 1 / (sum(p_c) + 1), i.e. it only punishes
  probability put on it, and the +1 keeps value and gradient finite for empty classes and for a hand
  that is absent (a map all background). Batch sums rather than per-image ones, because small parts
  have few pixels per image and per-image Dice of those is very noisy.
- jaccard: the same with soft IoU: (sum(p g) + 1) / (sum(p) + sum(g) - sum(p g) + 1).
- focal: -(1 - p_t)^gamma log p_t per pixel, weighted mean as for ce (gamma = 0 is exactly ce).
- dice_ce: dice_weight × dice + ce_weight × ce (the report's choice; the default).
- dice_topk: dice_weight × dice + ce_weight × top-k ce, where top-k ce is the (weighted) mean ce over
  the k = max(1, round(topk × pixels)) pixels of the batch with the largest (weighted) ce.

All losses run in float32 whatever autocast says: the logits are cast with .float() and autocast is
turned off inside, so bf16/fp16 training gets a finite float32 loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from amodal.config import LossConfig
from amodal.labels import NUM_CLASSES, NUM_OUTPUTS, split_logits

LOSS_NAMES = ("ce", "dice", "dice_ce", "focal", "jaccard", "dice_topk")
SMOOTH = 1.0  # additive smoothing of the soft Dice / IoU ratios (keeps empty classes finite)


def _soft_counts(p: torch.Tensor, target: torch.Tensor):
    """Per class, summed over the batch: soft intersection sum(p_c g_c), soft prediction mass sum(p_c),
    ground-truth pixels sum(g_c); p = softmax (N, 17, H, W), target (N, H, W). The intersection adds
    each pixel's probability of its own class to that class (index_add): no one-hot map is built."""
    p_true = p.gather(1, target.unsqueeze(1)).flatten()
    inter = torch.zeros(NUM_CLASSES, dtype=p.dtype, device=p.device).index_add_(0, target.flatten(), p_true)
    g_sum = torch.bincount(target.flatten(), minlength=NUM_CLASSES).to(p.dtype)
    return inter, p.sum((0, 2, 3)), g_sum


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """One hand: logits (N, 17, H, W) float32, target (N, H, W) int64 -> scalar (see module doc)."""
    return _dice(logits.softmax(dim=1), target, weight)


def _dice(p: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    inter, p_sum, g_sum = _soft_counts(p, target)
    dice = (2 * inter + SMOOTH) / (p_sum + g_sum + SMOOTH)
    return _class_mean(1 - dice, weight)


def soft_jaccard_loss(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """One hand: 1 - smoothed soft IoU per class, class-(weighted) mean."""
    inter, p_sum, g_sum = _soft_counts(logits.softmax(dim=1), target)
    union = p_sum + g_sum - inter
    iou = (inter + SMOOTH) / (union + SMOOTH)
    return _class_mean(1 - iou, weight)


def _class_mean(per_class: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return per_class.mean()
    return (per_class * weight).sum() / weight.sum()


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, gamma: float, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """One hand: mean of -(1 - p_t)^gamma log p_t, weighted by w[y] like cross_entropy."""
    logp_t = logits.log_softmax(dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
    # 1 - p_t via expm1 for precision; the clamp keeps the pow's gradient finite where p_t == 1.
    one_minus = (-torch.expm1(logp_t)).clamp(min=1e-12)
    per_pixel = -one_minus.pow(gamma) * logp_t
    if weight is None:
        return per_pixel.mean()
    w = weight[target]
    return (w * per_pixel).sum() / w.sum()


def topk_ce_loss(
    logits: torch.Tensor, target: torch.Tensor, fraction: float, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """One hand: (weighted) mean cross-entropy of the hardest round(fraction × pixels) pixels (≥ 1)."""
    ce = F.cross_entropy(logits, target, reduction="none").flatten()  # unweighted, per pixel
    k = max(1, round(fraction * ce.numel()))
    if weight is None:
        return ce.topk(k).values.mean()
    w = weight[target].flatten()
    top = (w * ce).topk(k).indices  # hardest by weighted loss
    return (w[top] * ce[top]).sum() / w[top].sum()


class HandLoss(nn.Module):
    """A loss on the (N, 34, H, W) logits: one loss per hand on its 17-way head, summed over the hands."""

    def __init__(self, name: str, cfg: LossConfig, weight: torch.Tensor | None):
        super().__init__()
        self.name = name
        self.dice_weight = cfg.dice_weight
        self.ce_weight = cfg.ce_weight
        self.gamma = cfg.focal_gamma
        self.topk = cfg.topk
        # A buffer so that .to(device) moves it with the model's loss; None when unweighted.
        self.register_buffer("class_weights", weight, persistent=False)

    def hand_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        w = self.class_weights
        if self.name == "ce":
            return F.cross_entropy(logits, target, weight=w)
        if self.name == "dice":
            return soft_dice_loss(logits, target, w)
        if self.name == "jaccard":
            return soft_jaccard_loss(logits, target, w)
        if self.name == "focal":
            return focal_loss(logits, target, self.gamma, w)
        if self.name == "dice_ce":
            # One log-softmax for both terms: on a CPU the softmax over the class axis is the dear part.
            logp = logits.log_softmax(dim=1)
            return self.dice_weight * _dice(logp.exp(), target, w) + self.ce_weight * F.nll_loss(logp, target, weight=w)
        if self.name == "dice_topk":
            return self.dice_weight * soft_dice_loss(logits, target, w) + self.ce_weight * topk_ce_loss(
                logits, target, self.topk, w
            )
        raise AssertionError(self.name)  # build_loss validated the name

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 4 or logits.shape[1] != NUM_OUTPUTS:
            raise ValueError(f"loss: logits must be (N, {NUM_OUTPUTS}, H, W), got {tuple(logits.shape)}")
        n, _, h, w = logits.shape
        if tuple(target.shape) != (n, 2, h, w):
            raise ValueError(f"loss: target must be (N, 2, H, W) = {(n, 2, h, w)}, got {tuple(target.shape)}")
        if target.is_floating_point():
            raise ValueError(f"loss: target must be an integer tensor, got {target.dtype}")
        target = target.long()
        # Always float32: under bf16/fp16 autocast the softmax sums would lose too much precision.
        with torch.autocast(device_type=logits.device.type, enabled=False):
            left, right = split_logits(logits.float())
            return self.hand_loss(left, target[:, 0]) + self.hand_loss(right, target[:, 1])

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def stage_loss(loss_fn: nn.Module, stage_logits: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Mean of `loss_fn` over the decoder stages' own logits (N, 34, h, w), each against the target
    subsampled to h x w (the pixel at the centre of each k x k block: labels stay labels)."""
    losses = []
    for logits in stage_logits:
        k = target.shape[-1] // logits.shape[-1]
        if k * logits.shape[-1] != target.shape[-1] or target.shape[-2] != k * logits.shape[-2]:
            raise ValueError(f"stage loss: target {tuple(target.shape[-2:])} is not a multiple of the stage's "
                             f"{tuple(logits.shape[-2:])}")
        losses.append(loss_fn(logits, target[..., k // 2 :: k, k // 2 :: k]))
    return torch.stack(losses).mean()


def _check_finite(value: float, key: str, low: float, high: float = math.inf, low_open: bool = False) -> None:
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if math.isfinite(high) else "")
        raise ValueError(f"loss.{key}: must be {bound}, got {value!r}")


def build_loss(cfg: LossConfig) -> nn.Module:
    """The loss the config names; raises ValueError naming the bad option."""
    if cfg.name not in LOSS_NAMES:
        raise ValueError(f"loss.name: unknown loss {cfg.name!r} (known: {', '.join(LOSS_NAMES)})")
    weight = None
    if cfg.class_weights:
        if len(cfg.class_weights) != NUM_CLASSES:
            raise ValueError(
                f"loss.class_weights: expected {NUM_CLASSES} weights (background + 16 parts), "
                f"got {len(cfg.class_weights)}"
            )
        # Positive, so that a weighted mean over an all-background hand never divides by zero.
        for i, v in enumerate(cfg.class_weights):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"loss.class_weights[{i}]: must be a finite number > 0, got {v!r}")
        weight = torch.tensor(cfg.class_weights, dtype=torch.float32)
    _check_finite(cfg.dice_weight, "dice_weight", 0.0)
    _check_finite(cfg.ce_weight, "ce_weight", 0.0)
    _check_finite(cfg.focal_gamma, "focal_gamma", 0.0)
    _check_finite(cfg.topk, "topk", 0.0, 1.0, low_open=True)
    _check_finite(cfg.stage_weight, "stage_weight", 0.0)
    return HandLoss(cfg.name, cfg, weight)
