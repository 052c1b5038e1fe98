"""tools/evaluate.py: a checkpoint's leaderboard mIoU on a split, with and without flip TTA."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amodal.data.dataset import ShardDataset
from amodal.evaluate import score
from amodal.metrics import leaderboard_miou
from amodal.predict import predict_batch
from conftest import tiny_unet_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, synthetic_shards):
    """A run folder whose best.pt is a tiny U-Net in the trainer's format, trained on synthetic_shards."""
    run = tmp_path_factory.mktemp("eval-run")
    return run, tiny_unet_run(run, str(synthetic_shards))


@pytest.mark.slow
def test_scores_equal_the_metric_on_the_whole_split(run_dir, synthetic_shards):
    run, model = run_dir
    rows = score(run, split="val", batch_size=5)  # shards from the checkpoint's data.root
    assert [r["tta_flip"] for r in rows] == [False, True]

    # Independently: predict every val sample at once, then the leaderboard rule on all of them.
    dataset = ShardDataset(synthetic_shards, "val", input_size=64)
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    targets = torch.stack([dataset[i]["target"] for i in range(len(dataset))])
    with torch.inference_mode():
        expected = [leaderboard_miou(predict_batch(model, images, flip), targets) for flip in (False, True)]
    assert expected[0] > 0 and expected[0] != expected[1]  # a real score, which TTA changes
    assert [r["miou"] for r in rows] == pytest.approx(expected, abs=1e-12)
    assert rows[0]["count"] == rows[1]["count"] > 0


@pytest.mark.slow
def test_cli_prints_both_settings_and_names_a_missing_checkpoint(run_dir, tmp_path):
    run, _ = run_dir
    tool = [sys.executable, str(REPO / "tools" / "evaluate.py")]
    ok = subprocess.run(tool + [str(run), "--tta-flip", "on"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "flip TTA on" in ok.stdout and "flip TTA off" not in ok.stdout

    missing = tmp_path / "no-such-run"
    bad = subprocess.run(tool + [str(missing)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and str(missing) in bad.stderr
