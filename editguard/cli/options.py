"""Options shared by several commands, declared once."""

from __future__ import annotations

import contextlib
from typing import Annotated, Optional

import typer

from ..errors import EditguardError
from ..outputs import Created
from ..resolve import ModelRef, resolve
from . import state

ModelArg = Annotated[str, typer.Argument(
    metavar="MODEL", help="Hub id (org/name), local folder, .gguf file, or demo:smollm2-135m / demo:gemma3-270m.")]
Revision = Annotated[Optional[str], typer.Option("--revision", help="Hub branch, tag or commit.")]
AllowPickle = Annotated[bool, typer.Option(
    "--allow-pickle", help="Read pickle weights (*.bin, *.pt, ...) with torch.load(weights_only=True).")]
DeviceMap = Annotated[str, typer.Option("--device-map", help="cpu | auto | cuda | cuda:N (accelerate placement).")]
Dtype = Annotated[str, typer.Option("--dtype", help="float32 | bfloat16 | float16 | auto.")]
MaxMemory = Annotated[Optional[str], typer.Option(
    "--max-memory", help="Per-device caps for --device-map auto, e.g. '0=20GiB,cpu=60GiB'.")]
OffloadFolder = Annotated[Optional[str], typer.Option("--offload-folder", help="Where accelerate may offload weights.")]
BaseRevision = Annotated[Optional[str], typer.Option("--base-revision", help="Hub branch, tag or commit of --base.")]


def resolve_model(spec: str, revision: str | None = None, allow_pickle: bool = False) -> ModelRef:
    """Resolve with a spinner: a first use may download or convert (tens of seconds)."""
    out = state.out()
    with out.progress(f"resolving {spec}") as advance, _hub_bars(out.human and not out.quiet):
        return resolve(spec, revision=revision, allow_pickle=allow_pickle,
                       progress=lambda message: advance(0, description=message))


@contextlib.contextmanager
def _hub_bars(show: bool):
    """huggingface_hub's download bars (tqdm, on stderr) follow --quiet and the output format."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not show:
        disable_progress_bars()
    try:
        yield
    finally:
        if not show and not was_disabled:
            enable_progress_bars()


def parse_max_memory(text: str | None) -> dict | None:
    if not text:
        return None
    caps: dict = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not value.strip():
            raise EditguardError(f"--max-memory: expected DEVICE=SIZE pairs, got {item!r}")
        key, value = key.strip(), value.strip()
        caps[_memory_device(key)] = value
        try:
            from accelerate.utils import convert_file_size_to_int

            size = convert_file_size_to_int(value)
        except ValueError:
            size = -1
        if size <= 0:
            raise EditguardError(f"--max-memory: {value!r} for {key} is not a size (use e.g. 2GB, 500MiB)")
    return caps


def _memory_device(key: str) -> int | str:
    """A --max-memory device as accelerate names it: a GPU index this machine has, cpu, or disk."""
    if key.isdigit():
        import torch

        count = torch.cuda.device_count()
        if int(key) >= count:
            raise EditguardError(f"--max-memory: no GPU {key} on this machine ({count} found)")
        return int(key)
    if key not in ("cpu", "disk", "mps"):
        raise EditguardError(f"--max-memory: unknown device {key!r} (a GPU index, cpu, disk or mps)")
    return key


def load_options(device_map: str, dtype: str, max_memory: str | None, offload_folder: str | None,
                 allow_pickle: bool | None = None) -> dict:
    """load_model's placement keywords (and allow_pickle, unless None: a caller that passes it itself)."""
    from ..loading import check_placement

    check_placement(device_map, dtype)
    options = dict(device_map=device_map, dtype=dtype, max_memory=parse_max_memory(max_memory),
                   offload_folder=offload_folder)
    return options if allow_pickle is None else {**options, "allow_pickle": allow_pickle}


def check_share(option: str, value: float | None, closed: bool = False) -> None:
    """A threshold, share or probability option: a number in (0, 1) ([0, 1] if `closed`), NaN refused."""
    if value is None:
        return
    inside = 0 <= value <= 1 if closed else 0 < value < 1
    if not inside:  # NaN fails both comparisons
        raise EditguardError(f"{option} must be a number in {'[0, 1]' if closed else '(0, 1)'}, got {value}")


def input_paths(ref: ModelRef, *others: str | None) -> list:
    """What a command reads, for the output checks: the model folder, the user's own file behind a
    converted .gguf (the folder is a copy in the cache), and any other inputs (mask, base)."""
    return [ref.path, ref.model_id if ref.kind == "gguf" else None, *others]


def offload_input(folder: str | None) -> Created | None:
    """The offload folder as an input for -o checks: accelerate creates it during the load, so it counts
    before it exists (--force must not delete it under the running load)."""
    return None if folder is None else Created(folder)


def num_layers_of(ref: ModelRef, allow_pickle: bool = False) -> int:
    """Layer count from the checkpoint's config, without loading the model (for checks before the load)."""
    from .. import arch as arch_table

    config = ref.checkpoint(allow_pickle=allow_pickle).config
    return arch_table.for_config(config).num_layers(config)


def hparams_or_default(hparams: str | None, ref: ModelRef, what: str = "give --hparams") -> str:
    """The user's hparams (YAML or preset name), else the demo model's own preset (named after it)."""
    if hparams is not None:
        return hparams
    if ref.kind == "demo":
        return ref.spec.split(":", 1)[1]
    raise EditguardError(f"{what} (EasyEdit ROME/MEMIT YAML or a preset name); only demo models have a default")
