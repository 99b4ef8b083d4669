"""Holding a whole model: transformers + accelerate device mapping, frozen, in eval mode.

Weight-level work never comes here (it reads tensors lazily through `Checkpoint`); this is for work
that runs the network (editing, probing, mask training).
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from dataclasses import dataclass, field
from typing import Iterable

import torch

from . import arch as arch_table
from .arch import Arch
from .checkpoint import Checkpoint, model_fingerprint
from .cpu_precision import warn_if_slow
from .errors import BAD_JSON, EditguardError, EditguardWarning, first_line
from .quiet import quiet_transformers
from .resolve import ModelRef

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    arch: Arch
    num_layers: int
    ref: ModelRef
    checkpoint: Checkpoint
    extras: dict = field(default_factory=dict)

    @functools.cached_property
    def fingerprint(self) -> str:
        """The whole model's identity (`model_fingerprint` of its checkpoint): what edit banks, training
        checkpoints and the cached second-moment statistics are keyed by."""
        return model_fingerprint(self.checkpoint)

    @property
    def device(self) -> torch.device:
        return self.module("embed").weight.device

    def module(self, role: str, layer: int | None = None) -> torch.nn.Module:
        return self.model.get_submodule(self.arch.module(role, layer))

    def layer_range_check(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise EditguardError(f"layer {layer} is out of range: this model has layers 0-{self.num_layers - 1}")


def load_tokenizer(ref: ModelRef):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    loader = AutoTokenizer
    config_path = ref.path / "tokenizer_config.json"
    if config_path.is_file() and (ref.path / "tokenizer.json").is_file():
        try:
            declared = json.loads(config_path.read_text()).get("tokenizer_class")
        except (*BAD_JSON, AttributeError):  # not JSON, or not an object
            declared = None
        if declared in ("PreTrainedTokenizerFast", "TokenizersBackend"):
            # honour a generic tokenizer the folder declares; AutoTokenizer would swap in a model-specific one
            loader = PreTrainedTokenizerFast
    with quiet_transformers():
        try:
            tokenizer = loader.from_pretrained(ref.path, trust_remote_code=False)
        except Exception as exc:
            raise EditguardError(f"{ref.spec}: cannot load its tokenizer ({first_line(exc, 200)})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# accelerate's placements by name (a dict is library-only); "cuda:N" and a bare device index name one GPU
DEVICE_MAPS = re.compile(r"cpu|auto|balanced|balanced_low_0|sequential|mps|cuda(:\d+)?|\d+")


def check_placement(device_map: str, dtype: str) -> None:
    """--device-map and --dtype, checked when given, not only once a command gets to loading the model."""
    if dtype not in DTYPES and dtype != "auto":
        raise EditguardError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    if isinstance(device_map, str) and not DEVICE_MAPS.fullmatch(device_map):
        raise EditguardError(f"unknown --device-map {device_map!r}; choose cpu, auto, cuda, cuda:N, balanced or "
                             "sequential")


def _check_loading(ref: ModelRef, info: dict) -> None:
    """transformers fills weights a checkpoint lacks with random ones and says so only in a log line
    editguard silences: every test would then run on a partly random model. (A tensor of the wrong shape
    already stops from_pretrained.)"""
    def named(keys) -> str:
        keys = sorted(keys)
        return keys[0] + (f" and {len(keys) - 1} more" if len(keys) > 1 else "")

    if info.get("missing_keys"):
        raise EditguardError(f"{ref.spec}: the checkpoint lacks {named(info['missing_keys'])}, which the model "
                             "needs (transformers would fill it with random values)")
    if info.get("unexpected_keys"):  # weights the model never reads: not what it runs, but worth an auditor's look
        warnings.warn(EditguardWarning(f"{ref.spec}: the checkpoint stores {named(info['unexpected_keys'])}, which "
                                       "the model does not load"), stacklevel=3)


def load_model(
    ref: ModelRef,
    *,
    device_map: str = "cpu",
    dtype: str = "float32",
    max_memory: dict | None = None,
    offload_folder: str | None = None,
    allow_pickle: bool = False,
    keep_on_device: Iterable[str] = (),
) -> LoadedModel:
    """Load `ref` with transformers, never trusting remote code and never unpickling unless allowed.

    `keep_on_device` names modules that must hold real weights (editguard writes them in place: edits,
    masks, restorations): with accelerate's automatic placement they would otherwise risk being offloaded
    to `meta`/disk. The embedding and output head, every layer's MLP output projection (what ROME and
    MEMIT write, and what every `down_proj` mask covers) and a lock's masked tensors are always kept;
    name others (a whole-MLP mask's input projections) here.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    checkpoint = ref.checkpoint(allow_pickle=allow_pickle)  # refuses pickle, validates headers
    arch = arch_table.for_config(checkpoint.config)
    num_layers = arch.num_layers(checkpoint.config)
    # transformers builds whatever config.json asks for: check the layer count against the weights first
    # (a config claiming 10**12 layers would otherwise allocate until the machine gives out)
    last = arch.weight_name("mlp_out", num_layers - 1)
    if checkpoint.find(arch.tensor_candidates(last)) is None:
        raise EditguardError(f"{ref.spec}: config.json says {num_layers} layers but the checkpoint lacks {last}")
    check_placement(device_map, dtype)
    torch_dtype = "auto" if dtype == "auto" else DTYPES[dtype]
    kwargs: dict = dict(dtype=torch_dtype, trust_remote_code=False, use_safetensors=checkpoint.format == "safetensors")
    placed = device_map != "cpu" or max_memory or offload_folder  # accelerate places (and may offload) it
    keep = kept_modules(arch, num_layers, checkpoint, keep_on_device) if placed else []
    if placed:
        kwargs["device_map"] = device_map
        if max_memory:
            kwargs["max_memory"] = max_memory
        if offload_folder:
            kwargs["offload_folder"] = offload_folder
        if device_map == "auto":
            with quiet_transformers():
                config = AutoConfig.from_pretrained(ref.path, trust_remote_code=False)
            kwargs["device_map"] = _auto_map_keeping(config, torch_dtype, max_memory, keep)
    with quiet_transformers():
        try:
            model, info = AutoModelForCausalLM.from_pretrained(ref.path, output_loading_info=True, **kwargs)
        except EditguardError:
            raise
        except Exception as exc:
            stop = _interruption(exc)
            if stop is not None:  # Ctrl-C while transformers imports the model class: not a broken model
                raise stop from None
            raise EditguardError(f"{ref.spec}: transformers could not load it ({first_line(exc, 240)})") from None
    _check_loading(ref, info)
    model.eval()
    model.requires_grad_(False)
    warn_if_slow(model)
    for name in keep:
        real_weight(model.get_submodule(name).weight, name)
    tokenizer = load_tokenizer(ref)
    loaded = LoadedModel(model, tokenizer, arch, num_layers, ref, checkpoint)
    _keep_lock(loaded)
    return loaded


def kept_modules(arch: Arch, num_layers: int, checkpoint: Checkpoint, extra: Iterable[str] = ()) -> list[str]:
    """The modules automatic placement must leave on a real device: the embedding (it sets the device
    inputs go to) and output head (read directly), every layer's MLP output projection, and of `extra` and
    the modules a lock's manifest masks those this architecture has (a mask of other modules, or a broken
    manifest, is reported by the command's own checks)."""
    from .harden.lock import read_manifest

    keep = [arch.module("embed"), arch.unembed, *(arch.module("mlp_out", n) for n in range(num_layers))]
    try:
        manifest = read_manifest(checkpoint.folder)
    except EditguardError:
        manifest = None
    targets = [t.removesuffix(".weight") for t in (manifest or {}).get("targets", []) if isinstance(t, str)]
    maskable = set(keep) | {path for n in range(num_layers) for path in arch.mlp_in_modules(n)}
    keep += [name for name in [*extra, *targets] if name in maskable]
    return list(dict.fromkeys(keep))


def real_weight(weight: torch.Tensor, name: str) -> torch.Tensor:
    """`weight`, refused with one clear line where accelerate offloaded it (`meta`): editguard reads or
    writes it in place, which an offloaded weight does not allow."""
    if weight.device.type == "meta":
        raise EditguardError(f"{name} was offloaded by --device-map auto; editguard reads and writes it in place: "
                             "give the model room with --max-memory, or use --device-map cpu")
    return weight


def _interruption(exc: BaseException) -> BaseException | None:
    """A Ctrl-C or SIGTERM that a library wrapped into an ordinary error (transformers turns one raised
    during its lazy imports into "Could not import module ..."), found along the exception chain."""
    seen: BaseException | None = exc
    while seen is not None:
        if not isinstance(seen, Exception):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _keep_lock(loaded: LoadedModel) -> None:
    """A locked checkpoint keeps its mask in the forward pass whenever editguard loads it."""
    from .harden.lock import install_mask, read_manifest
    from .mask.file import MaskFile

    manifest = read_manifest(loaded.checkpoint.folder)
    if manifest is None:
        return
    try:
        mask = MaskFile.load(loaded.checkpoint.folder / manifest["mask_file"])
        stored_names = mask.check_fits(loaded.arch, loaded.checkpoint)  # a mask of other tensors or shapes is named, not met mid-forward
        _check_loaded_is_locked(loaded, mask, stored_names)
    except EditguardError as exc:
        # a broken lock (its mask deleted or swapped): loaded without it, so `scan` can report the break
        # (EG030) and `reverse --method base` can still restore; load_locked refuses such a folder
        warnings.warn(EditguardWarning(f"lock broken, its mask is not applied: {exc.message}"), stacklevel=2)
        loaded.extras["lock"] = {**manifest, "broken": exc.message}
        return
    install_mask(loaded.model, loaded.arch, mask, manifest.get("threshold"))
    loaded.extras["lock"] = manifest


def _check_loaded_is_locked(loaded: LoadedModel, mask, stored_names: list[str]) -> None:
    """The weights transformers loaded into the masked modules are the locked tensors, byte for byte (in the
    loaded dtype): a second copy under a spelling transformers also reads, or a config.json that routes
    the load elsewhere, would otherwise put weights no hash covers under the mask."""
    for (path, _), stored in zip(mask.modules(), stored_names):
        weight = real_weight(loaded.model.get_submodule(path).weight, path + ".weight").detach()
        locked = loaded.checkpoint.read(stored).to(weight.device, weight.dtype)
        same = weight.shape == locked.shape and bool(((weight == locked) | (weight.isnan() & locked.isnan())).all())
        if not same:
            raise EditguardError(f"the model transformers builds does not hold the locked {stored} in {path} "
                                 "(another copy of it, or a config.json that routes the load elsewhere)")


def _auto_map_keeping(config, dtype, max_memory, keep: list[str]) -> dict:
    """transformers' own automatic map, with the kept modules forced onto the first real device.

    A disk-mapped ancestor of a kept module is split along the path to it: its other children stay
    where they were mapped, the kept module gets real memory.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.integrations.accelerate import _get_device_map

    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, dtype=None if dtype == "auto" else dtype)
    device_map = dict(_get_device_map(empty, "auto", max_memory, None))
    offloaded = ("disk", "meta")
    real = [d for d in device_map.values() if d not in offloaded]
    first = real[0] if real else "cpu"
    for module in keep:
        owner = max((k for k in device_map if k == "" or module == k or module.startswith(k + ".")),
                    key=len, default=None)
        if owner is not None and device_map[owner] in offloaded:
            where = device_map.pop(owner)
            prefix, node = owner, empty.get_submodule(owner)
            rest = [step for step in module[len(owner):].lstrip(".").split(".") if step]  # none: the owner is it
            for step in rest:
                join = (lambda name: f"{prefix}.{name}" if prefix else name)
                for name, _ in node.named_parameters(recurse=False):
                    device_map[join(name)] = where
                for name, _ in node.named_children():
                    if name != step:
                        device_map[join(name)] = where
                prefix, node = join(step), node.get_submodule(step)
            device_map[module] = first
        for key in device_map:
            if key.startswith(module + ".") and device_map[key] in offloaded:
                device_map[key] = first
    return device_map
