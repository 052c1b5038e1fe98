"""Facts about this machine and checkout, for the environment table, the report and the wheels."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from gpucheck.state import ROOT


def nvidia_smi(field: str) -> str:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else \
            f"nvidia-smi failed: {out.stderr.strip()[:200]}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi not available ({type(e).__name__})"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def meminfo() -> str:
    try:
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        return f"{kb / 2**20:.0f} GiB"
    except (OSError, IndexError, ValueError):
        return "unknown"


def project_commit() -> str:
    """git's HEAD (and whether the tree differs from it); where no .git travelled, wheels/COMMIT, which
    --fetch-wheels writes."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=20)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=20).stdout.strip()
            return head.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    stamp = ROOT / "wheels" / "COMMIT"
    if stamp.exists():
        return f"{stamp.read_text().strip()} (from wheels/COMMIT: no .git here)"
    return "unknown (no .git here and no wheels/COMMIT)"
