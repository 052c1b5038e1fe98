"""Helpers more than one stage uses: threads on the CPU, the synthetic set."""

from __future__ import annotations

import time
from pathlib import Path

from gpucheck.state import Check, Result


def cpu_threads(check: Check) -> None:
    """On the CPU one math thread: the rehearsal shares two cores with its loader workers (and, on a
    developer's machine, with everyone else), and oversubscribed threads make every figure noise."""
    if not check.cuda:
        import torch

        torch.set_num_threads(1)


def ensure_data(check: Check, res: Result) -> Path:
    """The check's synthetic set (train/val/test counts from its sizes), packed once per work folder."""
    from amodal.config import DataConfig
    from amodal.data.pack import ensure_synthetic

    root = check.data_root()
    if (root / "manifest.json").exists():
        return root
    train, val, test = check.sizes.data
    began = time.monotonic()
    ensure_synthetic(DataConfig(root=str(root), make_synthetic=True, synthetic_train=train, synthetic_val=val,
                                synthetic_test=test, synthetic_seed=0))
    res.note(f"packed the synthetic set ({train} train / {val} val / {test} test) in "
             f"{time.monotonic() - began:.1f} s")
    return root
