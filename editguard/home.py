"""Where editguard keeps what it builds once (converted demo models, statistics, ...)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from .errors import EditguardError


def home() -> Path:
    """`$EDITGUARD_HOME`, else `$XDG_CACHE_HOME/editguard`, else `~/.cache/editguard`."""
    env = os.environ.get("EDITGUARD_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "editguard"


def cache_dir(*parts: str) -> Path:
    path = home().joinpath(*parts)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EditguardError(f"cannot create editguard's cache folder {path} ({exc.strerror}); set EDITGUARD_HOME "
                             "to a writable folder") from None
    return path


@contextlib.contextmanager
def folder_lock(folder: Path):
    """An exclusive advisory lock on a folder itself (its descriptor), for a read-modify-write of a file in
    it that is replaced by rename: no lock file is left among the user's files."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def file_lock(path: Path, busy: str | None = None):
    """An exclusive advisory lock, so two processes building the same artefact wait for each other; with
    `busy`, a process that finds it held stops with that message instead of waiting."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0))
        except BlockingIOError:
            raise EditguardError(busy) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
