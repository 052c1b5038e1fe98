"""Node-local staging (FORMAT.md, "Staging"): a job copies the shards it reads from the shared folder to
the node's own disk once per node, checks each against the manifest's sha256, and reads them there.

    root = stage_data(cfg.data, splits)   # the folder to read: the staged copy, or data.root

Where to: `data.stage` = "auto" ($SLURM_TMPDIR, else $TMPDIR; nothing to do when neither is set or when
it is on the same file system as data.root), "off", or a folder. The copy of a dataset lives in
<base>/amodal-shards-<fingerprint[:16]>/ beside a lock file and `staged.json`, which lists the shards
that are complete and verified:

- Ranks of one node (and jobs sharing the folder) take an exclusive fcntl.flock on `.lock` in turn:
  the first copies, the others find the shards listed and return at once.
- Each shard is copied to `<file>.tmp-<pid>` while hashing it, fsynced, compared with the manifest's
  sha256, renamed into place, and only then listed in staged.json (written atomically). A copy killed
  by a signal leaves a temporary file and no entry; the next holder of the lock deletes it and copies
  again. Nothing is read from the staged folder before every shard it needs is listed.
- No room (too little free space before starting, or ENOSPC / EFBIG / EDQUOT while writing), or a
  folder it may not write in: the partial file is removed and the job reads the shared folder, with
  one warning.
- A shard whose hash does not match its manifest is a ShardError naming the shared file: the shared
  copy is damaged, and reading it in place would not be better.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from amodal.config import ConfigError
from amodal.data.format import MANIFEST, ShardError, read_manifest, splits_of
from amodal.fileio import commit, write_text_atomic

MARKER = "staged.json"
LOCK = ".lock"
CHUNK = 1 << 22  # bytes per read and write of a copy
HEADROOM = 1 << 28  # left free on the node's disk after staging (256 MiB): other jobs write there too
NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
CANNOT_WRITE = (errno.EACCES, errno.EPERM, errno.EROFS)  # a node-local folder we may not use: read in place


@dataclass
class Staged:
    root: Path  # the folder to read
    note: str  # one line for the run log: what was done
    copied: list[str] = field(default_factory=list)  # the shards this process copied
    fell_back: bool = False  # no room: reading the shared folder


def stage_base(stage: str, root, env=os.environ) -> Path | None:
    """The folder that data.stage asks to stage into, or None (read data.root in place)."""
    if stage == "off":
        return None
    if stage != "auto":
        folder = Path(os.path.expandvars(stage)).expanduser()
        if not folder.is_absolute():
            raise ConfigError(f"data.stage = {stage!r}: {folder} is not an absolute folder here (a variable "
                              "that is not set?)")
        return folder
    local = env.get("SLURM_TMPDIR") or env.get("TMPDIR")
    if not local or not Path(local).is_dir():
        return None
    with contextlib.suppress(OSError):
        if os.stat(local).st_dev == os.stat(root).st_dev:
            return None  # the data is on the node's own file system already
    return Path(local)


def stage_data(data_cfg, splits: Sequence[str], warn: bool = True, progress: Callable | None = None) -> Staged:
    """Stage the shards of `splits` of data_cfg.root as data_cfg.stage says (module note). warn: print
    the no-room warning (one process per node does: the others share its disk and its fate)."""
    root = Path(data_cfg.root)
    base = stage_base(data_cfg.stage, root)
    if base is None:
        why = "data.stage = off" if data_cfg.stage == "off" else "no node-local folder ($SLURM_TMPDIR, $TMPDIR) " \
              "on another file system"
        return Staged(root, f"reading {root} in place ({why})")
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"data.stage = {data_cfg.stage!r}: cannot create {base}: {e}") from None
    return stage_shards(root, splits, base, warn, progress)


def stage_shards(root, splits: Sequence[str], base, warn: bool = True, progress: Callable | None = None) -> Staged:
    """Copy the shards of `splits` under root into base/amodal-shards-<fingerprint>/ (module note).
    progress(file, bytes_done, bytes_total) is called after each block written."""
    root, base = Path(root), Path(base)
    manifest = read_manifest(root)
    entries = [e for s in splits_of(manifest, splits) for e in manifest["splits"][s]["shards"]]
    dest = base / f"amodal-shards-{manifest['fingerprint'][:16]}"
    try:
        dest.mkdir(parents=True, exist_ok=True)
        lock = open(dest / LOCK, "a")
    except OSError as err:
        if err.errno not in CANNOT_WRITE + NO_ROOM:
            raise
        return _fall_back(root, f"cannot write in {dest}: {os.strerror(err.errno)}", warn)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        done = _read_marker(dest)
        todo = [e for e in entries
                if done.get(e["file"]) != e["sha256"] or not _has_size(dest / e["file"], e["bytes"])]
        if not todo:
            return Staged(dest, f"reading {dest} (staged from {root})")
        for tmp in dest.glob("*.tmp-*"):  # left by a copy that was killed; we hold the lock
            tmp.unlink()
        need = sum(e["bytes"] for e in todo)
        free = shutil.disk_usage(dest).free
        if free < need + HEADROOM:
            return _fall_back(root, f"no room: {need / 2**20:.0f} MiB to stage, {free / 2**20:.0f} MiB free on "
                                    f"{dest}", warn)
        copied = []
        try:
            if not (dest / MANIFEST).is_file():
                write_text_atomic(dest / MANIFEST, (root / MANIFEST).read_text())
            for e in todo:
                _copy_verified(root / e["file"], dest / e["file"], e, progress)
                copied.append(e["file"])
                done[e["file"]] = e["sha256"]
                write_text_atomic(dest / MARKER, json.dumps({"files": done}, indent=1, sort_keys=True) + "\n")
        except OSError as err:
            if err.errno not in NO_ROOM + CANNOT_WRITE:
                raise
            return _fall_back(root, f"no room: {os.strerror(err.errno)} while copying to {dest}", warn)
    return Staged(dest, f"staged {len(copied)} shards ({need / 2**20:.1f} MiB) from {root} to {dest}", copied)


def _fall_back(root: Path, why: str, warn: bool) -> Staged:
    note = f"cannot stage the shards ({why}): reading {root} in place"
    if warn:
        print(f"warning: {note}", file=sys.stderr, flush=True)
    return Staged(root, note, fell_back=True)


def _read_marker(dest: Path) -> dict:
    try:
        return dict(json.loads((dest / MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # none yet, or unreadable: everything is copied again


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except FileNotFoundError:
        return False


def _copy_verified(src: Path, dst: Path, entry: dict, progress: Callable | None) -> None:
    """src to dst through a temporary file, hashed on the way; renamed into place only if the hash is
    the manifest's."""
    tmp = dst.with_name(f"{dst.name}.tmp-{os.getpid()}")
    h = hashlib.sha256()
    try:
        try:
            fi = open(src, "rb")
        except FileNotFoundError:
            raise ShardError(f"{src}: missing shard (listed in {src.parent / MANIFEST})") from None
        with fi, open(tmp, "wb") as fo:
            done = 0
            while block := fi.read(CHUNK):
                h.update(block)
                fo.write(block)
                done += len(block)
                if progress is not None:
                    progress(dst.name, done, entry["bytes"])
        if h.hexdigest() != entry["sha256"]:
            raise ShardError(f"{src}: sha256 {h.hexdigest()[:16]}… does not match the manifest's "
                             f"{entry['sha256'][:16]}… (the shared copy is damaged: amodal-verify)")
        commit(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
