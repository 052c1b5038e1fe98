"""augment.on = "device": the batch warped on the training device matches the worker path, JPEG crops
are decoded at 1/2 or 1/4 where the warp needs no more, and training with it resumes sample-exactly.

Figures (measured on the shared synthetic set, 64 samples x 4 epochs = 256 draws, CPU): the device
path's images differ from the worker path's by 0.24/255 on average (OpenCV rounds its warp to uint8 and
interpolates with 1/32-pixel weights; grid_sample does neither), and 99.9999% of label and front pixels
agree (nearest sampling may round a coordinate that falls on a pixel boundary the other way).
"""

import signal

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from amodal.config import AugmentConfig, ConfigError, load_config
from amodal.data import augment, codec
from amodal.data.augment import AugParams
from amodal.data.dataset import ShardDataset
from amodal.data.device_augment import augment_batch, reduced_affine, reduction, resolve_on

CPU = torch.device("cpu")
SEED = 3


def both_ways(root, input_size: int, epochs=range(4), batch: int = 32, **device_options):
    """(worker batches, device batches) of every training sample in `epochs`, in stored order."""
    worker = ShardDataset(root, "train", input_size, augment=AugmentConfig(), seed=SEED)
    device = ShardDataset(root, "train", input_size, augment=AugmentConfig(), seed=SEED, on_device=True,
                          **device_options)
    assert device.on_device and not worker.on_device
    items = [(e, i) for e in epochs for i in range(len(worker))]
    out = []
    for start in range(0, len(items), batch):
        part = items[start:start + batch]
        out.append((default_collate([worker[x] for x in part]),
                    augment_batch(default_collate([device[x] for x in part]), CPU, input_size)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("input_size", [64, 128])
def test_device_path_matches_the_worker_path(synthetic_shards, input_size):
    pairs = both_ways(synthetic_shards, input_size, reduced_decode=False)
    assert sum(len(a["index"]) for a, _ in pairs) == 256
    image_diff, labels_equal, front_equal = [], [], []
    for a, b in pairs:
        assert torch.equal(a["index"], b["index"]) and a["key"] == b["key"]
        assert b["image"].shape == a["image"].shape and b["image"].dtype == torch.float32
        assert b["target"].dtype == torch.int64 and b["front"].dtype == torch.uint8
        image_diff.append((a["image"] - b["image"]).abs().mean().item() * 255)
        labels_equal.append((a["target"] == b["target"]).float().mean().item())
        front_equal.append((a["front"] == b["front"]).float().mean().item())
    assert np.mean(image_diff) < 0.5  # measured 0.24/255
    assert np.mean(labels_equal) > 0.9999 and np.mean(front_equal) > 0.9999  # measured 99.9999%
    # the draws are the worker path's: flips (which swap the hands) and gains both ways
    flips = [augment.params_for(AugmentConfig(), SEED, e, i).flip for e in range(4) for i in range(64)]
    assert 0 < sum(flips) < len(flips)


def test_flip_swaps_the_maps_and_front_values_on_the_device(synthetic_shards):
    """A sample drawn with a flip: the device's left map is the worker's left map (the right hand
    mirrored), and the front values are swapped as the worker path swaps them."""
    pairs = both_ways(synthetic_shards, 64, epochs=[0], reduced_decode=False)
    a, b = pairs[0]
    flipped = [k for k, i in enumerate(a["index"].tolist()) if augment.params_for(AugmentConfig(), SEED, 0, i).flip]
    assert flipped
    for k in flipped:
        assert (a["target"][k] == b["target"][k]).float().mean() > 0.999
        assert (a["front"][k] == b["front"][k]).float().mean() > 0.999
        assert set(b["front"][k].unique().tolist()) <= {0, 1, 2}


def test_jpeg_decoded_at_half_and_quarter_size():
    """The decoder's reduced output is the full decode averaged over blocks (within 1/255 on a smooth
    image), with each reduced pixel's centre where reduced_affine puts it."""
    y, x = np.mgrid[0:203, 0:203]
    image = np.stack([x, y, (x + y) // 2], -1).astype(np.uint8)
    data = np.frombuffer(codec.encode_image(image, "jpeg", 95), np.uint8)
    full = codec.decode_image(data, "jpeg", 203)
    for r in (2, 4):
        small = codec.decode_image(data, "jpeg", 203, reduce=r)
        assert small.shape == (-(-203 // r), -(-203 // r), 3)
        area = cv2.resize(full, None, fx=1 / r, fy=1 / r, interpolation=cv2.INTER_AREA)
        n = min(area.shape[0], small.shape[0]) - 1
        assert np.abs(area[:n, :n].astype(int) - small[:n, :n]).mean() < 1.0
        # a warp of the reduced crop with the scaled matrix lands where the full warp does
        m = augment.box_affine([40, 30, 120, 120], 32)
        a = augment.warp_image(full, m, 32).astype(float)
        b = augment.warp_image(small, reduced_affine(m, r), 32).astype(float)
        assert np.abs(a - b)[2:-2, 2:-2].mean() < 1.5
    with pytest.raises(ValueError, match="JPEG"):
        codec.decode_image(np.frombuffer(codec.encode_image(image, "png"), np.uint8), "png", 203, reduce=2)


def test_reduction_follows_source_pixels_per_output_pixel():
    assert reduction([0, 0, 100, 100], AugParams(), 128) == 1
    assert reduction([0, 0, 256, 300], AugParams(), 128) == 2
    assert reduction([0, 0, 300, 256], AugParams(scale=0.9), 128) == 1  # the smaller axis decides
    assert reduction([0, 0, 512, 512], AugParams(), 128) == 4
    assert reduction([0, 0, 1024, 1024], AugParams(), 128) == 4


@pytest.mark.slow
def test_reduced_decode_against_a_full_decode(synthetic_shards):
    """At input 32, most crops decode at 1/2 and some at 1/4. Measured mean abs differences of the
    warped images from a full decode's: 2.7/255 at 1/2, 4.8/255 at 1/4 (the full decode's bilinear warp
    skips source pixels there, the reduced decode averages them: it differs from the full decode
    averaged over blocks by 1.0/255). Label and front maps are never reduced."""
    full = both_ways(synthetic_shards, 32, epochs=[0], reduced_decode=False)
    reduced = both_ways(synthetic_shards, 32, epochs=[0], reduced_decode=True)
    ds = ShardDataset(synthetic_shards, "train", 32)
    diffs = {1: [], 2: [], 4: []}
    for (_, a), (_, b) in zip(full, reduced):
        assert torch.equal(a["target"], b["target"]) and torch.equal(a["front"], b["front"])
        for k, i in enumerate(a["index"].tolist()):
            j, local = ds._locate(i)
            r = reduction(ds._shard(j).bbox[local], augment.params_for(AugmentConfig(), SEED, 0, i), 32)
            diffs[r].append((a["image"][k] - b["image"][k]).abs().mean().item() * 255)
    ds.close()
    assert diffs[1] and max(diffs[1]) == 0.0
    assert len(diffs[2]) > len(diffs[4]) > 0
    assert np.mean(diffs[2]) < 4.0 and np.mean(diffs[4]) < 7.0


def test_augment_on_is_checked_and_resolved(synthetic_shards):
    with pytest.raises(ConfigError, match="augment.on"):
        load_config(None, ["augment.on=gpu"])
    assert load_config(None, ["augment.on=device"]).augment.on == "device"
    assert resolve_on("auto", torch.device("cuda")) == "device"
    assert resolve_on("auto", CPU) == "worker"
    assert resolve_on("device", CPU) == "device" and resolve_on("worker", torch.device("cuda")) == "worker"
    # evaluation and disabled augmentation never go through the device path
    assert not ShardDataset(synthetic_shards, "val", 64, augment=None, on_device=True).on_device
    assert not ShardDataset(synthetic_shards, "train", 64, augment=AugmentConfig(enabled=False), on_device=True).on_device


# What a user runs (wandb offline, a loader worker, a ResNet U-Net), with augmentation on the device.
USER = ["augment.on=device", "tracking.wandb=offline", "data.num_workers=1", "model.name=resnet_unet",
        "model.encoder_depth=18", "model.encoder_layers=3", "train.steps=8", "train.val_every=4"]


@pytest.mark.slow
def test_device_augmentation_trains_and_resumes_sample_exactly(synthetic_shards, tmp_path):
    from test_train_support import Launch, assert_bitwise_equal, events, final_state, samples_by_step

    full = Launch(tmp_path / "full", synthetic_shards, USER)
    cut = Launch(tmp_path / "cut", synthetic_shards, USER)
    cut.signal_at_step(3, signal.SIGUSR2)
    codes, outs = full.wait()
    assert codes == [0], outs[0]
    codes, outs = cut.wait()
    assert codes == [75], outs[0]
    (stopped,) = events(cut.run_dir, "interrupted")
    codes, outs = Launch(tmp_path / "cut", synthetic_shards, USER).wait()
    assert codes == [0], outs[0]
    for run_dir in (full.run_dir, cut.run_dir):
        assert all(e["augment_on_device"] for e in events(run_dir, "start"))
        assert [e["step"] for e in events(run_dir, "done")] == [8]
    assert [e["step"] for e in events(full.run_dir, "val")] == [4, 8]
    assert [e["step"] for e in events(cut.run_dir, "start")] == [0, stopped["step"]]
    a, b = final_state(full.run_dir), final_state(cut.run_dir)
    assert_bitwise_equal(a["model"], b["model"], "model")
    assert samples_by_step(full.run_dir) == samples_by_step(cut.run_dir)
    assert sorted(samples_by_step(full.run_dir)) == list(range(1, 9))
