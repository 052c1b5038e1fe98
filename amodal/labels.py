"""The label space of the task (docs/design.md §1): 16 parts per hand, two hands, [left | right]."""

import numpy as np

FINGERS = ("thumb", "index", "middle", "ring", "little")
SEGMENTS = ("proximal", "middle", "distal")

# Class 0 is background; 1 is the palm; then three segments per finger, base to tip.
PART_NAMES = ("background", "palm") + tuple(f"{f}_{s}" for f in FINGERS for s in SEGMENTS)
NUM_PARTS = 16  # foreground classes per hand
NUM_CLASSES = NUM_PARTS + 1  # per hand, background included
HANDS = ("left", "right")  # order of the two target maps and of the two halves of the logits
# Key suffixes of a sample's two maps, [left, right], in the course's label LMDB, a folder's labels
# (<key>__l.png) and the leaderboard file.
HAND_SUFFIXES = ("__l", "__r")
LEFT, RIGHT = 0, 1
NUM_OUTPUTS = 2 * NUM_CLASSES  # 34 logits: [left 17 | right 17]
TARGET_SIZE = 128  # label maps and model outputs are always 128x128
MIN_PIXELS = 20  # the leaderboard skips a class with fewer ground-truth pixels than this

# Front-hand map stored with synthetic samples: which hand is visible at each pixel.
FRONT_NONE, FRONT_LEFT, FRONT_RIGHT = 0, 1, 2

assert len(PART_NAMES) == NUM_CLASSES


def split_logits(logits):
    """(N, 34, H, W) -> (left (N, 17, H, W), right (N, 17, H, W))."""
    return logits[:, :NUM_CLASSES], logits[:, NUM_CLASSES:]


def swap_logits(logits):
    """Swap the two 17-channel halves of (N, 34, H, W) logits (flip test-time augmentation)."""
    import torch

    left, right = split_logits(logits)
    return torch.cat([right, left], dim=1)


def _palette():
    # Distinct, stable colours: hue steps around the wheel, fingers grouped by hue.
    import colorsys

    colours = [(0, 0, 0), (200, 200, 200)]
    for i in range(len(FINGERS) * len(SEGMENTS)):
        finger, segment = divmod(i, len(SEGMENTS))
        r, g, b = colorsys.hsv_to_rgb(finger / len(FINGERS), 1.0 - 0.25 * segment, 1.0 - 0.2 * segment)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return np.array(colours, dtype=np.uint8)


PALETTE = _palette()  # (17, 3) RGB, one colour per class

