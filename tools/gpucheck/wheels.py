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

# seconds: pip installs the default set (21 wheels, 24 MiB) in 7 s on this 2-core machine, and took more
# than 15 s here under a load of 14; past it the wheels are unpacked instead, which also works
WHEELS_BUDGET = 30


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_project(path: Path) -> str:
    return canonical(path.name.split("-")[0])


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


# The GPU machine, as its description and a session there saw it: python3 is Python 3.12.3, and its torch
# 2.11.0 is PyTorch's manylinux_2_28 wheel, so its glibc is 2.28 or newer: the tags pip would accept there
# (pip expands manylinux2014 to the older legacy tags, a manylinux_2_x tag to none; NVIDIA's libraries
# that torch needs are manylinux_2_27).
PYTHON_VERSION = "3.12"
PLATFORMS = tuple(f"manylinux_2_{minor}_x86_64" for minor in range(28, 16, -1)) + ("manylinux2014_x86_64",)
CARRY_LIMIT = 64 * 2**20  # bytes: the working tree and the carried folders of a device run, together
IMAGE = ROOT / "tools" / "gpu_image.txt"
# The markers of a dependency, evaluated for the GPU machine rather than for this one.
_MARKER_ENV = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
               "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def image_projects() -> dict[str, str]:
    """The projects the GPU image has (tools/gpu_image.txt), {project: "==version" or ""}: never carried,
    so that a wheel can never replace the image's own build."""
    words = " ".join(line.split("#")[0] for line in IMAGE.read_text().splitlines()).split()
    return {canonical(word.split("==")[0]): word[len(word.split("==")[0]):] for word in words}


def split_resolution(install: list[dict], requirements: list[str], image: set[str],
                     python_version: str) -> tuple[dict[str, str], dict[str, str]]:
    """pip's resolution ({"metadata": {name, version, requires_dist}} items) split into what must be carried
    and what the image provides, both {project: version}: the requirements are followed through each
    project's own dependencies, stopping at the image's projects, whose dependencies the image has too."""
    from packaging.requirements import Requirement

    env = {**_MARKER_ENV, "python_version": python_version, "python_full_version": f"{python_version}.0"}
    resolved = {canonical(i["metadata"]["name"]): i["metadata"] for i in install}
    carry: dict[str, str] = {}
    relied: dict[str, str] = {}
    seen = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonical(req.name)
        if name not in resolved or (name, frozenset(req.extras)) in seen:
            continue  # pip found it not needed for that Python and platform, or it is done
        seen.add((name, frozenset(req.extras)))
        meta = resolved[name]
        if name in image:
            relied[name] = meta["version"]
            continue
        carry[name] = meta["version"]
        for text in meta.get("requires_dist") or []:
            dep = Requirement(text)
            if dep.marker is None or any(dep.marker.evaluate({**env, "extra": e}) for e in ("", *req.extras)):
                todo.append(dep)
    return carry, relied


def travelling_bytes() -> int | None:
    """The size of the working tree that a device run copies (tracked and untracked files that git does
    not ignore); None without git."""
    try:
        files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                               capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if files.returncode != 0:
        return None
    return sum(p.stat().st_size for p in (ROOT / f for f in files.stdout.split("\0") if f) if p.is_file())


def fetch_wheels(python_version: str = PYTHON_VERSION, platforms: tuple[str, ...] = PLATFORMS,
                 no_wandb: bool = False) -> int:
    """Fill wheels/ with what the GPU machine's Python lacks: tools/gpu_wheels.txt resolved for its Python
    version and platform, less the image's projects (split_resolution), downloaded one wheel per project
    with no dependencies. Also writes wheels/COMMIT (the project's commit) and wheels/image-needs.txt (the
    image's projects the set relies on, which the rehearsal's venv installs: tools/gpu_rehearsal.sh), and
    prints the size against the carry limit; exit status 1 when it does not fit."""
    out = ROOT / "wheels"
    out.mkdir(exist_ok=True)
    reqs = [line.split("#")[0].strip() for line in (ROOT / "tools" / "gpu_wheels.txt").read_text().splitlines()]
    reqs = [r for r in reqs if r and not (no_wandb and canonical(r).startswith("wandb"))]
    target = ["--only-binary=:all:", "--python-version", python_version]
    for platform in platforms:
        target += ["--platform", platform]
    image = image_projects()
    with tempfile.TemporaryDirectory() as tmp:
        # resolved against the image's own versions where the list gives them (torch, torchvision)
        pins = Path(tmp) / "image-versions.txt"
        pins.write_text("".join(f"{name}{version}\n" for name, version in image.items() if version))
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
               str(report), "--target", str(Path(tmp) / "t"), "-c", str(pins), *target, *reqs]
        print("+ " + " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            return 1
        install = json.loads(report.read_text())["install"]
    carry, relied = split_resolution(install, reqs, set(image), python_version)
    print(f"resolved {len(install)} projects for Python {python_version}; the GPU image has {len(relied)} of those "
          f"the check needs ({' '.join(sorted(relied))}); downloading {len(carry)}", flush=True)
    for stale in out.glob("*.whl"):
        stale.unlink()
    code = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(out),
                           *target, *(f"{n}=={v}" for n, v in sorted(carry.items()))]).returncode
    (out / "COMMIT").write_text(project_commit() + "\n")
    (out / "image-needs.txt").write_text("# the GPU image's projects that the check and these wheels rely on "
                                         "(tools/gpu_image.txt)\n" + "".join(f"{n}\n" for n in sorted(relied)))
    wheels = sorted(out.glob("*.whl"), key=lambda f: -f.stat().st_size)
    total = sum(f.stat().st_size for f in wheels)
    for f in wheels:
        print(f"  {f.stat().st_size / 2**20:6.2f} MiB  {f.name}")
    tree = travelling_bytes()
    both = total + (tree or 0)
    print(f"{out}: {len(wheels)} wheels, {total / 2**20:.1f} MiB; with the working tree "
          + (f"({tree / 2**20:.1f} MiB) " if tree is not None else "(size unknown: no git) ")
          + f"{both / 2**20:.1f} MiB of the device run's {CARRY_LIMIT / 2**20:.0f} MiB carry limit")
    if both > CARRY_LIMIT:
        print("too big to carry: --no-wandb leaves wandb out (the check trains with tracking off)")
        return 1
    return code
