"""Shard format: manifest, hashes, crops, crash-safe and resumable packing, verification, open checks."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch

from amodal.config import AugmentConfig, DataConfig
from amodal.data import augment
from amodal.data import format as shards
from amodal.data.dataset import ShardDataset
from amodal.data.format import JOURNAL, MANIFEST, PackOptions, ShardError, read_manifest
from amodal.data.pack import ensure_synthetic, make_record, pack
from amodal.data.read import verify_shards
from amodal.data.sources import SyntheticSource

REPO = Path(__file__).resolve().parents[1]


def small_sources(train=10, val=4, test=3, seed=0):
    return {"train": SyntheticSource("train", train, seed), "val": SyntheticSource("val", val, seed),
            "test": SyntheticSource("test", test, seed)}


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A small pack (4 samples per shard) that tests copy before damaging."""
    root = tmp_path_factory.mktemp("packed")
    pack(root, small_sources(), shard_size=4, progress=False)
    return root


def copy_of(root, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst


def test_manifest_describes_the_shards(synthetic_shards):
    m = read_manifest(synthetic_shards)
    assert m["format"] == "amodal-shards" and m["format_version"] == shards.FORMAT_VERSION
    assert {k: v["count"] for k, v in m["splits"].items()} == {"train": 64, "val": 16, "test": 16}
    assert m["layout"]["crop_size"] == shards.CROP_SIZE and m["layout"]["labels"]["channels"] == ["left", "right"]
    files = sorted(p.name for p in synthetic_shards.glob("*.h5"))
    assert files == ["test-00000.h5", "train-00000.h5", "train-00001.h5", "val-00000.h5"]
    for s in m["splits"].values():
        assert s["has_labels"] and s["has_front"]
        for e in s["shards"]:
            assert shards.sha256_file(synthetic_shards / e["file"]) == e["sha256"]
    assert len(m["fingerprint"]) == 64 and m["fingerprint"] == shards.fingerprint_of(m)
    assert m["layout"]["image"]["codec"] == "jpeg" and m["layout"]["labels"]["codec"] == "zlib"
    with h5py.File(synthetic_shards / "train-00001.h5", "r") as f:
        assert f.attrs["format_version"] == 2
        for name in ("image", "labels", "front"):  # each sample's bytes one after another
            assert f[name].ndim == 1 and f[name].chunks is None and f[f"{name}_offsets"].shape == (33,)
            assert f[f"{name}_offsets"][-1] == f[name].shape[0]
        assert f["side"].shape == (32,) and f["side"][()].max() <= shards.CROP_SIZE
        assert f["eval_labels"].shape == (32, 2, 128, 128) and f["eval_labels"].chunks == (1, 2, 128, 128)
        assert [k.decode() for k in f["key"][:2]] == ["synthetic/000032", "synthetic/000033"]
    assert not list(synthetic_shards.glob("*.tmp")) and not (synthetic_shards / JOURNAL).exists()


def test_packing_is_reproducible_and_splits_do_not_overlap(packed, tmp_path):
    m = pack(tmp_path, small_sources(), shard_size=4, progress=False)
    assert m["fingerprint"] == read_manifest(packed)["fingerprint"]
    keys = {s: ShardDataset(packed, s).keys() for s in ("train", "val", "test")}
    assert keys["val"][0] == "synthetic/800000" and keys["test"][-1] == "synthetic/900002"
    assert len(set(keys["train"]) | set(keys["val"]) | set(keys["test"])) == 17


def test_stored_crop_matches_the_frame(packed):
    """Eval targets are the exact nearest warp of the frame's box. A box that fits the crop unscaled is
    stored as an exact window of the frame, so a warp of the crop equals that warp of the frame; a
    larger box is stored downscaled, and warps of it agree closely."""
    src = SyntheticSource("train", 10, 0)
    ds = ShardDataset(packed, "train")
    p = augment.AugParams(shift_x=0.2, shift_y=-0.25, scale=1.3, rotation=9.0, gains=(1.2, 0.8, 1.0), flip=True)
    with h5py.File(packed / "train-00001.h5", "r") as f:
        for local, i in ((0, 4), (3, 7)):
            raw = src.get(i)
            want = augment.warp_labels(raw.labels, augment.box_affine(raw.bbox, 128), 128, flip=False)
            assert np.array_equal(f["eval_labels"][local], want)
            sample = ds[i]
            assert np.array_equal(sample["target"].numpy(), want)
            assert max(raw.bbox[2:]) <= shards.CROP_SIZE / shards.CONTEXT  # the generator's boxes fit
            direct = augment.apply(raw.image, raw.bbox, augment.IDENTITY, 128)["image"]
            assert np.abs(sample["image"].numpy() - direct).mean() < 5 / 255  # JPEG q95 (FORMAT.md)
            for tight in (False, True):  # the crops of format versions 1 and 2
                rec = make_record(raw, tight=tight)
                assert rec["image"].shape[0] == (min(shards.CROP_SIZE, np.ceil(2.2 * max(raw.bbox[2:])) + 2)
                                                 if tight else shards.CROP_SIZE)
                from_crop = augment.apply(rec["image"], rec["bbox"], p, 128, rec["labels"], rec["front"])
                from_frame = augment.apply(raw.image, raw.bbox, p, 128, raw.labels, raw.front)
                assert np.array_equal(from_crop["labels"], from_frame["labels"])
                assert np.array_equal(from_crop["front"], from_frame["front"])
                # images: equal but for OpenCV's 1/32-pixel fixed-point rounding of a few coordinates
                diff = np.abs(from_crop["image"] - from_frame["image"])
                assert diff.max() <= 1.5 / 255 and np.mean(diff > 1e-6) < 1e-3
    # a box too large for an unscaled crop: 2.2 × 180 px > 320
    raw = src.get(2)
    big = shards.RawSample(raw.key, cv2.resize(raw.image, (512, 512)), raw.bbox * 2,
                           np.stack([cv2.resize(m, (512, 512), interpolation=cv2.INTER_NEAREST) for m in raw.labels]))
    rec = make_record(big, tight=True)
    assert rec["bbox"][2] < big.bbox[2] and rec["image"].shape[0] == shards.CROP_SIZE  # stored downscaled
    from_crop = augment.apply(rec["image"], rec["bbox"], p, 128, rec["labels"])
    from_frame = augment.apply(big.image, big.bbox, p, 128, big.labels)
    assert np.mean(from_crop["labels"] == from_frame["labels"]) > 0.97
    assert np.abs(from_crop["image"] - from_frame["image"]).mean() < 0.02


def test_interrupted_pack_resumes_keeping_finished_shards(tmp_path, packed):
    class Failing:
        """A source that breaks at sample 9 (in the third train shard)."""

        def __init__(self, inner):
            self.inner, self.name, self.where = inner, inner.name, inner.where
            self.has_labels, self.has_front = inner.has_labels, inner.has_front

        def __len__(self):
            return len(self.inner)

        def get(self, i):
            if i == 9:
                raise RuntimeError("killed")
            return self.inner.get(i)

    sources = small_sources()
    broken = dict(sources, train=Failing(sources["train"]))
    with pytest.raises(RuntimeError, match="killed"):
        pack(tmp_path, broken, shard_size=4, progress=False)
    assert not (tmp_path / MANIFEST).exists()
    assert (tmp_path / JOURNAL).exists() and (tmp_path / "train-00002.h5.tmp").exists()
    assert not (tmp_path / "train-00002.h5").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("train-0000[01].h5")}
    assert len(finished) == 2
    # damage one finished shard: the resumed pack must notice and rewrite it
    with open(tmp_path / "train-00001.h5", "r+b") as f:
        f.seek(-100, os.SEEK_END)
        b = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(tmp_path / "train-00001.h5", ns=(1, 1))

    m = pack(tmp_path, sources, shard_size=4, progress=False)
    assert (tmp_path / "train-00000.h5").stat().st_mtime_ns == finished["train-00000.h5"]  # kept
    assert (tmp_path / "train-00001.h5").stat().st_mtime_ns != 1  # rewritten
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / JOURNAL).exists()
    assert verify_shards(tmp_path) == []
    assert m["fingerprint"] == read_manifest(packed)["fingerprint"]


def test_rerun_keeps_everything_and_changes_rewrite_only_what_differs(packed, tmp_path):
    root = copy_of(packed, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in root.iterdir()}
    pack(root, small_sources(), shard_size=4, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in root.iterdir()} == before  # nothing rewritten
    # fewer train samples: train-00002 shrinks, the other shards stay
    m = pack(root, small_sources(train=6), shard_size=4, progress=False)
    assert m["splits"]["train"]["count"] == 6
    assert (root / "train-00000.h5").stat().st_mtime_ns == before["train-00000.h5"]
    assert not (root / "train-00002.h5").exists()
    assert verify_shards(root) == []


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


@pytest.mark.parametrize("where", [0, 0.5, -1])
def test_verify_reports_a_flipped_byte_anywhere(packed, tmp_path, where):
    root = copy_of(packed, tmp_path)
    path = root / "val-00000.h5"
    size = path.stat().st_size
    flip_byte(path, {0: 0, 0.5: size // 2, -1: size - 1}[where])
    problems = verify_shards(root)
    assert len(problems) == 1 and "val-00000.h5" in problems[0] and "sha256" in problems[0]


def test_verify_reports_truncated_missing_unlisted_and_bad_manifest(packed, tmp_path):
    root = copy_of(packed, tmp_path)
    assert verify_shards(root) == []
    with open(root / "train-00001.h5", "r+b") as f:
        f.truncate(1000)
    (root / "test-00000.h5").unlink()
    shutil.copy(root / "val-00000.h5", root / "val-00007.h5")
    problems = "\n".join(verify_shards(root))
    assert "train-00001.h5: 1000 bytes" in problems
    assert "test-00000.h5: missing shard" in problems
    assert "val-00007.h5: shard not listed" in problems

    root = copy_of(packed, tmp_path / "b")
    m = json.loads((root / MANIFEST).read_text())
    m["splits"]["val"]["count"] = 5  # does not match its shards
    (root / MANIFEST).write_text(json.dumps(m))
    assert "manifest.json: split 'val': shards hold 4 samples, count says 5" in verify_shards(root)[0]
    m["splits"]["val"]["count"] = 4
    m["splits"]["val"]["shards"][0]["sha256"] = "0" * 64  # edited hash: the fingerprint no longer matches
    (root / MANIFEST).write_text(json.dumps(m))
    assert "fingerprint does not match" in verify_shards(root)[0]
    (root / MANIFEST).write_text("{not json")
    assert "manifest.json: unreadable manifest" in verify_shards(root)[0]
    (root / MANIFEST).unlink()
    assert "no manifest" in verify_shards(root)[0]


def test_verify_cli_exit_codes(packed, tmp_path, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import verify_shards as cli
    finally:
        sys.path.pop(0)
    root = copy_of(packed, tmp_path)
    assert cli.main([str(root)]) == 0 and "OK" in capsys.readouterr().out
    flip_byte(root / "train-00002.h5", 4000)
    # the real command line, once: a non-zero exit status naming the file
    bad = subprocess.run([sys.executable, str(REPO / "tools/verify_shards.py"), str(root)],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "train-00002.h5" in bad.stderr


def rewrite_manifest_for(root: Path, name: str) -> None:
    """Make the manifest agree with a replaced shard file (hash, size, fingerprint)."""
    m = json.loads((root / MANIFEST).read_text())
    for s in m["splits"].values():
        for e in s["shards"]:
            if e["file"] == name:
                e["sha256"], e["bytes"] = shards.sha256_file(root / name), (root / name).stat().st_size
    m["fingerprint"] = shards.fingerprint_of(m)
    (root / MANIFEST).write_text(json.dumps(m))


def test_loader_checks_shapes_and_counts_when_it_opens_a_shard(packed, tmp_path):
    root = copy_of(packed, tmp_path)
    with h5py.File(root / "val-00000.h5", "a") as f:  # a shard whose targets lost a sample
        labels = f["eval_labels"][:3]
        del f["eval_labels"]
        f.create_dataset("eval_labels", data=labels)
    rewrite_manifest_for(root, "val-00000.h5")
    ds = ShardDataset(root, "val")  # opening the folder checks sizes only (cheap)
    for read in (lambda: ds[0], ds.keys):  # opening the shard checks every dataset's shape
        with pytest.raises(ShardError, match=r"val-00000.h5: dataset 'eval_labels' has shape \(3, 2, 128, 128\)"):
            read()
    with h5py.File(root / "val-00000.h5", "a") as f:  # offsets that run past the bytes they index
        del f["eval_labels"]  # (the targets put back whole first)
        f.create_dataset("eval_labels", data=np.zeros((4, 2, 128, 128), np.uint8))
        f["labels_offsets"][2] = f["labels"].shape[0] + 10
    rewrite_manifest_for(root, "val-00000.h5")
    with pytest.raises(ShardError, match=r"val-00000.h5: dataset 'labels_offsets' does not run from 0"):
        ShardDataset(root, "val")[0]
    assert "labels_offsets" in verify_shards(root)[0]
    # a truncated shard is refused when the dataset is built
    root2 = copy_of(packed, tmp_path / "b")
    with open(root2 / "train-00000.h5", "r+b") as f:
        f.truncate(5000)
    with pytest.raises(ShardError, match="train-00000.h5: 5000 bytes"):
        ShardDataset(root2, "train")
    with pytest.raises(ShardError, match="split 'nope' is not in the manifest"):
        ShardDataset(root2, "nope")


def test_ensure_synthetic_packs_once(tmp_path):
    cfg = DataConfig(root=str(tmp_path / "syn"), synthetic_train=3, synthetic_val=2, synthetic_test=2)
    ensure_synthetic(cfg)
    m = read_manifest(cfg.root)
    assert {k: v["count"] for k, v in m["splits"].items()} == {"train": 3, "val": 2, "test": 2}
    # it packs with worker processes (a shard each); one process gives the same bytes
    serial = pack(tmp_path / "serial", {s: SyntheticSource(s, n) for s, n in (("train", 3), ("val", 2), ("test", 2))},
                  progress=False, workers=1)
    assert serial["fingerprint"] == m["fingerprint"]
    stamp = (Path(cfg.root) / MANIFEST).stat().st_mtime_ns
    ensure_synthetic(cfg)
    assert (Path(cfg.root) / MANIFEST).stat().st_mtime_ns == stamp
    with pytest.raises(ShardError, match="make_synthetic is off"):
        ensure_synthetic(DataConfig(root=str(tmp_path / "none"), make_synthetic=False))


def test_pack_options_are_recorded_and_checked(tmp_path):
    m = pack(tmp_path, {"val": SyntheticSource("val", 2)}, shard_size=4, progress=False,
             options=PackOptions(crop_size=128, image_codec="png", map_codec="raw"))
    assert m["layout"]["crop_size"] == 128 and m["layout"]["image"] == {"codec": "png", "order": "BGR", "axes": "HWC"}
    assert m["layout"]["labels"]["codec"] == "raw"
    s = ShardDataset(tmp_path, "val", augment=AugmentConfig())[1]
    assert s["target"].shape == (2, 128, 128) and s["image"].shape == (3, 128, 128)
    with pytest.raises(ValueError, match="map_codec"):
        PackOptions(map_codec="zip")
    with pytest.raises(ValueError, match="format version 1 stores raw images only"):
        PackOptions(format_version=1)


V1 = PackOptions(format_version=1, image_codec="raw", map_codec="raw")


def test_version_1_and_2_give_the_same_training_samples(tmp_path):
    """Labels and front maps exactly equal; images within JPEG q95's error (FORMAT.md), and equal up to
    OpenCV's fixed-point rounding with raw crops. Both versions verify and load side by side."""
    sources = {"train": SyntheticSource("train", 12), "val": SyntheticSource("val", 4)}
    folders = {}
    for name, opt in (("v1", V1), ("v2", PackOptions()), ("v2-raw", PackOptions(image_codec="raw"))):
        m = pack(tmp_path / name, sources, shard_size=8, progress=False, options=opt)
        assert m["format_version"] == opt.format_version and verify_shards(tmp_path / name) == []
        folders[name] = tmp_path / name
    sizes = {k: sum(p.stat().st_size for p in f.glob("train-*.h5")) for k, f in folders.items()}
    assert sizes["v2"] < sizes["v1"] / 10
    cfg = AugmentConfig()
    ds = {k: ShardDataset(f, "train", augment=cfg) for k, f in folders.items()}
    errors = []
    for epoch in (0, 1):
        for i in range(12):
            a, b, c = (ds[k][(epoch, i)] for k in ("v1", "v2", "v2-raw"))
            for key in ("target", "front"):
                assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key]), (epoch, i, key)
            errors.append((a["image"] - b["image"]).abs().mean().item() * 255)
            assert (a["image"] - c["image"]).abs().max().item() <= 1.5 / 255
    assert max(errors) < 6 and np.mean(errors) < 4, errors
    for k in ("v1", "v2"):  # evaluation mode reads the same stored targets
        e = ShardDataset(folders[k], "val")[2]
        assert torch.equal(e["target"], ShardDataset(folders["v1"], "val")[2]["target"])
    # a version-2 pack over a version-1 folder rewrites every shard
    m = pack(folders["v1"], sources, shard_size=8, progress=False)
    assert m["fingerprint"] == read_manifest(folders["v2"])["fingerprint"] and verify_shards(folders["v1"]) == []
