"""The course's crop and augmentation (docs/design.md §1), plus the flip that swaps the hands.

One affine transform maps the hand box (shifted, scaled and rotated about its centre) onto the output
square: the image is warped bilinearly to input_size², the label maps and the front map with nearest
neighbour to 128². Then a colour gain per channel, and a horizontal flip that also swaps the left and
right maps (and the front map's values 1 <-> 2). Evaluation mode is the plain crop of the box.

Every random number comes from np.random.default_rng([seed, epoch, index]): nothing else holds RNG
state, so any sample of any epoch can be reproduced on any rank.

Coordinates follow OpenCV's warpAffine (pixel i has its centre at i) and the course's convention: the
box [x, x + w] maps onto [0, out], its centre (x + w/2, y + h/2) onto (out/2, out/2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from amodal.config import AugmentConfig
from amodal.labels import FRONT_LEFT, FRONT_RIGHT, TARGET_SIZE

# front map values under a horizontal flip: the left hand becomes the right one.
_FRONT_FLIP = np.arange(256, dtype=np.uint8)
_FRONT_FLIP[FRONT_LEFT], _FRONT_FLIP[FRONT_RIGHT] = FRONT_RIGHT, FRONT_LEFT


@dataclass(frozen=True)
class AugParams:
    shift_x: float = 0.0  # box centre shift, in units of the box width
    shift_y: float = 0.0  # ... of the box height
    scale: float = 1.0  # > 1: the source region is larger than the box (zoom out)
    rotation: float = 0.0  # degrees
    gains: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per channel, B G R
    flip: bool = False

    @property
    def is_identity(self) -> bool:
        return self == IDENTITY


IDENTITY = AugParams()


def _clip(x: float, limit: float) -> float:
    return min(max(x, -limit), limit)  # np.clip costs ~10 us on a scalar


def draw_params(cfg: AugmentConfig, rng: np.random.Generator) -> AugParams:
    """The course's draws. The same numbers are drawn in the same order whatever the factors (two
    calls: each generator call costs more than the numbers it returns)."""
    t, s, r, c = cfg.shift, cfg.scale, cfg.rotation, cfg.colour
    u = rng.random(7).tolist()  # shift x, shift y, rotation coin, 3 gains, flip coin
    n = rng.standard_normal(2).tolist()  # scale, rotation
    return AugParams(
        shift_x=(2.0 * u[0] - 1.0) * t,
        shift_y=(2.0 * u[1] - 1.0) * t,
        scale=1.0 + _clip(n[0], 1.0) * s,
        rotation=_clip(n[1], 2.0) * r if u[2] < cfg.rotation_prob else 0.0,
        gains=tuple(1.0 + (2.0 * g - 1.0) * c for g in u[3:6]),
        flip=u[6] < cfg.flip,
    )


def params_for(cfg: AugmentConfig | None, seed: int, epoch: int, index: int) -> AugParams:
    """Augmentation of sample `index` in `epoch`; the identity when cfg is None or disabled."""
    if cfg is None or not cfg.enabled:
        return IDENTITY
    return draw_params(cfg, np.random.default_rng([seed, epoch, index]))


def box_affine(bbox, out_size: int, params: AugParams = IDENTITY) -> np.ndarray:
    """2x3 matrix taking source pixel coordinates to output pixel coordinates.

    The box centre, shifted by (shift_x × w, shift_y × h), goes to the output centre; a region of
    (w × scale, h × scale) rotated by `rotation` degrees about it fills the output; a flip mirrors the
    output horizontally.
    """
    x, y, w, h = (float(v) for v in bbox)
    cx = x + 0.5 * w + params.shift_x * w
    cy = y + 0.5 * h + params.shift_y * h
    sx = out_size / (w * params.scale)
    sy = out_size / (h * params.scale)
    a = math.radians(params.rotation)
    cos, sin = math.cos(a), math.sin(a)
    # out - centre_out = diag(sx, sy) · R(-a) · (p - c)
    m = np.array([[sx * cos, sx * sin, 0.0], [-sy * sin, sy * cos, 0.0]])
    m[:, 2] = np.array([out_size / 2, out_size / 2]) - m[:, :2] @ np.array([cx, cy])
    if params.flip:
        # output column i -> out_size - 1 - i
        m[0] = -m[0]
        m[0, 2] += out_size - 1
    return m


def warp_image(image: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def warp_image_fast(image: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    """warp_image for (H, W, 3) BGR, returned as (size, size, 4): OpenCV's bilinear warp of 4-channel
    images is about 2.5x faster than of 3-channel ones, which outweighs the conversion (measured)."""
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2BGRA)
    return warp_image(image, m, size)


def warp_map(label: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    return cv2.warpAffine(label, m, (size, size), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT)


def warp_labels(labels: np.ndarray, m: np.ndarray, size: int, flip: bool) -> np.ndarray:
    """(2, H, W) [left, right] -> (2, size, size); a flip swaps the two maps."""
    out = np.empty((2, size, size), dtype=labels.dtype)
    left, right = (1, 0) if flip else (0, 1)
    out[left] = warp_map(labels[0], m, size)
    out[right] = warp_map(labels[1], m, size)
    return out


def warp_front(front: np.ndarray, m: np.ndarray, size: int, flip: bool) -> np.ndarray:
    out = warp_map(front, m, size)
    return _FRONT_FLIP[out] if flip else out


def image_to_chw(image_u8: np.ndarray, gains=(1.0, 1.0, 1.0)) -> np.ndarray:
    """(S, S, 3 or 4) uint8 BGR[x] -> (3, S, S) float32 in [0, 1], each channel times its gain, clipped:
    the course's clip(image × gain, 0, 255) / 255. Per plane, because numpy is slow on strided views."""
    h, w = image_u8.shape[:2]
    out = np.empty((3, h, w), dtype=np.float32)
    for c, plane in enumerate(cv2.split(image_u8)[:3]):
        np.multiply(plane, np.float32(gains[c] / 255.0), out=out[c])
    # clipping costs time; only gains above 1 (or below 0) can leave [0, 1]
    if max(gains) > 1.0:
        np.minimum(out, 1.0, out=out)
    if min(gains) < 0.0:
        np.maximum(out, 0.0, out=out)
    return out


def apply(
    image: np.ndarray,
    bbox,
    params: AugParams,
    input_size: int,
    labels: np.ndarray | None = None,
    front: np.ndarray | None = None,
    target_size: int = TARGET_SIZE,
) -> dict:
    """Crop (and augment) one sample.

    image: (H, W, 3) uint8 BGR; labels: (2, H, W) uint8 or None; front: (H, W) uint8 or None; bbox in
    the same pixel frame. Returns `image` (3, S, S) float32 in [0, 1] and, when given, `labels`
    (2, 128, 128) uint8 and `front` (128, 128) uint8.
    """
    out = {}
    m = box_affine(bbox, input_size, params)
    out["image"] = image_to_chw(warp_image_fast(image, m, input_size), params.gains)
    if labels is not None or front is not None:
        mt = m if target_size == input_size else box_affine(bbox, target_size, params)
        if labels is not None:
            out["labels"] = warp_labels(labels, mt, target_size, params.flip)
        if front is not None:
            out["front"] = warp_front(front, mt, target_size, params.flip)
    return out


def augment(
    image: np.ndarray,
    bbox,
    cfg: AugmentConfig | None,
    seed: int,
    epoch: int,
    index: int,
    input_size: int,
    labels: np.ndarray | None = None,
    front: np.ndarray | None = None,
) -> dict:
    """apply() with the parameters of (seed, epoch, index); eval mode when cfg is None or disabled."""
    return apply(image, bbox, params_for(cfg, seed, epoch, index), input_size, labels, front)
