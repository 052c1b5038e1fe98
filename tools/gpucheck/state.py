"""What the stages share: the check's settings and sizes, and a stage's result as it is written."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "jobs" / "train.toml"
RECIPE_STEPS = 30_000


@dataclass(frozen=True)
class Sizes:
    """How big each stage's work is: the full run, or the rehearsal's tiny one."""

    data: tuple[int, int, int]  # synthetic train / val / test images
    depth: int  # ResNet depth of the bench stage (and of the recipe in the rehearsal)
    input: int
    batch: int
    bench_batch: int
    bench_steps: int
    bench_rounds: int
    workers: list[int] | None  # the loader stage's worker counts; None: chosen from the cores
    loader_seconds: float
    rate_seconds: float
    train_seconds: float
    export: int
    overrides: list[str]


FULL = Sizes(data=(2048, 256, 1000), depth=50, input=128, batch=32, bench_batch=32, bench_steps=20, bench_rounds=3,
             workers=None, loader_seconds=3.0, rate_seconds=5.0, train_seconds=55.0, export=1000, overrides=[])
# The rehearsal trains 30 s: at 15 s a busy 2-core machine (load 12-15) stopped it before its first
# validation (the tests, the gpu-rehearsal and the stage alone all saw it).
QUICK = Sizes(data=(64, 16, 32), depth=18, input=64, batch=4, bench_batch=2, bench_steps=1, bench_rounds=1,
              workers=[1, 2], loader_seconds=1.5, rate_seconds=2.0, train_seconds=30.0, export=32,
              overrides=["data.num_workers=1"])


@dataclass(frozen=True)
class Check:
    """One run of the check, as every stage is given it."""

    device: str  # "cuda" or "cpu"
    quick: bool
    work: Path  # scratch folder: data, runs, the stages' results
    train_seconds: float = 0.0  # the train stage's time; 0: the size's default

    @property
    def sizes(self) -> Sizes:
        return QUICK if self.quick else FULL

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def data_root(self) -> Path:
        train, val, test = self.sizes.data
        return self.work / f"data-{train}-{val}-{test}"

    def recipe_overrides(self) -> list[str]:
        """The default recipe on this check's data, device and sizes; tracking off (wandb is optional here)."""
        s = self.sizes
        out = [f"data.root={json.dumps(str(self.data_root()))}", "data.make_synthetic=false", "tracking.wandb=\"off\"",
               f"train.device=\"{self.device}\""]
        if self.quick:
            out += [f"model.encoder_depth={s.depth}", f"data.input_size={s.input}", f"train.global_batch={s.batch}"]
        return out + s.overrides


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)


@dataclass
class StageRecord:
    """What a stage measured: <work>/<stage>.json, read back by the parent for the report."""

    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    summary: str = ""
    error: str | None = None
    values: dict = field(default_factory=dict)
    traceback: str | None = None

    @classmethod
    def read(cls, path: Path) -> StageRecord:
        """The record a stage left; an empty one where it left none (it died before writing)."""
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return cls()
        return cls(tables=[Table(**t) for t in data.get("tables", [])], notes=data.get("notes", []),
                   summary=data.get("summary", ""), error=data.get("error"), values=data.get("values", {}),
                   traceback=data.get("traceback"))


class Result:
    """A stage's record, written to <work>/<stage>.json after every change (a stage stopped by its
    budget keeps what it measured)."""

    def __init__(self, path: Path):
        self.path = path
        self.record = StageRecord()
        self.flush()

    def table(self, title: str, columns: list[str]) -> list:
        table = Table(title, columns)
        self.record.tables.append(table)
        self.flush()
        return table.rows

    def add(self, rows: list, *row) -> list:
        rows.append([cell(v) for v in row])
        self.flush()
        return rows[-1]

    def note(self, text: str) -> None:
        self.record.notes.append(text)
        print(f"note: {text}", flush=True)
        self.flush()

    def value(self, key: str, value) -> None:
        self.record.values[key] = value
        self.flush()

    def summary(self, text: str) -> None:
        self.record.summary = text
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.record), indent=1))
        os.replace(tmp, self.path)


def cell(v) -> str:
    """A value as a table cell: numbers to a readable precision, nothing that breaks a markdown row."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}" if abs(v) < 1 else f"{v:.1f}"
    return str(v).replace("|", "\\|").replace("\n", " ")
