"""The report: DIR/<card>.md, the stages' summary table, then a section per stage with its tables."""

from __future__ import annotations

import datetime
import re
from pathlib import Path

from gpucheck.runner import StageOutcome
from gpucheck.stages import TITLES
from gpucheck.state import Check, cell


def card_slug(card: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", card).strip("-") or "unknown"


def write_report(path: Path, check: Check, card: str, argv: list[str], wheel_rows: list,
                 outcomes: list[StageOutcome], seconds: float) -> None:
    lines = [f"# GPU check: {card}" + ("" if check.cuda else " (CPU rehearsal, not GPU figures)"), ""]
    lines += [f"`python tools/gpu_check.py {' '.join(argv)}` on "
              f"{datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}, "
              f"{'quick (tiny sizes)' if check.quick else 'full sizes'}, {seconds:.0f} s in all. "
              "Stage by stage: docs/gpu.md.", ""]
    lines += ["| # | stage | status | seconds (budget) | summary |", "| ---: | --- | --- | ---: | --- |"]
    for i, o in enumerate(outcomes, 1):
        lines.append(f"| {i} | {TITLES[o.stage]} | {o.status} | {o.seconds:.0f} ({o.budget}) | "
                     f"{cell(o.record.summary or o.record.error or '')} |")
    if not check.cuda:
        only = [f"{o.stage}: {n}" for o in outcomes for n in o.record.notes if "CUDA" in n or "CPU" in n]
        only += [f"tests: {row[0]} ({row[1]}): {row[3]}" for o in outcomes if o.stage == "tests"
                 for t in o.record.tables for row in t.rows if row[1] == "skipped" or row[3] not in ("", "-")]
        if only:
            lines += ["", "Checked only on CUDA (this rehearsal ran a CPU stand-in or skipped):", ""]
            lines += [f"- {text}" for text in only]
    if wheel_rows:
        lines += ["", "## Carried wheels", "", "| wheel | result |", "| --- | --- |"]
        lines += [f"| {cell(a)} | {cell(b)} |" for a, b in wheel_rows]
    for i, o in enumerate(outcomes, 1):
        lines += ["", f"## {i}. {TITLES[o.stage]}", "", f"Status: **{o.status}** in {o.seconds:.1f} s "
                  f"(budget {o.budget} s)." + (f" {o.record.summary}" if o.record.summary else ""), ""]
        for t in o.record.tables:
            lines += [f"{t.title}:", "", "| " + " | ".join(t.columns) + " |",
                      "| " + " | ".join("---" for _ in t.columns) + " |"]
            lines += ["| " + " | ".join(row) + " |" for row in t.rows] or ["| (no rows) |"]
            lines.append("")
        lines += [f"- {n}" for n in o.record.notes]
        if o.record.error:
            lines += ["", f"Error: `{cell(o.record.error)[:500]}`"]
            if o.log_tail:
                lines += ["", "```", o.log_tail, "```"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n")
