"""A folder of weight files, read one tensor at a time and copied with some tensors replaced.

Safetensors headers are parsed here (not trusted blindly) so a corrupt or truncated file is one clear
error before any tensor is touched. Pickle checkpoints are refused unless the caller allows them, and
even then are read only with `torch.load(weights_only=True)`: no code from a checkpoint ever runs.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from .errors import BAD_JSON, EditguardError, first_line
from .outputs import check_output_folder

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
SAFETENSORS_INDEX = "model.safetensors.index.json"
TEMP_SUFFIX = re.compile(r"[a-z0-9_]{8}")  # what tempfile.mkstemp/mkdtemp add to a prefix
SHARD_NAME = re.compile(r".+-\d+-of-\d+\.safetensors")  # how save_pretrained names the shards of a model
PICKLE_WEIGHTS = "pytorch_model.bin"  # the pickle files transformers loads: this, else its shard index's
PICKLE_INDEX = "pytorch_model.bin.index.json"
DIGEST_KEY = "editguard_sha256"  # header metadata of editguard's own files: `payload_digest` of their tensors
OWN_FILE_PREFIX = "editguard-"  # files editguard writes into a model folder (lock manifest, lock mask)

# safetensors dtype tag -> (torch dtype, bytes per element)
_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
_TAGS = {dtype: tag for tag, (dtype, _) in _DTYPES.items()}

# Whole safetensors headers larger than this are not real checkpoints (the format caps them at 100 MB).
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str  # file name inside the checkpoint folder
    dtype: str  # safetensors tag, e.g. "F32"
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype][0]


_LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors file's header: tensors by name, and the free-form metadata."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw_len = handle.read(8)
        if len(raw_len) < 8:
            raise EditguardError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if raw_len == _LFS_POINTER[:8]:  # a checkout without `git lfs pull`: how a CI gate often meets a "model"
            if raw_len + handle.read(len(_LFS_POINTER) - 8) == _LFS_POINTER:
                raise EditguardError(f"{path}: a Git LFS pointer, not the weights (fetch them: git lfs pull)")
            handle.seek(8)
        if header_len > min(_MAX_HEADER, size - 8):
            raise EditguardError(f"{path}: corrupt or truncated safetensors file (header length {header_len} "
                                 f"does not fit in a {size}-byte file)")
        try:
            header = json.loads(handle.read(header_len))
        except BAD_JSON as exc:
            raise EditguardError(f"{path}: corrupt safetensors header ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise EditguardError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise EditguardError(f"{path}: corrupt safetensors header (__metadata__ is not a JSON object)")
    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            tag, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise EditguardError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        # integers only (JSON true/false are ints to Python), none negative
        if not all(type(x) is int and x >= 0 for x in (*shape, begin, end)):
            raise EditguardError(f"{path}: corrupt safetensors header entry for {name!r} (shape and offsets must be "
                                 "non-negative integers)")
        if not isinstance(tag, str) or tag not in _DTYPES:
            raise EditguardError(f"{path}: tensor {name!r} has unsupported dtype {tag!r}")
        if end - begin != math.prod(shape) * _DTYPES[tag][1]:
            raise EditguardError(f"{path}: corrupt safetensors header (tensor {name!r} size does not match its shape)")
        tensors[name] = TensorInfo(name, path.name, tag, shape, data_start + begin, data_start + end)
    # as the safetensors library requires: the tensors tile the data section, no gaps, no overlaps (two names
    # on the same bytes would let a checkpoint show one weight to one reader and another to the next)
    spans = sorted((t.start, t.end, t.name) for t in tensors.values())
    position = data_start
    for start, end, name in spans:
        if start != position:
            raise EditguardError(f"{path}: corrupt safetensors header (tensor {name!r} "
                                 f"{'overlaps another' if start < position else 'leaves a gap before it'})")
        position = end
    end_max = position - data_start
    if data_start + end_max != size:
        state = "truncated" if data_start + end_max > size else "has trailing bytes"
        raise EditguardError(f"{path}: corrupt safetensors file ({state}: header describes "
                             f"{data_start + end_max} bytes, file has {size})")
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor, any dtype (bf16 included)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def comparable(t: torch.Tensor) -> torch.Tensor:
    """8-bit floats as float32: comparisons and isfinite are not implemented for them."""
    return t.float() if t.is_floating_point() and t.element_size() == 1 else t


def fingerprint(tensor: torch.Tensor) -> str:
    """Identity of a weight: sha256 of its float32 bytes, as stored (masks and banks record it)."""
    return hashlib.sha256(tensor_bytes(tensor.detach().to(torch.float32))).hexdigest()[:16]


def model_fingerprint(checkpoint: "Checkpoint") -> str:
    """Identity of a whole model, cheap at any size: every stored tensor's name, dtype, shape and a few
    runs of its raw bytes spread over it (`Checkpoint.sample`: a few pages a tensor, never the whole
    file). A fine-tune or an edit anywhere changes it (they change whole matrices); a change to a few single
    weights may not. Stored bytes: a copy in another dtype or format is another model here."""
    digest = hashlib.sha256()
    for name in sorted(checkpoint.names()):
        info = checkpoint.info(name)
        digest.update(f"{name}:{info.dtype}:{info.shape}:".encode())
        digest.update(checkpoint.sample(name))
    return digest.hexdigest()[:16]


class Checkpoint:
    """One model folder: config.json plus safetensors shards (or, if allowed, pickle files)."""

    def __init__(self, folder: str | os.PathLike, allow_pickle: bool = False):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise EditguardError(f"no such model folder: {self.folder}")
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise EditguardError(f"{self.folder} has no config.json: not a Hugging Face model folder")
        try:
            self.config: dict = json.loads(config_path.read_text())
        except BAD_JSON:
            raise EditguardError(f"{config_path}: not valid JSON") from None
        if not isinstance(self.config, dict):
            raise EditguardError(f"{config_path}: not a JSON object")
        self.allow_pickle = allow_pickle
        self._tensors: dict[str, TensorInfo] = {}
        self.file_metadata: dict[str, dict[str, str]] = {}
        self._pickle_state: dict[str, dict[str, torch.Tensor]] = {}
        self._pickle_names: dict[str, str] = {}
        self.index_file: str | None = None  # the shard index the weights were found by, if any
        self.format = self._scan()

    # -- discovery ----------------------------------------------------------------------------
    def _scan(self) -> str:
        shards = self._safetensors_files()
        if shards:
            for shard in shards:
                tensors, metadata = read_safetensors_header(self.folder / shard)
                twice = sorted(set(tensors) & set(self._tensors))
                if twice:  # which copy a loader takes is up to the loader: refuse, never guess
                    raise EditguardError(f"{self.folder}: tensor {twice[0]!r} is stored in both "
                                         f"{self._tensors[twice[0]].file} and {shard}")
                self._tensors.update(tensors)
                self.file_metadata[shard] = metadata
            return "safetensors"
        pickles = self._pickle_files()
        if not pickles:
            stray = sorted(p.name for p in self.folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
            if stray:  # e.g. a Trainer's training_args.bin: not weights, and not read
                raise EditguardError(f"{self.folder} holds no weights transformers would load (model.safetensors, "
                                     f"{PICKLE_WEIGHTS} or a shard index); the pickle files here "
                                     f"({', '.join(stray)}) are not read")
            raise EditguardError(f"{self.folder} holds no weights (*.safetensors)")
        if not self.allow_pickle:
            raise EditguardError(
                f"{self.folder} holds only pickle weights ({', '.join(pickles)}); pickle can run code, so editguard "
                "refuses it. Convert to safetensors, or pass --allow-pickle to read it with torch.load(weights_only=True)"
            )
        for name in pickles:
            for tensor_name in self._load_pickle(name):
                if tensor_name in self._pickle_names:
                    raise EditguardError(f"{self.folder}: tensor {tensor_name!r} is stored in both "
                                         f"{self._pickle_names[tensor_name]} and {name}")
                self._pickle_names[tensor_name] = name
        return "pickle"

    def _pickle_files(self) -> list[str]:
        """The pickle weights transformers loads, and only those (other pickles beside them, such as a
        Trainer's training_args.bin or a stale copy, are not this model's weights)."""
        if (self.folder / PICKLE_WEIGHTS).is_file():
            return [PICKLE_WEIGHTS]
        if (self.folder / PICKLE_INDEX).is_file():
            return self._index_files(self.folder / PICKLE_INDEX)
        return []

    def _safetensors_files(self) -> list[str]:
        """The weight files transformers loads, in its order: the file config.json names in
        `transformers_weights`, else `model.safetensors`, else the shard index's files, else every
        `*.safetensors`. Files it would not load are not weights: a clean copy of an edited tensor in a
        stray file (or in shards beside a `model.safetensors`) must not hide the edit from the diff or the
        lock check."""
        explicit = self.config.get("transformers_weights")
        if explicit is not None:
            if not isinstance(explicit, str) or Path(explicit).name != explicit or explicit in (".", ".."):
                raise EditguardError(f"{self.folder}/config.json: transformers_weights must be a plain file name "
                                     f"in the folder, not {explicit!r}")
            if explicit.endswith(".safetensors.index.json") and (self.folder / explicit).is_file():
                self.index_file = explicit
                return self._index_files(self.folder / explicit)
            if explicit.endswith(".safetensors") and (self.folder / explicit).is_file():
                return [explicit]
            raise EditguardError(f"{self.folder}/config.json: transformers_weights names {explicit!r}, not a "
                                 f".safetensors file or shard index in the folder")
        if (self.folder / "model.safetensors").is_file():
            return ["model.safetensors"]
        index = self.folder / SAFETENSORS_INDEX
        if index.is_file():
            self.index_file = SAFETENSORS_INDEX
            return self._index_files(index)
        # editguard's own files beside the weights (a lock's mask) are not weights
        names = sorted(p.name for p in self.folder.glob("*.safetensors") if not p.name.startswith(OWN_FILE_PREFIX))
        odd = [n for n in names if not (self.folder / n).is_file()]
        if odd:
            raise EditguardError(f"{self.folder}: {', '.join(odd)} is not a file")
        shards = [n for n in names if SHARD_NAME.fullmatch(n)]
        if shards:  # shards without their index (an interrupted download): part of a model, and no loader reads them
            raise EditguardError(f"{self.folder}: sharded weights ({shards[0]}, ...) without their shard index "
                                 f"{SAFETENSORS_INDEX}: an incomplete download or copy")
        return names

    def _index_files(self, index: Path) -> list[str]:
        """The shard files a shard index names, each a plain file in the folder."""
        try:
            weight_map = json.loads(index.read_bytes())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (*BAD_JSON, KeyError, TypeError, AttributeError):
            raise EditguardError(f"{index}: corrupt shard index") from None
        escaping = [f for f in files if not isinstance(f, str) or Path(f).name != f or f in (".", "..")]
        if escaping:
            raise EditguardError(f"{index}: shard names must be plain file names in the folder, not {escaping[0]!r}")
        missing = [f for f in files if not (self.folder / f).is_file()]
        if missing:
            raise EditguardError(f"{self.folder}: shard index names missing files: {', '.join(missing)}")
        return files

    def _load_pickle(self, file: str) -> dict[str, torch.Tensor]:
        if file not in self._pickle_state:
            try:
                # mmap needs the zip format torch.save writes since 1.6; older files are read whole
                with warnings.catch_warnings():  # torch's notes on what it refuses: the refusal says it
                    warnings.simplefilter("ignore")
                    state = torch.load(self.folder / file, map_location="cpu", weights_only=True,
                                       mmap=zipfile.is_zipfile(self.folder / file))
            except Exception as exc:  # weights_only refuses anything but tensors and plain containers
                why = re.sub(r"\x1b\[[0-9;]*m", "", first_line(exc))  # torch's message carries colour codes
                raise EditguardError(f"{self.folder / file}: refused to load pickle ({why})") from None
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            if not isinstance(state, dict):
                raise EditguardError(f"{self.folder / file}: pickle does not hold a state dict")
            self._pickle_state[file] = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        return self._pickle_state[file]

    # -- queries ------------------------------------------------------------------------------
    @property
    def files(self) -> list[str]:
        """Weight files, in order."""
        if self.format == "safetensors":
            return sorted(self.file_metadata)
        return sorted(set(self._pickle_names.values()))

    def names(self) -> list[str]:
        return list(self._tensors) if self.format == "safetensors" else list(self._pickle_names)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors or name in self._pickle_names

    def info(self, name: str) -> TensorInfo:
        if self.format == "safetensors":
            if name not in self._tensors:
                raise EditguardError(f"tensor {name!r} is not in {self.folder}")
            return self._tensors[name]
        tensor = self.read(name)
        return TensorInfo(name, self._pickle_names[name], _TAGS.get(tensor.dtype, "F32"), tuple(tensor.shape), 0, 0)

    def find(self, candidates: Iterable[str]) -> str | None:
        """The one of several possible spellings of a tensor name that this checkpoint stores. Stored under
        two, which copy a loader takes is up to the loader (transformers takes the alias for GPT-2): refuse,
        never guess, or a reversal could rewrite the copy nobody loads."""
        stored = [name for name in candidates if name in self]
        if len(stored) > 1:
            raise EditguardError(f"{self.folder}: one tensor is stored under two names, {stored[0]!r} and "
                                 f"{stored[1]!r}; keep one")
        return stored[0] if stored else None

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor from disk without touching the others."""
        if self.format == "pickle":
            if name not in self._pickle_names:
                raise EditguardError(f"tensor {name!r} is not in {self.folder}")
            tensor = self._load_pickle(self._pickle_names[name])[name]
        else:
            info = self.info(name)
            with open(self.folder / info.file, "rb") as handle:
                handle.seek(info.start)
                raw = bytearray(handle.read(info.nbytes))
            tensor = torch.frombuffer(raw, dtype=info.torch_dtype).reshape(info.shape) if raw else \
                torch.empty(info.shape, dtype=info.torch_dtype)
        return tensor if dtype is None else tensor.to(dtype)

    def sample(self, name: str, runs: int = 16, run: int = 256) -> bytes:
        """Raw stored bytes of `runs` runs of `run` consecutive elements spread evenly over a tensor (all of
        a small one), read without the rest of it."""
        info = self.info(name)
        numel = math.prod(info.shape)
        if numel <= runs * run:
            starts, run = [0], numel
        else:
            starts = [i * (numel - run) // (runs - 1) for i in range(runs)]
        if self.format == "pickle":  # the state dict is memory-mapped: slicing reads only these pages
            flat = self.read(name).reshape(-1)
            return b"".join(tensor_bytes(flat[i:i + run]) for i in starts)
        itemsize = info.nbytes // max(numel, 1)
        with open(self.folder / info.file, "rb") as handle:
            parts = []
            for i in starts:
                handle.seek(info.start + i * itemsize)
                parts.append(handle.read(run * itemsize))
        return b"".join(parts)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.read(name)

    def weight_files_size(self) -> int:
        return sum((self.folder / f).stat().st_size for f in self.files)

    # -- writing ------------------------------------------------------------------------------
    def write_copy(
        self,
        out_dir: str | os.PathLike,
        replacements: dict[str, torch.Tensor],
        extra_files: dict[str, bytes] | None = None,
        force: bool = False,
        progress: Callable[[str], None] | None = None,
        omit: Iterable[str] = (),
        added: dict[str, torch.Tensor] | None = None,
    ) -> list[str]:
        """Write a complete model folder equal to this one with some tensors replaced.

        Only shards that hold a replaced tensor are rewritten (streamed, byte ranges copied); the others
        are copied (kernel-side copy). `added` tensors (names the folder lacks) go into the last weight file,
        and into the shard index that maps it. The folder appears atomically: it is built beside
        `out_dir` and renamed into place, so an interrupted or failed write (disk full) leaves nothing.
        Files named in `omit` are left out; `extra_files` are written last (over a copied file of that name).
        Returns the names of the rewritten files.
        """
        out = check_output_folder(out_dir, [self.folder], force)
        for name in replacements:
            if name not in self:
                raise EditguardError(f"cannot replace {name!r}: not in {self.folder}")
        added = added or {}
        for name in added:
            if name in self:
                raise EditguardError(f"cannot add {name!r}: {self.folder} already holds it")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(out)
        rewritten: list[str] = []
        try:
            if self.format == "pickle":
                rewritten = self._write_pickle_as_safetensors(tmp, replacements, added)
            else:
                home = self.files[-1]
                touched = {self._tensors[name].file for name in replacements} | ({home} if added else set())
                for shard in self.files:
                    if shard in touched:
                        if progress:
                            progress(f"rewriting {shard}")
                        self._rewrite_shard(shard, tmp / shard, replacements, added if shard == home else {})
                        rewritten.append(shard)
                    else:
                        _copy(self.folder / shard, tmp / shard)
                if (self.folder / SAFETENSORS_INDEX).is_file():
                    _copy(self.folder / SAFETENSORS_INDEX, tmp / SAFETENSORS_INDEX)
                if added and self.index_file is not None:
                    extra_files = {self.index_file: self._index_with(added, home), **(extra_files or {})}
            weight_files = set(self.files) | {SAFETENSORS_INDEX}
            for item in self.folder.iterdir():
                if item.name in weight_files or item.name in omit or item.suffix in PICKLE_SUFFIXES or item.name.startswith("."):
                    continue
                if item.is_file():
                    _copy(item, tmp / item.name)
                elif item.is_dir():
                    shutil.copytree(item, tmp / item.name)
            for name, data in (extra_files or {}).items():
                (tmp / name).write_bytes(data)
            fsync_tree(tmp)  # every file on disk before the rename: a crash after it leaves no torn file
            _replace_dir(tmp, out)
            fsync_path(out.parent)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno == errno.ENOSPC:
                raise EditguardError(f"disk full while writing {out}; nothing was written") from None
            source = Path(exc.filename) if isinstance(exc.filename, str) else None
            if source is not None and source.is_relative_to(self.folder):  # an input file, not the output
                raise EditguardError(f"could not read {source}: {exc.strerror or exc}") from None
            raise EditguardError(f"could not write {out}: {exc.strerror or exc}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return rewritten

    def _rewrite_shard(self, shard: str, dest: Path, replacements: dict[str, torch.Tensor],
                       added: dict[str, torch.Tensor]) -> None:
        entries = sorted((info for info in self._tensors.values() if info.file == shard), key=lambda i: i.start)
        header: dict = {}
        metadata = self.file_metadata.get(shard) or {}
        if metadata:
            header["__metadata__"] = metadata
        payload: list[tuple[TensorInfo | None, torch.Tensor | None]] = []
        offset = 0
        for info, name in [(info, info.name) for info in entries] + [(None, name) for name in sorted(added)]:
            new = replacements.get(name) if info is not None else added[name]
            if new is not None:
                new = new.detach().to("cpu").contiguous()
                tag = _TAGS.get(new.dtype)
                if tag is None:
                    raise EditguardError(f"cannot store dtype {new.dtype} for {name}")
                size = new.numel() * new.element_size()
                header[name] = {"dtype": tag, "shape": list(new.shape), "data_offsets": [offset, offset + size]}
            else:
                size = info.nbytes
                header[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [offset, offset + size]}
            payload.append((info, new))
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the format aligns the data section to 8 bytes
        with open(self.folder / shard, "rb") as src, open(dest, "wb") as dst:
            dst.write(struct.pack("<Q", len(blob)))
            dst.write(blob)
            for info, new in payload:
                if new is not None:
                    dst.write(tensor_bytes(new))
                else:
                    src.seek(info.start)
                    remaining = info.nbytes
                    while remaining:
                        chunk = src.read(min(remaining, 64 << 20))
                        dst.write(chunk)
                        remaining -= len(chunk)
            dst.flush()
            os.fsync(dst.fileno())

    def _index_with(self, added: dict[str, torch.Tensor], home: str) -> bytes:
        """The shard index with the `added` tensors mapped to shard `home` (its total size grown by them)."""
        index = json.loads((self.folder / self.index_file).read_bytes())  # (read as valid when the folder was)
        index["weight_map"].update({name: home for name in added})
        metadata = index.get("metadata")
        total = metadata.get("total_size") if isinstance(metadata, dict) else None
        if isinstance(total, int) and not isinstance(total, bool):
            metadata["total_size"] = total + sum(t.numel() * t.element_size() for t in added.values())
        return (json.dumps(index, indent=2) + "\n").encode()

    def _write_pickle_as_safetensors(self, tmp: Path, replacements: dict[str, torch.Tensor],
                                     added: dict[str, torch.Tensor]) -> list[str]:
        tensors, storages = dict(added), set()
        for name in self.names():
            tensor = replacements.get(name, self.read(name))
            storage = tensor.untyped_storage().data_ptr()
            # tied weights share one storage in a pickle; safetensors stores each tensor on its own
            tensors[name] = tensor.clone() if storage in storages else tensor
            storages.add(storage)
        write_safetensors(tmp / "model.safetensors", tensors, {"format": "pt"})
        return ["model.safetensors"]


def payload_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order: what editguard's own files
    record when written and check when read (`digest=True`), so that a damaged payload under an intact
    header (a flipped bit, bytes overwritten in place) is named instead of used."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{_TAGS.get(t.dtype, t.dtype)}:{list(t.shape)}:".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def load_checked(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An editguard-written safetensors file (`what`: "mask file", "edit bank", ...): its tensors and header
    metadata, the tensors checked against the digest recorded at writing (files written before editguard
    recorded one are read unchecked). Any failure is one line: "corrupted {what} {path}: ..."."""
    from safetensors.torch import load_file

    try:
        _, metadata = read_safetensors_header(path)
        tensors = load_file(path)
    except EditguardError as exc:
        raise EditguardError(f"corrupted {what} {path}: {exc.message.removeprefix(f'{path}: ')}") from None
    except Exception as exc:  # safetensors' own error type for bad data
        raise EditguardError(f"corrupted {what} {path}: {first_line(exc)}") from None
    recorded = metadata.get(DIGEST_KEY)
    if recorded is not None and recorded != payload_digest(tensors):
        raise EditguardError(f"corrupted {what} {path}: its tensors do not match the sha256 recorded when it was "
                             "written (damaged on disk or in transfer)")
    return tensors, metadata


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                      digest: bool = False) -> None:
    """Write a safetensors file atomically (temp file + rename); with `digest`, the payload's sha256 in its
    header for `load_checked` (editguard's own files, not the model shards it writes)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    if digest:
        metadata = {**(metadata or {}), DIGEST_KEY: payload_digest(tensors)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        try:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        except SafetensorError as exc:  # its I/O errors are not OSErrors: read the OS error it names
            found = re.search(r"os error (\d+)", str(exc))
            raise OSError(int(found.group(1)) if found else errno.EIO, first_line(exc)) from None
        # after the write: mkstemp, and safetensors' own temp file, make 0600; outputs look like any other file
        os.chmod(tmp, 0o666 & ~_umask())
        fsync_path(tmp)  # on disk before the rename: a crash leaves the old file or the new one, never a torn one
        os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise EditguardError(f"disk full while writing {path}; nothing was written "
                                 f"({exc.strerror or os.strerror(exc.errno)})") from None
        raise EditguardError(f"could not write {path}: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def temp_leftovers(folder: Path, prefix: str) -> list[Path]:
    """What tempfile made in `folder` under `.{prefix}.` (a file or folder named `.{prefix}.XXXXXXXX`)."""
    if not folder.is_dir():
        return []
    return [p for p in folder.glob(f".{glob.escape(prefix)}.*") if TEMP_SUFFIX.fullmatch(p.name[len(prefix) + 2:])]


def remove_stale_temps(path: Path) -> None:
    """The temporary files `write_safetensors` left beside `path` when killed mid-write (no handler ran).
    Only for a caller that holds the lock on writing `path`: another writer's file would be in flight."""
    path = Path(path)
    for leftover in temp_leftovers(path.parent, path.name):
        if leftover.is_file():
            leftover.unlink(missing_ok=True)


def make_temp_dir(out: Path) -> Path:
    """A private build folder beside `out` (same file system, so the final rename is atomic)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # it becomes the output: ordinary permissions
    return tmp


def fsync_path(path: Path | str) -> None:
    """Flush a file, or a folder's entries (a rename), to disk; a file system that cannot is left as is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync_path every file and folder under `folder`, then `folder` itself."""
    for root, dirs, files in os.walk(folder):
        for name in files + dirs:
            fsync_path(Path(root) / name)
    fsync_path(folder)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _copy(src: Path, dest: Path) -> None:
    # A copy, not a hard link: a later in-place write to the output must never reach the input.
    shutil.copy2(src, dest)


def _replace_dir(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    # a fresh name each time: one left by a killed run (or another process of the same pid) is never in the way
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    try:
        os.replace(out, old)  # onto the empty folder just made
    except BaseException:  # e.g. `out` is a mount point (EBUSY): the earlier output stays, the empty folder goes
        old.rmdir()
        raise
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)  # interrupted between the two: the earlier output goes back where it was
        raise
    try:
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:  # interrupted while cleaning up: the new output is in place; finish, then stop
        shutil.rmtree(old, ignore_errors=True)
        raise
