"""Augmentation of a whole batch on the training device (`augment.on = "device"`; FORMAT.md).

On the worker path (amodal.data.augment.apply) each loader worker warps, colour-scales and flips its
samples with OpenCV. On this path a worker only reads and decodes (`canvas_sample`): it returns the
context crop at the top left of a fixed canvas (uint8, zero beyond the crop, so a batch stacks), the
label and front maps on a canvas of the same side, the sampling parameters (affine_grid's theta) of
box_affine's two matrices, to the input side and to the 128² targets, and the sample's colour gains
and flip, all drawn as on the worker path. After the host-to-device copy, `augment_batch` warps the
batch in one call per kind (affine_grid + grid_sample: bilinear for the image, nearest for the maps),
applies the gains, clips, and swaps the left and right maps and the front values 1 <-> 2 of flipped
samples.

Conventions: OpenCV's warpAffine puts pixel i's centre at i and reads 0 outside the source
(BORDER_CONSTANT); grid_sample with align_corners=False puts it at (2i + 1) / side - 1 and, with
padding_mode="zeros", reads 0 outside too. The zero canvas beyond a crop continues that border, so a
crop warps on its canvas as it would alone.

Decoding at the size needed: where the warp samples the crop at 2 (or 4) source pixels per output pixel
or more along both axes, the JPEG decoder returns the crop at 1/2 (1/4) of its side (`reduction`), and
the image matrix is scaled to match. Measured differences from the worker path:
tests/test_device_augment.py.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from amodal.data.augment import AugParams, box_affine
from amodal.labels import FRONT_LEFT, FRONT_RIGHT, TARGET_SIZE

# the batch entries a worker sends for augment_batch, beside "index" and "key"
DEVICE_KEYS = ("crop", "maps", "theta", "theta_target", "gains", "flip")


def resolve_on(on: str, device: torch.device) -> str:
    """augment.on as run: "auto" is "device" on CUDA, "worker" elsewhere: on the CPU the batched warp
    costs more per sample than OpenCV's per-sample warp, and the training process would do it on the
    cores the model trains on (tools/bench_data.py, tools/bench_train.py; FORMAT.md, "Augmentation on
    the training device")."""
    if on == "auto":
        return "device" if device.type == "cuda" else "worker"
    return on


def reduction(bbox, params: AugParams, input_size: int) -> int:
    """4, 2 or 1: the largest JPEG reduction at which the image warp still samples whole decoded pixels
    or finer, i.e. source pixels per output pixel (box side × scale / input side, the smaller axis)."""
    step = min(float(bbox[2]), float(bbox[3])) * params.scale / input_size
    return 4 if step >= 4 else 2 if step >= 2 else 1


def reduced_affine(m: np.ndarray, reduce: int) -> np.ndarray:
    """The matrix of box_affine for a crop decoded at 1/reduce: reduced pixel j is the mean of full
    pixels reduce·j .. reduce·j + reduce - 1, so its centre is at reduce·j + (reduce - 1) / 2."""
    out = m.copy()
    out[:, :2] *= reduce
    out[:, 2] += m[:, :2].sum(axis=1) * (reduce - 1) / 2
    return out


def canvas_sample(image: np.ndarray, reduce: int, bbox, params: AugParams, input_size: int, canvas: int,
                  labels: np.ndarray, front: np.ndarray | None = None) -> dict:
    """What a worker returns for augment_batch: image (h, w, 3) uint8 BGR decoded at 1/reduce of the
    crop whose box is bbox; labels (2, s, s) and front (s, s) uint8 at the crop's full side s, stacked
    as maps [left, right(, front)]."""
    crop = np.zeros((canvas, canvas, 3), np.uint8)
    crop[:image.shape[0], :image.shape[1]] = image
    m = box_affine(bbox, input_size, params)
    out = {"crop": torch.from_numpy(crop),
           "theta": sampling_theta(reduced_affine(m, reduce) if reduce > 1 else m, canvas, input_size),
           "theta_target": sampling_theta(box_affine(bbox, TARGET_SIZE, params), canvas, TARGET_SIZE),
           "gains": torch.tensor(params.gains, dtype=torch.float32),
           "flip": torch.tensor(params.flip)}
    s = labels.shape[1]
    maps = np.zeros((2 if front is None else 3, canvas, canvas), np.uint8)
    maps[:2, :s, :s] = labels
    if front is not None:
        maps[2, :s, :s] = front
    out["maps"] = torch.from_numpy(maps)
    return out


def _normalised(side: int) -> np.ndarray:
    """Pixel coordinates to grid_sample's (align_corners=False): pixel i's centre -> (2i + 1) / side - 1."""
    return np.array([[2 / side, 0, 1 / side - 1], [0, 2 / side, 1 / side - 1], [0, 0, 1]])


def sampling_theta(m: np.ndarray, canvas: int, size: int) -> torch.Tensor:
    """affine_grid's theta (output -> source, normalised) for a matrix m taking canvas pixels to output
    pixels of a size² output. Computed in the worker, in float64: the device gets it with the batch,
    and no small tensor has to be copied to it (a copy from pageable memory waits for the GPU)."""
    m3 = np.vstack([m, [0, 0, 1]])
    theta = _normalised(canvas) @ np.linalg.inv(m3) @ np.linalg.inv(_normalised(size))
    return torch.from_numpy(theta[:2].astype(np.float32))


def augment_batch(batch: dict, device: torch.device, input_size: int) -> dict:
    """A collated batch of canvas_sample()s, copied to `device` and augmented there: image (B, 3, S, S)
    float32 in [0, 1] (channels B, G, R as on the worker path), target (B, 2, 128, 128) int64 and,
    when the maps hold it, front (B, 128, 128) uint8; index and key passed on. The crop crosses to the
    device as uint8: a quarter of the bytes of the float image it becomes there."""
    on = {k: batch[k].to(device, non_blocking=True) for k in DEVICE_KEYS}
    b = len(batch["index"])
    image = on["crop"].permute(0, 3, 1, 2).float()
    grid = F.affine_grid(on["theta"], [b, 1, input_size, input_size], align_corners=False)
    image = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    image = (image * (on["gains"] / 255.0)[:, :, None, None]).clamp_(0.0, 1.0)
    out = {"image": image, "index": batch["index"], "key": batch["key"]}
    grid = F.affine_grid(on["theta_target"], [b, 1, TARGET_SIZE, TARGET_SIZE], align_corners=False)
    maps = F.grid_sample(on["maps"].float(), grid, mode="nearest", padding_mode="zeros",
                         align_corners=False).to(torch.uint8)
    flip = on["flip"][:, None, None]
    left, right = maps[:, 0], maps[:, 1]
    out["target"] = torch.stack([torch.where(flip, right, left), torch.where(flip, left, right)], 1).long()
    if maps.shape[1] == 3:
        front = maps[:, 2]
        swapped = torch.where(front == FRONT_LEFT, FRONT_RIGHT, torch.where(front == FRONT_RIGHT, FRONT_LEFT, front))
        out["front"] = torch.where(flip, swapped, front)
    return out
