"""Collect finished training runs into a results table and bar charts.

    amodal-report RUNS... -o DIR [--baseline RUN]

Each RUN is a run folder (holding config.json and metrics.jsonl, as amodal.train writes them) or a
folder holding run folders (a sweep: runs/<sweep name>/<point>/). Writes into DIR:

  results.md    one row per run, best validation mIoU first: recipe (model and encoder, loss,
                augmentation factors t/s/r/c, extras such as EMA or flip TTA, input size), steps done,
                images/s (median over the train records), best validation mIoU, the occluded-region
                mIoU and the step of that same validation, and a second table of per-part IoU (mean of
                the two hands) at that step; with --baseline RUN, each run's mIoU difference to it
  results.json  the same rows as data
  miou.png      validation mIoU (and occluded-region mIoU) per run, as bars
  parts.png     per-part IoU per run (a heat map: 16 parts × many runs stays readable as one)
  curves.png    learning curves: validation mIoU against images seen and against minutes of training

Runs without validation records are listed with "—". A folder that is neither a run nor holds runs
is an error naming it. Numbers are read from the runs' own records; nothing is recomputed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from amodal.config import Config, ConfigError, from_dict
from amodal.fileio import write_atomic
from amodal.labels import FINGERS, HANDS, NUM_PARTS, PART_NAMES
from amodal.tracking import METRICS_FILE, MetricsError, read_metrics

CONFIG_FILE = "config.json"
DASH = "—"

# Field names of the trainer's metrics.jsonl records (amodal/train.py, its log.event calls).
KIND, STEP = "event", "step"
TRAIN_KIND, VAL_KIND, START_KIND = "train", "val", "start"
IMAGES_PER_S = "img_per_s"
MIOU, OCCLUDED, PART_IOU = "miou", "occluded_miou", "part_iou"

# Short part names for table headers: palm, then finger initial + segment number (1 = proximal).
PART_SHORT = ["palm"] + [f"{f[0].upper()}{s}" for f in FINGERS for s in (1, 2, 3)]
assert len(PART_SHORT) == NUM_PARTS


class ReportError(Exception):
    pass


@dataclass
class Run:
    path: Path
    name: str
    config: Config
    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    start: dict | None = None  # the last start record: device and number of ranks

    @property
    def device(self) -> str | None:
        if self.start is None or "device" not in self.start:
            return None
        world = self.start.get("world_size", 1)
        return str(self.start["device"]).split(":")[0] + (f" x{world}" if world != 1 else "")

    @property
    def steps_done(self) -> int | None:
        steps = [r[STEP] for r in self.train + self.val if isinstance(r.get(STEP), int)]
        return max(steps) if steps else None

    @property
    def images_per_s(self) -> float | None:
        values = [r[IMAGES_PER_S] for r in self.train if _number(r.get(IMAGES_PER_S))]
        return statistics.median(values) if values else None

    @property
    def best(self) -> dict | None:
        """The validation record with the highest mIoU (the earliest of equals), or None."""
        scored = [r for r in self.val if _number(r.get(MIOU))]
        return max(scored, key=lambda r: r[MIOU]) if scored else None

    @property
    def curve(self) -> list[dict]:
        """The learning curve: per validated step (the last record of a step validated twice, as after
        a resume), images seen (step x global batch), minutes of training (the train records' own seconds
        up to the last record at or before the step, so validation, saves and restarts are not counted;
        log every few steps for a finer clock) and mIoU."""
        by_step = {r[STEP]: r[MIOU] for r in self.val if _number(r.get(MIOU))}
        batch = self.config.train.global_batch
        seconds = sorted((r[STEP], r["seconds"]) for r in self.train
                         if isinstance(r.get(STEP), int) and _number(r.get("seconds")))
        points = []
        for step in sorted(by_step):
            spent = sum(sec for s, sec in seconds if s <= step)
            points.append({"step": step, "images": step * batch,
                           "minutes": round(spent / 60, 3) if seconds else None, "miou": by_step[step]})
        return points

    @property
    def part_iou(self) -> list[float | None] | None:
        """Per part, the mean IoU of the two hands at the best validation (a hand never counted for
        that part is left out of the mean)."""
        best = self.best
        if best is None or not isinstance(best.get(PART_IOU), dict):
            return None
        out = []
        for c in range(NUM_PARTS):
            values = [best[PART_IOU][h][c] for h in HANDS
                      if h in best[PART_IOU] and _number(best[PART_IOU][h][c])]
            out.append(sum(values) / len(values) if values else None)
        return out


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------------
# Reading runs


def is_run(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file()


def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders from the arguments: each a run, or a folder whose direct subfolders hold runs."""
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise ReportError(f"{path}: no such folder")
        if is_run(path):
            runs = [path]
        else:
            runs = sorted(p for p in path.iterdir() if p.is_dir() and is_run(p))
            if not runs:
                raise ReportError(f"{path}: not a run folder (no {CONFIG_FILE}) and holds no run folders")
        for run in runs:
            if run.resolve() not in [f.resolve() for f in found]:
                found.append(run)
    return found


def read_run(folder: Path) -> Run:
    config_path = folder / CONFIG_FILE
    try:
        table = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(table, dict):
        raise ReportError(f"{config_path}: expected a JSON object")
    try:
        config = from_dict(table, str(config_path))
    except ConfigError as e:
        raise ReportError(str(e)) from None
    try:
        records = read_metrics(folder / METRICS_FILE)
    except MetricsError as e:
        raise ReportError(str(e)) from None
    train = [r for r in records if r.get(KIND) == TRAIN_KIND]
    val = [r for r in records if r.get(KIND) == VAL_KIND]
    for r in val:
        if _number(r.get(MIOU)) and not isinstance(r.get(STEP), int):
            raise ReportError(f"{folder / METRICS_FILE}: a validation record without an integer {STEP!r}")
    starts = [r for r in records if r.get(KIND) == START_KIND]
    return Run(folder, folder.name, config, train, val, starts[-1] if starts else None)


# ---------------------------------------------------------------------------------------------------
# The recipe in a few words


def model_summary(cfg: Config) -> str:
    m = cfg.model
    if m.name.startswith("unet"):
        text = f"{m.name} c{m.base_channels}"
    else:
        text = f"{m.name} R{m.encoder_depth}"
        if m.name == "resnet_unet" and m.encoder_layers != 4:
            text += f" {m.encoder_layers} layers"
        if m.name == "resnet_unet" and not m.stage_heads:
            text += " no-heads"
    if m.attention and m.name != "unet_attention":
        text += " +att"
    if m.pretrained:
        text += " +pretrained"
    return text


def augment_summary(cfg: Config) -> str:
    a = cfg.augment
    if not a.enabled:
        return "off"
    text = f"{a.shift:g}/{a.scale:g}/{a.rotation:g}/{a.colour:g}"
    if a.flip != 0.5:
        text += f" flip {a.flip:g}"
    return text


def extras_summary(cfg: Config) -> str:
    parts = []
    if cfg.train.ema > 0:
        parts.append(f"EMA {cfg.train.ema:g}")
    if cfg.train.tta_flip:
        parts.append("flip TTA")
    if cfg.loss.stage_weight > 0:
        parts.append(f"deep supervision {cfg.loss.stage_weight:g}")
    if cfg.model.name == "resnet_unet" and not cfg.model.normalize_input:
        parts.append("raw BGR input")
    if cfg.loss.class_weights:
        parts.append("class weights")
    return ", ".join(parts) or DASH


# ---------------------------------------------------------------------------------------------------
# Rows, table, charts


def _fmt(value, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if _number(value) else DASH


def row_of(run: Run, baseline: Run | None) -> dict:
    best = run.best
    cfg = run.config
    miou = best[MIOU] if best else None
    base_best = baseline.best if baseline is not None else None
    delta = miou - base_best[MIOU] if best and base_best else None
    return {
        "run": run.name,
        "path": str(run.path),
        "model": model_summary(cfg),
        "loss": cfg.loss.name,
        "augment": augment_summary(cfg),
        "extras": extras_summary(cfg),
        "input_size": cfg.data.input_size,
        "global_batch": cfg.train.global_batch,
        "steps_done": run.steps_done,
        "steps_planned": cfg.train.steps,
        "images_per_s": run.images_per_s,
        "device": run.device,
        "miou": miou,
        "occluded_miou": best.get(OCCLUDED) if best else None,
        "best_step": best.get(STEP) if best else None,
        "part_iou": run.part_iou,
        "delta_miou": delta,
        "curve": run.curve,
    }


def sort_rows(rows: list[dict]) -> list[dict]:
    """Best validation mIoU first; runs without one last, in the order given."""
    scored = sorted((r for r in rows if _number(r["miou"])), key=lambda r: -r["miou"])
    return scored + [r for r in rows if not _number(r["miou"])]


def markdown(rows: list[dict], baseline: str | None) -> str:
    head = ["#", "run", "model", "loss", "aug t/s/r/c", "extras", "input", "batch", "steps", "device",
            "images/s", "val mIoU", "occluded mIoU", "best step"]
    if baseline:
        head.append(f"Δ mIoU vs {baseline}")
    lines = ["# Results", "",
             "Best validation mIoU (leaderboard rule) of each run; the occluded-region mIoU and the per-part "
             "IoU are from that same validation. images/s: median over the run's train records.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows, 1):
        steps = str(r["steps_done"] or 0)
        if r["steps_done"] != r["steps_planned"]:
            steps += f" of {r['steps_planned']}"  # unfinished (or stopped) runs say so
        cells = [str(i), f"`{r['run']}`", r["model"], r["loss"], r["augment"], r["extras"], str(r["input_size"]),
                 str(r["global_batch"]), steps, r["device"] or DASH, _fmt(r["images_per_s"], 1), _fmt(r["miou"]),
                 _fmt(r["occluded_miou"]), DASH if r["best_step"] is None else str(r["best_step"])]
        if baseline:
            cells.append(DASH if r["delta_miou"] is None else f"{r['delta_miou']:+.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Per-part IoU at the best validation (mean of the two hands)", "",
              "Parts: " + ", ".join(f"{s} = {n}" for s, n in zip(PART_SHORT[1:], PART_NAMES[2:])) + ".", "",
              "| run | " + " | ".join(PART_SHORT) + " |", "|" + "---|" * (NUM_PARTS + 1)]
    for r in rows:
        parts = r["part_iou"] or [None] * NUM_PARTS
        lines.append(f"| `{r['run']}` | " + " | ".join(_fmt(v, 2) for v in parts) + " |")
    lines += ["", "## Learning curves", "",
              "Validation mIoU at each validation: images seen (step x global batch), and minutes of training.", ""]
    for r in rows:
        if r["curve"]:
            points = ", ".join(f"{p['images']}: {p['miou']:.4f}" for p in r["curve"])
            lines.append(f"- `{r['run']}`: {points}")
    lines += ["", "![validation mIoU per run](miou.png)", "", "![learning curves](curves.png)", "",
              "![per-part IoU per run](parts.png)", ""]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def miou_chart(rows: list[dict], path: Path, baseline_row: dict | None) -> None:
    plt = _pyplot()
    names = [r["run"] for r in rows]
    miou = [r["miou"] if _number(r["miou"]) else 0.0 for r in rows]
    occ = [r["occluded_miou"] if _number(r["occluded_miou"]) else 0.0 for r in rows]
    show_occ = any(_number(r["occluded_miou"]) for r in rows)
    height = max(2.5, 0.42 * len(rows) + 1.2)
    fig, ax = plt.subplots(figsize=(9, height))
    y = list(range(len(rows)))
    bar = 0.38 if show_occ else 0.7
    ax.barh([v - (bar / 2 if show_occ else 0) for v in y], miou, height=bar, color="#3b75af", label="val mIoU")
    if show_occ:
        ax.barh([v + bar / 2 for v in y], occ, height=bar, color="#ef8636", label="occluded-region mIoU")
    top = max(miou + occ + [1e-3])
    xmax = min(1.0, top * 1.2)  # scaled to the data: early or CPU-budget runs have small values
    for i, r in enumerate(rows):
        text = _fmt(r["miou"]) if _number(r["miou"]) else "no validation"
        ax.text(miou[i] + 0.01 * xmax, y[i] - (bar / 2 if show_occ else 0), text, va="center", fontsize=8)
    if baseline_row is not None and _number(baseline_row["miou"]):
        ax.axvline(baseline_row["miou"], color="grey", linestyle="--", linewidth=1,
                   label=f"baseline {baseline_row['run']}")
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()  # best run on top
    ax.set_xlim(0, xmax)
    ax.set_xlabel("mIoU (leaderboard rule)")
    ax.set_title("Validation mIoU per run")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def curves_chart(rows: list[dict], path: Path) -> None:
    """Validation mIoU against images seen (left) and against minutes of training (right), one line per
    run: where a run is in its learning, which one end point hides."""
    plt = _pyplot()
    fig, (by_images, by_minutes) = plt.subplots(1, 2, figsize=(13, 5))
    for r in rows:
        curve = r["curve"]
        if not curve:
            continue
        line, = by_images.plot([p["images"] for p in curve], [p["miou"] for p in curve], marker=".",
                               linewidth=1.2, label=r["run"])
        timed = [p for p in curve if p["minutes"] is not None]
        if timed:
            by_minutes.plot([p["minutes"] for p in timed], [p["miou"] for p in timed], marker=".",
                            linewidth=1.2, color=line.get_color())
    by_images.set_xlabel("images seen")
    by_minutes.set_xlabel("minutes of training (validation and saves not counted)")
    for ax in (by_images, by_minutes):
        ax.set_ylabel("validation mIoU")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    by_images.set_title("Learning per image")
    by_minutes.set_title("Learning per minute")
    if by_images.lines:
        by_images.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def parts_chart(rows: list[dict], path: Path) -> None:
    plt = _pyplot()
    import numpy as np

    data = np.array([[v if _number(v) else np.nan for v in (r["part_iou"] or [None] * NUM_PARTS)] for r in rows],
                    dtype=float).reshape(len(rows), NUM_PARTS)
    height = max(2.5, 0.38 * len(rows) + 1.6)
    fig, ax = plt.subplots(figsize=(11, height))
    image = ax.imshow(np.ma.masked_invalid(data), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for i in range(data.shape[0]):
        for j in range(NUM_PARTS):
            v = data[i, j]
            ax.text(j, i, DASH if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if not np.isnan(v) and v > 0.6 else "white")
    ax.set_xticks(range(NUM_PARTS), PART_SHORT, fontsize=8)
    ax.set_yticks(range(len(rows)), [r["run"] for r in rows], fontsize=8)
    ax.set_facecolor("#cccccc")
    ax.set_title("Per-part IoU at the best validation (mean of the two hands; 1/2/3 = proximal/middle/distal)")
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def pick_baseline(runs: list[Run], name: str) -> Run:
    exact = [r for r in runs if r.name == name]
    matches = exact or [r for r in runs if name in r.name]
    if len(matches) != 1:
        known = ", ".join(r.name for r in runs)
        what = "no run" if not matches else f"{len(matches)} runs"
        raise ReportError(f"--baseline {name!r}: {what} match (runs: {known})")
    return matches[0]


def report(paths: list[Path], out_dir: Path, baseline: str | None = None) -> list[dict]:
    runs = [read_run(p) for p in find_runs(paths)]
    base = pick_baseline(runs, baseline) if baseline else None
    rows = sort_rows([row_of(r, base) for r in runs])
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, base.name if base else None)
    write_atomic(out_dir / "results.md", lambda tmp: tmp.write_text(text))
    write_atomic(out_dir / "results.json", lambda tmp: tmp.write_text(json.dumps(rows, indent=1) + "\n"))
    base_row = next((r for r in rows if base is not None and r["run"] == base.name), None)
    miou_chart(rows, out_dir / "miou.png", base_row)
    parts_chart(rows, out_dir / "parts.png")
    curves_chart(rows, out_dir / "curves.png")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="amodal-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUNS", help="run folders or folders of runs")
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="DIR", help="folder for the report")
    parser.add_argument("--baseline", metavar="RUN", help="run to compare every mIoU with (a name or part of one)")
    args = parser.parse_args(argv)
    try:
        rows = report(args.runs, args.output, args.baseline)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(rows)} runs -> {args.output / 'results.md'}, miou.png, curves.png, parts.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
