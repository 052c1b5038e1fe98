"""The synthetic generator: determinism, format, amodal overlap, mirrored hands, parts from shape only."""

import numpy as np
import pytest

from amodal.data.synthetic import generate
from amodal.labels import FRONT_LEFT, FRONT_RIGHT, NUM_PARTS, PALETTE

SIZE = 256
COUNT = 200


@pytest.fixture(scope="module")
def samples():
    return [generate(11, i) for i in range(COUNT)]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _centroid(label_map, part, min_pixels=20):
    ys, xs = np.nonzero(label_map == part)
    return None if len(xs) < min_pixels else np.array([xs.mean(), ys.mean()])


def test_deterministic_in_seed_and_index():
    first = [generate(3, i) for i in (5, 6, 7)]
    again = [generate(3, i) for i in (7, 6, 5)][::-1]  # order of generation does not matter
    assert all(_same(a, b) for a, b in zip(first, again))
    assert not _same(first[0], first[1])  # other index
    assert not _same(first[0], generate(4, 5))  # other seed
    # No global RNG: seeding or drawing from numpy's global state changes nothing.
    np.random.seed(123)
    np.random.random(10)
    assert _same(generate(3, 5), first[0])


def test_format(samples):
    for s in samples[:50]:
        assert s["image"].shape == (SIZE, SIZE, 3) and s["image"].dtype == np.uint8
        assert s["labels"].shape == (2, SIZE, SIZE) and s["labels"].dtype == np.uint8
        assert s["front"].shape == (SIZE, SIZE) and s["front"].dtype == np.uint8
        assert s["bbox"].shape == (4,) and s["bbox"].dtype == np.float32
        assert s["labels"].max() <= NUM_PARTS and set(np.unique(s["front"])) <= {0, FRONT_LEFT, FRONT_RIGHT}
        assert s["hand_type"] in ("left", "right", "interacting")
    small = generate(0, 1, size=128)
    assert small["image"].shape == (128, 128, 3) and small["labels"].shape == (2, 128, 128)
    with pytest.raises(ValueError, match="size"):
        generate(0, 0, size=8)


def test_front_and_box_agree_with_labels(samples):
    for s in samples:
        labels, front = s["labels"], s["front"]
        hand = labels.any(0)
        assert np.array_equal(front > 0, hand)  # front names a hand exactly where some hand is labelled
        for own, other, value in ((0, 1, FRONT_LEFT), (1, 0, FRONT_RIGHT)):
            # Where front names a hand that is not labelled there, its arm covers the other hand.
            unlabelled = (front == value) & (labels[own] == 0)
            assert (labels[other][unlabelled] > 0).all()
        x, y, w, h = s["bbox"].astype(int)
        ys, xs = np.nonzero(hand)
        assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
        # The hands' box is about half the frame and near its centre: the frame is a context crop.
        assert 0.3 * SIZE <= max(w, h) <= 0.6 * SIZE
        assert np.abs(np.array([x + w / 2, y + h / 2]) - SIZE / 2).max() <= 0.1 * SIZE


def test_hand_types_and_amodal_overlap(samples):
    occluded = 0
    for s in samples:
        labels, front = s["labels"], s["front"]
        present = [bool(labels[0].any()), bool(labels[1].any())]
        expected = {"left": [True, False], "right": [False, True], "interacting": [True, True]}
        assert present == expected[s["hand_type"]]
        # The back hand keeps labels where the other hand is the visible one.
        hidden = ((labels[0] > 0) & (front == FRONT_RIGHT)).sum()
        hidden += ((labels[1] > 0) & (front == FRONT_LEFT)).sum()
        overlap = ((labels[0] > 0) & (labels[1] > 0)).sum()
        occluded += hidden >= 20 and overlap >= 20
    types = [s["hand_type"] for s in samples]
    assert occluded >= COUNT // 2, f"only {occluded}/{COUNT} samples have an occluded labelled back hand"
    assert types.count("left") >= 10 and types.count("right") >= 10


def test_every_part_appears_in_interacting_samples(samples):
    maps = [m for s in samples if s["hand_type"] == "interacting" for m in s["labels"]]
    presence = np.array([[(m == k).sum() >= 20 for k in range(1, NUM_PARTS + 1)] for m in maps])
    assert presence.mean(0).min() >= 0.8, presence.mean(0)


def test_left_hand_is_the_mirror_of_the_right(samples):
    # The triangle thumb base -> index base -> little base turns one way for a right hand and the other
    # way for a left hand, whatever the in-plane rotation (the palm always faces the viewer).
    signs = {0: [], 1: []}
    for s in samples:
        for hand in (0, 1):
            points = [_centroid(s["labels"][hand], part) for part in (2, 5, 14)]
            if any(p is None for p in points):
                continue
            a, b = points[1] - points[0], points[2] - points[0]
            signs[hand].append(np.sign(a[0] * b[1] - a[1] * b[0]))
    left, right = np.array(signs[0]), np.array(signs[1])
    assert len(left) >= 60 and len(right) >= 60
    assert (left > 0).mean() >= 0.97 and (right < 0).mean() >= 0.97


def test_parts_are_not_painted_in_colours(samples):
    """Within a hand, every visible part has the hand's chromaticity (only shading differs): nothing but
    shape tells the parts apart. The same statistic on an image painted with the part palette is large,
    as is the hand-vs-background difference."""

    part_gap, painted_gap, background_gap = [], [], []
    palette = PALETTE[:, ::-1].astype(np.float64)  # BGR, like the image
    for s in samples[:100]:
        image = s["image"].reshape(-1, 3).astype(np.float64)
        background = image[s["front"].reshape(-1) == 0].mean(0)
        for hand in (0, 1):
            visible = ((s["front"] == hand + 1) * s["labels"][hand]).reshape(-1)  # visible part ids
            counts = np.bincount(visible, minlength=NUM_PARTS + 1)[1:]
            if counts.sum() < 200:
                continue
            sums = np.stack([np.bincount(visible, image[:, c], NUM_PARTS + 1)[1:] for c in range(3)], 1)
            hand_chroma = sums.sum(0) / sums.sum()
            painted = counts @ palette[1:]
            painted_chroma = painted / painted.sum()
            background_gap.append(np.abs(background / background.sum() - hand_chroma).max())
            for part in np.flatnonzero(counts >= 30):
                part_gap.append(np.abs(sums[part] / sums[part].sum() - hand_chroma).max())
                colour = palette[part + 1]
                painted_gap.append(np.abs(colour / max(colour.sum(), 1.0) - painted_chroma).max())
    part_gap, painted_gap = np.array(part_gap), np.array(painted_gap)
    assert len(part_gap) >= 300
    assert np.median(part_gap) < 0.01 and np.percentile(part_gap, 95) < 0.03
    assert np.median(painted_gap) > 5 * np.percentile(part_gap, 95)  # the check can tell paint apart
    assert np.median(background_gap) > 5 * np.median(part_gap)
