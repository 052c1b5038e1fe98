"""Losses against values worked out by hand on tiny tensors; gradients on empty classes / absent hands."""

import math

import pytest
import torch

from amodal.config import LossConfig
from amodal.losses import LOSS_NAMES, build_loss, stage_loss

E = math.e
K = 17  # classes per hand


def tiny_case():
    """Logits (1, 34, 1, 2) and target (1, 2, 1, 2) whose losses are easy to write down.

    Left hand:  pixel a has logit 2 on class 0 (others 0), target 0;
                pixel b has logit 1 on class 3 (others 0), target 5.
    Right hand: all logits 0 (uniform), target background at both pixels (an absent hand).
    """
    logits = torch.zeros(1, 34, 1, 2)
    logits[0, 0, 0, 0] = 2.0
    logits[0, 3, 0, 1] = 1.0
    target = torch.zeros(1, 2, 1, 2, dtype=torch.long)
    target[0, 0, 0, 1] = 5
    return logits, target


# Softmax probabilities of the tiny case, by hand.
PA0 = E**2 / (E**2 + 16)  # pixel a, class 0
PA_OTHER = 1 / (E**2 + 16)  # pixel a, any other class
PB3 = E / (E + 16)  # pixel b, class 3
PB_OTHER = 1 / (E + 16)  # pixel b, any other class (5 included)
CE_A = -math.log(PA0)
CE_B = -math.log(PB_OTHER)
CE_RIGHT = math.log(17)  # uniform over 17 classes


def left_class_sums():
    """Per class c: (sum p*g, sum p, sum g) over the two left pixels."""
    sums = {}
    for c in range(K):
        pa = PA0 if c == 0 else PA_OTHER
        pb = PB3 if c == 3 else PB_OTHER
        ga, gb = (1 if c == 0 else 0), (1 if c == 5 else 0)
        sums[c] = (pa * ga + pb * gb, pa + pb, ga + gb)
    return sums


def right_class_sums():
    return {c: ((2 / 17 if c == 0 else 0.0), 2 / 17, (2 if c == 0 else 0)) for c in range(K)}


def dice_by_hand(sums, w=None):
    w = w or [1.0] * K
    per = [1 - (2 * i + 1) / (p + g + 1) for i, p, g in (sums[c] for c in range(K))]
    return sum(wc * x for wc, x in zip(w, per)) / sum(w)


def jaccard_by_hand(sums):
    return sum(1 - (i + 1) / (p + g - i + 1) for i, p, g in (sums[c] for c in range(K))) / K


def loss_of(name, logits, target, **kw):
    return build_loss(LossConfig(name=name, **kw))(logits, target).item()


def test_cross_entropy_by_hand():
    logits, target = tiny_case()
    expected = (CE_A + CE_B) / 2 + CE_RIGHT
    assert loss_of("ce", logits, target) == pytest.approx(expected, rel=1e-6)


def test_weighted_cross_entropy_by_hand():
    logits, target = tiny_case()
    w = [1.0] * K
    w[0], w[5] = 0.5, 3.0
    left = (0.5 * CE_A + 3.0 * CE_B) / (0.5 + 3.0)
    right = CE_RIGHT  # both pixels background: (0.5 l + 0.5 l) / (0.5 + 0.5)
    assert loss_of("ce", logits, target, class_weights=w) == pytest.approx(left + right, rel=1e-6)


def test_dice_by_hand():
    logits, target = tiny_case()
    expected = dice_by_hand(left_class_sums()) + dice_by_hand(right_class_sums())
    assert loss_of("dice", logits, target) == pytest.approx(expected, rel=1e-6)


def test_weighted_dice_by_hand():
    logits, target = tiny_case()
    w = [float(c + 1) for c in range(K)]
    expected = dice_by_hand(left_class_sums(), w) + dice_by_hand(right_class_sums(), w)
    assert loss_of("dice", logits, target, class_weights=w) == pytest.approx(expected, rel=1e-6)


def test_dice_ce_by_hand_with_weights():
    logits, target = tiny_case()
    dice = dice_by_hand(left_class_sums()) + dice_by_hand(right_class_sums())
    ce = (CE_A + CE_B) / 2 + CE_RIGHT
    got = loss_of("dice_ce", logits, target, dice_weight=0.5, ce_weight=2.0)
    assert got == pytest.approx(0.5 * dice + 2.0 * ce, rel=1e-6)
    assert loss_of("dice_ce", logits, target) == pytest.approx(dice + ce, rel=1e-6)  # default weights 1, 1


def test_focal_by_hand():
    logits, target = tiny_case()
    g = 2.0

    def fl(p):
        return -((1 - p) ** g) * math.log(p)

    expected = (fl(PA0) + fl(PB_OTHER)) / 2 + fl(1 / 17)
    assert loss_of("focal", logits, target, focal_gamma=g) == pytest.approx(expected, rel=1e-6)
    # gamma = 0 is plain cross-entropy.
    assert loss_of("focal", logits, target, focal_gamma=0.0) == pytest.approx((CE_A + CE_B) / 2 + CE_RIGHT, rel=1e-6)


def test_jaccard_by_hand():
    logits, target = tiny_case()
    expected = jaccard_by_hand(left_class_sums()) + jaccard_by_hand(right_class_sums())
    assert loss_of("jaccard", logits, target) == pytest.approx(expected, rel=1e-6)


def test_dice_topk_by_hand():
    logits, target = tiny_case()
    dice = dice_by_hand(left_class_sums()) + dice_by_hand(right_class_sums())
    # topk 0.5 of 2 pixels = the 1 hardest pixel per hand: left b (CE_B > CE_A), right either (log 17).
    assert CE_B > CE_A
    got = loss_of("dice_topk", logits, target, topk=0.5)
    assert got == pytest.approx(dice + CE_B + CE_RIGHT, rel=1e-6)
    # topk 1.0 keeps every pixel: plain cross-entropy.
    got = loss_of("dice_topk", logits, target, topk=1.0, dice_weight=0.0)
    assert got == pytest.approx((CE_A + CE_B) / 2 + CE_RIGHT, rel=1e-6)


def test_batch_sums_span_images():
    """Dice sums over the whole batch: two 1×1 images equal one 1×2 image holding the same pixels."""
    logits, target = tiny_case()
    split_logits = logits.permute(3, 1, 2, 0).contiguous()  # (2, 34, 1, 1)
    split_target = target.permute(3, 1, 2, 0).contiguous()  # (2, 2, 1, 1)
    for name in LOSS_NAMES:
        a = loss_of(name, logits, target, topk=0.5)
        b = loss_of(name, split_logits, split_target, topk=0.5)
        assert a == pytest.approx(b, rel=1e-6), name


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gradients_finite_for_empty_classes_and_absent_hand(name):
    torch.manual_seed(0)
    logits = (torch.randn(2, 34, 8, 8) * 3).requires_grad_()
    target = torch.zeros(2, 2, 8, 8, dtype=torch.long)
    target[:, 0, 2:5, 2:5] = 1  # left: background + class 1 only (15 classes empty); right: absent
    weights = [1.0 + 0.1 * c for c in range(K)]
    loss = build_loss(LossConfig(name=name, class_weights=weights, focal_gamma=0.5))(logits, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[:, :K].abs().sum() > 0 and logits.grad[:, K:].abs().sum() > 0


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_confident_correct_logits_stay_finite(name):
    """Saturated softmax (p_t == 1 in float32) must not give nan gradients (focal with gamma < 1)."""
    target = torch.zeros(1, 2, 4, 4, dtype=torch.long)
    logits = torch.full((1, 34, 4, 4), -60.0)
    logits[:, 0] = 60.0
    logits[:, K] = 60.0
    logits.requires_grad_()
    loss = build_loss(LossConfig(name=name, focal_gamma=0.5))(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_bf16_autocast_gives_finite_float32_loss(name):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 34, 3, padding=1)
    x = torch.randn(2, 3, 16, 16)
    target = torch.randint(0, K, (2, 2, 16, 16))
    target[:, 1] = 0
    loss_fn = build_loss(LossConfig(name=name))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(x)
        assert logits.dtype == torch.bfloat16
        loss = loss_fn(logits, target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(conv.weight.grad).all()


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="loss.class_weights") as e:
        build_loss(LossConfig(class_weights=[1.0] * 16))
    assert "17" in str(e.value)
    with pytest.raises(ValueError, match=r"loss.class_weights\[3\]"):
        build_loss(LossConfig(class_weights=[1.0] * 3 + [0.0] + [1.0] * 13))
    with pytest.raises(ValueError) as e:
        build_loss(LossConfig(name="lovasz"))
    assert "lovasz" in str(e.value) and all(n in str(e.value) for n in LOSS_NAMES)
    with pytest.raises(ValueError, match="loss.topk"):
        build_loss(LossConfig(name="dice_topk", topk=0.0))
    with pytest.raises(ValueError, match="loss.focal_gamma"):
        build_loss(LossConfig(name="focal", focal_gamma=-1.0))


def test_bad_shapes_are_errors():
    loss = build_loss(LossConfig())
    with pytest.raises(ValueError, match="logits"):
        loss(torch.zeros(1, 17, 4, 4), torch.zeros(1, 2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="target"):
        loss(torch.zeros(1, 34, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        loss(torch.zeros(1, 34, 4, 4), torch.zeros(1, 2, 4, 4))


def test_class_weights_follow_the_module_to_a_device():
    loss = build_loss(LossConfig(class_weights=[1.0] * K))
    assert loss.class_weights.shape == (K,)
    assert "class_weights" not in loss.state_dict()  # not saved into checkpoints
    assert build_loss(LossConfig()).class_weights is None


def test_stage_loss_scores_each_stage_against_the_target_at_its_resolution():
    # A 2x2 map blown up 2x by nearest neighbour: the stage at 2x2 must be scored against the 2x2 map
    # itself, and the full-resolution stage against the 4x4 one.
    loss = build_loss(LossConfig(name="dice_ce"))
    small_target = torch.tensor([[[[0, 5], [16, 1]], [[2, 0], [0, 3]]]])  # (1, 2, 2, 2)
    target = small_target.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.manual_seed(0)
    coarse, fine = torch.randn(1, 34, 2, 2), torch.randn(1, 34, 4, 4)
    both = stage_loss(loss, [coarse, fine], target)
    torch.testing.assert_close(both, (loss(coarse, small_target) + loss(fine, target)) / 2)
    with pytest.raises(ValueError, match="not a multiple"):
        stage_loss(loss, [torch.randn(1, 34, 3, 3)], target)
    with pytest.raises(ValueError, match="stage_weight"):
        build_loss(LossConfig(stage_weight=-1.0))
