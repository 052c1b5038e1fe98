"""The byte codecs of format version 2 (FORMAT.md beside this): a context crop to and from JPEG, PNG or
raw bytes, and label / front maps to and from zlib or raw bytes. amodal.data.pack encodes,
amodal.data.read decodes; both take the codec names from the manifest's layout.

Also the one codec of label maps as PNG images, the course's form (three identical channels; one
channel is read too): its label LMDB and a folder's labels (amodal.data.sources), and the leaderboard
file (amodal.submission).

Decoding is the loader's hot path: one cv2.imdecode or zlib.decompress per array, nothing else.
"""

from __future__ import annotations

import zlib

import cv2
import numpy as np

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAP_LEVEL = 1  # level 6: maps 40% smaller, decompressed 2.4-3.2x slower (bench_data.py --what storage)


class CodecError(ValueError):
    """Bytes that do not decode to the array the layout promises."""


def encode_image(image: np.ndarray, codec: str, quality: int = 95) -> bytes:
    """(s, s, 3) uint8 BGR -> bytes."""
    if codec == "raw":
        return np.ascontiguousarray(image).tobytes()
    if codec == "jpeg":
        # Huffman tables fitted to the image: 4% smaller, decodes no slower (bench_data.py --what storage)
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_OPTIMIZE, 1])
    elif codec == "png":
        ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    else:
        raise ValueError(f"image codec {codec!r}")
    if not ok:
        raise CodecError(f"OpenCV could not encode a {image.shape} image as {codec}")
    return buf.tobytes()


# JPEG decoded at 1/r of its side by the decoder itself (its scaled inverse DCT): far less work
_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4}


def decode_image(data: np.ndarray, codec: str, side: int, reduce: int = 1) -> np.ndarray:
    """Bytes (a uint8 array) -> (side, side, 3) uint8 BGR; with reduce 2 or 4 (JPEG only) the decoder
    itself returns (ceil(side / reduce),)² pixels, each the mean of a reduce² block of the full image."""
    if codec == "raw":
        image = data
    else:
        if reduce != 1 and codec != "jpeg":
            raise ValueError(f"reduced decoding is for JPEG, not {codec}")
        image = cv2.imdecode(data, _REDUCED[reduce])
        if image is None:
            raise CodecError(f"{codec} bytes that OpenCV cannot decode")
    side = -(-side // reduce)
    if image.size != side * side * 3:
        raise CodecError(f"image of {image.size} values, expected {side}x{side}x3")
    return image.reshape(side, side, 3)


def encode_map(array: np.ndarray, codec: str) -> bytes:
    data = np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    return zlib.compress(data, MAP_LEVEL) if codec == "zlib" else data


def decode_map(data: np.ndarray, codec: str, shape: tuple[int, ...]) -> np.ndarray:
    """Bytes (a uint8 array) -> a uint8 array of `shape`."""
    if codec == "zlib":
        try:
            data = zlib.decompress(data)
        except zlib.error as e:
            raise CodecError(f"zlib: {e}") from None
    out = np.frombuffer(data, dtype=np.uint8)
    if out.size != int(np.prod(shape)):
        raise CodecError(f"map of {out.size} values, expected {'x'.join(map(str, shape))}")
    return out.reshape(shape)


def encode_label_png(label_map: np.ndarray) -> bytes:
    """An (H, W) uint8 label map -> PNG bytes with 3 identical channels, as the course wrote them."""
    ok, buf = cv2.imencode(".png", np.repeat(label_map[:, :, None], 3, axis=2))
    if not ok:
        raise CodecError("OpenCV could not encode a label map as PNG")
    return buf.tobytes()


def decode_label_png(data: bytes, alpha_ok: bool = False) -> np.ndarray:
    """PNG bytes of a label map, one channel or three identical ones -> (H, W) uint8; with alpha_ok, a
    fourth (alpha) channel is ignored, as image tools often save one. A CodecError says what is wrong
    ("is not a PNG image", ...); the caller names the file and key."""
    if not data.startswith(PNG_MAGIC):
        raise CodecError("is not a PNG image")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise CodecError("does not decode as PNG")
    if image.dtype != np.uint8:
        raise CodecError(f"has dtype {image.dtype}, expected uint8")
    if image.ndim == 3:
        if image.shape[2] not in ((3, 4) if alpha_ok else (3,)):
            raise CodecError(f"has {image.shape[2]} channels, expected 1 or 3" + (" (+ alpha)" if alpha_ok else ""))
        if not (np.array_equal(image[:, :, 0], image[:, :, 1]) and np.array_equal(image[:, :, 0], image[:, :, 2])):
            raise CodecError("has 3 channels that differ")
        image = np.ascontiguousarray(image[:, :, 0])
    return image
