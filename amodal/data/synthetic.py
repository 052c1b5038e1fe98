"""Procedural two-hand images with exact amodal part labels: the project's built-in default data.

Each hand is a small 3-D model (a planar palm plus five chains of tapered capsules), posed with random
finger bend and spread, tilted and turned, projected orthographically and drawn with OpenCV. The image
shows only shaded skin; part identity lives in the labels alone, so a model must read parts from shape.

Label semantics follow docs/design.md §1: each hand's map holds that hand whole, also where the other hand
covers it (amodal between hands), while within one hand the parts are drawn far to near, so a part hidden
by the same hand is not labelled (modal within a hand). `front` says which hand is visible at each
labelled pixel. Everything is a function of (seed, index): one `np.random.default_rng([seed, index])`.
"""

from functools import lru_cache

import cv2
import numpy as np

from amodal.labels import FRONT_LEFT, FRONT_RIGHT

# ---- The canonical right hand. Units: palm length. x points to the thumb side, y to the fingers,
# z to the viewer; the palm faces the viewer, so bent fingers curl towards the camera (y up here; the
# image flips y when it projects). The left hand is this model mirrored in x.
PALM_OUTLINE = np.array([[-0.36, 0.0], [0.36, 0.0], [0.47, 0.4], [0.45, 0.9], [0.33, 1.02],
                         [0.0, 1.06], [-0.3, 1.01], [-0.42, 0.9], [-0.45, 0.45]])
ARM_OUTLINE = np.array([[-0.33, 0.05], [0.33, 0.05], [0.42, -1.6], [-0.42, -1.6]])  # skin, never labelled
# Per chain, in label order (thumb, index, middle, ring, little): base joint (the thumb's sits low in
# the palm, the fingers' at the knuckles), bone lengths base to tip, radius at the base.
BASES = np.array([[0.3, 0.22, 0.0], [0.31, 0.98, 0.0], [0.1, 1.02, 0.0], [-0.11, 0.98, 0.0],
                  [-0.31, 0.9, 0.0]])
LENGTHS = np.array([[0.42, 0.32, 0.26], [0.38, 0.24, 0.19], [0.42, 0.27, 0.2], [0.4, 0.25, 0.19],
                    [0.31, 0.19, 0.17]])
RADII = np.array([0.15, 0.105, 0.11, 0.1, 0.085])
FAN = np.radians([-9.0, -2.0, 5.0, 13.0])  # resting spread of the fingers, from +y away from the thumb
THUMB_BEND = np.array([-0.75, 0.1, 0.65])  # the thumb curls across the palm and towards the viewer
TAPER = np.array([1.0, 0.9, 0.82, 0.74])  # radius at the joints of a chain, base to tip

_ARC = np.linspace(-np.pi / 2, np.pi / 2, 7)  # half-circle samples of a capsule end
_COS, _SIN = np.cos(_ARC)[:, None], np.sin(_ARC)[:, None]
_POINTS = 2 * len(_ARC)  # every polygon of a hand gets this many vertices, so they stack in one array
# Palm and arm padded by repeating their last vertex (repeats do not change a filled polygon).
PALM = np.concatenate([PALM_OUTLINE, np.repeat(PALM_OUTLINE[-1:], _POINTS - len(PALM_OUTLINE), 0)])
ARM = np.concatenate([ARM_OUTLINE, np.repeat(ARM_OUTLINE[-1:], _POINTS - len(ARM_OUTLINE), 0)])
SHIFT = 4  # cv2 sub-pixel bits: polygons are drawn at 1/16 pixel precision
ONE = 1 << SHIFT  # one pixel in those fixed-point units
SKIN = np.array([[185, 205, 238], [140, 172, 222], [100, 140, 196], [70, 105, 160], [45, 68, 110]],
                dtype=np.float32)  # BGR anchors, light to dark


def _rotation(rng, az: float) -> np.ndarray:
    """In-plane turn az with a random tilt of at most 45 degrees about x and y (the palm keeps facing
    the viewer, so a left hand never projects like a right one)."""
    ax, ay = rng.uniform(-0.8, 0.8, 2)
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _pose(rng):
    """Joint chains of one canonical right hand, in label order (thumb, index, middle, ring, little):
    joints (5, 4, 3) from base to tip, radii (5, 4) at those joints, bone directions (5, 3, 3)."""
    curl = (rng.uniform(0.0, 1.0) ** 1.5 + rng.normal(0.0, 0.15, 5)).clip(0.0, 1.0)  # 0 open, 1 fist
    loose = rng.random(5) < 0.2  # some fingers move on their own (pointing, pinching)
    curl = np.where(loose, rng.random(5), curl)
    spread = rng.uniform(-0.3, 1.6) * FAN + rng.normal(0.0, 0.05, 4)
    thumb = np.radians(rng.uniform(25, 65))  # thumb abduction in the palm plane

    # Flexion per joint (MCP, PIP, DIP) as cumulative angles from the palm plane towards the viewer.
    flex = np.radians(np.stack([-10 + 100 * curl, 105 * curl, rng.uniform(50, 80, 5) * curl], 1))
    phi = np.cumsum(flex, 1)[..., None]  # (5, 3, 1)

    # Each chain leaves its base along u and bends towards w: +z for the fingers; for the thumb,
    # across the palm and to the viewer.
    u = np.zeros((5, 3))
    u[0] = np.array([np.sin(thumb), np.cos(thumb), 0.35]) / np.hypot(1.0, 0.35)
    u[1:, 0], u[1:, 1] = -np.sin(spread), np.cos(spread)
    w = np.zeros((5, 3))
    w[1:, 2] = 1.0
    w[0] = THUMB_BEND - (THUMB_BEND @ u[0]) * u[0]
    w[0] /= np.sqrt(w[0] @ w[0])
    dirs = np.cos(phi) * u[:, None] + np.sin(phi) * w[:, None]  # (5, 3, 3)

    lengths = LENGTHS * rng.uniform(0.9, 1.1, (5, 1)) * rng.uniform(0.92, 1.08)
    joints = np.concatenate([BASES[:, None], BASES[:, None] + np.cumsum(dirs * lengths[..., None], 1)], 1)
    radii = RADII[:, None] * TAPER * rng.uniform(0.9, 1.1)
    return joints, radii, dirs


def _capsules(p0, p1, r0, r1) -> np.ndarray:
    """Tapered 2-D capsules from p0 to p1 (n, 2) with end radii r0, r1 (n,) -> (n, 14, 2) polygons."""
    d = p1 - p0
    length = np.sqrt((d * d).sum(1, keepdims=True))
    u = np.where(length > 1e-6, d / np.maximum(length, 1e-6), [1.0, 0.0])
    n = np.stack([-u[:, 1], u[:, 0]], 1)
    ring = _COS * u[:, None] + _SIN * n[:, None]  # (n, 7, 2) unit half circle facing along the bone
    tip, root = p1[:, None] + r1[:, None, None] * ring, p0[:, None] - r0[:, None, None] * ring
    return np.concatenate([tip, root], 1)


def _hand(rng, left: bool, turn: float, light: np.ndarray) -> dict:
    """One posed hand, projected to scene units (y down): `polys` (33, 14, 2) = 0 palm, 1..15 finger
    bones in label order, 16..31 their highlights, 32 the arm; `shade` (16,); `order` draw order."""
    joints, radii, dirs = _pose(rng)
    m = _rotation(rng, turn) * ([-1.0 if left else 1.0, 1.0, 1.0])  # mirror x for the left hand
    project = m[:2] * [[1.0], [-1.0]]  # (2, 3): camera x right, image y down
    flat = np.concatenate([PALM, ARM * [1.0, rng.uniform(0.7, 1.2)]]) @ project[:, :2].T  # z = 0
    j2 = joints @ project.T  # (5, 4, 2)
    z = joints @ m[2]  # (5, 4) depth towards the viewer
    d3 = dirs.reshape(15, 3) @ m.T

    # Shade from the visible surface normal: the view axis without its component along the bone.
    normal = np.array([0.0, 0.0, 1.0]) - d3[:, 2:] * d3
    norm = np.sqrt((normal * normal).sum(1, keepdims=True))
    normal = np.where(norm < 0.2, m[:, 2], normal / np.maximum(norm, 1e-6))  # bone faces the camera
    shade = 0.6 + 0.45 * np.concatenate([[m[:, 2] @ light], normal @ light]).clip(0.0, 1.0)

    # Highlights: half-width cores shifted towards the light, so bones and palm look rounded.
    towards = light[:2] * [1.0, -1.0] / max(np.hypot(*light[:2]), 1e-6)
    palm, arm = flat[:_POINTS], flat[_POINTS:]
    centre = palm[:len(PALM_OUTLINE)].mean(0)
    p0, p1 = j2[:, :3].reshape(-1, 2), j2[:, 1:].reshape(-1, 2)
    r0, r1 = radii[:, :3].reshape(-1), radii[:, 1:].reshape(-1)
    bones = _capsules(np.concatenate([p0, p0]), np.concatenate([p1, p1]),
                      np.concatenate([r0, 0.5 * r0]), np.concatenate([r1, 0.5 * r1]))
    bones[15:] += towards * 0.35 * r0[:, None, None]
    palm_core = centre + 0.7 * (palm - centre) + 0.08 * towards
    polys = np.concatenate([palm[None], bones[:15], palm_core[None], bones[15:], arm[None]])
    # Draw order: the palm first (the fingers lie on its viewer side), then the bones far to near.
    depth = (z[:, :3] + z[:, 1:]).reshape(-1)
    order = [0] + [int(k) + 1 for k in np.argsort(depth, kind="stable")]
    return {"polys": polys, "shade": shade, "order": order}


@lru_cache(maxsize=4)
def _noise_bank(size: int) -> np.ndarray:
    """Fixed Gaussian grain around 128, a bit larger than the frame: samples take random windows."""
    bank = np.random.default_rng(20210501).normal(128.0, 48.0, (size + 64, size + 64, 3))
    return np.clip(bank, 0, 255).astype(np.uint8)


def _grain(rng, image: np.ndarray, amount: float) -> np.ndarray:
    size = image.shape[0]
    y, x = (64 * rng.random(2)).astype(int)
    window = _noise_bank(size)[y:y + size, x:x + size]
    return cv2.addWeighted(image, 1.0, window, amount, -128.0 * amount)


def _skin(rng) -> np.ndarray:
    t = rng.uniform(0, len(SKIN) - 1)
    i = min(int(t), len(SKIN) - 2)
    tone = SKIN[i] + (t - i) * (SKIN[i + 1] - SKIN[i])
    return tone * rng.uniform(0.85, 1.12) * rng.uniform(0.94, 1.06, 3)


def _background(rng, size: int, skin: np.ndarray) -> np.ndarray:
    """A smooth colour field with blocky or soft mid-frequency texture, then random clutter shapes."""
    cells = int(rng.uniform(6, 24))
    low = cv2.resize((256 * rng.random((3, 3, 3))).astype(np.uint8), (cells, cells),
                     interpolation=cv2.INTER_LINEAR)
    mid = cv2.addWeighted(low, 0.7, (256 * rng.random((cells, cells, 3))).astype(np.uint8), 0.3, 0.0)
    interp = cv2.INTER_NEAREST if rng.random() < 0.3 else cv2.INTER_LINEAR
    image = cv2.resize(mid, (size, size), interpolation=interp)
    # Clutter: one random row per shape (colour, points, kind, thickness, angle), drawn in one go.
    u = rng.random((int(rng.uniform(3, 12)), 16))
    # Some clutter takes skin colours, so colour alone does not find the hands.
    colours = np.where(u[:, :1] < 0.15, skin * (0.7 + 0.5 * u[:, 1:2]), 255 * u[:, 2:5]).clip(0, 255)
    pts = ((1.2 * u[:, 5:11] - 0.1) * size * ONE).astype(int).tolist()
    kinds = (4 * u[:, 11]).astype(int).tolist()
    thick = np.where(u[:, 12] < 0.6, -1, 1 + 6 * u[:, 13]).astype(int).tolist()  # -1: filled
    axes = (size * ONE * (0.03 + 0.27 * u[:, 14:16])).astype(int).tolist()
    angles = (180 * u[:, 13]).tolist()
    for colour, p, kind, t, ax, angle in zip(colours.tolist(), pts, kinds, thick, axes, angles):
        if kind == 0:
            cv2.rectangle(image, p[0:2], p[2:4], colour, t, cv2.LINE_AA, SHIFT)
        elif kind == 1:
            cv2.ellipse(image, p[0:2], ax, angle, 0, 360, colour, t, cv2.LINE_AA, SHIFT)
        elif kind == 2:
            cv2.line(image, p[0:2], p[2:4], colour, max(t, 1), cv2.LINE_AA, SHIFT)
        else:
            cv2.fillPoly(image, [np.array(p, np.int32).reshape(3, 2)], colour, cv2.LINE_AA, SHIFT)
    return image


def _draw(image, label_map, polys: np.ndarray, hand: dict, skin: np.ndarray) -> None:
    """Draw one hand: shaded skin into the image, its part ids far to near into its own label map.
    `polys` are the hand's polygons in frame pixels, fixed point (SHIFT bits)."""
    colour = hand["shade"][:, None] * skin
    dark, bright, line = (colour * 0.84).tolist(), colour.tolist(), (colour * 0.62).tolist()
    cv2.fillPoly(image, [polys[32]], dark[0], cv2.LINE_AA, SHIFT)
    for k in hand["order"]:
        cv2.fillPoly(label_map, [polys[k]], k + 1, cv2.LINE_8, SHIFT)
        cv2.fillPoly(image, [polys[k]], dark[k], cv2.LINE_8, SHIFT)  # the outline smooths its edge
        cv2.fillPoly(image, [polys[16 + k]], bright[k], cv2.LINE_AA, SHIFT)
        cv2.polylines(image, [polys[k]], True, line[k], 1, cv2.LINE_AA, SHIFT)


def generate(seed: int, index: int, size: int = 256) -> dict:
    """One sample, fully determined by (seed, index). Keys: `image` uint8 (size, size, 3) BGR; `labels`
    uint8 (2, size, size) [left, right], 0..16, amodal between hands; `front` uint8 (size, size), 0 none,
    1 left visible, 2 right visible; `bbox` float32 [x, y, w, h] tight around the labelled pixels;
    `hand_type` in {left, right, interacting}. Where the front hand's arm covers the back hand, `front`
    names the front hand (an arm counts as its hand's skin)."""
    if size < 32:
        raise ValueError(f"synthetic size must be at least 32 pixels, got size={size}")
    rng = np.random.default_rng([seed, index])
    draw = rng.random()
    hand_type = "interacting" if draw < 0.7 else "left" if draw < 0.85 else "right"
    skin = _skin(rng)
    image = _background(rng, size, skin)
    light = np.array([*rng.normal(0.0, 1.0, 2), rng.uniform(0.6, 1.5)])
    light /= np.linalg.norm(light)

    sides = [0, 1] if hand_type == "interacting" else [0 if hand_type == "left" else 1]
    base = rng.uniform(-np.pi, np.pi)  # the scene's up direction; the two hands roughly share it
    hands = {side: _hand(rng, side == 0, base + rng.normal(0.0, 0.6), light) for side in sides}
    if len(sides) == 2:
        # The right hand reaches into the left one: its palm lands within about a hand of the other's.
        r, t = rng.uniform(0.2, 1.1), rng.uniform(-np.pi, np.pi)
        scale = rng.uniform(0.9, 1.1)
        palms = [hands[side]["polys"][0, :len(PALM_OUTLINE)].mean(0) for side in sides]
        offset = palms[0] - scale * palms[1]
        hands[1]["polys"] = hands[1]["polys"] * scale + offset + [r * np.cos(t), r * np.sin(t)]

    # Fit the hands' box to about half the frame, near its centre, so the frame is a context crop.
    pts = np.concatenate([h["polys"][:16].reshape(-1, 2) for h in hands.values()])
    lo, hi = pts.min(0), pts.max(0)
    scale = rng.uniform(0.4, 0.55) * size / max(hi - lo)
    shift = size / 2 + rng.uniform(-0.05, 0.05, 2) * size - scale * (lo + hi) / 2
    fixed = {side: np.round((h["polys"] * scale + shift) * ONE).astype(np.int32)
             for side, h in hands.items()}

    labels = np.zeros((2, size, size), np.uint8)
    order = sides if rng.random() < 0.5 else sides[::-1]  # back hand first
    tone = {side: skin * rng.uniform(0.95, 1.05) for side in sides}
    for side in order:
        _draw(image, labels[side], fixed[side], hands[side], tone[side])

    # Which hand is visible at each labelled pixel: the front hand wherever its skin (arm included) is.
    ids = (FRONT_LEFT, FRONT_RIGHT)
    front = cv2.threshold(labels[order[0]], 0, ids[order[0]], cv2.THRESH_BINARY)[1]
    if len(order) == 2:
        skin_mask = cv2.threshold(labels[order[1]], 0, 255, cv2.THRESH_BINARY)[1]
        cv2.fillPoly(skin_mask, [fixed[order[1]][32]], 255, cv2.LINE_8, SHIFT)
        covered = cv2.bitwise_and(skin_mask, cv2.bitwise_or(labels[0], labels[1]))
        np.copyto(front, np.uint8(ids[order[1]]), where=covered > 0)

    if rng.random() < 0.6:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.4, 1.3))
    image = _grain(rng, image, rng.uniform(0.0, 0.2))
    bbox = np.array(cv2.boundingRect(front), np.float32)  # the box of the non-zero pixels
    return {"image": image, "labels": labels, "front": front, "bbox": bbox, "hand_type": hand_type}
