"""tools/gpu_check.py: the CPU rehearsal of the GPU acceptance check, and its wheel installer.

The rehearsal runs every stage at a tiny size, with this checkout on PYTHONPATH and no wheels, the way
a clean clone runs it; every stage has to produce its table and none may fail, so that the one GPU
run never fails for a reason the CPU could have shown.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
from conftest import TOOLS, load_tool

gpu_check = load_tool("gpu_check")


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
