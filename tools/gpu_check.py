"""The GPU acceptance check: one command that fills every GPU figure in one call (docs/gpu.md).

    python tools/gpu_check.py [--device cuda|cpu] [--quick] -o DIR [--work DIR] [--stages a,b] [--budget STAGE=S]
    python tools/gpu_check.py --fetch-wheels [--python-version 3.12] [--platform TAG ...] [--no-wandb]

Stages, in order, each in a child process of its own with a time budget (a crash, a CUDA error or a
hang in one stage costs that stage only; what it measured before it was stopped is kept):
  env     the card, driver, CUDA, cuDNN, NCCL, torch, the packages, the project's commit
  tests   `pytest -m gpu` (tests/test_gpu.py) on the device, one row per test
  bench   our ResNet-50 U-Net against smp's Unet-ResNet-50: bf16 and channels_last, eager and
          compiled, images/s and peak memory side by side in one process
  loader  the training loader's samples/s from N workers, next to the GPU's step rate at the default
          recipe: whether training is data-bound and how many cores per GPU it needs
  train   the default recipe (jobs/train.toml) trained for a fixed time: images/s, the validation
          mIoU curve, and what that rate means for the recipe's 30,000 steps
  export  1,000 test images predicted, written to the leaderboard file and checked, timed
The report is DIR/<card>.md, a table per stage; for a full (not --quick) run on CUDA also
docs/results/gpu/<card>.md. Before the stages, the wheels in wheels/ (fetched with --fetch-wheels)
whose packages this Python lacks are installed into <work>/site, which the stages put on their path.

--device cpu --quick is the rehearsal: every stage at a tiny size, in a few minutes on two cores,
with an installed checkout or with none (the stages get this checkout on PYTHONPATH). What only CUDA
can check is marked in the report, never passed silently.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from gpucheck.machine import nvidia_smi
from gpucheck.report import card_slug, write_report
from gpucheck.runner import BUDGETS, QUICK_BUDGETS, run_stage, run_stages
from gpucheck.stages import STAGES, TITLES  # noqa: F401 - the check's stages, for its tests
from gpucheck.state import ROOT, Check
from gpucheck.wheels import PLATFORMS, PYTHON_VERSION, fetch_wheels, install_wheels


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="every stage at a tiny size (the CPU rehearsal)")
    p.add_argument("-o", "--out", help="folder for the report <card>.md")
    p.add_argument("--work", help="scratch folder: data, runs, stage results (default: a folder in $TMPDIR)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    p.add_argument("--budget", action="append", default=[], metavar="STAGE=SECONDS", help="a stage's time budget")
    p.add_argument("--train-seconds", type=float, default=0.0, help="training time of the train stage")
    p.add_argument("--wheels", default=str(ROOT / "wheels"), help="folder of wheels to install first ('' for none)")
    p.add_argument("--fetch-wheels", action="store_true", help="fill wheels/ with pip download, then stop")
    p.add_argument("--python-version", default=PYTHON_VERSION, help="with --fetch-wheels: the GPU machine's Python")
    p.add_argument("--platform", action="append", help="with --fetch-wheels: its platform tags (repeat; default: "
                   "the manylinux tags of glibc 2.17 to 2.28)")
    p.add_argument("--no-wandb", action="store_true", help="with --fetch-wheels: leave wandb out")
    p.add_argument("--stage", help=argparse.SUPPRESS)  # the child's side
    args = p.parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels(args.python_version, tuple(args.platform or PLATFORMS), args.no_wandb)
    work = Path(args.work or Path(tempfile.gettempdir()) / f"amodal-gpu-check-{args.device}{'-quick' if args.quick else ''}")
    check = Check(device=args.device, quick=args.quick, work=work.resolve(), train_seconds=args.train_seconds)
    if args.stage:
        return run_stage(args.stage, check)
    if not args.out:
        p.error("-o DIR is required")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
    budgets = dict(QUICK_BUDGETS if args.quick else BUDGETS)
    for item in args.budget:
        stage, _, value = item.partition("=")
        if stage not in budgets:
            p.error(f"--budget {item}: unknown stage")
        budgets[stage] = int(float(value))

    began = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    site = work / "site"
    wheel_rows = []
    if args.wheels and Path(args.wheels).is_dir():
        wheel_rows = install_wheels(Path(args.wheels), site)
        print(f"wheels: {sum(not r[1].startswith('not needed') for r in wheel_rows)} installed into {site}, "
              f"{sum(r[1].startswith('not needed') for r in wheel_rows)} present already", flush=True)
    outcomes = run_stages(check, stages, budgets, Path(__file__).resolve(), site)

    env_outcome = next((o for o in outcomes if o.stage == "env"), None)
    card = (env_outcome and env_outcome.record.values.get("card")) or \
        ("cpu" if args.device == "cpu" else nvidia_smi("name"))
    seconds = time.monotonic() - began
    name = card_slug(card) + ("-quick" if args.quick else "") + ".md"
    report = Path(args.out) / name
    write_report(report, check, card, argv, wheel_rows, outcomes, seconds)
    print(f"report: {report}")
    if args.device == "cuda" and not args.quick and card != "cpu":
        copy = ROOT / "docs" / "results" / "gpu" / name
        write_report(copy, check, card, argv, wheel_rows, outcomes, seconds)
        print(f"report: {copy}")
    failed = [o.stage for o in outcomes if o.status != "ok"]
    print(f"{len(outcomes) - len(failed)} of {len(outcomes)} stages ok in {seconds:.0f} s"
          + (f"; not ok: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
