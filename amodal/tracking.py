"""The record of a training run: log.txt and metrics.jsonl (RunLog, read back by read_metrics), and the
wandb run (Tracker).

Both are written by rank 0 only. metrics.jsonl is the complete record (one JSON object per event);
wandb is the dashboard beside it.

Experiment tracking uses the real wandb library.

`tracking.wandb` picks the mode:
- auto: online when the user configured a key (WANDB_API_KEY, or a netrc entry for the wandb host),
  else offline (the run is written under <run>/wandb and can be uploaded later with `wandb sync`);
  WANDB_MODE in the environment, when set, wins over this guess;
- online, offline: as named; off: no wandb at all (not even imported).

The run id is chosen here (or taken from the checkpoint of a resumed job) and passed with
resume="allow", so a requeued job continues the same wandb run. The API key is never read into the
config, a log line or a checkpoint: wandb reads it from the environment itself.
"""

from __future__ import annotations

import json
import netrc
import os
import secrets
import string
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

MODES = ("auto", "online", "offline", "off")
LAST_STEP_FILE = "last_step"
METRICS_FILE = "metrics.jsonl"


class MetricsError(ValueError):
    """A metrics.jsonl line that is not a JSON object (the message names the file and line)."""


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl (RunLog.event), oldest first; [] when there is none yet. A last
    line cut short (a killed writer, or one being written right now) is dropped; a broken line before
    it is a MetricsError naming the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                break
            raise MetricsError(f"{path}:{number}: not a JSON record ({e})") from None
        if not isinstance(record, dict):
            raise MetricsError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def read_last_step(run_dir: str | Path) -> int | None:
    """The last step a run trained (<run>/last_step, see RunLog.step_done), None before its first step."""
    try:
        return int((Path(run_dir) / LAST_STEP_FILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


class RunLog:
    """log.txt, metrics.jsonl and the terminal, written by rank 0 only (others get a RunLog that writes
    nothing). A progress bar on a terminal, plain lines elsewhere (Slurm logs). Kept as our own small
    class rather than the logging module with tqdm.contrib.logging: metrics.jsonl is structured records,
    not log lines, and log.txt needs only a time stamp."""

    def __init__(self, run_dir: Path, main: bool):
        self.main = main
        self.bar = None
        if main:
            self._log = open(run_dir / "log.txt", "a", buffering=1)
            self._metrics = open(run_dir / METRICS_FILE, "a", buffering=1)
            self._last_step = os.open(run_dir / LAST_STEP_FILE, os.O_WRONLY | os.O_CREAT, 0o644)

    def step_done(self, step: int) -> None:
        """Rewrite <run>/last_step after every step: one small write, no fsync. A job killed without
        warning (or one that saved a step earlier than its last) leaves there how far it got, so its
        next start can count the steps it trains again (amodal/requeues.py, requeues.json)."""
        if self.main:
            os.pwrite(self._last_step, f"{step:>12d}\n".encode(), 0)  # fixed width: nothing to truncate

    def info(self, message: str, echo: bool = True) -> None:
        if not self.main:
            return
        self._log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        if not echo:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def event(self, kind: str, **fields) -> None:
        if self.main:
            self._metrics.write(json.dumps({"event": kind, "time": round(time.time(), 3), **fields}) + "\n")

    def start_bar(self, total: int, initial: int) -> None:
        """A progress bar when rank 0 writes to a terminal."""
        if self.main and sys.stdout.isatty() and initial < total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stdout)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        if self.main:
            self.close_bar()
            self._log.close()
            self._metrics.close()
            os.close(self._last_step)


def has_api_key() -> bool:
    """Whether wandb would find a key: WANDB_API_KEY, or a netrc entry for the wandb host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(mode: str) -> str:
    """online | offline | off, from the configured mode (see the module note)."""
    if mode not in MODES:
        raise ValueError(f"tracking.wandb: {mode!r} is not one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if env_mode in ("online", "offline"):
        return env_mode
    if env_mode in ("disabled", "off", "dryrun"):
        return "off" if env_mode != "dryrun" else "offline"
    return "online" if has_api_key() else "offline"


def new_run_id() -> str:
    """A wandb-style run id (8 characters of [a-z0-9]) from the OS's randomness, not from any seeded
    generator, so that two runs with the same seed still get different ids."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


class Tracker:
    """A thin wrapper: log(metrics, step) and finish(); does nothing when tracking is off.

    The tracking backend can never stop training or a save: any error of wandb (its service process
    killed by the signal Slurm sends every process of a job step, a full disk, no network, a wandb bug)
    becomes one warning line, tracking stops for the rest of this process, and metrics.jsonl stays the
    complete record. The run id is kept, so the next start continues the same wandb run.
    """

    def __init__(self, run=None, mode: str = "off"):
        self.run = run
        self.mode = mode
        self.run_id = run.id if run is not None else None

    def _call(self, what: str, *args, **kwargs) -> None:
        if self.run is None:
            return
        try:
            getattr(self.run, what)(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - whatever the backend raises, training goes on
            print(f"warning: wandb {what} failed ({type(e).__name__}: {e}); tracking stops here, "
                  f"metrics.jsonl keeps the record", file=sys.stderr, flush=True)
            self.run, self.mode = None, "failed"
            self._teardown()

    @staticmethod
    def _teardown() -> None:
        """Let go of wandb's service process now, not in wandb's exit hook: by the time the process
        ends, Slurm's SIGTERM (sent to every process of a job it requeues or preempts) may have killed
        the service, and the hook would print a traceback (ConnectionResetError) into the job's log.
        wandb.teardown takes that hook down first; if the service is gone it then fails here, ignored."""
        import wandb

        try:
            wandb.teardown()
        except Exception:  # noqa: BLE001 - the service is gone; there is nothing left to close
            pass

    def log(self, metrics: dict, step: int) -> None:
        self._call("log", metrics, step=step)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        self._call("finish", exit_code=exit_code)
        if self.run is not None:  # finished (a failed call has let go of wandb already)
            self.run = None
            self._teardown()


def start_tracking(cfg, run_dir: str | Path, run_id: str | None, is_main: bool = True) -> Tracker:
    """Start (or continue, when run_id is given) the wandb run of this training run.

    `cfg` is the whole amodal Config; its tracking table picks the mode and project, and its dict is
    the wandb config. Only rank 0 tracks; other ranks get a Tracker that does nothing. A wandb that
    cannot start online falls back to offline; one that cannot start at all is a warning, not an
    error (see Tracker).
    """
    mode = resolve_mode(cfg.tracking.wandb)
    if not is_main or mode == "off":
        return Tracker(None, "off")
    import wandb

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_id = run_id or new_run_id()
    kwargs = dict(
        dir=str(run_dir),
        id=run_id,
        resume="allow",
        project=cfg.tracking.project,
        entity=cfg.tracking.entity or None,
        name=cfg.name,
        config=cfg.to_dict(),
        # Console capture would wrap stdout (our progress bar and Slurm log); log.txt has the output.
        settings=wandb.Settings(console="off", silent=True),
    )
    for attempt in (mode, "offline") if mode == "online" else (mode,):
        try:
            return Tracker(wandb.init(mode=attempt, **kwargs), attempt)
        except Exception as e:  # noqa: BLE001 - no network, a full disk, a wandb bug
            # A compute node without internet access: keep the record offline; `wandb sync
            # <run>/wandb/offline-run-*` uploads it later.
            print(f"warning: wandb {attempt} start failed ({type(e).__name__}: {e})"
                  + ("; trying offline" if attempt == "online" else "; training without wandb"),
                  file=sys.stderr, flush=True)
    tracker = Tracker(None, "failed")
    tracker.run_id = run_id  # a later start may still continue this run
    return tracker
