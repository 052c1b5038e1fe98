"""The leaderboard file (docs/design.md §1): writer, reader and validator.

Format, exactly as the course's skeleton produced it:

    test.lmdb.tar.gz            a gzip-compressed tar whose one top folder is test.lmdb
      test.lmdb/data.mdb        an LMDB environment (lock.mdb beside it, as lmdb.open leaves it)
      test.lmdb/lock.mdb
      test.lmdb/im_path.pt      torch.save of a list of str: each test key + ".jpg", in test-list order

For each test key the LMDB holds two PNG images, 128x128 uint8 with values 0..16, under the ASCII
keys `<key>__l` (left hand) and `<key>__r` (right hand). The course wrote 3 identical channels; a
reader takes channel 0. Keys are ASCII because the course's reader looks them up with
`key.encode("ascii")`.

The predictions file that the writer reads (amodal.predict writes it): HDF5 with a dataset `keys`
(variable-length UTF-8 strings, test-list order) and `labels` uint8 (N, 2, 128, 128) [left, right].

The command `amodal-submission` (main below) writes or checks the file.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import os
import shutil
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

import h5py
import lmdb
import numpy as np
import torch

from amodal.data.codec import CodecError, decode_label_png, encode_label_png
from amodal.fileio import fsync_path
from amodal.labels import HAND_SUFFIXES, NUM_PARTS, TARGET_SIZE

TOP = "test.lmdb"
IM_PATH = "im_path.pt"
REQUIRED_FILES = ("data.mdb", IM_PATH)
OPTIONAL_FILES = ("lock.mdb",)
CHUNK = 256  # samples read from the predictions file at once


class SubmissionError(ValueError):
    """A fault in a predictions file or a leaderboard file; the message names the file and key."""


# ---------------------------------------------------------------------------------------------------
# The predictions file


@contextlib.contextmanager
def _open_predictions(path: str | Path):
    """Yield (keys, labels h5 dataset) after checking everything about the file but the values."""
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"{path}: no such predictions file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise SubmissionError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        for name in ("keys", "labels"):
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise SubmissionError(f"{path}: no dataset {name!r}")
        labels = f["labels"]
        if labels.dtype != np.uint8:
            raise SubmissionError(f"{path}: labels have dtype {labels.dtype}, expected uint8")
        if labels.ndim != 4 or labels.shape[1:] != (2, TARGET_SIZE, TARGET_SIZE):
            raise SubmissionError(
                f"{path}: labels have shape {labels.shape}, expected (N, 2, {TARGET_SIZE}, {TARGET_SIZE})"
            )
        if f["keys"].ndim != 1:
            raise SubmissionError(f"{path}: keys have shape {f['keys'].shape}, expected (N,)")
        if h5py.check_string_dtype(f["keys"].dtype) is None:
            raise SubmissionError(f"{path}: keys have dtype {f['keys'].dtype}, expected UTF-8 strings")
        keys = f["keys"].asstr()[()].tolist()
        if len(keys) != labels.shape[0]:
            raise SubmissionError(f"{path}: {len(keys)} keys but {labels.shape[0]} label pairs")
        if not keys:
            raise SubmissionError(f"{path}: no predictions")
        for i, key in enumerate(keys):
            if not key:
                raise SubmissionError(f"{path}: key {i} is empty")
            if not key.isascii():
                raise SubmissionError(f"{path}: key {key!r} is not ASCII (the course's reader encodes keys as ASCII)")
        repeated = _first_repeated(keys)
        if repeated is not None:
            raise SubmissionError(f"{path}: key {repeated!r} appears more than once")
        yield keys, labels


def _first_repeated(items: Sequence[str]) -> str | None:
    """The first item that appears a second time in `items` (the one whose repeat comes first), or None."""
    seen: set[str] = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None


def _check_values(path: Path, keys: list[str], labels: h5py.Dataset) -> None:
    for start in range(0, len(keys), CHUNK):
        block = labels[start : start + CHUNK]
        bad = np.flatnonzero(block.reshape(len(block), -1).max(axis=1) > NUM_PARTS)
        if bad.size:
            i = int(bad[0])
            raise SubmissionError(
                f"{path}: key {keys[start + i]!r} has label value {int(block[i].max())} (allowed 0..{NUM_PARTS})"
            )


def read_predictions(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(keys, labels uint8 (N, 2, 128, 128)) of a checked predictions file."""
    with _open_predictions(path) as (keys, labels):
        _check_values(Path(path), keys, labels)
        return keys, labels[()]


# ---------------------------------------------------------------------------------------------------
# Writing


def _tar_info(name: str, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
    # Fixed owner and time so the archive depends only on its contents.
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    return info


def _pack(folder: Path, out_file) -> None:
    """Write folder (named test.lmdb) as a gzip tar with test.lmdb as its one top folder."""
    with gzip.GzipFile(filename="", fileobj=out_file, mode="wb", mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_tar_info(TOP, directory=True))
            for child in sorted(folder.iterdir()):
                with open(child, "rb") as f:
                    tar.addfile(_tar_info(f"{TOP}/{child.name}", child.stat().st_size), f)


def write_submission(predictions_h5: str | Path, out_path: str | Path, test_keys: Sequence[str] | None = None) -> Path:
    """Write the leaderboard file out_path (test.lmdb.tar.gz) from a predictions file.

    The predictions are checked first (shape, dtype, values 0..16, unique ASCII keys). The archive is
    built next to out_path under temporary names, read back (checked against test_keys when given,
    else against the predictions' keys) and compared with the predictions, then renamed over out_path:
    an existing out_path is left untouched when anything fails.
    """
    predictions_h5 = Path(predictions_h5)
    out_path = Path(out_path)
    out_dir = out_path.parent if str(out_path.parent) else Path(".")
    if not out_dir.is_dir():
        raise SubmissionError(f"{out_path}: folder {out_dir} does not exist")

    with _open_predictions(predictions_h5) as (keys, labels):
        _check_values(predictions_h5, keys, labels)
        for key in keys:
            if len((key + HAND_SUFFIXES[0]).encode("ascii")) > 511:  # LMDB's default key size limit
                raise SubmissionError(f"{predictions_h5}: key {key!r} is too long for an LMDB key")

        work = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_dir))
        tmp_tar = work.with_name(work.name + ".tar.gz")
        try:
            folder = work / TOP
            folder.mkdir()
            # Address space only: LMDB files grow with what is written. PNGs of label maps are a few
            # kB; the raw size bounds them from above.
            map_size = len(keys) * 2 * (3 * TARGET_SIZE * TARGET_SIZE + 4096) * 2 + (16 << 20)
            env = lmdb.open(str(folder), map_size=map_size, subdir=True)
            try:
                for start in range(0, len(keys), CHUNK):
                    block = labels[start : start + CHUNK]
                    with env.begin(write=True) as txn:
                        for key, pair in zip(keys[start : start + CHUNK], block):
                            for hand, suffix in enumerate(HAND_SUFFIXES):
                                txn.put((key + suffix).encode("ascii"), encode_label_png(pair[hand]))
                env.sync(True)
            finally:
                env.close()
            torch.save([key + ".jpg" for key in keys], folder / IM_PATH)

            with open(tmp_tar, "wb") as f:
                _pack(folder, f)
                f.flush()
                os.fsync(f.fileno())

            # Read back what will be submitted: format, keys (against test_keys when given) and every
            # map equal to the predictions.
            try:
                with contextlib.closing(_iter_submission(tmp_tar, keys if test_keys is None else test_keys)) as back:
                    for i, (key, pair) in enumerate(back):
                        if not np.array_equal(pair, labels[i]):
                            raise SubmissionError(f"{tmp_tar}: key {key!r} does not read back as written")
            except SubmissionError as e:
                raise SubmissionError(str(e).replace(str(tmp_tar), f"{out_path} (not written)")) from None

            os.replace(tmp_tar, out_path)
            fsync_path(out_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            tmp_tar.unlink(missing_ok=True)
    return out_path


# ---------------------------------------------------------------------------------------------------
# Reading and checking


def _member_kind(m: tarfile.TarInfo) -> str:
    if m.isdir():
        return "folder"
    if m.isfile():
        return "file"
    if m.issym():
        return "symbolic link"
    if m.islnk():
        return "hard link"
    return "special file"


def _check_members(path: Path, members: list[tarfile.TarInfo]) -> list[tarfile.TarInfo]:
    """The regular files to extract; SubmissionError on any unsafe, foreign or missing member."""
    allowed = {f"{TOP}/{name}" for name in REQUIRED_FILES + OPTIONAL_FILES}
    files: dict[str, tarfile.TarInfo] = {}
    for m in members:
        name = m.name
        parts = PurePosixPath(name).parts
        if name.startswith("/") or "\\" in name or ".." in parts or not parts:
            raise SubmissionError(f"{path}: unsafe member path {name!r}")
        if not (m.isdir() or m.isfile()):
            raise SubmissionError(f"{path}: member {name!r} is a {_member_kind(m)}; only files and folders are allowed")
    for m in members:
        top = PurePosixPath(m.name).parts[0]
        if top != TOP:
            raise SubmissionError(f"{path}: wrong top folder {top!r} (member {m.name!r}); expected {TOP!r}")
    for m in members:
        name = "/".join(PurePosixPath(m.name).parts)  # drops a trailing slash of a folder
        if name == TOP and m.isdir():
            continue
        if name not in allowed or not m.isfile():
            raise SubmissionError(
                f"{path}: unexpected member {m.name!r} ({_member_kind(m)}); "
                f"{TOP}/ may hold only {', '.join(REQUIRED_FILES + OPTIONAL_FILES)}"
            )
        if name in files:
            raise SubmissionError(f"{path}: member {m.name!r} appears more than once")
        files[name] = m
    for required in REQUIRED_FILES:
        if f"{TOP}/{required}" not in files:
            raise SubmissionError(f"{path}: no {TOP}/{required}")
    return list(files.values())


def _read_im_paths(path: Path, file: Path) -> list[str]:
    try:
        im_paths = torch.load(file, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same fault for the user
        raise SubmissionError(f"{path}: {TOP}/{IM_PATH} does not load with torch.load(weights_only=True): {e}") from None
    if not isinstance(im_paths, list) or not all(isinstance(p, str) for p in im_paths):
        raise SubmissionError(f"{path}: {TOP}/{IM_PATH} is not a list of str")
    keys = [_key_of_entry(path, p) for p in im_paths]
    repeated = _first_repeated(im_paths)
    if repeated is not None:
        raise SubmissionError(f"{path}: {TOP}/{IM_PATH} lists {repeated!r} more than once")
    if not keys:
        raise SubmissionError(f"{path}: {TOP}/{IM_PATH} is empty")
    return keys


def _key_of_entry(path: Path, entry: str) -> str:
    """The test key that an im_path.pt entry names: the entry without its .jpg."""
    if not entry.endswith(".jpg"):
        raise SubmissionError(f"{path}: {TOP}/{IM_PATH} entry {entry!r} does not end in .jpg")
    if not entry.isascii():
        raise SubmissionError(f"{path}: {TOP}/{IM_PATH} entry {entry!r} is not ASCII")
    return entry[: -len(".jpg")]


def _compare_keys(path: Path, keys: list[str], test_keys: Sequence[str]) -> None:
    have, want = set(keys), set(test_keys)
    if len(want) != len(test_keys):
        raise SubmissionError("the test key list itself holds a key more than once")
    for key in test_keys:
        if key not in have:
            raise SubmissionError(f"{path}: test key {key!r} is missing from {TOP}/{IM_PATH}")
    for key in keys:
        if key not in want:
            raise SubmissionError(f"{path}: {TOP}/{IM_PATH} lists {key + '.jpg'!r}, which is not a test key")
    for i, (got, expected) in enumerate(zip(keys, test_keys)):
        if got != expected:
            raise SubmissionError(
                f"{path}: {TOP}/{IM_PATH} is out of test-list order at position {i}: "
                f"{got + '.jpg'!r} where {expected + '.jpg'!r} belongs"
            )


def _decode_map(path: Path, name: str, value: bytes) -> np.ndarray:
    try:
        image = decode_label_png(value)
    except CodecError as e:
        raise SubmissionError(f"{path}: LMDB entry {name!r} {e}") from None
    if image.shape != (TARGET_SIZE, TARGET_SIZE):
        raise SubmissionError(
            f"{path}: LMDB entry {name!r} is {image.shape[0]}x{image.shape[1]} (height x width), "
            f"expected {TARGET_SIZE}x{TARGET_SIZE}"
        )
    if image.max() > NUM_PARTS:
        raise SubmissionError(f"{path}: LMDB entry {name!r} has label value {int(image.max())} (allowed 0..{NUM_PARTS})")
    return image


def _iter_submission(path: str | Path, test_keys: Sequence[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Check a leaderboard file step by step and yield (key, labels (2, 128, 128)) in im_path order.

    Faults are raised in this order: the gzip stream, the tar members, im_path.pt (and, when test_keys
    is given, its keys against them), the LMDB entries, then each map.
    """
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            raise SubmissionError(f"{path}: not a gzip file")
    # Read the whole gzip stream once: this checks its CRC and length, which tarfile alone may not.
    try:
        with gzip.open(path, "rb") as gz:
            while gz.read(1 << 20):
                pass
    except (OSError, EOFError, zlib.error) as e:
        raise SubmissionError(f"{path}: corrupt gzip stream ({e})") from None

    with tempfile.TemporaryDirectory(prefix="amodal-submission-") as tmp:
        try:
            with tarfile.open(path, "r:gz") as tar:
                members = tar.getmembers()
                if not members:
                    raise SubmissionError(f"{path}: empty tar archive")
                # Names and types are checked before anything touches the disk; the 'data' filter
                # is a second guard against paths outside tmp, links and device files.
                files = _check_members(path, members)
                tar.extractall(tmp, members=files, filter="data")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise SubmissionError(f"{path}: not a readable tar.gz archive ({e})") from None
        folder = Path(tmp) / TOP

        keys = _read_im_paths(path, folder / IM_PATH)
        if test_keys is not None:
            _compare_keys(path, keys, test_keys)

        try:
            env = lmdb.open(
                str(folder), subdir=True, readonly=True, lock=False, readahead=False, meminit=False, create=False
            )
        except lmdb.Error as e:
            raise SubmissionError(f"{path}: {TOP} is not a readable LMDB environment ({e})") from None
        try:
            with env.begin(write=False) as txn:
                wanted = {(key + suffix).encode("ascii") for key in keys for suffix in HAND_SUFFIXES}
                try:
                    for name in txn.cursor().iternext(keys=True, values=False):
                        if bytes(name) not in wanted:
                            raise SubmissionError(
                                f"{path}: LMDB entry {bytes(name).decode('ascii', 'replace')!r} "
                                f"belongs to no key of {TOP}/{IM_PATH}"
                            )
                    for key in keys:
                        pair = []
                        for suffix in HAND_SUFFIXES:
                            value = txn.get((key + suffix).encode("ascii"))
                            if value is None:
                                raise SubmissionError(f"{path}: key {key!r} has no LMDB entry {key + suffix!r}")
                            pair.append(_decode_map(path, key + suffix, bytes(value)))
                        yield key, np.stack(pair)
                except lmdb.Error as e:
                    raise SubmissionError(f"{path}: {TOP} LMDB read failed ({e})") from None
        finally:
            env.close()


def read_submission(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(keys without .jpg in im_path.pt order, labels uint8 (N, 2, 128, 128)) of a checked leaderboard
    file; raises SubmissionError naming the first fault."""
    keys, maps = [], []
    for key, pair in _iter_submission(path):
        keys.append(key)
        maps.append(pair)
    return keys, np.stack(maps)


def check_submission(path: str | Path, test_keys: Sequence[str]) -> None:
    """Raise SubmissionError naming the first fault of a leaderboard file against the test keys:
    every key once, in test-list order, both hands, PNG 128x128 with values 0..16."""
    test_keys = list(test_keys)
    if not test_keys:
        raise SubmissionError("no test keys to check against")
    for _ in _iter_submission(path, test_keys):
        pass


CLI_DOC = """Write or check the leaderboard file (test.lmdb.tar.gz, docs/design.md §1).

    amodal-submission PREDICTIONS -o test.lmdb.tar.gz [--test-shards DIR]
    amodal-submission --check FILE --test-shards DIR [--split test]

Writing reads a predictions file (amodal.predict); with --test-shards the result must also match the
test split's keys before it replaces OUT. Checking names the first fault and exits with status 1.
"""


def split_keys(shards: Path, split: str) -> list[str]:
    """The keys of one split of a shard folder, in stored (test-list) order."""
    from amodal.data.dataset import ShardDataset

    return ShardDataset(shards, split).keys()


def main(argv: list[str] | None = None) -> int:
    from amodal.data.format import ShardError

    parser = argparse.ArgumentParser(prog="amodal-submission", description=CLI_DOC,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictions", nargs="?", metavar="PREDICTIONS", help="predictions.h5 to convert")
    parser.add_argument("-o", "--output", metavar="OUT", default="test.lmdb.tar.gz", help="file to write (default: %(default)s)")
    parser.add_argument("--check", metavar="FILE", help="validate this leaderboard file instead of writing one")
    parser.add_argument("--test-shards", metavar="DIR", help="shard folder whose split gives the expected keys")
    parser.add_argument("--split", default="test", help="split of --test-shards holding the test keys (default: %(default)s)")
    args = parser.parse_args(argv)

    if args.check and args.predictions:
        parser.error("give PREDICTIONS (to write) or --check FILE (to validate), not both")
    if not args.check and not args.predictions:
        parser.error("give PREDICTIONS to write a leaderboard file, or --check FILE --test-shards DIR")
    if args.check and not args.test_shards:
        parser.error("--check needs --test-shards DIR (the expected test keys)")

    try:
        keys = None
        if args.test_shards:
            shards = Path(args.test_shards)
            if not shards.is_dir():
                raise SubmissionError(f"--test-shards {shards}: no such folder")
            keys = split_keys(shards, args.split)
        if args.check:
            check_submission(args.check, keys)
            print(f"OK {args.check}: {len(keys)} test images, {2 * len(keys)} label maps, in test-list order")
            return 0
        out = write_submission(args.predictions, args.output, test_keys=keys)
        with h5py.File(args.predictions, "r") as f:
            n = len(f["keys"])
        print(f"wrote {out}: {n} test images" + (f", checked against {args.test_shards}" if keys is not None else ""))
        return 0
    except (SubmissionError, ShardError) as e:  # the file, key or shard folder at fault, no traceback
        print(f"FAULT: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
