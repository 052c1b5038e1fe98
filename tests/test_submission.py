"""The leaderboard file: exact layout, round trip, every fault named, atomic writes, the CLI."""

import gzip
import io
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import h5py
import lmdb
import numpy as np
import pytest
import torch

from amodal.data.codec import encode_label_png
from amodal.submission import (
    SubmissionError,
    check_submission,
    read_predictions,
    read_submission,
    write_submission,
)

REPO = Path(__file__).resolve().parents[1]
KEYS = [
    "Capture0/ROM01_No_Interaction_2_Hand/cam400262/image1234",
    "Capture0/ROM01_No_Interaction_2_Hand/cam400262/image1235",
    "Capture9/0390_dh_touchROM/cam410209/image0001",
    "synthetic/000003",
    "a b+c=d,e;f'g(h)[i]",
]


def make_labels(n, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, 2, 128, 128), np.uint8)
    for i in range(n):
        for hand in range(2):
            y, x = rng.integers(10, 80, size=2)
            labels[i, hand, y : y + 40, x : x + 30] = rng.integers(1, 17, size=(40, 30))
    labels[0, 0, 0, 0] = 16  # the largest valid value appears
    return labels


def write_predictions_h5(path, keys, labels):
    with h5py.File(path, "w") as f:
        f.create_dataset("keys", data=keys, dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("labels", data=labels)
        f.attrs["checkpoint"] = "test"
        f.attrs["fingerprint"] = "test"
    return path


@pytest.fixture
def predictions(tmp_path):
    labels = make_labels(len(KEYS))
    return write_predictions_h5(tmp_path / "predictions.h5", KEYS, labels), labels


@pytest.fixture
def submission(tmp_path, predictions):
    return write_submission(predictions[0], tmp_path / "test.lmdb.tar.gz")


# --- helpers that build faulty archives by hand -----------------------------------------------------


def unpack(path, dest):
    with tarfile.open(path, "r:gz") as tar:
        tar.extractall(dest, filter="data")
    return Path(dest) / "test.lmdb"


def pack(folder, out, top="test.lmdb", extra=()):
    """Pack folder under the top name `top`, plus extra (TarInfo, bytes) members."""
    with tarfile.open(out, "w:gz") as tar:
        tar.add(folder, arcname=top)
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out


def edit_lmdb(folder, put=(), delete=()):
    env = lmdb.open(str(folder), map_size=64 << 20)
    with env.begin(write=True) as txn:
        for key, value in put:
            txn.put(key.encode(), value)
        for key in delete:
            assert txn.delete(key.encode())
    env.close()


def assert_fault(path, pattern, keys=KEYS):
    with pytest.raises(SubmissionError, match=pattern):
        check_submission(path, keys)


# --- the format -------------------------------------------------------------------------------------


def test_round_trip_layout_and_im_path(tmp_path, predictions, submission):
    _, labels = predictions
    keys, read = read_submission(submission)
    assert keys == KEYS
    assert read.dtype == np.uint8 and read.shape == (len(KEYS), 2, 128, 128)
    np.testing.assert_array_equal(read, labels)
    check_submission(submission, KEYS)

    with open(submission, "rb") as f:
        assert f.read(2) == b"\x1f\x8b"
    with tarfile.open(submission, "r:gz") as tar:
        names = tar.getnames()
    assert {n.split("/")[0] for n in names} == {"test.lmdb"}
    assert sorted(names) == ["test.lmdb", "test.lmdb/data.mdb", "test.lmdb/im_path.pt", "test.lmdb/lock.mdb"]

    # Read the way the course's grader would: its own extraction, lmdb, cv2, channel 0.
    folder = unpack(submission, tmp_path / "x")
    assert torch.load(folder / "im_path.pt", weights_only=True) == [k + ".jpg" for k in KEYS]
    env = lmdb.open(str(folder), readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.stat()["entries"] == 2 * len(KEYS)
        for i, key in enumerate(KEYS):
            for hand, suffix in enumerate(("__l", "__r")):
                raw = txn.get((key + suffix).encode("ascii"))
                assert raw.startswith(b"\x89PNG")
                image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
                assert image.shape == (128, 128, 3)
                np.testing.assert_array_equal(image[:, :, 0], labels[i, hand])
                np.testing.assert_array_equal(image[:, :, 2], labels[i, hand])
    env.close()


def test_write_is_deterministic(tmp_path, predictions, submission):
    again = write_submission(predictions[0], tmp_path / "again.tar.gz")
    with tarfile.open(submission) as a, tarfile.open(again) as b:
        for name in ("test.lmdb/data.mdb", "test.lmdb/im_path.pt"):
            assert a.extractfile(name).read() == b.extractfile(name).read()


# --- faults of the leaderboard file -------------------------------------------------------------------


def test_check_against_other_keys(submission):
    assert_fault(submission, r"test key 'extra/key' is missing", KEYS + ["extra/key"])
    assert_fault(submission, r"lists 'synthetic/000003.jpg', which is not a test key", [k for k in KEYS if k != "synthetic/000003"])
    swapped = [KEYS[1], KEYS[0]] + KEYS[2:]
    assert_fault(submission, r"out of test-list order at position 0", swapped)


def test_missing_key(tmp_path, submission):
    # Both the im_path entry and its two maps gone: the key is simply missing.
    folder = unpack(submission, tmp_path / "x")
    torch.save([k + ".jpg" for k in KEYS[:-1]], folder / "im_path.pt")
    edit_lmdb(folder, delete=[KEYS[-1] + "__l", KEYS[-1] + "__r"])
    bad = pack(folder, tmp_path / "bad.tar.gz")
    assert_fault(bad, re.escape(f"test key {KEYS[-1]!r} is missing from test.lmdb/im_path.pt"))


def test_duplicated_key_in_im_path(tmp_path, submission):
    folder = unpack(submission, tmp_path / "x")
    torch.save([k + ".jpg" for k in KEYS + [KEYS[2]]], folder / "im_path.pt")
    bad = pack(folder, tmp_path / "bad.tar.gz")
    assert_fault(bad, rf"lists {KEYS[2] + '.jpg'!r} more than once")


def test_wrong_order(tmp_path, submission):
    folder = unpack(submission, tmp_path / "x")
    order = [KEYS[0], KEYS[1], KEYS[3], KEYS[2], KEYS[4]]
    torch.save([k + ".jpg" for k in order], folder / "im_path.pt")
    bad = pack(folder, tmp_path / "bad.tar.gz")
    assert_fault(bad, rf"out of test-list order at position 2: {KEYS[3] + '.jpg'!r} where {KEYS[2] + '.jpg'!r}")


def test_im_path_without_jpg_and_not_a_list(tmp_path, submission):
    folder = unpack(submission, tmp_path / "x")
    torch.save(KEYS, folder / "im_path.pt")
    assert_fault(pack(folder, tmp_path / "a.tar.gz"), r"does not end in \.jpg")
    torch.save({"keys": KEYS}, folder / "im_path.pt")
    assert_fault(pack(folder, tmp_path / "b.tar.gz"), r"im_path.pt is not a list of str")
    torch.save([k + ".jpg" for k in KEYS[:4]] + ["café.jpg"], folder / "im_path.pt")
    assert_fault(pack(folder, tmp_path / "c.tar.gz"), r"entry 'café.jpg' is not ASCII")
    (folder / "im_path.pt").write_bytes(b"not a torch file")
    assert_fault(pack(folder, tmp_path / "d.tar.gz"), r"im_path.pt does not load with torch.load\(weights_only=True\)")


def test_map_127_by_128(tmp_path, submission):
    folder = unpack(submission, tmp_path / "x")
    edit_lmdb(folder, put=[(KEYS[1] + "__l", encode_label_png(np.zeros((127, 128), np.uint8)))])
    bad = pack(folder, tmp_path / "bad.tar.gz")
    assert_fault(bad, rf"LMDB entry {KEYS[1] + '__l'!r} is 127x128")


def test_value_17(tmp_path, submission):
    folder = unpack(submission, tmp_path / "x")
    m = np.zeros((128, 128), np.uint8)
    m[5, 7] = 17
    edit_lmdb(folder, put=[(KEYS[3] + "__r", encode_label_png(m))])
    bad = pack(folder, tmp_path / "bad.tar.gz")
    assert_fault(bad, rf"LMDB entry {KEYS[3] + '__r'!r} has label value 17")


def test_missing_right_map(tmp_path, submission):
    folder = unpack(submission, tmp_path / "x")
    edit_lmdb(folder, delete=[KEYS[4] + "__r"])
    bad = pack(folder, tmp_path / "bad.tar.gz")
    assert_fault(bad, re.escape(f"key {KEYS[4]!r} has no LMDB entry {KEYS[4] + '__r'!r}"))


def test_foreign_lmdb_entry_channels_and_encoding(tmp_path, submission):
    folder = unpack(submission, tmp_path / "x")
    edit_lmdb(folder, put=[("stray__l", encode_label_png(np.zeros((128, 128), np.uint8)))])
    assert_fault(pack(folder, tmp_path / "a.tar.gz"), r"LMDB entry 'stray__l' belongs to no key")

    folder = unpack(submission, tmp_path / "y")
    colour = np.zeros((128, 128, 3), np.uint8)
    colour[:, :, 1] = 3
    edit_lmdb(folder, put=[(KEYS[0] + "__l", cv2.imencode(".png", colour)[1].tobytes())])
    assert_fault(pack(folder, tmp_path / "b.tar.gz"), r"has 3 channels that differ")

    folder = unpack(submission, tmp_path / "z")
    jpeg = cv2.imencode(".jpg", np.zeros((128, 128, 3), np.uint8))[1].tobytes()
    edit_lmdb(folder, put=[(KEYS[0] + "__r", jpeg)])
    assert_fault(pack(folder, tmp_path / "c.tar.gz"), rf"LMDB entry {KEYS[0] + '__r'!r} is not a PNG")

    folder = unpack(submission, tmp_path / "w")
    one_channel = cv2.imencode(".png", np.full((128, 128), 2, np.uint8))[1].tobytes()
    edit_lmdb(folder, put=[(KEYS[0] + "__r", one_channel)])
    check_submission(pack(folder, tmp_path / "d.tar.gz"), KEYS)  # one channel is readable too


def test_corrupt_gzip(tmp_path, submission):
    data = bytearray(submission.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(bytes(data))
    assert_fault(bad, r"corrupt gzip stream")

    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(submission.read_bytes()[:-100])
    assert_fault(truncated, r"corrupt gzip stream")

    plain = tmp_path / "plain.tar"
    with gzip.open(submission) as src:
        plain.write_bytes(src.read())
    assert_fault(plain, r"not a gzip file")

    not_tar = tmp_path / "not_tar.tar.gz"
    not_tar.write_bytes(gzip.compress(b"hello" * 1000))
    assert_fault(not_tar, r"not a readable tar.gz archive")


def test_unsafe_members(tmp_path, submission):
    folder = unpack(submission, tmp_path / "x")
    evil = tarfile.TarInfo("../evil")
    evil.size = 4
    bad = pack(folder, tmp_path / "evil.tar.gz", extra=[(evil, b"evil")])
    assert_fault(bad, r"unsafe member path '\.\./evil'")
    assert not (tmp_path / "evil").exists()

    absolute = tarfile.TarInfo("/tmp/evil")
    absolute.size = 4
    assert_fault(pack(folder, tmp_path / "abs.tar.gz", extra=[(absolute, b"evil")]), r"unsafe member path '/tmp/evil'")

    link = tarfile.TarInfo("test.lmdb/link")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    assert_fault(pack(folder, tmp_path / "link.tar.gz", extra=[(link, None)]), r"'test.lmdb/link' is a symbolic link")


def test_wrong_top_folder_extra_and_missing_members(tmp_path, submission):
    folder = unpack(submission, tmp_path / "x")
    assert_fault(pack(folder, tmp_path / "top.tar.gz", top="predictions"), r"wrong top folder 'predictions'")

    extra = tarfile.TarInfo("test.lmdb/notes.txt")
    extra.size = 2
    assert_fault(pack(folder, tmp_path / "extra.tar.gz", extra=[(extra, b"hi")]), r"unexpected member 'test.lmdb/notes.txt'")

    (folder / "im_path.pt").unlink()
    assert_fault(pack(folder, tmp_path / "noim.tar.gz"), r"no test.lmdb/im_path.pt")


# --- faults of the predictions file and atomicity ------------------------------------------------------


@pytest.mark.parametrize(
    "change, pattern",
    [
        (lambda k, l: (k, l.astype(np.int64)), r"dtype int64, expected uint8"),
        (lambda k, l: (k, l[:, :, :127]), r"shape \(5, 2, 127, 128\)"),
        (lambda k, l: (k[:4], l), r"4 keys but 5 label pairs"),
        (lambda k, l: (k[:4] + [k[0]], l), rf"key {KEYS[0]!r} appears more than once"),
        (lambda k, l: (k[:4] + ["café"], l), r"key 'café' is not ASCII"),
    ],
)
def test_bad_predictions_leave_existing_output(tmp_path, predictions, submission, change, pattern):
    before = submission.read_bytes()
    keys, labels = change(list(KEYS), predictions[1].copy())
    bad = write_predictions_h5(tmp_path / "bad.h5", keys, labels)
    with pytest.raises(SubmissionError, match=pattern) as e:
        write_submission(bad, submission)
    assert str(bad) in str(e.value)
    assert submission.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["predictions.h5", "test.lmdb.tar.gz", "bad.h5"])


def test_value_17_in_predictions_names_key_and_keeps_output(tmp_path, predictions, submission):
    before = submission.read_bytes()
    labels = predictions[1].copy()
    labels[3, 1, 100, 100] = 17
    bad = write_predictions_h5(tmp_path / "bad.h5", KEYS, labels)
    with pytest.raises(SubmissionError, match=rf"bad.h5: key {KEYS[3]!r} has label value 17"):
        write_submission(bad, submission)
    assert submission.read_bytes() == before
    with pytest.raises(SubmissionError, match=r"no dataset 'keys'"):
        with h5py.File(tmp_path / "empty.h5", "w"):
            pass
        read_predictions(tmp_path / "empty.h5")


def test_write_against_other_test_keys_keeps_output(tmp_path, predictions, submission):
    before = submission.read_bytes()
    with pytest.raises(SubmissionError, match=re.escape(f"{submission} (not written): test key 'other/key' is missing")):
        write_submission(predictions[0], submission, test_keys=KEYS + ["other/key"])
    assert submission.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.h5", "test.lmdb.tar.gz"]
    write_submission(predictions[0], submission, test_keys=KEYS)


def test_failure_after_build_leaves_output_and_no_temporaries(tmp_path, predictions, submission, monkeypatch):
    # A crash at the last moment (the rename) must leave the old file and no temporary files.
    before = submission.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_submission(predictions[0], submission)
    assert submission.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.h5", "test.lmdb.tar.gz"]


# --- the command line ---------------------------------------------------------------------------------


def run_tool(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_submission.py"), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_write(tmp_path, predictions):
    out = tmp_path / "out" / "test.lmdb.tar.gz"
    out.parent.mkdir()
    r = run_tool(predictions[0], "-o", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout and "5 test images" in r.stdout
    assert read_submission(out)[0] == KEYS


def test_cli_usage_errors(tmp_path, predictions, capsys):
    from amodal.submission import main
    for args, message in [
        ([], "give PREDICTIONS"),
        (["--check", "x.tar.gz"], "--check needs --test-shards"),
        ([str(predictions[0]), "--check", "x.tar.gz", "--test-shards", str(tmp_path)], "not both"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
        assert message in capsys.readouterr().err
    assert main([str(tmp_path / "nope.h5"), "-o", str(tmp_path / "o.tar.gz")]) == 1
    assert "nope.h5: no such predictions file" in capsys.readouterr().err
    assert main(["--check", "x.tar.gz", "--test-shards", str(tmp_path / "none")]) == 1
    assert "--test-shards" in capsys.readouterr().err and not (tmp_path / "o.tar.gz").exists()
