"""Where editguard may write: never into, over or around its inputs, and never over something that is
not its own kind of output. Commands check before the work starts; the writers check again."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from .errors import EditguardError
from .home import user_path


class Created(str):
    """A folder the run creates while it reads (an offload folder): it overlaps the output even before it
    exists, where a missing input is skipped (it may be a hub id)."""


def _overlap(out: Path, inputs: Iterable[str | os.PathLike | None]) -> Path | None:
    """The first local input that `out` equals, holds or sits inside (inputs that are no local path, such
    as a hub id, are skipped unless `Created`). Both the path as given and its link target count: a Hugging
    Face cache snapshot holds links into its blobs."""
    for item in inputs:
        if item is None or not (isinstance(item, Created) or user_path(item).exists()):
            continue
        item = user_path(item)
        for source in {Path(os.path.abspath(item)), item.resolve()}:
            if out == source or source.is_relative_to(out) or out.is_relative_to(source):
                return source
            if _within(out, source) or _within(source, out):
                return source
    return None


def _within(inner: Path, outer: Path) -> bool:
    """`inner` is `outer` or lies inside it by file identity: the same folder under another spelling (a
    case-insensitive file system, a bind mount) that the path comparison above cannot see."""
    if not outer.exists():
        return False
    return any(p.exists() and os.path.samefile(p, outer) for p in (inner, *inner.parents))


def _parent_is_writable(out: Path) -> None:
    """The nearest existing folder above `out` must be one we may write into: say so before the work, not
    after it (a scan can take minutes before its report is written)."""
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise EditguardError(f"cannot write {out}: {parent} is not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise EditguardError(f"cannot write {out}: no permission to write in {parent}")
            try:  # permission bits do not tell everything (root, read-only mounts, /proc): try a file there
                with tempfile.NamedTemporaryFile(dir=parent, prefix=".editguard-probe-"):
                    pass
            except OSError as e:
                raise EditguardError(f"cannot write {out}: {parent} takes no new files ({e.strerror})") from None
            return


def _resolved(path: str | os.PathLike) -> Path:
    """`path` made absolute with its links followed, or one clear error (a link loop)."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as exc:  # Python raises RuntimeError for a loop before 3.13, OSError after
        raise EditguardError(f"cannot write {path}: a symbolic link loop or an unreadable path ({exc})") from None


def check_output_folder(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (),
                        force: bool = False) -> Path:
    """The resolved output folder, or one clear error: it overlaps an input (equal, inside it, or holding
    it: `--force` would delete the input), exists without `--force`, is a file, or is a non-empty folder
    that is not a model folder (so `--force` cannot wipe an arbitrary directory)."""
    out = _resolved(out)
    source = _overlap(out, inputs)
    if source is not None:
        raise EditguardError(f"output folder {out} overlaps the input {source}; editguard never writes into or over "
                             "its input")
    _parent_is_writable(out)
    if out.exists():
        if not out.is_dir():
            raise EditguardError(f"output {out} exists and is not a folder")
        if not force:
            raise EditguardError(f"output folder {out} already exists (use --force to replace it)")
        if any(out.iterdir()) and not (out / "config.json").is_file():
            raise EditguardError(f"--force replaces only a model folder (with config.json) or an empty folder; "
                                 f"{out} is neither")
    return out


def check_output_file(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (),
                      suffixes: tuple[str, ...] = ()) -> Path:
    """The resolved path of a file editguard may (over)write: not inside or equal to an input, not a
    folder, and with one of `suffixes` (e.g. a report must end in .html: it can never replace weights)."""
    path = _resolved(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise EditguardError(f"{path.name}: the file name must end in {' or '.join(suffixes)}")
    source = _overlap(path, inputs)
    if source is not None:
        raise EditguardError(f"{path} overlaps the input {source}; editguard never writes into or over its input")
    if path.is_dir():
        raise EditguardError(f"{path} is a folder")
    _parent_is_writable(path)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temp file beside it: an interrupted write leaves nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        # errors="replace": a file name that is not valid UTF-8 (held as surrogates) must not fail the write
        with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the rename: a crash leaves the old file or the new one
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finite_dumps(data: Any, **kwargs) -> str:
    """Strict JSON of `data` (NaN and infinities as null), indented."""
    return json.dumps(finite_json(data), indent=2, allow_nan=False, **kwargs)


def finite_json(data: Any) -> Any:
    """`data` with NaN and infinities as null: JSON has no such numbers (Python writes bare NaN, which
    strict parsers reject). A figure that could not be measured is null."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite_json(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(value) for value in data]
    return data
