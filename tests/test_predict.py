"""Prediction to a file: flip TTA, the file's contents, checkpoints, and the way to the
leaderboard file."""

import dataclasses
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from amodal.checkpoint import BEST_NAME, save_checkpoint, step_path
from amodal.config import Config, ModelConfig
from amodal.data.dataset import ShardDataset
from amodal.labels import NUM_CLASSES
from amodal.models import build_model
from amodal.predict import PredictError, load_model_from_checkpoint, predict_to_file
from amodal.submission import check_submission, read_predictions, read_submission, write_submission

TINY = ModelConfig(name="unet", base_channels=4)


@pytest.fixture(scope="module")
def shards(synthetic_shards):
    return synthetic_shards  # conftest.py: 16 test samples, read-only


@pytest.fixture(scope="module")
def test_set(shards):
    return ShardDataset(shards, "test")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_model(TINY).eval()


def conv_model(seed=0):
    """Two 3x3 convolutions: an output that varies from pixel to pixel and is not mirror-symmetric (a
    freshly initialised U-Net in eval mode predicts nearly one class everywhere, which would hide a
    missing flip)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2 * NUM_CLASSES, 3, padding=1)).eval()


class Symmetrized(nn.Module):
    """g(x) + the mirror of g on the mirrored image (hands swapped): equivariant under the flip with
    hand swap by construction, exactly, in floating point (a sum of the same two terms)."""

    def __init__(self, g):
        super().__init__()
        self.g = g

    def forward(self, x):
        mirrored = self.g(x.flip(-1)).flip(-1)
        mirrored = torch.cat([mirrored[:, NUM_CLASSES:], mirrored[:, :NUM_CLASSES]], dim=1)
        return self.g(x) + mirrored


def assert_nearly_same_labels(a, b):
    """Equal up to a few near-tie pixels: a batch of 1 and a batch of 4 may take different convolution
    code paths, and logits that differ in the last bit can flip an argmax. A real fault (no flip back,
    no hand swap) changes far more than 1e-4 of the pixels."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert (a != b).mean() <= 1e-4, f"{(a != b).sum()} of {a.size} labels differ"


def labels_of(path):
    with h5py.File(path, "r") as f:
        return [k.decode() for k in f["keys"][()]], f["labels"][()], dict(f.attrs)


def reference_tta(model, dataset):
    """Flip TTA written out independently of amodal.predict: per hand, the argmax of the mean of the
    log-probabilities of the image and of its mirror (mirror output flipped back, hands swapped)."""
    out = []
    with torch.no_grad():
        for i in range(len(dataset)):
            x = dataset[i]["image"][None]
            a = model(x)
            b = model(x.flip(-1)).flip(-1)
            b = b[:, list(range(NUM_CLASSES, 2 * NUM_CLASSES)) + list(range(NUM_CLASSES))]
            hands = []
            for h in range(2):
                s = slice(h * NUM_CLASSES, (h + 1) * NUM_CLASSES)
                hands.append((a[:, s].log_softmax(1) + b[:, s].log_softmax(1)).argmax(1))  # = mean logits' argmax
            out.append(torch.stack(hands, 1)[0])
    return torch.stack(out).numpy().astype(np.uint8)


@pytest.mark.slow
def test_file_contents_and_tta(tmp_path, test_set):
    model = conv_model()
    plain = predict_to_file(model, test_set, tmp_path / "plain.h5", batch_size=3, checkpoint="ckpt.pt")
    keys, labels, attrs = labels_of(plain)
    assert keys == test_set.keys()
    assert labels.dtype == np.uint8 and labels.shape == (len(test_set), 2, 128, 128) and labels.max() <= 16
    assert attrs["checkpoint"] == "ckpt.pt" and attrs["fingerprint"] == test_set.fingerprint
    assert not attrs["tta_flip"]
    with torch.no_grad():
        direct = torch.stack([model(test_set[i]["image"][None])[0] for i in range(len(test_set))])
    expected = torch.stack([direct[:, :NUM_CLASSES].argmax(1), direct[:, NUM_CLASSES:].argmax(1)], 1)
    assert_nearly_same_labels(labels, expected.numpy().astype(np.uint8))

    tta = predict_to_file(model, test_set, tmp_path / "tta.h5", batch_size=4, tta_flip=True)
    _, tta_labels, tta_attrs = labels_of(tta)
    assert tta_attrs["tta_flip"]
    assert_nearly_same_labels(tta_labels, reference_tta(model, test_set))
    assert (tta_labels != labels).mean() > 0.01  # the model is not mirror-symmetric
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.h5", "tta.h5"]  # no temporaries left


@pytest.mark.slow
def test_tta_of_equivariant_model_changes_nothing(tmp_path, test_set):
    model = Symmetrized(conv_model(1))
    plain = labels_of(predict_to_file(model, test_set, tmp_path / "a.h5", batch_size=7))[1]
    tta = labels_of(predict_to_file(model, test_set, tmp_path / "b.h5", batch_size=7, tta_flip=True))[1]
    np.testing.assert_array_equal(plain, tta)
    # The same model without the hand swap is not equivariant under "flip + swap": TTA changes it.
    class NoSwap(Symmetrized):
        def forward(self, x):
            return self.g(x) + self.g(x.flip(-1)).flip(-1)

    broken = NoSwap(conv_model(1))
    a = labels_of(predict_to_file(broken, test_set, tmp_path / "c.h5", batch_size=7))[1]
    b = labels_of(predict_to_file(broken, test_set, tmp_path / "d.h5", batch_size=7, tta_flip=True))[1]
    assert (a != b).mean() > 0.01


def test_round_trip_to_leaderboard_file_and_cli_check(tmp_path, shards, test_set, capsys):
    predictions = predict_to_file(conv_model(), test_set, tmp_path / "predictions.h5", batch_size=4, tta_flip=True)
    out = write_submission(predictions, tmp_path / "test.lmdb.tar.gz")
    check_submission(out, test_set.keys())
    keys, labels = read_submission(out)
    assert keys == test_set.keys()
    np.testing.assert_array_equal(labels, read_predictions(predictions)[1])

    from amodal.submission import main
    assert main(["--check", str(out), "--test-shards", str(shards)]) == 0
    assert f"OK {out}: 16 test images, 32 label maps" in capsys.readouterr().out
    assert main(["--check", str(out), "--test-shards", str(shards), "--split", "val"]) == 1
    assert "test key 'synthetic/800000' is missing" in capsys.readouterr().err
    again = tmp_path / "again.tar.gz"
    assert main([str(predictions), "-o", str(again), "--test-shards", str(shards)]) == 0
    assert "16 test images, checked against" in capsys.readouterr().out


def test_bad_arguments(tmp_path, test_set):
    with pytest.raises(PredictError, match="does not exist"):
        predict_to_file(tiny_model(), test_set, tmp_path / "missing" / "p.h5")

    class Wrong(nn.Module):
        def forward(self, x):
            return torch.zeros(len(x), 34, 64, 64)

    before = b"old predictions"
    (tmp_path / "p.h5").write_bytes(before)
    with pytest.raises(PredictError, match=r"model output has shape \(3, 34, 64, 64\)"):
        predict_to_file(Wrong(), test_set, tmp_path / "p.h5", batch_size=3)
    assert (tmp_path / "p.h5").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.h5"]


# --- checkpoints -----------------------------------------------------------------------------------


def checkpoint_state(step, model, ema=None, config=None):
    config = config or Config(model=TINY).to_dict()
    return {
        "model": model.state_dict(),
        "optimizer": {},
        "scheduler": {},
        "scaler": {},
        "ema": ema,
        "step": step,
        "epoch": 0,
        "samples_seen": 0,
        "global_batch": 2,
        "fingerprint": "f",
        "config": config,
        "wandb_run_id": "",
        "best_miou": 0.0,
    }


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_model_from_checkpoint(tmp_path):
    run = tmp_path / "run"
    m1, m2, m3 = tiny_model(1), tiny_model(2), tiny_model(3)
    save_checkpoint(checkpoint_state(10, m1), run, is_best=True)
    save_checkpoint(checkpoint_state(20, m2), run)

    model, cfg, path = load_model_from_checkpoint(run)  # best.pt wins over the newer step file
    assert path.name == BEST_NAME and same_weights(model, m1) and not model.training
    assert cfg["model"]["name"] == "unet"
    model, _, path = load_model_from_checkpoint(step_path(run, 20))  # a file as given
    assert path == step_path(run, 20) and same_weights(model, m2)

    (run / "checkpoints" / BEST_NAME).unlink()
    model, _, path = load_model_from_checkpoint(run)  # no best: the newest that loads
    assert path == step_path(run, 20) and same_weights(model, m2)

    # EMA weights, when the checkpoint holds them, are preferred.
    ema = m3.state_dict()
    save_checkpoint(checkpoint_state(30, m2, ema=ema), run)
    model, _, path = load_model_from_checkpoint(run)
    assert path == step_path(run, 30) and same_weights(model, m3) and model.weights_name == "ema"

    # A truncated newest file is skipped; a folder without checkpoints is an error naming it.
    data = step_path(run, 30).read_bytes()
    step_path(run, 40).write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="step-00000040.pt"):
        _, _, path = load_model_from_checkpoint(run)
    assert path == step_path(run, 30)
    with pytest.raises(PredictError, match="no loadable checkpoint"):
        load_model_from_checkpoint(tmp_path)
    with pytest.raises(PredictError, match="no such checkpoint file or run folder"):
        load_model_from_checkpoint(tmp_path / "nowhere")

    other = Config(model=dataclasses.replace(TINY, base_channels=8)).to_dict()
    save_checkpoint(checkpoint_state(50, m1, config=other), run)
    with pytest.raises(PredictError, match="model weights do not fit model 'unet'"):
        load_model_from_checkpoint(step_path(run, 50))


def test_checkpoint_remembers_the_encoder_layers(tmp_path):
    """A model without layer4 (the demo's and the CPU recipe's) comes back from its checkpoint as it was
    trained; told it has the whole ResNet, the same weights are a clear error, not a silent mismatch."""
    small = ModelConfig(name="resnet_unet", encoder_depth=18, encoder_layers=3)
    torch.manual_seed(0)
    trained = build_model(small).eval()
    run = tmp_path / "run"
    save_checkpoint(checkpoint_state(10, trained, config=Config(model=small).to_dict()), run)
    model, cfg, _ = load_model_from_checkpoint(run)
    assert cfg["model"]["encoder_layers"] == 3 and same_weights(model, trained)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained(x), rtol=0, atol=0)
    whole = Config(model=dataclasses.replace(small, encoder_layers=4)).to_dict()
    save_checkpoint(checkpoint_state(20, trained, config=whole), run)
    with pytest.raises(PredictError, match="model weights do not fit model 'resnet_unet'"):
        load_model_from_checkpoint(step_path(run, 20))
