"""The leaderboard mIoU (docs/design.md §1), per-part IoU and the occluded-region mIoU; batched and streaming.

The leaderboard rule, per image and per hand, for each class c in 1..16 (background never counts):
  G = ground-truth pixels of c, P = predicted pixels of c;
  if |G| < 20 (labels.MIN_PIXELS) the class is skipped; else IoU_c = |P∩G| / max(|P∪G|, 1).
  The hand's score is the mean IoU over the classes not skipped; a hand with none left is skipped.
  The score is the mean over all (image, hand) pairs not skipped.

Everything is computed at once for the whole batch: one bincount over (image, hand, pred, gt) codes
gives a 17×17 confusion matrix per (image, hand) pair; no Python loop over images or classes.

When no pair is scored (every hand of every image has fewer than 20 pixels of every part),
`leaderboard_miou` returns float('nan'), and `MIoUAccumulator.compute` gives None for that value.
"""

from __future__ import annotations

import torch

from amodal.labels import (FRONT_LEFT, FRONT_RIGHT, HANDS, MIN_PIXELS, NUM_CLASSES, NUM_PARTS, split_logits,
                           swap_logits)

_CODES = NUM_CLASSES * NUM_CLASSES  # (pred, gt) pairs; one more code collects masked-out pixels


def _check_maps(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.dim() != 4 or pred.shape[1] != 2:
        raise ValueError(f"metrics: pred must be (N, 2, H, W), got {tuple(pred.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"metrics: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    for name, t in (("pred", pred), ("target", target)):
        if t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"metrics: {name} must be an integer label tensor, got {t.dtype}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= NUM_CLASSES):
            raise ValueError(f"metrics: {name} holds labels outside 0..{NUM_CLASSES - 1}")


def pair_counts(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None):
    """Per (image, hand) and part: (|P∩G|, |P|, |G|), each int64 (N, 2, 16), counted inside `mask`.

    mask: bool (N, 2, H, W) or None (all pixels). Pixels outside the mask are not counted at all,
    neither in P nor in G.
    """
    n = pred.shape[0]
    code = pred.long() * NUM_CLASSES + target.long()  # (N, 2, H, W) in 0..288
    if mask is not None:
        code = torch.where(mask, code, torch.full_like(code, _CODES))
    pairs = torch.arange(n * 2, device=code.device).view(n, 2, 1, 1)
    index = (pairs * (_CODES + 1) + code).flatten()
    conf = torch.bincount(index, minlength=n * 2 * (_CODES + 1)).view(n, 2, _CODES + 1)
    conf = conf[..., :_CODES].view(n, 2, NUM_CLASSES, NUM_CLASSES)  # [..., pred, gt]
    inter = conf.diagonal(dim1=-2, dim2=-1)[..., 1:]
    pred_count = conf.sum(-1)[..., 1:]
    gt_count = conf.sum(-2)[..., 1:]
    return inter, pred_count, gt_count


def pair_scores(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None):
    """The leaderboard rule per (image, hand): returns (iou, counted, score, scored).

    iou float64 (N, 2, 16); counted bool (N, 2, 16): the class has >= MIN_PIXELS ground-truth pixels;
    score float64 (N, 2): mean IoU over the counted classes (0 where none); scored bool (N, 2).
    """
    inter, pred_count, gt_count = pair_counts(pred, target, mask)
    union = pred_count + gt_count - inter
    iou = inter.double() / union.clamp(min=1).double()
    counted = gt_count >= MIN_PIXELS
    n_counted = counted.sum(-1)
    score = (iou * counted).sum(-1) / n_counted.clamp(min=1)
    return iou, counted, score, n_counted > 0


def hidden_mask(front: torch.Tensor) -> torch.Tensor:
    """front (N, H, W) 0/1/2 -> bool (N, 2, H, W): [left hidden (right in front), right hidden (left in front)]."""
    return torch.stack([front == FRONT_RIGHT, front == FRONT_LEFT], dim=1)


def leaderboard_miou(pred: torch.Tensor, target: torch.Tensor) -> float:
    """The leaderboard mIoU of int label maps (N, 2, H, W) [left, right]; nan when no pair is scored."""
    _check_maps(pred, target)
    _, _, score, scored = pair_scores(pred, target)
    count = int(scored.sum())
    if count == 0:
        return float("nan")
    return float((score * scored).sum()) / count


def predict_labels(logits: torch.Tensor) -> torch.Tensor:
    """(N, 34, H, W) logits -> (N, 2, H, W) int64: argmax over each hand's 17 classes."""
    if logits.dim() != 4 or logits.shape[1] != 2 * NUM_CLASSES:
        raise ValueError(f"predict_labels: logits must be (N, {2 * NUM_CLASSES}, H, W), got {tuple(logits.shape)}")
    left, right = split_logits(logits)
    return torch.stack([left.argmax(1), right.argmax(1)], dim=1)


def predict_logits(model, images: torch.Tensor, tta_flip: bool = False) -> torch.Tensor:
    """The model's float32 logits for `images`; with flip test-time augmentation, the mean of those and
    of the mirror image's, mapped back: columns flipped and hands swapped (a mirrored left hand looks
    like a right hand), the rule the training augmentation uses for labels. The mean keeps a
    mirror-equivariant model's logits exactly ((a + a) / 2 == a). Validation and export both use this."""
    logits = model(images).float()
    if tta_flip:
        logits = (logits + swap_logits(model(images.flip(-1)).float().flip(-1))) / 2
    return logits


# Layout of the accumulator's one packed float64 state vector (so all_reduce is a single call).
_SCORE, _COUNT, _OCC_SCORE, _OCC_COUNT, _FRONT_IMAGES, _IMAGES = range(6)
_PART_SUM = 6  # 2 × 16 sums of per-image part IoU
_PART_COUNT = _PART_SUM + 2 * NUM_PARTS  # 2 × 16 counts of images where the part was counted
_STATE_SIZE = _PART_COUNT + 2 * NUM_PARTS


class MIoUAccumulator:
    """Streaming leaderboard mIoU, per-part IoU and occluded-region mIoU over many batches and ranks.

    update(pred, target, front=None): pred/target int (N, 2, H, W) [left, right]; front uint8 (N, H, W)
    with 0 = no hand, 1 = left in front, 2 = right in front (synthetic data only).

    - miou: the leaderboard rule (module doc), i.e. sum of hand scores / number of scored pairs.
    - part_iou[hand][c-1]: mean over the images where part c of that hand has >= 20 ground-truth pixels
      of that image's IoU_c (the same per-image IoU the leaderboard averages); None where never counted.
    - occluded_miou: the leaderboard rule restricted to the pixels where the hand is hidden by the
      other one: for the left hand the pixels with front == 2 (the right hand is visible there), for
      the right hand those with front == 1. P and G are both intersected with that mask before
      counting, and the 20-pixel rule applies to the restricted G. Only batches given a `front` take
      part; None when no batch had one or no pair was scored.
    - count: the number of (image, hand) pairs scored for miou; images: the number of images seen.

    Sums are float64 on `device` (default: the device of the first batch). Call all_reduce() once,
    after the last update and on every rank, before compute() to combine the ranks.
    """

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else None
        self.state: torch.Tensor | None = None
        self.reduced = False
        if self.device is not None:
            self.reset()

    def reset(self) -> None:
        self.state = torch.zeros(_STATE_SIZE, dtype=torch.float64, device=self.device)
        self.reduced = False

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, front: torch.Tensor | None = None) -> None:
        if self.reduced:
            raise RuntimeError("MIoUAccumulator: update() after all_reduce(); call reset() first")
        _check_maps(pred, target)
        if self.state is None:
            self.device = pred.device
            self.reset()
        pred, target = pred.to(self.device), target.to(self.device)
        iou, counted, score, scored = pair_scores(pred, target)
        s = self.state
        s[_SCORE] += (score * scored).sum()
        s[_COUNT] += scored.sum()
        s[_IMAGES] += pred.shape[0]
        # Per part: sum over images of IoU where counted, per hand -> (2, 16).
        s[_PART_SUM:_PART_COUNT] += (iou * counted).sum(0).flatten()
        s[_PART_COUNT:] += counted.sum(0).flatten()
        if front is not None:
            n, _, h, w = pred.shape
            if tuple(front.shape) != (n, h, w):
                raise ValueError(f"metrics: front must be (N, H, W) = {(n, h, w)}, got {tuple(front.shape)}")
            _, _, occ_score, occ_scored = pair_scores(pred, target, hidden_mask(front.to(self.device)))
            s[_OCC_SCORE] += (occ_score * occ_scored).sum()
            s[_OCC_COUNT] += occ_scored.sum()
            s[_FRONT_IMAGES] += n

    def all_reduce(self) -> None:
        """Sum the state over all ranks (one all_reduce of the packed vector); no-op when not distributed."""
        import torch.distributed as dist

        if self.reduced:
            raise RuntimeError("MIoUAccumulator: all_reduce() called twice; the sums would be counted twice")
        if self.state is None:  # this rank saw no batch; it still has to join the collective
            self.reset()
        if dist.is_available() and dist.is_initialized():
            state = self.state
            if dist.get_backend() == "nccl" and state.device.type != "cuda":
                state = state.cuda()
            dist.all_reduce(state, op=dist.ReduceOp.SUM)
            self.state = state.to(self.state.device)
        self.reduced = True

    def compute(self) -> dict:
        s = (self.state if self.state is not None else torch.zeros(_STATE_SIZE, dtype=torch.float64)).cpu().tolist()

        def ratio(total: float, count: float):
            return total / count if count > 0 else None

        part_sum = s[_PART_SUM:_PART_COUNT]
        part_count = s[_PART_COUNT:]
        part_iou = {
            hand: [ratio(part_sum[h * NUM_PARTS + c], part_count[h * NUM_PARTS + c]) for c in range(NUM_PARTS)]
            for h, hand in enumerate(HANDS)
        }
        return {
            "miou": ratio(s[_SCORE], s[_COUNT]),
            "occluded_miou": ratio(s[_OCC_SCORE], s[_OCC_COUNT]) if s[_FRONT_IMAGES] > 0 else None,
            "part_iou": part_iou,
            "count": int(s[_COUNT]),
            "occluded_count": int(s[_OCC_COUNT]),
            "images": int(s[_IMAGES]),
        }



@torch.no_grad()
def evaluate(model, loader, device: torch.device, amp_dtype, channels_last: bool, tta_flip: bool) -> dict:
    """Leaderboard mIoU of `model` over `loader` (each rank its share), combined over the ranks with
    one all_reduce; the result of MIoUAccumulator.compute()."""
    was_training = model.training
    model.eval()
    acc = MIoUAccumulator(device)
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = predict_logits(model, images, tta_flip)
        front = batch.get("front")
        acc.update(predict_labels(logits), batch["target"].to(device),
                   front.to(device) if front is not None else None)
    acc.all_reduce()
    model.train(was_training)
    return acc.compute()
