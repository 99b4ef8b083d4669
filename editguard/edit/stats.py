"""Second moments C = E[k kᵀ] of an MLP output projection's input, from a text corpus.

ROME (with `mom2_adjustment`) and MEMIT weight their updates by C⁻¹. Statistics are computed once per
model and layer and cached under `$EDITGUARD_HOME/stats/`, keyed by the model's fingerprint
(`LoadedModel.fingerprint`), so an edited copy of a model never reuses its parent's statistics. The
corpus is the shipped WikiText-2 test split unless `mom2_dataset` names a text file; `mom2_n_samples`
caps the number of windows (the paper's 100,000 Wikipedia samples are out of reach on a CPU, and
WikiText-2 has ~300 windows).
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import load_checked, write_safetensors
from ..data.text import WIKITEXT, load_text
from ..errors import EditguardError
from ..home import cache_dir, file_lock, user_path
from ..loading import LoadedModel
from .forward import _Stop

WINDOW = 1024
def _stats_path(loaded: LoadedModel, layer: int, dataset: str, n_samples: int) -> Path:
    if dataset == WIKITEXT:
        name = dataset
    else:  # two corpora may share a file name, and a corpus may be edited: key on where and which version
        path = user_path(dataset).resolve()
        try:
            stat = path.stat()
            version = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
        except OSError:
            version = str(path)  # (reading it will say what is wrong)
        name = f"{path.name}-{hashlib.sha256(version.encode()).hexdigest()[:12]}"
    return cache_dir("stats", loaded.fingerprint) / f"mom2-L{layer}-{name}-{n_samples}.safetensors"


def second_moments(loaded: LoadedModel, layers: list[int], template: str, dataset: str, n_samples: int,
                   progress: Callable[[int, int], None] | None = None) -> dict[int, torch.Tensor]:
    """C of the input of module `template`.format(layer) for each layer (float32, [in, in]) over `n_samples`
    windows of `dataset`, from the cache or one pass over the corpus for all of them."""
    result = _cached(loaded, layers, dataset, n_samples)
    if len(result) == len(layers):
        return result
    # One process collects at a time; one that waited here finds what the other wrote.
    with file_lock(cache_dir("stats", loaded.fingerprint) / "collect.lock"):
        result.update(_cached(loaded, [layer for layer in layers if layer not in result], dataset, n_samples))
        missing = [layer for layer in layers if layer not in result]
        if missing:
            sums = _collect(loaded, missing, template, dataset, n_samples, progress)
            for layer, (total, count) in sums.items():
                if count < total.shape[0]:  # fewer keys than dimensions: C is singular, the edit meaningless
                    raise EditguardError(
                        f"mom2_dataset {dataset}: {count} tokens cannot estimate the {total.shape[0]}-dimensional "
                        f"second moment of {template.format(layer)}; give a longer text or a larger mom2_n_samples")
                moment = (total / count).float()
                write_safetensors(_stats_path(loaded, layer, dataset, n_samples),
                                  {"mom2": moment, "count": torch.tensor([count])}, digest=True)
                result[layer] = moment
    return result


def _cached(loaded: LoadedModel, layers: list[int], dataset: str, n_samples: int) -> dict[int, torch.Tensor]:
    """The layers whose statistics the cache holds; an unreadable or damaged cache file counts as missing
    (recomputed)."""
    found = {}
    for layer in layers:
        path = _stats_path(loaded, layer, dataset, n_samples)
        if path.is_file():
            with contextlib.suppress(EditguardError, OSError, KeyError):
                found[layer] = load_checked(path, "statistics file")[0]["mom2"]
    return found


def second_moment(loaded: LoadedModel, layer: int, hp) -> torch.Tensor:
    return second_moments(loaded, [layer], hp.rewrite_module_tmp, hp.mom2_dataset, hp.mom2_n_samples)[layer]


@torch.no_grad()
def _collect(loaded: LoadedModel, layers: list[int], template: str, dataset: str, n_samples: int,
             progress) -> dict[int, tuple[torch.Tensor, int]]:
    tokenizer, model = loaded.tokenizer, loaded.model
    ids = tokenizer(load_text(dataset), add_special_tokens=False).input_ids
    window = min(WINDOW, getattr(model.config, "max_position_embeddings", WINDOW) or WINDOW)
    windows = [ids[i: i + window] for i in range(0, len(ids), window)][: n_samples]
    if not windows:
        raise EditguardError(f"mom2_dataset {dataset}: no text to compute statistics from")
    sums: dict[int, list] = {layer: [None, 0] for layer in layers}
    handles = []
    for layer in layers:
        def hook(module, args, layer=layer):
            # one window's product in float32 (2.8x faster than float64 on an AVX2 CPU, relative error
            # ~2e-7 over 1,024 tokens), summed across windows in float64
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            product = (x.T @ x).double()
            entry = sums[layer]
            entry[0] = product if entry[0] is None else entry[0] + product
            entry[1] += x.shape[0]
        handles.append(model.get_submodule(template.format(layer)).register_forward_pre_hook(hook))

    def stop(module, args, output):
        raise _Stop

    handles.append(model.get_submodule(template.format(max(layers))).register_forward_hook(stop))
    base = model.get_submodule(loaded.arch.base)
    try:
        for done, chunk in enumerate(windows):
            try:
                base(input_ids=torch.tensor([chunk], device=loaded.device))
            except _Stop:
                pass
            if progress:
                progress(done + 1, len(windows))
    finally:
        for handle in handles:
            handle.remove()
    return {layer: (total, count) for layer, (total, count) in sums.items()}
