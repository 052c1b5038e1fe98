"""Atomic file writes: what the project writes lands whole or not at all (temporary name in the same
folder, fsync, rename, fsync of the folder), so a kill or a full disk never leaves a half file under a
real name."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """fsync a file or a folder by name (a folder's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: str | Path, final: str | Path) -> None:
    """fsync the finished temporary file, rename it over the final name, fsync the folder."""
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(Path(final).parent)


def write_atomic(path: str | Path, write) -> None:
    """write(tmp_path) fills a temporary file next to path, which then replaces path whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))
