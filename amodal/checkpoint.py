"""Checkpoints on disk (docs/design.md §3): atomic files, retention, and finding the newest one that loads.

Layout: `<run>/checkpoints/step-00001234.pt`, one file per save, plus `best.pt` (a hard link to the
step file with the best validation score, or a copy where links are not possible).

Every file is written to a temporary name in the same folder, flushed and fsynced, renamed over its
final name, and the folder is fsynced, so a crash at any moment leaves either the old or the new file,
never a half-written one under a final name. Files hold only tensors and plain Python values and are
read with `torch.load(weights_only=True)`, so loading a checkpoint never runs code.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import warnings
from pathlib import Path

from amodal.config import ConfigError
from amodal.fileio import fsync_path

CHECKPOINT_DIR = "checkpoints"
BEST_NAME = "best.pt"
_STEP_FILE = re.compile(r"^step-(\d{8,})\.pt$")
_TMP_MARK = ".tmp-"  # temporary files: .<final name>.tmp-<pid>

# What every checkpoint dict holds (docs/design.md §3). The trainer adds a few more (see train.py).
REQUIRED_KEYS = (
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "ema",
    "step",
    "epoch",
    "samples_seen",
    "global_batch",
    "fingerprint",
    "config",
    "wandb_run_id",
    "best_miou",
)


class CheckpointError(RuntimeError):
    pass


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def step_path(run_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step-{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every step file, oldest first. Temporary files are never listed."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _STEP_FILE.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


class _RecordingWriter:
    """A file wrapper that keeps the OS error of a failed write: torch.save turns it into an
    unreadable RuntimeError, and the user needs to read 'No space left on device'."""

    def __init__(self, f):
        self.f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_torch_save(obj, path: str | Path) -> None:
    """torch.save `obj` to `path` so that `path` is either the old file or the complete new one.

    On any failure (full disk, unwritable folder, file size limit) the temporary file is removed, an
    existing `path` is left untouched, and CheckpointError says which file and why.
    """
    import torch  # here: the launcher lists checkpoints without loading torch

    path = Path(path)
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")
    writer = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            writer = _RecordingWriter(f)
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except Exception as e:
        cause = writer.error if writer is not None and writer.error is not None else e
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            pass  # the folder itself is unusable; the message below says so
        if isinstance(cause, OSError):
            reason = f"{os.strerror(cause.errno) if cause.errno else cause} ({errno.errorcode.get(cause.errno, '?')})"
        else:
            reason = str(cause)
        raise CheckpointError(f"could not write checkpoint {path}: {reason}") from e


def _link_or_copy(source: Path, target: Path) -> None:
    """Make `target` the same content as `source`, atomically (hard link, else an fsynced copy)."""
    tmp = target.with_name(f".{target.name}{_TMP_MARK}{os.getpid()}")
    try:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_path(target.parent)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise CheckpointError(f"could not write checkpoint {target}: {os.strerror(e.errno) if e.errno else e}") from e


def _remove_stale_tmp(folder: Path) -> None:
    """Temporary files left by a process killed while saving (only the saving rank calls this)."""
    for path in folder.iterdir():
        if path.name.startswith(".") and _TMP_MARK in path.name:
            try:
                path.unlink()
            except OSError:
                pass


def save_checkpoint(state: dict, run_dir: str | Path, keep_last: int = 3, is_best: bool = False) -> Path:
    """Write `state` (which holds `step`) as the step file, update best.pt when `is_best`, then keep only
    the newest `keep_last` step files (best.pt is kept apart). Returns the step file's path."""
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint state lacks {', '.join(missing)}")
    run_dir = Path(run_dir)
    folder = checkpoint_dir(run_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"could not create checkpoint folder {folder}: {os.strerror(e.errno) if e.errno else e}") from e
    _remove_stale_tmp(folder)
    path = step_path(run_dir, int(state["step"]))
    atomic_torch_save(state, path)
    if is_best:
        _link_or_copy(path, folder / BEST_NAME)
    prune(run_dir, keep_last)
    return path


def prune(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step files (at least one is always kept)."""
    files = list_checkpoints(run_dir)
    for _, path in files[: max(0, len(files) - max(1, keep_last))]:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Read one checkpoint with weights_only=True; CheckpointError names the file when it cannot."""
    import torch

    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as e:  # truncated zip, garbage, unpicklable content: all mean "not a checkpoint"
        raise CheckpointError(f"{path}: not a loadable checkpoint ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds {type(state).__name__}, expected a dict)")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint of this project (lacks {', '.join(missing)})")
    return state


def _first_that_loads(paths: list[Path], map_location) -> tuple[Path, dict] | None:
    """(path, state) of the first of `paths` that loads; each one that does not is skipped with a
    warning (attributed to the caller of load_latest or load_best)."""
    for path in paths:
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint: {e}", stacklevel=3)
    return None


def load_latest(run_dir: str | Path, map_location="cpu") -> tuple[Path, dict] | None:
    """The newest checkpoint of a run that loads, as (path, state); None when the run has none.

    Step files are tried newest first; one that does not load (truncated, corrupt) is skipped with a
    warning. best.pt is the last resort. The state is returned so that the caller reads it once.
    """
    candidates = [path for _, path in reversed(list_checkpoints(run_dir))]
    best = checkpoint_dir(run_dir) / BEST_NAME
    if best.exists():
        candidates.append(best)
    return _first_that_loads(candidates, map_location)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Path of the newest checkpoint of the run that loads (see load_latest), or None."""
    found = load_latest(run_dir)
    return None if found is None else found[0]


def load_best(run_dir: str | Path, map_location="cpu") -> tuple[Path, dict] | None:
    """best.pt of a run as (path, state) when it exists and loads, else None (with a warning when it
    exists but does not load)."""
    path = checkpoint_dir(run_dir) / BEST_NAME
    return _first_that_loads([path] if path.exists() else [], map_location)


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """Path of best.pt when it exists and loads, else None."""
    found = load_best(run_dir)
    return None if found is None else found[0]


def check_compatible(state: dict, *, fingerprint: str, global_batch: int, source: str = "checkpoint",
                     allow_mismatch: bool = False, extra: dict | None = None) -> list[str]:
    """Refuse to resume a checkpoint made on other data or with another global batch size.

    Returns the list of differences (empty when none). Raises CheckpointError naming them and the
    override unless `allow_mismatch`. `extra` maps further names to (checkpoint value, current value).
    """
    problems = []
    if state.get("fingerprint") != fingerprint:
        problems.append(f"data fingerprint {state.get('fingerprint')!r} in the checkpoint, {fingerprint!r} now")
    if state.get("global_batch") != global_batch:
        problems.append(f"train.global_batch {state.get('global_batch')} in the checkpoint, {global_batch} now")
    for name, (then, now) in (extra or {}).items():
        if then != now:
            problems.append(f"{name} {then!r} in the checkpoint, {now!r} now")
    if problems and not allow_mismatch:
        raise CheckpointError(
            f"refusing to resume from {source}: " + "; ".join(problems)
            + ". Use another run folder, or --set checkpoint.allow_mismatch=true to resume anyway."
        )
    return problems


def check_finished_source(cfg) -> None:
    """For a retrain_full job with `from_run`: that run must have finished (a checkpoint at its last
    step), since its step count is the one retraining takes. ConfigError otherwise."""
    if cfg.job != "retrain_full" or not cfg.from_run:
        return
    last = list_checkpoints(cfg.from_run)
    done = last[-1][0] if last else 0
    if done < cfg.train.steps:
        raise ConfigError(f"from_run = {cfg.from_run}: not finished (checkpoint at step {done} of "
                          f"{cfg.train.steps})")
