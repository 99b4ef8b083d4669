"""Model reference -> local folder: a hub id, a local folder, a .gguf file, or a demo model."""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .checkpoint import Checkpoint
from .demo import DEMO_PREFIX, ensure_demo, ensure_gguf_folder
from .errors import EditguardError, first_line
from .home import user_path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# What editguard needs from a hub repository: never the whole repo.
HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "*.tiktoken",
    "chat_template*",
    # the weights transformers loads, at the repo's top level: not consolidated.safetensors or original/*.pth
    # copies in another layout (as many GB again, never read)
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "README.md",
]
HUB_PICKLE_PATTERNS = ["pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json"]


@dataclass(frozen=True)
class ModelRef:
    spec: str  # what the user typed
    kind: str  # "hub" | "local" | "gguf" | "demo"
    path: Path  # local folder with config.json and weights
    model_id: str  # stable identity recorded in banks, masks and reports
    revision: str | None = None  # hub commit, when known

    @property
    def source(self) -> str:
        """Where the user's weights are: the .gguf file itself (converted into the cache), else the folder."""
        return self.model_id if self.kind == "gguf" else str(self.path)

    def checkpoint(self, allow_pickle: bool = False) -> Checkpoint:
        return Checkpoint(self.path, allow_pickle=allow_pickle)


def resolve(
    spec: str,
    revision: str | None = None,
    allow_pickle: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ModelRef:
    """Turn whatever the user typed into a local model folder, fetching or converting it if needed."""
    if not spec.strip():  # Path("") is the working directory: an empty CI variable must not scan it
        raise EditguardError("the model argument is empty")
    if revision is not None:
        check_revision(revision)
    if revision is not None and (spec.startswith(DEMO_PREFIX) or user_path(spec).exists()):
        raise EditguardError(f"a revision applies to hub ids only; {spec} is a local model")
    if spec.startswith(DEMO_PREFIX):
        name = spec[len(DEMO_PREFIX):]
        return ModelRef(spec, "demo", ensure_demo(name, progress), model_id=spec)
    path = user_path(spec)
    if path.exists():
        if path.is_file():
            if path.suffix.lower() == ".gguf":
                folder = ensure_gguf_folder(path, progress)
                return ModelRef(spec, "gguf", folder, model_id=str(path.resolve()))
            raise EditguardError(f"{spec}: expected a model folder or a .gguf file")
        return ModelRef(spec, "local", path.resolve(), model_id=str(path.resolve()))
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        if path.parent.is_dir():  # "models/upload" beside a local models/: a missing folder, not a hub repo
            raise EditguardError(f"no such folder: {spec} ({path.parent}/ is a local folder, so this is not taken "
                                 "for a hub id; run from another directory to mean the hub repo)")
        folder = _hub_download(spec, revision, allow_pickle, progress)
        return ModelRef(spec, "hub", folder, model_id=spec, revision=folder.name)
    if "/" in spec.strip("/") and not spec.startswith((".", "/", "~")):  # meant for a hub id, perhaps
        raise EditguardError(f"no such file or folder: {spec} (nor a hub id: those read ORG/NAME, in letters, "
                             "digits, '-', '_' and '.')")
    raise EditguardError(f"no such file or folder: {spec}")


def hub_cache_dir() -> Path:
    """The cache huggingface_hub uses, by its rules (HF_HUB_CACHE, the older HUGGINGFACE_HUB_CACHE, HF_HOME,
    XDG_CACHE_HOME; `$VAR`s expanded), read at call time (huggingface_hub reads them once, at import)."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return user_path(os.path.expandvars(cache))
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return user_path(os.path.expandvars(hf_home)) / "hub"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE, or TRANSFORMERS_OFFLINE, as huggingface_hub reads them."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in {"1", "true", "yes", "on"}


def check_revision(revision: str) -> str:
    """A branch, tag or commit as git names them: never a path that leaves the repo's cache folder."""
    if not revision.strip():  # an empty CI variable: not silently the default branch
        raise EditguardError("the revision is empty")
    if (revision.startswith(("/", "-")) or ".." in revision or "\\" in revision
            or any(ord(c) < 32 for c in revision) or revision.endswith(("/", ".lock"))):
        raise EditguardError(f"{revision!r} is not a valid revision (a branch, tag or commit)")
    return revision


@contextlib.contextmanager
def _hub_quiet():
    from huggingface_hub.utils import logging as hub_logging

    verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hub_logging.set_verbosity(verbosity)


def _hub_download(repo_id: str, revision: str | None, allow_pickle: bool, progress) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hub_errors

    offline = hub_offline()
    patterns = HUB_PATTERNS + (HUB_PICKLE_PATTERNS if allow_pickle else [])
    if progress:
        progress(f"resolving {repo_id} in the Hugging Face cache" + ("" if offline else " (downloading what is missing)"))
    try:
        with _hub_quiet():  # its retry warnings; what failed is said once, below
            folder = Path(snapshot_download(
                repo_id, revision=revision, allow_patterns=patterns, cache_dir=hub_cache_dir(),
                local_files_only=offline, token=os.environ.get("HF_TOKEN") or None,
            ))
    except hub_errors.IncompleteSnapshotError as exc:  # (a kind of LocalEntryNotFoundError: first)
        raise EditguardError(f"{repo_id}: the cached snapshot is incomplete, an interrupted download "
                             f"({first_line(exc, 200)})") from None
    except hub_errors.LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise EditguardError(f"{repo_id}{'@' + revision if revision else ''} is not in the local Hugging Face "
                             f"cache ({hub_cache_dir()}) and {why}") from None
    except hub_errors.GatedRepoError:
        raise EditguardError(f"{repo_id} is gated: accept its licence on the Hub and set HF_TOKEN") from None
    except hub_errors.RepositoryNotFoundError:
        raise EditguardError(f"{repo_id}: no such model on the Hub (or it is private: set HF_TOKEN)") from None
    except hub_errors.RevisionNotFoundError:
        raise EditguardError(f"{repo_id}: no revision {revision!r}") from None
    except hub_errors.HFValidationError as exc:  # e.g. "org/a--b", "org/x.", names over 96 characters
        raise EditguardError(f"{repo_id}: not a valid Hugging Face repo id ({first_line(exc, 200)})") from None
    except (hub_errors.HfHubHTTPError, OSError) as exc:
        raise EditguardError(f"{repo_id}: download failed ({first_line(exc, 200)})") from None
    if not (folder / "config.json").is_file():
        raise EditguardError(f"{repo_id}: the cached snapshot has no config.json")
    return folder
