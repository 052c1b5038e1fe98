"""The wheels the GPU machine's Python lacks: fetched here into wheels/ (--fetch-wheels), carried with the
run, and installed there into <work>/site before the stages."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from gpucheck.machine import project_commit
from gpucheck.state import ROOT

WHEELS_BUDGET = 15  # seconds


def wheel_project(path: Path) -> str:
    return re.sub(r"[-_.]+", "-", path.name.split("-")[0]).lower()


def install_wheels(wheels: Path, site: Path, timeout: float = WHEELS_BUDGET) -> list[list[str]]:
    """Install into `site` (--no-deps, --no-index) the wheels whose projects this Python does not have; a
    row per wheel. Without pip the wheels are unpacked, which is what installing a wheel does."""
    import importlib.metadata as md

    rows, missing = [], []
    for whl in sorted(wheels.glob("*.whl")):
        try:
            rows.append([whl.name, f"not needed: {md.version(wheel_project(whl))} installed"])
        except md.PackageNotFoundError:
            missing.append(whl)
    if not missing:
        return rows
    site.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-warn-script-location",
           "--disable-pip-version-check", "--quiet", "--upgrade", "--target", str(site), *map(str, missing)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        how = "installed" if done.returncode == 0 else None
        problem = done.stderr.strip()[-300:]
    except (OSError, subprocess.TimeoutExpired) as e:
        how, problem = None, f"{type(e).__name__}: {e}"
    if how is None:  # no pip here, or it failed: a wheel is a zip of the files as installed
        try:
            for whl in missing:
                with zipfile.ZipFile(whl) as z:
                    z.extractall(site)
            how = f"unpacked (pip: {problem or 'failed'})"
        except (OSError, zipfile.BadZipFile) as e:
            how = f"failed: {type(e).__name__}: {e}; pip: {problem}"
    rows += [[whl.name, f"{how} into {site}"] for whl in missing]
    return rows


# Projects the GPU image has (torch, torchvision, numpy, pillow, h5py, OpenCV, tqdm, matplotlib, timm, and
# what they need); never carried, so that a wheel can never replace the image's own build.
PRESENT = re.compile(r"^(torch|torchvision|triton|numpy|pillow|h5py|opencv-.*|tqdm|matplotlib|timm|huggingface-hub|"
                     r"hf-xet|httpx2|httpcore2|truststore|safetensors|pyyaml|filelock|fsspec|sympy|mpmath|networkx|"
                     r"jinja2|markupsafe|setuptools|nvidia-.*|cuda-.*)$")


def fetch_wheels(python_version: str, platform: str, no_wandb: bool = False) -> int:
    """Fill wheels/ with what the GPU machine's Python lacks (tools/gpu_wheels.txt, resolved for its Python
    version and platform, less PRESENT): pip download, one wheel per project, no dependencies."""
    out = ROOT / "wheels"
    out.mkdir(exist_ok=True)
    reqs = [line.split("#")[0].strip() for line in (ROOT / "tools" / "gpu_wheels.txt").read_text().splitlines()]
    reqs = [r for r in reqs if r and not (no_wandb and r.startswith("wandb"))]
    target = ["--only-binary=:all:", "--python-version", python_version, "--platform", platform]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
               str(report), "--target", str(Path(tmp) / "t"), *target, *reqs]
        print("+ " + " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            return 1
        resolved = [(i["metadata"]["name"], i["metadata"]["version"]) for i in json.loads(report.read_text())["install"]]
    keep = [f"{n}=={v}" for n, v in resolved if not PRESENT.match(re.sub(r"[-_.]+", "-", n).lower())]
    print(f"resolved {len(resolved)} projects; {len(resolved) - len(keep)} are in the GPU image; downloading "
          f"{len(keep)}: {' '.join(keep)}", flush=True)
    for stale in out.glob("*.whl"):
        stale.unlink()
    code = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(out),
                           *target, *keep]).returncode
    (out / "COMMIT").write_text(project_commit() + "\n")
    total = sum(f.stat().st_size for f in out.glob("*.whl"))
    print(f"{out}: {len(list(out.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB (what the device run carries: "
          "64 MiB in all)")
    return code

