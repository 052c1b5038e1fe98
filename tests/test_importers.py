"""Importers: the course's LMDB layout and a plain folder, on small fixtures written in those layouts."""

import json
import subprocess
import sys
from pathlib import Path

import cv2
import lmdb
import numpy as np
import pytest
import torch
from conftest import framed_samples

from amodal.data import augment
from amodal.data.dataset import ShardDataset
from amodal.data.format import RawSample, SourceError, read_manifest
from amodal.data.pack import pack_course, pack_folder
from amodal.data.read import verify_shards
from amodal.data.sources import (CourseSource, FolderSource, close_environments, load_torch_data, write_course_layout,
                                 write_folder_layout)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def frames():
    return {"train": framed_samples(5, "train"), "val": framed_samples(3, "val", seed=1),
            "test": framed_samples(3, "test", seed=2)}


@pytest.fixture(scope="module")
def course_dir(tmp_path_factory, frames):
    root = tmp_path_factory.mktemp("course") / "InterHand2.6M"
    write_course_layout(root, frames)
    return root


def expected_target(s: RawSample) -> np.ndarray:
    return augment.warp_labels(s.labels, augment.box_affine(s.bbox, 128), 128, flip=False)


def test_course_layout_is_the_course_s(course_dir, frames):
    """The fixture writer follows docs/design.md §1 (read back here with plain lmdb/cv2/torch calls)."""
    datalist = torch.load(course_dir / "datalist_train_mp.pt", weights_only=True)
    path2id = torch.load(course_dir / "path2id_train.pt", weights_only=True)
    item = datalist[1]
    assert set(item) == {"img_path", "bbox", "hand_type", "capture", "cam", "frame"}
    assert item["img_path"] == f"./data/InterHand2.6M/images/{frames['train'][1].key}.jpg"
    key = item["img_path"].replace("./data/InterHand2.6M/images/", "").replace(".jpg", "")
    env = lmdb.open(str(course_dir / "interhand.lmdb"), readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.get(item["img_path"][2:].encode()) is not None
    env = lmdb.open(str(course_dir / "segm_train_val_mp.lmdb"), readonly=True, lock=False)
    with env.begin() as txn:
        left = cv2.imdecode(np.frombuffer(txn.get(f"{path2id[key]}__l".encode()), np.uint8), cv2.IMREAD_UNCHANGED)
    assert left.shape[2] == 3 and set(np.unique(left)) - {0} <= set(range(17, 33))
    assert not (course_dir / "path2id_test.pt").exists() and (course_dir / "datalist_stud_test.pt").exists()


def test_course_import_packs_exact_targets(course_dir, frames, tmp_path):
    m = pack_course(course_dir, tmp_path, progress=False, shard_size=2)
    assert m["format_version"] == 2 and m["layout"]["image"]["codec"] == "jpeg"  # the compact layout by default
    assert {k: v["count"] for k, v in m["splits"].items()} == {"train": 5, "val": 3, "test": 3}
    assert not m["splits"]["test"]["has_labels"] and m["splits"]["val"]["has_labels"]
    assert verify_shards(tmp_path) == []
    for split in ("train", "val"):
        ds = ShardDataset(tmp_path, split)
        assert ds.keys() == [s.key for s in frames[split]]
        for i in (0, len(ds) - 1):
            assert np.array_equal(ds[i]["target"].numpy(), expected_target(frames[split][i]))
    test = ShardDataset(tmp_path, "test")
    assert not test.has_labels and "target" not in test[0] and test.keys()[2] == frames["test"][2].key


def test_course_datalist_with_numpy_boxes_loads(tmp_path):
    data = [{"img_path": "./data/InterHand2.6M/images/a.jpg", "bbox": np.array([1, 2, 3, 4], np.float32),
             "hand_type": "left", "capture": np.int64(1), "cam": 2, "frame": 3}]
    torch.save(data, tmp_path / "d.pt")
    assert load_torch_data(tmp_path / "d.pt")[0]["bbox"].tolist() == [1, 2, 3, 4]


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def copy_course(course_dir: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "InterHand2.6M"
    shutil.copytree(course_dir, dst)
    return dst


def test_course_bad_input_names_file_and_key(course_dir, frames, tmp_path, capsys):
    root = copy_course(course_dir, tmp_path)
    datalist = torch.load(root / "datalist_train_mp.pt", weights_only=True)

    # code in a pickle is refused, not run
    torch.save([Evil()], root / "datalist_val_mp.pt")
    with pytest.raises(SourceError, match=r"datalist_val_mp.pt: not plain data.*print"):
        CourseSource(root, "val")
    assert "must never run" not in capsys.readouterr().out

    # a box whose centre is outside the frame
    bad = [dict(d) for d in datalist]
    bad[2]["bbox"] = [500.0, 10.0, 20.0, 20.0]
    torch.save(bad, root / "datalist_train_mp.pt")
    with pytest.raises(SourceError, match=rf"datalist_train_mp.pt: key '{frames['train'][2].key}': bbox .* outside"):
        pack_course(root, tmp_path / "out", splits=("train",), progress=False)
    torch.save(datalist, root / "datalist_train_mp.pt")

    # an image key missing from path2id
    p2i = torch.load(root / "path2id_train.pt", weights_only=True)
    del p2i[frames["train"][1].key]
    torch.save(p2i, root / "path2id_train.pt")
    with pytest.raises(SourceError, match=rf"path2id_train.pt: key '{frames['train'][1].key}'"):
        CourseSource(root, "train")
    p2i = torch.load(course_dir / "path2id_train.pt", weights_only=True)
    torch.save(p2i, root / "path2id_train.pt")

    # a missing image, wrong label values, a label map of another size
    src = CourseSource(root, "train")
    close_environments()  # LMDB allows one open environment per path and process
    env = lmdb.open(str(root / "interhand.lmdb"), map_size=1 << 30)
    with env.begin(write=True) as txn:
        txn.delete(src.entries[0][1].encode())
    env.close()
    with pytest.raises(SourceError, match=rf"interhand.lmdb: key '{src.entries[0][1]}' not found"):
        CourseSource(root, "train").get(0)
    close_environments()
    lid = str(p2i[frames["train"][3].key])
    wrong = np.full((160, 200, 3), 5, np.uint8)  # left map must hold 0 or 17..32
    small = np.zeros((100, 100, 3), np.uint8)
    env = lmdb.open(str(root / "segm_train_val_mp.lmdb"), map_size=1 << 30)
    with env.begin(write=True) as txn:
        txn.put(f"{lid}__l".encode(), cv2.imencode(".png", wrong)[1].tobytes())
        txn.put(f"{p2i[frames['train'][4].key]}__r".encode(), cv2.imencode(".png", small)[1].tobytes())
    env.close()
    with pytest.raises(SourceError, match=rf"segm_train_val_mp.lmdb: key '{lid}__l': left-hand labels must be 0 or 17..32"):
        CourseSource(root, "train").get(3)
    with pytest.raises(SourceError, match=r"segm_train_val_mp.lmdb: key '\d+' .*do not match the image"):
        CourseSource(root, "train").get(4)


def test_folder_import_with_unlabelled_test_split(frames, tmp_path):
    src = tmp_path / "folder"
    splits = {"train": frames["train"], "test": [RawSample(s.key, s.image, s.bbox, None) for s in frames["test"]]}
    write_folder_layout(src, splits)
    m = pack_folder(src, tmp_path / "out", progress=False)
    assert m["format_version"] == 2 and m["layout"]["image"]["codec"] == "jpeg"
    assert m["splits"]["train"]["has_labels"] and not m["splits"]["test"]["has_labels"]
    ds = ShardDataset(tmp_path / "out", "train")
    assert ds.keys() == [s.key for s in frames["train"]]
    assert np.array_equal(ds[3]["target"].numpy(), expected_target(frames["train"][3]))
    # PNG images are lossless: the eval crop equals the direct crop of the frame up to resampling
    direct = augment.apply(frames["train"][3].image, frames["train"][3].bbox, augment.IDENTITY, 128)["image"]
    assert np.abs(ds[3]["image"].numpy() - direct).mean() < 0.03


def test_folder_bad_input_names_file_and_key(frames, tmp_path):
    src = tmp_path / "folder"
    write_folder_layout(src, {"train": frames["train"][:3], "val": frames["val"][:2]}, image_ext=".jpg")
    key = frames["train"][1].key
    (src / "labels" / f"{key}__r.png").unlink()
    with pytest.raises(SourceError, match=rf"key '{key}': missing .*__r.png"):
        FolderSource(src, "train")
    lab = np.full((160, 200), 17, np.uint8)
    cv2.imwrite(str(src / "labels" / f"{key}__r.png"), lab)
    with pytest.raises(SourceError, match=rf"{key}__r.png: key '{key}': label values must be 0..16, found 17"):
        FolderSource(src, "train").get(1)
    cv2.imwrite(str(src / "labels" / f"{key}__r.png"), np.zeros((50, 60), np.uint8))
    with pytest.raises(SourceError, match=rf"{key}__r.png: key '{key}': label map is 60x50"):
        FolderSource(src, "train").get(1)
    cv2.imwrite(str(src / "labels" / f"{key}__r.png"), np.zeros((160, 200), np.uint16))
    with pytest.raises(SourceError, match=rf"{key}__r.png: key '{key}': label image has dtype uint16, expected uint8"):
        FolderSource(src, "train").get(1)
    cv2.imwrite(str(src / "labels" / f"{key}__r.png"), np.dstack([lab * 0, lab * 0, lab]))
    with pytest.raises(SourceError, match=rf"{key}__r.png: key '{key}': label image has 3 channels that differ"):
        FolderSource(src, "train").get(1)
    right = np.zeros((160, 200), np.uint8)
    right[40:80, 50:90] = 5
    cv2.imwrite(str(src / "labels" / f"{key}__r.png"), np.dstack([right, right, right, np.full_like(right, 255)]))
    assert np.array_equal(FolderSource(src, "train").get(1).labels[1], right)  # an alpha channel is ignored
    boxes = json.loads((src / "boxes.json").read_text())
    boxes["val"][0]["bbox"] = [10, 10, -5, 20]
    boxes["val"].append({"key": "../escape", "bbox": [0, 0, 1, 1]})
    (src / "boxes.json").write_text(json.dumps(boxes))
    with pytest.raises(SourceError, match=r"key '../escape' is not a relative path"):
        FolderSource(src, "val")
    boxes["val"].pop()
    (src / "boxes.json").write_text(json.dumps(boxes))
    with pytest.raises(Exception, match=rf"boxes.json: key '{frames['val'][0].key}': bad bbox"):
        pack_folder(src, tmp_path / "out", splits=["val"], progress=False)
    with pytest.raises(SourceError, match="no list for split 'test'"):
        FolderSource(src, "test")


@pytest.mark.slow
def test_pack_shards_cli(course_dir, tmp_path, capsys):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(REPO / "tools/pack_shards.py"), "course", "--root", str(course_dir),
                        "--out", str(out), "--shard-size", "2", "--splits", "val", "test", "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert read_manifest(out)["splits"]["val"]["count"] == 3 and len(list(out.glob("val-*.h5"))) == 2
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import pack_shards
    finally:
        sys.path.pop(0)
    assert pack_shards.main(["folder", "--root", str(tmp_path / "nowhere"), "--out", str(out)]) == 1
    assert "nowhere/boxes.json: no such file" in capsys.readouterr().err
