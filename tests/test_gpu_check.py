"""tools/gpu_check.py: the CPU rehearsal of the GPU acceptance check, its wheel installer, and which
wheels --fetch-wheels carries.

The rehearsal runs every stage at a tiny size, with this checkout on PYTHONPATH and no wheels, the way
a clean clone runs it; every stage has to produce its table and none may fail, so that the one GPU
run never fails for a reason the CPU could have shown.
"""

from __future__ import annotations

import configparser
import json
import os
import subprocess
import sys
import zipfile

import pytest
from conftest import TOOLS, load_tool

gpu_check = load_tool("gpu_check")
wheels = sys.modules["gpucheck.wheels"]


@pytest.mark.slow
def test_cpu_rehearsal_runs_every_stage(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(TOOLS.parent)}
    r = subprocess.run([sys.executable, str(TOOLS / "gpu_check.py"), "--device", "cpu", "--quick", "-o", str(out),
                        "--work", str(work), "--wheels", ""], capture_output=True, text=True, timeout=900, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    report = (out / "cpu-quick.md").read_text()
    assert "FAILED" not in report and "TIMED OUT" not in report
    for i, stage in enumerate(gpu_check.STAGES, 1):
        assert f"## {i}. {gpu_check.TITLES[stage]}" in report
        result = json.loads((work / f"{stage}.json").read_text())
        assert result["error"] is None, (stage, result["error"])
        assert result["tables"] and all(t["rows"] for t in result["tables"]), stage
    # What only CUDA can check is named, not passed silently.
    assert "Checked only on CUDA" in report
    assert "CUDA only: train.precision = 'fp16'" in report
    assert "NCCL only on CUDA" in report


def _wheel(folder, project: str, version: str = "0.1"):
    """A minimal pure-Python wheel of `project` with one module."""
    module = project.replace("-", "_")
    path = folder / f"{module}-{version}-py3-none-any.whl"
    info = f"{module}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{module}/__init__.py", "VALUE = 42\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {project}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_install_wheels_installs_only_what_is_missing(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    _wheel(wheels, "amodal-gpu-check-probe")
    _wheel(wheels, "pytest", "0.0.1")  # this Python has pytest: never replaced, not even shadowed
    rows = dict(gpu_check.install_wheels(wheels, site, timeout=300))
    assert rows["pytest-0.0.1-py3-none-any.whl"].startswith("not needed")
    assert "into" in rows["amodal_gpu_check_probe-0.1-py3-none-any.whl"]
    assert (site / "amodal_gpu_check_probe" / "__init__.py").exists()
    assert not (site / "pytest").exists()
    probe = subprocess.run([sys.executable, "-c", "import amodal_gpu_check_probe as m; print(m.VALUE)"],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(site)})
    assert probe.stdout.strip() == "42"


def test_wheel_requirements_are_the_projects():
    """tools/gpu_wheels.txt holds setup.cfg's requirements and test extra line for line, so that the set
    --fetch-wheels resolves for the GPU machine is what an install asks for (and admits its torch)."""
    cfg = configparser.ConfigParser()
    cfg.read(TOOLS.parent / "setup.cfg")
    wanted = cfg["options"]["install_requires"] + "\n" + cfg["options.extras_require"]["test"]
    wanted = {line.split("#")[0].strip() for line in wanted.splitlines()} - {""}
    listed = {line.split("#")[0].strip() for line in (TOOLS / "gpu_wheels.txt").read_text().splitlines()} - {""}
    assert wanted <= listed, wanted - listed


def _item(name: str, version: str, *requires: str) -> dict:
    return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)}}


def test_fetch_carries_only_what_the_gpu_image_lacks():
    """The defaults are the GPU machine's (Python 3.12, its platform), and the image's projects, named in
    one list, are left out with what only they need; a dependency for another platform, another Python or
    an extra nobody asked for is not carried either."""
    assert wheels.PYTHON_VERSION == "3.12" and "manylinux_2_28_x86_64" in wheels.PLATFORMS
    image = wheels.image_projects()
    assert image["torch"] == "==2.11.0" and image["torchvision"] == "==0.26.0"
    for name in ("numpy", "pillow", "h5py", "opencv-python-headless", "tqdm", "matplotlib", "timm", "pytest",
                 "pytest-timeout", "packaging", "requests", "pyyaml", "huggingface-hub", "safetensors"):
        assert name in image, name
    install = [  # a pip report's "install" items, cut down to what the split reads
        _item("wandb", "0.31.0", "requests<3,>=2.0.0", "pydantic<3", "pywin32; sys_platform == 'win32'",
              "tomli; python_version < '3.11'", "moviepy; extra == 'media'"),
        _item("pydantic", "2.14.4", "pydantic-core==2.50.5", "typing-extensions>=4.6"),
        _item("pydantic_core", "2.50.5", "typing-extensions>=4.6"),
        _item("requests", "2.34.2", "urllib3<3,>=1.21.1", "certifi>=2017.4.17"),
        _item("urllib3", "2.8.0"), _item("certifi", "2026.10.19"), _item("typing_extensions", "4.16.0"),
        _item("segmentation_models_pytorch", "0.6.0", "torch>=1.8", "timm>=0.9"),
        _item("timm", "1.0.31", "torch", "huggingface_hub"), _item("huggingface_hub", "1.33.0", "httpx2"),
        _item("httpx2", "2.17.0"), _item("torch", "2.11.0", "nvidia-cudnn-cu13==9.20; platform_system == 'Linux'"),
        _item("nvidia-cudnn-cu13", "9.20"), _item("pytest", "9.2.0", "pluggy"), _item("pluggy", "1.7.0"),
        _item("lmdb", "3.0.0"),
    ]
    carry, relied = wheels.split_resolution(install, ["wandb>=0.17", "segmentation-models-pytorch>=0.3",
                                                      "pytest>=8", "lmdb>=1.4"], set(image), "3.12")
    assert carry == {"wandb": "0.31.0", "pydantic": "2.14.4", "pydantic-core": "2.50.5",
                     "segmentation-models-pytorch": "0.6.0", "lmdb": "3.0.0"}
    assert set(relied) == {"requests", "typing-extensions", "torch", "timm", "pytest"}
