"""The leaderboard mIoU (docs/design.md §1): hand-computed cases, the 20-pixel rule, absent classes and hands,
a plain per-image reference, the streaming accumulator and its all_reduce over real gloo processes."""

import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from amodal.metrics import MIoUAccumulator, leaderboard_miou, predict_labels

S = 128


def blank(n=1):
    return torch.zeros(n, 2, S, S, dtype=torch.long)


def paint(maps, image, hand, label, count, start=0):
    """Set `count` pixels (row-major from `start`) of one map to `label`."""
    flat = maps[image, hand].view(-1)
    flat[start : start + count] = label


# ---------------------------------------------------------------------------------------------
# A plain reference written from the definition: loops over images, hands and classes, numpy only.


def reference_pair(pred, gt, mask=None):
    """Score of one (image, hand) map pair or None when skipped; part IoUs (None where skipped)."""
    if mask is not None:
        pred = np.where(mask, pred, -1)  # outside the mask: no class at all
        gt = np.where(mask, gt, -1)
    ious = []
    for c in range(1, 17):
        g = gt == c
        p = pred == c
        if g.sum() < 20:
            ious.append(None)
            continue
        ious.append((p & g).sum() / max((p | g).sum(), 1))
    kept = [x for x in ious if x is not None]
    return (sum(kept) / len(kept) if kept else None), ious


def reference(pred, gt, front=None):
    """(miou or nan, occluded miou or nan, part_iou dict, count) from plain loops."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    scores, occ = [], []
    part = {h: [[] for _ in range(16)] for h in ("left", "right")}
    for i in range(pred.shape[0]):
        for h, name in enumerate(("left", "right")):
            score, ious = reference_pair(pred[i, h], gt[i, h])
            if score is not None:
                scores.append(score)
            for c, x in enumerate(ious):
                if x is not None:
                    part[name][c].append(x)
            if front is not None:
                hidden = np.asarray(front[i]) == (2 if h == 0 else 1)
                score, _ = reference_pair(pred[i, h], gt[i, h], hidden)
                if score is not None:
                    occ.append(score)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    part_iou = {h: [(sum(v) / len(v) if v else None) for v in part[h]] for h in part}
    return mean(scores), mean(occ), part_iou, len(scores)


def random_maps(seed, n):
    """Blocky label maps (4×4 blocks, so a part covers 16, 32, 48, … pixels: both sides of the 20-pixel
    rule), mostly background, some hands absent; predictions = targets with some blocks changed and
    shifted by a pixel; a blocky front map."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randint(1, 17, (n, 2, 32, 32), generator=g)
    low[torch.rand(n, 2, 32, 32, generator=g) > 0.06] = 0
    low[torch.rand(n, 2, 1, 1, generator=g).expand(n, 2, 32, 32) < 0.2] = 0  # absent hands
    target = low.repeat_interleave(4, -1).repeat_interleave(4, -2)
    noise = torch.randint(0, 17, (n, 2, 32, 32), generator=g)
    flip = torch.rand(n, 2, 32, 32, generator=g) < 0.03
    pred_low = torch.where(flip, noise, low)
    pred = pred_low.repeat_interleave(4, -1).repeat_interleave(4, -2)
    pred = torch.roll(pred, shifts=1, dims=-1)  # one pixel off, so IoUs are not all 0 or 1
    front = torch.randint(0, 3, (n, 8, 8), generator=g).repeat_interleave(16, -1).repeat_interleave(16, -2)
    return pred, target, front.to(torch.uint8)


# ---------------------------------------------------------------------------------------------


def test_twenty_pixel_rule():
    target, pred = blank(), blank()
    paint(target, 0, 0, 1, 20)  # class 1: 20 gt pixels -> counted
    paint(pred, 0, 0, 1, 10)  # half of them predicted: IoU 10 / 20
    paint(target, 0, 0, 2, 19, start=100)  # class 2: 19 gt pixels -> skipped (pred misses it: IoU 0)
    assert leaderboard_miou(pred, target) == pytest.approx(0.5)
    paint(target, 0, 0, 2, 20, start=100)  # now 20 pixels -> counted, IoU 0
    assert leaderboard_miou(pred, target) == pytest.approx((0.5 + 0.0) / 2)


def test_absent_classes_do_not_count_but_false_positives_hurt_union():
    target, pred = blank(), blank()
    paint(target, 0, 1, 7, 50)
    paint(pred, 0, 1, 7, 50)
    paint(pred, 0, 1, 9, 300, start=1000)  # class 9 absent from the gt: not scored at all
    assert leaderboard_miou(pred, target) == 1.0
    paint(pred, 0, 1, 7, 25, start=2000)  # 25 extra pixels of class 7: IoU 50 / 75
    assert leaderboard_miou(pred, target) == pytest.approx(50 / 75)


def test_absent_hands_are_skipped_from_the_mean():
    target, pred = blank(2), blank(2)
    paint(target, 0, 0, 3, 40)
    paint(pred, 0, 0, 3, 40)  # image 0 left: 1.0
    paint(target, 1, 1, 3, 19)  # image 1 right: only a 19-pixel part -> the hand is skipped
    paint(pred, 0, 1, 5, 500)  # image 0 right is all background in the gt: skipped whatever is predicted
    assert leaderboard_miou(pred, target) == 1.0
    acc = MIoUAccumulator()
    acc.update(pred, target)
    assert acc.compute()["count"] == 1


def test_hand_computed_two_images():
    target, pred = blank(2), blank(2)
    # Image 0, left: class 1 gt 40 px, pred 30 px of which 20 overlap -> 20 / (40 + 30 - 20) = 0.4;
    #                class 5 gt 25 px predicted exactly -> 1.0; hand score 0.7.
    paint(target, 0, 0, 1, 40)
    paint(pred, 0, 0, 1, 30, start=20)
    paint(target, 0, 0, 5, 25, start=500)
    paint(pred, 0, 0, 5, 25, start=500)
    # Image 0, right: class 16 gt 20 px, predicted 20 px elsewhere -> 0.
    paint(target, 0, 1, 16, 20)
    paint(pred, 0, 1, 16, 20, start=40)
    # Image 1, left: absent (skipped). Image 1, right: class 2 gt 100 px, pred 50 of them -> 0.5.
    paint(target, 1, 1, 2, 100)
    paint(pred, 1, 1, 2, 50)
    assert leaderboard_miou(pred, target) == pytest.approx((0.7 + 0.0 + 0.5) / 3)
    acc = MIoUAccumulator()
    acc.update(pred, target)
    out = acc.compute()
    assert out["miou"] == pytest.approx(0.4) and out["count"] == 3 and out["occluded_miou"] is None
    left, right = out["part_iou"]["left"], out["part_iou"]["right"]
    assert left[0] == pytest.approx(0.4) and left[4] == 1.0 and right[15] == 0.0 and right[1] == 0.5
    assert left[1] is None and right[0] is None  # never counted


def test_nothing_scored_is_nan_and_none():
    target, pred = blank(3), blank(3)
    paint(target, 1, 0, 4, 19)
    assert math.isnan(leaderboard_miou(pred, target))
    acc = MIoUAccumulator()
    acc.update(pred, target, front=torch.zeros(3, S, S, dtype=torch.uint8))
    out = acc.compute()
    assert out["miou"] is None and out["occluded_miou"] is None and out["count"] == 0
    assert MIoUAccumulator().compute()["miou"] is None  # never updated


def test_occluded_hand_computed():
    target, pred = blank(), blank()
    front = torch.zeros(1, S, S, dtype=torch.uint8)
    # Left part 3 covers rows 0-1 (256 px); the right hand is in front over row 0 only (front == 2).
    target[0, 0, 0:2, :] = 3
    pred[0, 0, 0, 0:64] = 3  # predicted on half of row 0, nothing on row 1
    front[0, 0, :] = 2
    # Right part 8 covers row 5; left in front (front == 1) on 30 of its pixels, predicted on 15 of those
    # and on 10 pixels of row 5 outside the hidden region (which the occluded score ignores).
    target[0, 1, 5, :] = 8
    front[0, 5, 0:30] = 1
    pred[0, 1, 5, 0:15] = 8
    pred[0, 1, 5, 100:110] = 8
    acc = MIoUAccumulator()
    acc.update(pred, target, front)
    out = acc.compute()
    # Whole maps: left 64 / 256, right 25 / 128.
    assert out["miou"] == pytest.approx((64 / 256 + 25 / 128) / 2)
    # Hidden regions: left: row 0 -> 64 / 128; right: 30 hidden pixels -> 15 / 30.
    assert out["occluded_miou"] == pytest.approx((64 / 128 + 15 / 30) / 2)
    assert out["occluded_count"] == 2
    # 19 hidden pixels: the restricted gt falls under the 20-pixel rule and the right hand is skipped.
    front[0, 5, 19:30] = 0
    acc = MIoUAccumulator()
    acc.update(pred, target, front)
    assert acc.compute()["occluded_miou"] == pytest.approx(64 / 128)


def test_batched_equals_plain_reference():
    pred, target, front = random_maps(1, 12)
    miou, occ, part_iou, count = reference(pred, target, front)
    assert 0.1 < miou < 0.99 and count < 24  # the data exercise partial IoUs and skipped hands
    assert leaderboard_miou(pred, target) == pytest.approx(miou, abs=1e-12)
    acc = MIoUAccumulator()
    acc.update(pred.to(torch.uint8), target.to(torch.uint8), front)  # uint8 maps, as stored
    out = acc.compute()
    assert out["miou"] == pytest.approx(miou, abs=1e-12) and out["count"] == count
    assert out["occluded_miou"] == pytest.approx(occ, abs=1e-12)
    for hand in ("left", "right"):
        for got, want in zip(out["part_iou"][hand], part_iou[hand]):
            assert (got is None and want is None) or got == pytest.approx(want, abs=1e-12)


def test_accumulator_over_chunks_equals_one_shot():
    pred, target, front = random_maps(2, 10)
    one = MIoUAccumulator()
    one.update(pred, target, front)
    chunks = MIoUAccumulator(device="cpu")
    for lo, hi in ((0, 3), (3, 4), (4, 10)):
        chunks.update(pred[lo:hi], target[lo:hi], front[lo:hi])
    chunks.all_reduce()  # not distributed: a no-op
    _same(chunks.compute(), one.compute())
    with pytest.raises(RuntimeError):
        chunks.all_reduce()


def _same(a, b):
    assert a.keys() == b.keys()
    for k in ("miou", "occluded_miou"):
        assert a[k] == pytest.approx(b[k], abs=1e-12)
    assert (a["count"], a["occluded_count"], a["images"]) == (b["count"], b["occluded_count"], b["images"])
    for hand in ("left", "right"):
        for x, y in zip(a["part_iou"][hand], b["part_iou"][hand]):
            assert (x is None and y is None) or x == pytest.approx(y, abs=1e-12)
    return True


def test_predict_labels_and_errors():
    logits = torch.zeros(2, 34, 3, 3)
    logits[:, 5] = 1.0  # left: class 5 everywhere
    logits[1, 17 + 16, 0, 0] = 2.0  # right: class 16 at one pixel of image 1
    labels = predict_labels(logits)
    assert labels.shape == (2, 2, 3, 3) and labels.dtype == torch.int64
    assert (labels[:, 0] == 5).all() and labels[1, 1, 0, 0] == 16 and labels[0, 1].sum() == 0
    with pytest.raises(ValueError, match="34"):
        predict_labels(torch.zeros(1, 17, 3, 3))
    with pytest.raises(ValueError, match="outside"):
        leaderboard_miou(torch.full((1, 2, 4, 4), 17), torch.zeros(1, 2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        leaderboard_miou(torch.zeros(1, 2, 4, 4, dtype=torch.long), torch.zeros(1, 2, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="front"):
        MIoUAccumulator().update(blank(), blank(), torch.zeros(1, 4, 4, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------
# all_reduce across two real processes (gloo): each rank scores its own slice, the sums are combined.

RANK_SLICES = {0: [(0, 5)], 1: [(5, 7), (7, 13)]}


def _rank_main(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        pred, target, front = random_maps(3, 13)
        acc = MIoUAccumulator()
        for lo, hi in RANK_SLICES[rank]:
            acc.update(pred[lo:hi], target[lo:hi], front[lo:hi])
        acc.all_reduce()
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(acc.compute(), f)
    finally:
        dist.destroy_process_group()


def test_all_reduce_over_two_gloo_processes(tmp_path):
    # fork: the children need not re-import torch (seconds each on a loaded machine); still two real
    # processes talking over gloo.
    mp.start_processes(
        _rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    pred, target, front = random_maps(3, 13)
    single = MIoUAccumulator()
    single.update(pred, target, front)
    want = single.compute()
    assert want["images"] == 13
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        _same(got, want)
