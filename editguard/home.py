"""Where editguard keeps what it builds once (converted demo models, statistics, ...)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from pathlib import Path

from .errors import EditguardError


def user_path(text: str | os.PathLike) -> Path:
    """A path as the user typed it, `~` and `~user` expanded (a `~user` with no home is one clear error)."""
    try:
        return Path(text).expanduser()
    except RuntimeError:  # pathlib: "Could not determine home directory."
        raise EditguardError(f"{text}: no home folder for that user, so its '~' cannot be expanded") from None


def home() -> Path:
    """`$EDITGUARD_HOME`, else `$XDG_CACHE_HOME/editguard`, else `~/.cache/editguard`; absolute (what is
    built there is linked to from temporary folders elsewhere)."""
    env = os.environ.get("EDITGUARD_HOME")
    if env:
        return user_path(env).absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = user_path(xdg).absolute() if xdg else Path.home() / ".cache"
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
    `busy`, a process that finds it held stops with that message instead of waiting. The lock file is
    removed on release: locks keyed by passing paths (each bank filled, each .gguf converted) would
    otherwise pile up in the cache, one per path, forever."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0))
        except BlockingIOError:
            handle.close()
            raise EditguardError(busy) from None
        # The holder before us may have removed the file while we waited on it: a lock on a name nobody
        # else opens any more is no lock, so take the file now at `path` instead.
        if _same_file(path, handle.fileno()):
            break
        handle.close()
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # before the release, so no one can lock this file after us and miss the new one
        handle.close()  # releases the lock


def path_lock(kind: str, path: Path, busy: str):
    """One process at a time writes the file at `path` (an edit bank, a mask and its training run): a
    second stops with `busy`. The lock lives in editguard's cache, not beside the user's file."""
    try:
        where = str(Path(path).resolve())
    except (RuntimeError, OSError):  # a link loop: the output checks name it
        where = os.path.abspath(path)
    key = hashlib.sha256(where.encode()).hexdigest()[:16]
    return file_lock(cache_dir("locks") / f"{kind}-{key}.lock", busy=busy)


def _same_file(path: Path, fd: int) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)
