#!/usr/bin/env python3
"""Speed of the training engine on a recipe (default: jobs/smoke.toml), measured on real runs.

    python tools/bench_train.py [--recipe jobs/smoke.toml] [--set key=value ...] [--keep DIR]

Packs the recipe's data first when it is absent (timed apart), then runs `python -m amodal.train`
twice in a fresh run folder: once from scratch for the recipe's steps, then resumed for
--resume-steps more. Prints:
- steady-state images/s: the median over the log intervals after the first (validation and saving
  excluded; the first interval holds the warm-up);
- time from process start to the end of the first step, fresh and resumed (imports, data set-up,
  model, checkpoint load, tracking start, first batch, first step);
- time to save one checkpoint (median over the run's saves) and its size.
The figures come from the run's metrics.jsonl, written by the trainer itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def read_events(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(recipe: str, run_dir: Path, overrides: list[str]) -> float:
    args = [sys.executable, "-m", "amodal.train", recipe, "--run-dir", str(run_dir)]
    for o in overrides:
        args += ["--set", o]
    began = time.time()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"training failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return time.time() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="jobs/smoke.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume-steps", type=int, default=10, help="steps of the resumed run")
    parser.add_argument("--keep", help="keep the run folder here (default: a temporary folder, removed)")
    args = parser.parse_args()

    from amodal.config import load_config
    from amodal.data.format import MANIFEST
    from amodal.data.pack import ensure_synthetic

    cfg = load_config(REPO / args.recipe, args.overrides)
    data_root = Path(cfg.data.root) if Path(cfg.data.root).is_absolute() else REPO / cfg.data.root
    pack_s = None
    if not (data_root / MANIFEST).exists():
        began = time.time()
        cfg.data.root = str(data_root)
        ensure_synthetic(cfg.data)
        pack_s = time.time() - began

    tmp = Path(tempfile.mkdtemp(prefix="bench_train-"))
    run_dir = Path(args.keep) if args.keep else tmp / "run"
    if run_dir.exists():
        sys.exit(f"{run_dir} exists; give a new folder to --keep")
    try:
        fresh_s = run(args.recipe, run_dir, args.overrides)
        n_fresh = len(read_events(run_dir))
        more = args.overrides + [f"train.steps={cfg.train.steps + args.resume_steps}"]
        resume_s = run(args.recipe, run_dir, more)
        events = read_events(run_dir)
        fresh, resumed = events[:n_fresh], events[n_fresh:]

        def first_step(evs):
            return next(e["seconds_since_process_start"] for e in evs if e["event"] == "first_step")

        rates = [e["img_per_s"] for e in fresh if e["event"] == "train"][1:]
        saves = [e for e in events if e["event"] == "checkpoint"]
        save_s = statistics.median(e["seconds"] for e in saves)
        size_mb = Path(saves[-1]["path"]).stat().st_size / 1e6
        start = next(e for e in fresh if e["event"] == "start")
        print(f"recipe {args.recipe} {' '.join(args.overrides)}".rstrip())
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; "
              f"device {start['device']}, precision {start['precision']}, tracking {start['wandb']}, "
              f"torch CPU threads {start.get('cpu_threads')}")
        if pack_s is not None:
            print(f"packing the synthetic data (once):      {pack_s:8.1f} s")
        print(f"steady-state images/s:                  {statistics.median(rates):8.1f}  "
              f"(median of {len(rates)} log intervals, min {min(rates):.1f}, max {max(rates):.1f})")
        print(f"process start -> first step, fresh:     {first_step(fresh):8.1f} s")
        print(f"process start -> first step, resumed:   {first_step(resumed):8.1f} s")
        print(f"checkpoint save:                        {save_s:8.3f} s  "
              f"(median of {len(saves)}, {size_mb:.1f} MB each)")
        print(f"whole fresh run ({cfg.train.steps} steps, validation included): {fresh_s:.1f} s; "
              f"resumed run ({args.resume_steps} steps): {resume_s:.1f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
