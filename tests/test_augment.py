"""The course's crop and augmentation: geometry, flip with hand swap, determinism, value ranges."""


import numpy as np
import pytest

from amodal.config import AugmentConfig
from amodal.data import augment
from amodal.data.augment import IDENTITY, AugParams
from amodal.labels import FRONT_LEFT, FRONT_RIGHT, NUM_PARTS


def scene(size=128, seed=0):
    """An image with distinct left/right label blobs and a front map (values 0/1/2)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    labels = np.zeros((2, size, size), np.uint8)
    labels[0, 10:60, 5:50] = rng.integers(1, NUM_PARTS + 1, (50, 45))
    labels[1, 40:100, 30:120] = rng.integers(1, NUM_PARTS + 1, (60, 90))
    front = np.zeros((size, size), np.uint8)
    front[labels[0] > 0] = FRONT_LEFT
    front[labels[1] > 0] = FRONT_RIGHT
    return image, labels, front


def test_eval_warp_of_identity_box_reproduces_image_and_labels():
    image, labels, front = scene()
    out = augment.apply(image, [0, 0, 128, 128], IDENTITY, 128, labels, front)
    assert np.array_equal(out["labels"], labels)
    assert np.array_equal(out["front"], front)
    assert out["image"].dtype == np.float32 and out["image"].shape == (3, 128, 128)
    assert np.allclose(out["image"], image.transpose(2, 0, 1) / 255.0, atol=1e-6)


def test_eval_crop_of_a_box_is_its_content():
    """A 64² box at (32, 16) of a 256² image, warped to 64²: exactly that window."""
    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    lab = rng.integers(0, NUM_PARTS + 1, (2, 256, 256), dtype=np.uint8)
    out = augment.apply(big, [32, 16, 64, 64], IDENTITY, 64, lab, target_size=64)
    assert np.array_equal(out["labels"], lab[:, 16:80, 32:96])
    assert np.allclose(out["image"] * 255, big[16:80, 32:96].transpose(2, 0, 1), atol=1e-3)
    # targets are 128² by default whatever the input size: labels then scale by 2 (nearest)
    out = augment.apply(big, [32, 16, 64, 64], IDENTITY, 64, lab)
    assert out["labels"].shape == (2, 128, 128)
    assert np.array_equal(out["labels"][:, ::2, ::2], lab[:, 16:80, 32:96])


def test_flip_mirrors_and_swaps_hands_and_front_values():
    image, labels, front = scene()
    plain = augment.apply(image, [0, 0, 128, 128], IDENTITY, 128, labels, front)
    flipped = augment.apply(image, [0, 0, 128, 128], AugParams(flip=True), 128, labels, front)
    assert np.array_equal(flipped["labels"][0], plain["labels"][1][:, ::-1])
    assert np.array_equal(flipped["labels"][1], plain["labels"][0][:, ::-1])
    swapped = plain["front"][:, ::-1].copy()
    swapped[plain["front"][:, ::-1] == FRONT_LEFT] = FRONT_RIGHT
    swapped[plain["front"][:, ::-1] == FRONT_RIGHT] = FRONT_LEFT
    assert np.array_equal(flipped["front"], swapped)
    assert np.allclose(flipped["image"], plain["image"][:, :, ::-1])


def test_parameters_are_a_function_of_seed_epoch_index():
    cfg = AugmentConfig()
    a = augment.params_for(cfg, 3, 1, 17)
    assert a == augment.params_for(cfg, 3, 1, 17)
    assert a == augment.draw_params(cfg, np.random.default_rng([3, 1, 17]))
    others = {augment.params_for(cfg, 3, 1, 18), augment.params_for(cfg, 3, 2, 17), augment.params_for(cfg, 4, 1, 17)}
    assert a not in others and len(others) == 3
    image, labels, front = scene()
    r1 = augment.augment(image, [20, 20, 80, 70], cfg, 3, 1, 17, 96, labels, front)
    r2 = augment.augment(image, [20, 20, 80, 70], cfg, 3, 1, 17, 96, labels, front)
    for k in r1:
        assert np.array_equal(r1[k], r2[k])


def test_draws_follow_the_course_distribution():
    cfg = AugmentConfig(shift=0.3, scale=0.3, rotation=5.0, colour=0.3)
    ps = [augment.params_for(cfg, 0, 0, i) for i in range(3000)]
    shift = np.array([[p.shift_x, p.shift_y] for p in ps])
    scale = np.array([p.scale for p in ps])
    rot = np.array([p.rotation for p in ps])
    gains = np.array([p.gains for p in ps])
    assert np.abs(shift).max() <= 0.3 and np.abs(shift).max() > 0.29
    assert abs(np.abs(shift).mean() - 0.15) < 0.01  # uniform in [-0.3, 0.3]
    assert scale.min() == pytest.approx(0.7) and scale.max() == pytest.approx(1.3)  # clipped at ±1 sigma
    assert abs(np.mean(np.isclose(scale, 1.3)) - 0.159) < 0.03  # P(N > 1) ≈ 0.159
    assert np.abs(rot).max() <= 10.0 and np.abs(rot).max() == pytest.approx(10.0)  # clipped at ±2 sigma
    assert abs(np.mean(rot == 0.0) - 0.4) < 0.04  # rotation with probability 0.6
    assert gains.min() >= 0.7 and gains.max() <= 1.3
    assert abs(np.mean([p.flip for p in ps]) - 0.5) < 0.04


def test_zero_factors_give_the_identity():
    cfg = AugmentConfig(shift=0.0, scale=0.0, rotation=0.0, colour=0.0, flip=0.0)
    image, labels, front = scene()
    for i in range(20):
        p = augment.params_for(cfg, 0, 5, i)
        assert p.is_identity, p
        out = augment.augment(image, [10, 20, 90, 80], cfg, 0, 5, i, 128, labels, front)
        ref = augment.apply(image, [10, 20, 90, 80], IDENTITY, 128, labels, front)
        for k in ref:
            assert np.array_equal(out[k], ref[k])
    assert augment.params_for(AugmentConfig(enabled=False), 0, 0, 0) is IDENTITY
    assert augment.params_for(None, 0, 0, 0) is IDENTITY


def test_label_values_stay_in_range_under_augmentation():
    image, labels, front = scene()
    cfg = AugmentConfig(shift=0.5, scale=0.5, rotation=30.0, colour=0.5)
    for i in range(30):
        out = augment.augment(image, [5, 5, 110, 100], cfg, 1, 0, i, 64, labels, front)
        assert out["labels"].dtype == np.uint8 and out["labels"].max() <= NUM_PARTS
        # nearest neighbour: no value that was not in the source appears
        assert set(np.unique(out["labels"])) <= set(np.unique(labels))
        assert set(np.unique(out["front"])) <= {0, FRONT_LEFT, FRONT_RIGHT}
        assert 0.0 <= out["image"].min() and out["image"].max() <= 1.0


def test_colour_gain_is_clipped_like_the_course():
    image = np.full((16, 16, 3), 200, np.uint8)
    image[..., 1] = 10
    out = augment.apply(image, [0, 0, 16, 16], AugParams(gains=(1.3, 1.3, 0.5)), 16)["image"]
    assert np.all(out[0] == 1.0)  # 200 × 1.3 = 260 -> 255
    assert np.allclose(out[1], 13.0 / 255.0)
    assert np.allclose(out[2], 100.0 / 255.0)


def test_shift_scale_and_rotation_geometry():
    box = (40.0, 60.0, 80.0, 40.0)  # centre (80, 80)
    def to_out(m, x, y):
        return m @ np.array([x, y, 1.0])
    m = augment.box_affine(box, 128)
    assert np.allclose(to_out(m, 80, 80), [64, 64]) and np.allclose(to_out(m, 120, 100), [128, 128])
    m = augment.box_affine(box, 128, AugParams(shift_x=0.25, shift_y=-0.5))  # centre moves by (20, -20)
    assert np.allclose(to_out(m, 100, 60), [64, 64])
    m = augment.box_affine(box, 128, AugParams(scale=2.0))  # twice the box fills the output
    assert np.allclose(to_out(m, 160, 120), [128, 128])
    m = augment.box_affine((0, 0, 100, 100), 100, AugParams(rotation=90.0))
    assert np.allclose(to_out(m, 50, 50), [50, 50])  # about the box centre
    assert np.allclose(np.abs(to_out(m, 100, 50) - 50), [0, 50])  # the x axis turns onto the y axis
