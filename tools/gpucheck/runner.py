"""The stages in turn, each in a child process of its own with a time budget: a crash, a CUDA error or a
hang in one stage costs that stage only, and what it measured before it was stopped is kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from gpucheck.stages import STAGE_FUNCS, TITLES
from gpucheck.state import ROOT, Check, Result, StageRecord

# Seconds per stage. A full run stays under 9 minutes with the wheels' 30 s: 30 + 505 = 535.
BUDGETS = {"env": 30, "tests": 120, "bench": 130, "loader": 90, "train": 100, "export": 35}
QUICK_BUDGETS = {"env": 60, "tests": 240, "bench": 150, "loader": 150, "train": 120, "export": 90}


@dataclass
class StageOutcome:
    """How a stage ended, as the parent saw it, with the record it left."""

    stage: str
    seconds: float
    budget: int
    status: str  # "ok", "FAILED" or "TIMED OUT"
    record: StageRecord
    log_tail: str = ""  # the end of its log, where it was not ok


def run_stage(name: str, check: Check) -> int:
    """The child: one stage, its result in <work>/<name>.json; exit status 1 when it failed."""
    res = Result(check.work / f"{name}.json")
    try:
        STAGE_FUNCS[name](check, res)
        return 0
    except BaseException as e:  # noqa: BLE001 - recorded for the report, then the parent goes on
        res.record.error = f"{type(e).__name__}: {e}".strip()
        res.record.traceback = traceback.format_exc()[-4000:]
        res.flush()
        traceback.print_exc()
        return 1


def run_stages(check: Check, stages: list[str], budgets: dict[str, int], script: Path, site: Path) -> list[StageOutcome]:
    """The parent: each stage as `script --stage NAME` with this checkout and `site` (the carried wheels)
    on its path, stopped with its loader workers at its budget."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", AMODAL_TEST_DEVICE=check.device)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(site) if site.is_dir() else "",
                                                      os.environ.get("PYTHONPATH", "")]))
    child = [sys.executable, str(script), "--device", check.device, "--work", str(check.work)]
    child += ["--quick"] if check.quick else []
    child += ["--train-seconds", str(check.train_seconds)] if check.train_seconds else []

    outcomes = []
    for i, stage in enumerate(stages, 1):
        result_path, log_path = check.work / f"{stage}.json", check.work / f"{stage}.log"
        result_path.unlink(missing_ok=True)
        print(f"[{i}/{len(stages)}] {stage}: {TITLES[stage]} (budget {budgets[stage]} s)", flush=True)
        t0 = time.monotonic()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(child + ["--stage", stage], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=budgets[stage])
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the stage and its loader workers
                proc.wait()
                code = None
        o = StageOutcome(stage, time.monotonic() - t0, budgets[stage], "ok", StageRecord.read(result_path))
        if code is None:
            o.status = "TIMED OUT"
            o.record.error = f"stopped after its budget of {budgets[stage]} s; the rows above are what it measured"
        elif code != 0 or o.record.error:
            o.status = "FAILED"
            o.record.error = o.record.error or f"exit status {code}"
        if o.status != "ok":
            o.log_tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        outcomes.append(o)
        print(f"    {o.status} in {o.seconds:.1f} s: {o.record.summary or o.record.error or ''}", flush=True)
    return outcomes
