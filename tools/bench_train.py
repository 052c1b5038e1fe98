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

    python tools/bench_train.py --workers 0,1,2 [--recipe ...] [--set ...]

instead compares loader worker counts side by side: for each count, a fresh run with the trainer's
own choice of CPU threads, and one with the rule it replaced (one core per worker taken from the
math: OMP_NUM_THREADS = CPUs - workers); it prints steady-state images/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from amodal.tracking import METRICS_FILE, read_metrics

REPO = Path(__file__).resolve().parents[1]


def run(recipe: str, run_dir: Path, overrides: list[str], threads: int | None = None) -> float:
    args = [sys.executable, "-m", "amodal.train", recipe, "--run-dir", str(run_dir)]
    for o in overrides:
        args += ["--set", o]
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    began = time.time()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"training failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return time.time() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="jobs/smoke.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume-steps", type=int, default=10, help="steps of the resumed run")
    parser.add_argument("--keep", help="keep the run folder here (default: a temporary folder, removed)")
    parser.add_argument("--workers", help="compare these loader worker counts, e.g. 0,1,2 (see above)")
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

    if args.workers:
        compare_workers(args, [int(w) for w in args.workers.split(",")])
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench_train-"))
    run_dir = Path(args.keep) if args.keep else tmp / "run"
    if run_dir.exists():
        sys.exit(f"{run_dir} exists; give a new folder to --keep")
    try:
        fresh_s = run(args.recipe, run_dir, args.overrides)
        n_fresh = len(read_metrics(run_dir / METRICS_FILE))
        more = args.overrides + [f"train.steps={cfg.train.steps + args.resume_steps}"]
        resume_s = run(args.recipe, run_dir, more)
        events = read_metrics(run_dir / METRICS_FILE)
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


def steady_rate(run_dir: Path) -> tuple[float, int]:
    """(median images/s over the log intervals after the first, CPU threads the run used)."""
    events = read_metrics(run_dir / METRICS_FILE)
    rates = [e["img_per_s"] for e in events if e["event"] == "train"][1:]
    return statistics.median(rates), next(e["cpu_threads"] for e in events if e["event"] == "start")


def compare_workers(args, counts: list[int]) -> None:
    cpus = len(os.sched_getaffinity(0))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        for w in counts:
            overrides = args.overrides + [f"data.num_workers={w}", "train.val_every=0", "tracking.wandb=off"]
            row = [w]
            for i, threads in enumerate((None, max(1, cpus - w))):  # the trainer's choice, then the old rule
                run_dir = Path(tmp) / f"w{w}-{i}"
                run(args.recipe, run_dir, overrides, threads)
                row += steady_rate(run_dir)
            rows.append(row)
    print(f"recipe {args.recipe} {' '.join(args.overrides)}; {cpus} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the end")
    print("workers | threads (trainer) | images/s | threads (CPUs - workers) | images/s | ratio")
    for w, rate, threads, old_rate, old_threads in rows:
        print(f"{w:7d} | {threads:17d} | {rate:8.1f} | {old_threads:24d} | {old_rate:8.1f} | {rate / old_rate:5.2f}")
    best = max(rows, key=lambda r: r[1])
    print(f"fastest with the trainer's choice: {best[0]} worker(s), {best[1]:.1f} images/s")


if __name__ == "__main__":
    main()
