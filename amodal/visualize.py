"""Picture panels of a model's predictions: image, ground truth and prediction of both hands, with the
parts one hand hides of the other outlined.

One panel per sample, drawn with OpenCV (no GUI, exact pixel size):

    | image           | ground truth left  | ground truth right  | legend |
    | image + hidden  | prediction left    | prediction right    |        |

Each label map is coloured with amodal.labels.PALETTE (one colour per part) and scaled up with
nearest neighbours. The hidden region of a hand is where its ground truth is foreground and the
`front` map says the other hand is visible (docs/design.md §1: left is hidden where front == 2, right where
front == 1); its contour is drawn in white over a black rim on the ground truth and on the prediction
of that hand, so one sees whether the prediction fills in what it cannot see. The prediction titles
give the image's leaderboard score for that hand (amodal.metrics.pair_scores).

The command `amodal-visualize` (main below) writes the panels of a checkpoint's predictions on a
split.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from amodal.fileio import write_atomic
from amodal.labels import FRONT_LEFT, FRONT_RIGHT, HANDS, PALETTE, PART_NAMES

TILE = 256  # side of one picture tile in pixels (label maps are 128x128, so each pixel is 2x2)
TITLE_H = 24  # band above each tile holding its title
GAP = 6
LEGEND_W = 190
FONT = cv2.FONT_HERSHEY_SIMPLEX
_BGR_PALETTE = np.ascontiguousarray(PALETTE[:, ::-1])  # PALETTE is RGB; OpenCV draws BGR
_BACKGROUND = (40, 40, 40)


def panel_size(tile: int = TILE) -> tuple[int, int]:
    """(height, width) in pixels of a panel drawn with tiles of side `tile`."""
    height = 2 * (TITLE_H + tile) + 3 * GAP
    width = 3 * tile + LEGEND_W + 5 * GAP
    return height, width


def hidden_regions(target: np.ndarray, front: np.ndarray) -> np.ndarray:
    """bool (2, H, W): pixels of each hand's ground truth where the other hand is in front."""
    target = np.asarray(target)
    front = np.asarray(front)
    return np.stack([(target[0] > 0) & (front == FRONT_RIGHT), (target[1] > 0) & (front == FRONT_LEFT)])


def _colour_tile(label_map: np.ndarray, tile: int) -> np.ndarray:
    coloured = _BGR_PALETTE[np.asarray(label_map, dtype=np.int64)]
    return cv2.resize(coloured, (tile, tile), interpolation=cv2.INTER_NEAREST)


def _outline(tile_img: np.ndarray, mask: np.ndarray | None) -> None:
    """Draw the contour of `mask` (H, W bool, label-map resolution) onto tile_img in place."""
    if mask is None or not mask.any():
        return
    big = cv2.resize(mask.astype(np.uint8), tile_img.shape[1::-1], interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(tile_img, contours, -1, (0, 0, 0), 3)  # dark rim: visible on light parts too
    cv2.drawContours(tile_img, contours, -1, (255, 255, 255), 1)


def _image_tile(image: np.ndarray, tile: int) -> np.ndarray:
    """(3, S, S) float BGR in [0, 1] -> (tile, tile, 3) uint8 BGR (OpenCV writes BGR, so no swap)."""
    hwc = np.clip(np.asarray(image, dtype=np.float32).transpose(1, 2, 0) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return cv2.resize(hwc, (tile, tile), interpolation=cv2.INTER_LINEAR)


def _blank_tile(tile: int, text: str) -> np.ndarray:
    img = np.full((tile, tile, 3), 90, np.uint8)
    cv2.putText(img, text, (10, tile // 2), FONT, 0.5, (230, 230, 230), 1, cv2.LINE_AA)
    return img


def _legend(height: int, hidden_note: bool) -> np.ndarray:
    img = np.full((height, LEGEND_W, 3), _BACKGROUND, np.uint8)
    step = min(28, (height - 60) // len(PART_NAMES))
    y = 10
    for c, name in enumerate(PART_NAMES):
        colour = tuple(int(v) for v in _BGR_PALETTE[c])
        cv2.rectangle(img, (8, y), (8 + step - 6, y + step - 6), colour, -1)
        cv2.rectangle(img, (8, y), (8 + step - 6, y + step - 6), (160, 160, 160), 1)
        cv2.putText(img, f"{c:2d} {name}", (8 + step, y + step - 10), FONT, 0.42, (235, 235, 235), 1, cv2.LINE_AA)
        y += step
    if hidden_note:
        y += 8
        cv2.rectangle(img, (8, y), (8 + step - 6, y + step - 6), (0, 0, 0), 3)
        cv2.rectangle(img, (8, y), (8 + step - 6, y + step - 6), (255, 255, 255), 1)
        cv2.putText(img, "hidden by other", (8 + step, y + step - 10), FONT, 0.42, (235, 235, 235), 1, cv2.LINE_AA)
    return img


def hand_scores(pred: np.ndarray, target: np.ndarray) -> list[float | None]:
    """The leaderboard score of each hand of one image (None: the hand is not scored)."""
    from amodal.metrics import pair_scores

    _, _, score, scored = pair_scores(torch.as_tensor(pred)[None].long(), torch.as_tensor(target)[None].long())
    return [float(score[0, h]) if bool(scored[0, h]) else None for h in range(2)]


def draw_panel(image: np.ndarray, pred: np.ndarray, target: np.ndarray | None = None,
               front: np.ndarray | None = None, title: str = "", tile: int = TILE) -> np.ndarray:
    """One panel as a (H, W, 3) uint8 BGR array of size panel_size(tile).

    image: (3, S, S) float BGR in [0, 1] (the model's input); pred, target: (2, 128, 128) label maps
    [left, right]; front: (128, 128) 0/1/2 or None (no outlines then).
    """
    pred = np.asarray(pred)
    hidden = hidden_regions(target, front) if target is not None and front is not None else None
    scores = hand_scores(pred, target) if target is not None else [None, None]

    tiles: list[list[tuple[str, np.ndarray]]] = [[], []]
    picture = _image_tile(image, tile)
    tiles[0].append((title or "image", picture))
    overlay = picture.copy()
    if hidden is not None:
        _outline(overlay, hidden[0] | hidden[1])
    tiles[1].append(("image, hidden parts" if hidden is not None else "image (no front map)", overlay))
    for h, hand in enumerate(HANDS):
        mask = hidden[h] if hidden is not None else None
        if target is not None:
            gt = _colour_tile(target[h], tile)
            _outline(gt, mask)
        else:
            gt = _blank_tile(tile, "no ground truth")
        tiles[0].append((f"ground truth {hand}", gt))
        pr = _colour_tile(pred[h], tile)
        _outline(pr, mask)
        score = "" if scores[h] is None else f"  IoU {scores[h]:.3f}"
        tiles[1].append((f"prediction {hand}{score}", pr))

    height, width = panel_size(tile)
    panel = np.full((height, width, 3), _BACKGROUND, np.uint8)
    for r, row in enumerate(tiles):
        y = GAP + r * (TITLE_H + tile + GAP)
        for c, (text, img) in enumerate(row):
            x = GAP + c * (tile + GAP)
            cv2.putText(panel, text[:40], (x + 2, y + TITLE_H - 8), FONT, 0.5, (240, 240, 240), 1, cv2.LINE_AA)
            panel[y + TITLE_H : y + TITLE_H + tile, x : x + tile] = img
    x = GAP + 3 * (tile + GAP)
    legend = _legend(height - 2 * GAP, hidden is not None)
    panel[GAP : height - GAP, x : x + LEGEND_W] = legend
    return panel


def _file_name(position: int, key: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_")[:80]
    return f"{position:04d}_{safe}.png"


def _write_png(path: Path, img: np.ndarray) -> None:
    """Write atomically: a reader never sees half a PNG under the final name."""
    ok, data = cv2.imencode(".png", img)
    if not ok:
        raise RuntimeError(f"{path}: PNG encoding failed")
    write_atomic(path, lambda tmp: tmp.write_bytes(data.tobytes()))


def write_panels(checkpoint: str | Path, shards: str | Path, split: str, out_dir: str | Path, count: int = 8,
                 start: int = 0, tta_flip: bool = False, device: str = "cpu", batch_size: int = 8,
                 tile: int = TILE) -> list[Path]:
    """Predict samples start..start+count-1 of a split with a checkpoint (file or run folder) and write
    one panel PNG per sample into out_dir. Returns the written paths."""
    from amodal.data.dataset import ShardDataset
    from amodal.distributed import pick_device
    from amodal.predict import load_model_from_checkpoint, predict_batch

    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    device = pick_device(0, device)
    model, cfg, ckpt_path = load_model_from_checkpoint(checkpoint, device)
    input_size = int(cfg.get("data", {}).get("input_size", 128))
    dataset = ShardDataset(shards, split, input_size=input_size)
    if not 0 <= start < len(dataset):
        raise ValueError(f"--start {start} is outside split {split!r} of {shards} ({len(dataset)} samples)")
    indices = list(range(start, min(start + count, len(dataset))))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for b in range(0, len(indices), batch_size):
        samples = [dataset[i] for i in indices[b : b + batch_size]]
        images = torch.stack([s["image"] for s in samples])
        with torch.inference_mode():
            preds = predict_batch(model, images.to(device), tta_flip).cpu().numpy()
        for s, pred in zip(samples, preds):
            target = s["target"].numpy() if "target" in s else None
            front = s["front"].numpy() if "front" in s else None
            title = f"{s['key']}"
            panel = draw_panel(s["image"].numpy(), pred, target, front, title, tile)
            path = out_dir / _file_name(s["index"], s["key"])
            _write_png(path, panel)
            written.append(path)
    dataset.close()
    return written


CLI_DOC = """Write one PNG panel per sample: image, ground truth and prediction of both hands, hidden parts outlined.

    amodal-visualize CHECKPOINT --shards DIR [--split val] -o DIR [--count 8] [--start 0]
                     [--tta-flip] [--device cpu]

CHECKPOINT is a checkpoint file or a run folder (its best.pt, else its newest checkpoint). Each panel
shows the model's input image, the ground truth left and right maps, the predicted left and right maps
(with the image's leaderboard score per hand), one colour per part with a legend, and in white the
outline of the parts of a hand that the other hand hides (synthetic data, which has a front map).
"""


def main(argv: list[str] | None = None) -> int:
    from amodal.checkpoint import CheckpointError
    from amodal.config import ConfigError
    from amodal.data.format import ShardError
    from amodal.predict import PredictError

    parser = argparse.ArgumentParser(prog="amodal-visualize", description=CLI_DOC,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file or run folder")
    parser.add_argument("--shards", required=True, metavar="DIR", help="shard folder (manifest.json + *.h5)")
    parser.add_argument("--split", default="val", help="split to draw (default: %(default)s)")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the PNG panels")
    parser.add_argument("--count", type=int, default=8, help="number of samples (default: %(default)s)")
    parser.add_argument("--start", type=int, default=0, help="index of the first sample (default: %(default)s)")
    parser.add_argument("--tta-flip", action="store_true", help="predict with horizontal-flip test-time augmentation")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        paths = write_panels(args.checkpoint, args.shards, args.split, args.output, count=args.count,
                             start=args.start, tta_flip=args.tta_flip, device=args.device)
    except (CheckpointError, ConfigError, ShardError, PredictError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} panels to {args.output}")
    for path in paths:
        print(f"  panel: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
