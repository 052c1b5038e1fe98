"""amodal.models: shapes, gradients, stage heads, channels_last, local pretrained weights, errors."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from amodal.config import ModelConfig
from amodal.labels import NUM_CLASSES, NUM_OUTPUTS
from amodal.models import MODEL_NAMES, ResNetUNet, build_model
from amodal.models.blocks import AttentionGate
from conftest import load_tool

REPO = Path(__file__).resolve().parents[1]

# Small versions of every model so the whole file stays fast on two shared cores.
SMALL = {
    "unet": dict(base_channels=8),
    "unet_deep": dict(base_channels=8),
    "unet_attention": dict(base_channels=8),
    "resnet_unet": dict(encoder_depth=18),
    "smp_unetplusplus": dict(encoder_depth=18),
    "smp_deeplabv3plus": dict(encoder_depth=18),
    "smp_pspnet": dict(encoder_depth=18),
}


@pytest.fixture(autouse=True)
def one_thread():
    # Two OpenMP threads on two cores shared with other jobs spend most of their time waiting for
    # each other (10x slower here); one thread keeps this file fast and steady.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name, **{**SMALL[name], **kw}))


def test_small_table_covers_every_model():
    assert set(SMALL) == set(MODEL_NAMES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shape_every_input_size(name):
    model = small(name).eval()
    with torch.no_grad():
        for size in (64, 128, 160):
            out = model(torch.rand(2, 3, size, size))
            assert out.shape == (2, NUM_OUTPUTS, 128, 128), (name, size)
            assert torch.isfinite(out).all()


def test_default_configs():
    # The report's models at their default sizes: ResNet-50 encoder, 64-channel U-Net.
    model = build_model(ModelConfig())
    assert isinstance(model, ResNetUNet)
    assert isinstance(model.encoder.layer4[0], torchvision.models.resnet.Bottleneck)
    assert model.encoder.layer4[0].conv3.out_channels == 2048
    unet = build_model(ModelConfig(name="unet"))
    assert unet.inc[0][0].out_channels == 64
    assert len(unet.downs) == 4 and len(unet.ups) == 4
    assert unet.gates is None
    deep = build_model(ModelConfig(name="unet_deep", base_channels=8))
    assert len(deep.downs) == 5 and len(deep.ups) == 5
    att = build_model(ModelConfig(name="unet_attention", base_channels=8))
    assert len(att.gates) == 4 and all(isinstance(g, AttentionGate) for g in att.gates)


def _loss(out, target):
    return sum(F.cross_entropy(out[:, h * NUM_CLASSES : (h + 1) * NUM_CLASSES], target[:, h]) for h in range(2))


@pytest.mark.parametrize(
    "name, kw, first_param",
    [
        ("resnet_unet", {}, "encoder.conv1.weight"),
        ("resnet_unet", {"stage_heads": False, "attention": True}, "encoder.conv1.weight"),
        ("unet_attention", {}, "inc.0.0.weight"),
        ("smp_deeplabv3plus", {}, "net.encoder.conv1.weight"),
    ],
)
def test_gradients_reach_the_encoder(name, kw, first_param):
    model = small(name, **kw).train()
    target = torch.randint(0, NUM_CLASSES, (2, 2, 128, 128))
    _loss(model(torch.rand(2, 3, 64, 64)), target).backward()
    params = dict(model.named_parameters())
    grad = params[first_param].grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    missing = [n for n, p in params.items() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"


def test_attention_gates_present_and_bounded():
    model = small("resnet_unet", attention=True)
    gates = [s.gate for s in model.stages if s.gate is not None]
    assert len(gates) == 4  # every stage with a skip connection
    gate = AttentionGate(gate_channels=16, skip_channels=8).eval()
    x, g = torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8)
    y = gate(x, g)
    assert y.shape == x.shape
    assert (y.abs() <= x.abs() + 1e-6).all()  # the gate only scales by alpha in [0, 1]
    assert not torch.allclose(y, x)


def _literal_fusion(model: ResNetUNet, x: torch.Tensor) -> torch.Tensor:
    """fuse(concat(U_s(p_s))): each stage's logits taken to 128x128 on their own, concatenated, fused."""
    preds = model.stage_logits(x)
    sizes = [p.shape[-2:] for p in preds] + [(128, 128)]
    ups = []
    for i, p in enumerate(preds):
        for size in sizes[i + 1 :]:  # the same resize steps the model uses for stage i
            if tuple(p.shape[-2:]) != tuple(size):
                p = F.interpolate(p, size=tuple(size), mode="bilinear", align_corners=False)
        ups.append(p)
    return model.fuse(torch.cat(ups, dim=1))


@pytest.mark.parametrize("size", [64, 160])
def test_stage_heads_are_concatenated_and_fused(size):
    model = small("resnet_unet").eval()
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        preds = model.stage_logits(x)
        assert [p.shape[1] for p in preds] == [NUM_OUTPUTS] * 5
        assert [p.shape[-1] for p in preds] == [size // 16, size // 8, size // 4, size // 2, size]
        assert model.fuse.in_channels == 5 * NUM_OUTPUTS
        torch.testing.assert_close(model(x), _literal_fusion(model, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("size", [64, 96])
def test_three_encoder_layers_drop_layer4_and_the_coarsest_stage(size):
    model = small("resnet_unet", encoder_layers=3).eval()
    assert not hasattr(model.encoder, "layer4")
    assert not any(k.startswith("encoder.layer4.") for k in model.state_dict())
    assert [s.conv2[0].out_channels for s in model.stages] == [128, 64, 32, 16]
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        preds = model.stage_logits(x)
        assert [p.shape[-1] for p in preds] == [size // 8, size // 4, size // 2, size]
        assert model.fuse.in_channels == 4 * NUM_OUTPUTS
        torch.testing.assert_close(model(x), _literal_fusion(model, x), atol=1e-5, rtol=1e-4)
    # the whole ResNet's first three layers: the same modules and weights given the same seed
    whole = small("resnet_unet")
    for name in ("conv1", "layer1", "layer2", "layer3"):
        a, b = getattr(model.encoder, name).state_dict(), getattr(whole.encoder, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(model) < n(whole) / 3  # layer4 holds most of a ResNet-18's weights
    plain = small("resnet_unet", encoder_layers=3, stage_heads=False)
    assert plain(x).shape == (2, NUM_OUTPUTS, 128, 128)


def test_three_encoder_layers_load_a_whole_resnet_file(resnet18_file):
    path, state = resnet18_file
    model = small("resnet_unet", encoder_layers=3, pretrained=str(path))
    own = model.encoder.state_dict()
    for key, value in state.items():
        if key.startswith(("layer1.", "layer2.", "layer3.", "conv1.", "bn1.")):
            torch.testing.assert_close(own[key], value, rtol=0, atol=0)
    assert not any(k.startswith("layer4.") for k in own)


def test_every_stage_head_changes_the_output():
    model = small("resnet_unet").eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        base = model(x)
        for head in model.heads:
            saved = head.weight.clone(), head.bias.clone()
            head.weight.zero_()
            head.bias.zero_()
            assert (model(x) - base).abs().max() > 1e-4
            head.weight.copy_(saved[0])
            head.bias.copy_(saved[1])
        torch.testing.assert_close(model(x), base)


def test_plain_head_for_the_ablation():
    model = small("resnet_unet", stage_heads=False)
    assert model.heads is None and model.fuse is None
    assert model.head.in_channels == 16 and model.head.out_channels == NUM_OUTPUTS
    with_heads = small("resnet_unet")
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(with_heads) > n(model)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_channels_last_matches_contiguous(name):
    model = small(name, **({"attention": True} if name == "resnet_unet" else {})).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.fixture
def resnet18_file(tmp_path):
    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pt"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("name", ["resnet_unet", "smp_unetplusplus"])
def test_pretrained_loads_a_local_torchvision_state_dict(resnet18_file, name):
    path, state = resnet18_file
    model = small(name, pretrained=str(path))
    encoder = model.encoder if name == "resnet_unet" else model.net.encoder
    own = encoder.state_dict()
    assert not any(k.startswith("fc.") for k in own)
    for key, value in state.items():
        if not key.startswith("fc."):  # the classifier is ignored
            torch.testing.assert_close(own[key], value, rtol=0, atol=0)


def test_pretrained_missing_key_is_named(resnet18_file, tmp_path):
    path, state = resnet18_file
    del state["layer2.0.conv1.weight"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"partial\.pt.*missing keys \['layer2\.0\.conv1\.weight'\]"):
        small("resnet_unet", pretrained=str(tmp_path / "partial.pt"))


def test_pretrained_unexpected_key_is_named(resnet18_file, tmp_path):
    path, state = resnet18_file
    state["layer9.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"extra\.pt.*unexpected keys \['layer9\.weight'\]"):
        small("resnet_unet", pretrained=str(tmp_path / "extra.pt"))


def test_pretrained_wrong_files(resnet18_file, tmp_path):
    path, _ = resnet18_file
    # A ResNet-18 file for a ResNet-50 encoder: the bottleneck keys are missing, the shapes differ.
    with pytest.raises(ValueError, match=r"resnet18\.pt.*missing keys \[.*conv3"):
        build_model(ModelConfig(name="resnet_unet", encoder_depth=50, pretrained=str(path)))
    # A ResNet-18 file for ResNet-34: more blocks, so missing keys.
    with pytest.raises(ValueError, match=r"missing keys \[.*layer1\.2\."):
        build_model(ModelConfig(name="resnet_unet", encoder_depth=34, pretrained=str(path)))
    torch.save({"weights": [1, 2, 3]}, tmp_path / "notastate.pt")
    with pytest.raises(ValueError, match=r"notastate\.pt.*state dict"):
        small("resnet_unet", pretrained=str(tmp_path / "notastate.pt"))
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"garbage\.pt.*cannot be read"):
        small("resnet_unet", pretrained=str(tmp_path / "garbage.pt"))
    with pytest.raises(ValueError, match=r"nowhere\.pt: no such file"):
        small("resnet_unet", pretrained=str(tmp_path / "nowhere.pt"))
    with pytest.raises(ValueError, match="no pretrained encoder"):
        small("unet", pretrained=str(path))


def test_bad_names_and_options():
    with pytest.raises(ValueError, match="unknown model 'resnet_unett'.*unet, unet_deep, unet_attention, resnet_unet"):
        build_model(ModelConfig(name="resnet_unett"))
    with pytest.raises(ValueError, match="18, 34, 50, 101"):
        build_model(ModelConfig(name="resnet_unet", encoder_depth=152))
    with pytest.raises(ValueError, match="18, 34, 50, 101"):
        build_model(ModelConfig(name="smp_pspnet", encoder_depth=19))
    with pytest.raises(ValueError, match="no attention gates"):
        build_model(ModelConfig(name="smp_pspnet", encoder_depth=18, attention=True))
    with pytest.raises(ValueError, match=r"model\.encoder_layers must be one of \(3, 4\), got 2"):
        build_model(ModelConfig(name="resnet_unet", encoder_depth=18, encoder_layers=2))
    with pytest.raises(ValueError, match=r"'unet': model\.encoder_layers is for resnet_unet \(got 3\)"):
        build_model(ModelConfig(name="unet", encoder_layers=3))


def test_missing_smp_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "segmentation_models_pytorch", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install -e \.\[smp\]"):
        build_model(ModelConfig(name="smp_unetplusplus", encoder_depth=18))


@pytest.mark.parametrize("kw", [{}, {"attention": True}])
def test_bf16_autocast_forward_backward(kw):
    # The trainer runs bf16 autocast on GPUs; the same code path runs on the CPU here.
    model = small("resnet_unet", **kw).train().to(memory_format=torch.channels_last)
    target = torch.randint(0, NUM_CLASSES, (2, 2, 128, 128))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(2, 3, 64, 64).contiguous(memory_format=torch.channels_last))
    assert out.shape == (2, NUM_OUTPUTS, 128, 128)
    _loss(out.float(), target).backward()
    assert torch.isfinite(model.encoder.conv1.weight.grad).all()
    assert model.heads[0].weight.grad.abs().sum() > 0


def test_model_table_counts_macs():
    count = load_tool("model_table").count
    conv = torch.nn.Conv2d(3, 34, 3, padding=1, bias=False)
    params, gmacs = count(conv, 32)
    assert params == pytest.approx(34 * 3 * 9 / 1e6)
    assert gmacs == pytest.approx(34 * 3 * 9 * 32 * 32 / 1e9)  # one multiply-add per weight per pixel


@pytest.mark.slow
def test_bench_model_runs(capsys):
    load_tool("bench_model").main(["--device", "cpu", "--batch", "2", "--size", "64", "--steps", "1", "--rounds", "2", "--threads", "1"])
    out = capsys.readouterr().out
    assert "resnet_unet" in out and "smp.Unet" in out
    assert "ratio ours / smp (images/s):" in out


def test_bench_step_times_the_recipe_against_an_override(capsys):
    load_tool("bench_step").main(["--recipe", str(REPO / "jobs" / "demo.toml"), "--set", "data.input_size=32",
                                  "--set", "train.global_batch=2", "--rounds", "2", "--steps", "1",
                                  "--against", "model.encoder_layers=4"])
    out = capsys.readouterr().out
    assert "(encoder depth 18, 3 layers), input 32, batch 2" in out
    assert "optimizer: for-each / fused = " in out
    assert re.search(r"against model\.encoder_layers=4: step [\d.]+ ms .*; against / recipe = [\d.]+x", out), out


def test_stage_outputs_come_from_the_same_pass_as_the_logits():
    model = small("resnet_unet").eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        logits, stages = model(x, stages=True)
        torch.testing.assert_close(logits, model(x))
        heads = [head(y) for head, y in zip(model.heads, model.decode(x))]
    assert [s.shape[-1] for s in stages] == [4, 8, 16, 32, 64]
    for got, want in zip(stages, heads):
        torch.testing.assert_close(got, want)


def test_the_encoder_sees_rgb_standardised_with_imagenet_statistics():
    model = small("resnet_unet").eval()
    seen = []
    model.encoder.conv1.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    bgr = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        model(bgr)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[0], (bgr[:, [2, 1, 0]] - mean) / std)
    # The statistics are part of the weights: a model trained without them does not load silently.
    plain = small("resnet_unet", normalize_input=False)
    assert "input_mean" not in plain.state_dict()
    with pytest.raises(RuntimeError, match="input_mean"):
        model.load_state_dict(plain.state_dict())
