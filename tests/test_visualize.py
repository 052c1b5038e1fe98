"""Prediction panels: tools/visualize.py on a tiny checkpoint and a tiny shard set, and the drawing itself."""

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import amodal.visualize
from amodal.data.dataset import ShardDataset
from amodal.labels import FRONT_LEFT, FRONT_RIGHT, PALETTE
from amodal.visualize import GAP, TILE, TITLE_H, draw_panel, hidden_regions, panel_size, write_panels
from conftest import tiny_unet_run

REPO = Path(__file__).resolve().parents[1]
WHITE = (255, 255, 255)


def tile_at(panel, row, col, tile=TILE):
    y = GAP + row * (TITLE_H + tile + GAP) + TITLE_H
    x = GAP + col * (tile + GAP)
    return panel[y : y + tile, x : x + tile]


def colours_of(img):
    return {tuple(int(v) for v in c) for c in np.unique(img.reshape(-1, 3), axis=0)}


@pytest.fixture(scope="module")
def shards(synthetic_shards):
    return synthetic_shards  # conftest: 16 val samples with labels and front maps


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder whose best.pt is a tiny U-Net in the trainer's checkpoint format."""
    run = tmp_path_factory.mktemp("vis-run")
    tiny_unet_run(run)
    return run


@pytest.mark.slow
def test_cli_writes_one_panel_per_sample(shards, run_dir, tmp_path):
    out = tmp_path / "panels"
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "visualize.py"), str(run_dir), "--shards", str(shards),
         "--split", "val", "-o", str(out), "--count", "2"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    files = sorted(out.glob("*.png"))
    keys = ShardDataset(shards, "val").keys()[:2]
    assert [f.name for f in files] == [f"{i:04d}_{k.replace('/', '_')}.png" for i, k in enumerate(keys)]
    for f in files:
        img = cv2.imread(str(f))
        assert img is not None and img.shape == (*panel_size(), 3)


def test_panels_show_labels_and_hidden_outlines(shards, run_dir, tmp_path):
    ckpt = run_dir / "checkpoints" / "best.pt"
    paths = write_panels(ckpt, shards, "val", tmp_path, count=3, start=13)  # the last 3 of 16
    assert len(paths) == 3
    assert len(write_panels(ckpt, shards, "val", tmp_path / "all", count=50, start=14)) == 2  # stops at the end
    ds = ShardDataset(shards, "val", input_size=64)
    palette = {tuple(int(v) for v in c[::-1]) for c in PALETTE}  # panels are BGR
    outlined = 0
    for path, i in zip(paths, range(13, 16)):
        sample = ds[i]
        panel = cv2.imread(str(path))
        hidden = hidden_regions(sample["target"].numpy(), sample["front"].numpy())
        for hand in range(2):
            gt_tile = tile_at(panel, 0, 1 + hand)
            extra = colours_of(gt_tile) - palette
            if hidden[hand].any():
                assert WHITE in extra  # the outline of what the other hand hides
                outlined += 1
            else:
                assert extra == set()  # nothing but part colours
            # away from outlines the tile is the ground truth, colour for colour
            expected = PALETTE[sample["target"][hand].numpy()][:, :, ::-1]
            grown = cv2.dilate(hidden[hand].astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            clean = ~np.repeat(np.repeat(grown, 2, 0), 2, 1)
            assert np.array_equal(gt_tile[clean], np.repeat(np.repeat(expected, 2, 0), 2, 1)[clean])
    assert outlined > 0, "the synthetic val split should hold a hand hidden by the other"


def test_draw_panel_outline_and_no_ground_truth():
    target = np.zeros((2, 128, 128), np.uint8)
    target[0, 20:100, 20:100] = 1  # left palm
    target[1, 50:90, 50:90] = 5  # right index, lying on the left palm
    front = np.zeros((128, 128), np.uint8)
    front[20:100, 20:100] = FRONT_LEFT
    front[50:90, 50:90] = FRONT_RIGHT  # so the right hand hides part of the left one
    image = np.random.default_rng(0).random((3, 64, 64), dtype=np.float32)
    panel = draw_panel(image, target, target, front, "case")
    assert panel.shape == (*panel_size(), 3) and panel.dtype == np.uint8
    left_gt, left_pred = tile_at(panel, 0, 1), tile_at(panel, 1, 1)
    hidden = hidden_regions(target, front)
    assert hidden[0].sum() == 40 * 40 and not hidden[1].any()
    # the outline runs along the hidden square (tile pixels 100..180), not elsewhere
    ys, xs = np.nonzero(np.all(left_gt == WHITE, axis=-1))
    assert len(ys) > 0 and ys.min() >= 96 and ys.max() <= 183 and xs.min() >= 96 and xs.max() <= 183
    assert np.array_equal(np.all(left_pred == WHITE, -1), np.all(left_gt == WHITE, -1))
    assert not np.all(tile_at(panel, 0, 2) == WHITE, axis=-1).any()  # right hand: nothing hidden
    # a split without labels (test): prediction only, no outlines, same size
    bare = draw_panel(image, target, None, None, "test sample")
    assert bare.shape == panel.shape
    assert not np.all(tile_at(bare, 1, 1) == WHITE, axis=-1).any()


def test_bad_input_is_a_clear_error(shards, run_dir, tmp_path, capsys):
    tool = amodal.visualize  # in this process: the CLI test above already covers the subprocess path
    assert tool.main([str(tmp_path / "nothing"), "--shards", str(shards), "-o", str(tmp_path / "out")]) == 2
    assert "nothing: no such checkpoint file or run folder" in capsys.readouterr().err
    assert tool.main([str(run_dir), "--shards", str(tmp_path), "-o", str(tmp_path / "out")]) == 2
    assert str(tmp_path / "manifest.json") in capsys.readouterr().err
    assert tool.main([str(run_dir), "--shards", str(shards), "--split", "nope", "-o", str(tmp_path / "out")]) == 2
    assert "nope" in capsys.readouterr().err
