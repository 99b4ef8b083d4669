"""Which shipped (or user-trained) mask fits a model: the registry `inspect` and `scan` consult.

Each mask folder holds `index.json`: a list of entries written by `editguard train` (model type, target
tensor names and shapes, base-weight fingerprints, the mask file's sha256). Folders searched, in order: `$EDITGUARD_MASKS`
(os.pathsep-separated), the `masks/` folder of this source tree (or of the installed package),
`$EDITGUARD_HOME/masks`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from .arch import Arch
from .checkpoint import Checkpoint, fingerprint
from .errors import BAD_JSON, EditguardError
from .home import home

INDEX = "index.json"


def mask_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get("EDITGUARD_MASKS", "").split(os.pathsep) if p]
    here = Path(__file__).resolve().parent
    dirs.append(here.parent / "masks")  # a source checkout (or an editable install)
    dirs.append(here / "masks")  # an installed wheel: pyproject maps masks/ to editguard/masks/
    dirs.append(home() / "masks")
    seen, unique = set(), []
    for d in dirs:
        if d.resolve() not in seen and (d / INDEX).is_file():
            seen.add(d.resolve())
            unique.append(d)
    return unique


def read_index(path: Path) -> list[dict]:
    """The entries of a mask index (none when there is no file); anything else is one clear error, never
    silently replaced."""
    if not path.is_file():
        return []
    try:
        items = json.loads(path.read_text())
    except (OSError, *BAD_JSON):
        items = None
    if not isinstance(items, list) or not all(isinstance(item, dict) and isinstance(item.get("file"), str)
                                              for item in items):
        raise EditguardError(f"{path} is not a mask index (a JSON list of objects, each naming its mask \"file\"); "
                             "move it or choose another folder")
    return items


def entries() -> list[dict]:
    found = []
    for folder in mask_dirs():
        try:
            items = read_index(folder / INDEX)
        except EditguardError:
            continue  # a broken user index must not break inspect; `editguard masks` reports it
        for item in items:
            if _well_formed(item):
                found.append({**item, "path": str(folder / item["file"])})
    return found


def _well_formed(item) -> bool:
    """An entry `fitting` can read: a plain file name, and targets each with a tensor name and a shape
    (a broken entry is skipped, as a broken index is)."""
    if not (isinstance(item, dict) and isinstance(item.get("file"), str) and Path(item["file"]).name == item["file"]):
        return False
    targets = item.get("targets", [])
    layers, edit_layers = item.get("layers") or [], item.get("edit_layers") or []
    ints = lambda values: isinstance(values, list) and all(type(v) is int for v in values)  # noqa: E731
    return isinstance(targets, list) and ints(layers) and ints(edit_layers) and all(
        isinstance(t, dict) and isinstance(t.get("tensor"), str) and isinstance(t.get("stored_shape"), list)
        for t in targets) and all(isinstance(item.get(key) or 0, (int, float)) for key in ("test_rsr", "perplexity_increase"))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def mask_path(entry: dict) -> Path:
    """The entry's mask file, checked against the sha256 its index records (entries written before the field
    are taken as they are): a mask damaged on disk or swapped under its name is refused, never applied."""
    path = Path(entry["path"])
    recorded = entry.get("sha256")
    if isinstance(recorded, str) and path.is_file() and file_sha256(path) != recorded:  # (missing: the loader says)
        raise EditguardError(f"{path}: the file's sha256 is not the one its mask index records (damaged, or replaced "
                             "by hand; `editguard train` and `evaluate-mask -o` write both)")
    return path


def fitting(arch: Arch, checkpoint: Checkpoint) -> list[dict]:
    """Index entries whose target tensors exist here with the right shapes; 'exact' when the base
    weights' fingerprint matches too (the mask was trained on this very model)."""
    fits = []
    for entry in entries():
        if entry.get("model_type") != arch.model_type:
            continue
        ok, exact = True, True
        for target in entry.get("targets", []):
            stored = checkpoint.find(arch.tensor_candidates(target["tensor"]))
            if stored is None or list(checkpoint.info(stored).shape) != list(target["stored_shape"]):
                ok = False
                break
            if target.get("fingerprint") and fingerprint(checkpoint.read(stored)) != target["fingerprint"]:
                exact = False
        if ok:
            fits.append({**entry, "match": "exact" if exact else "shape"})
    # exact matches first, then the mask that reverses the most held-out edits
    return sorted(fits, key=lambda e: (e["match"] != "exact", -(e.get("test_rsr") or 0)))


def edit_layers(entry: dict) -> list[int]:
    """The layers of the edits the entry's mask reverses (indexes written before the field: the layers it masks)."""
    return entry.get("edit_layers") or entry.get("layers") or []


def prefer_layers(fits: list[dict], layers, method: str | None = None) -> list[dict]:
    """`fits` with the masks for edits at any of `layers` (where edits were found or planted) first: a mask
    only reverses edits of the tensors it was trained against; with `method`, masks trained against that edit
    method before those (a MEMIT mask spans the layer of a ROME edit without having learnt ROME's)."""
    wanted = set(layers or [])
    return sorted(fits, key=lambda e: (method is not None and e.get("method") != method,
                                       not wanted.intersection(edit_layers(e))))


def edited_tensors_only(arch: Arch, entry: dict) -> bool:
    """The entry masks MLP output projections only (the tensors ROME/MEMIT edit), no MLP inputs."""
    layers = entry.get("layers") or []
    return len(layers) == len(entry.get("targets", [])) and all(
        arch.is_mlp_out(t["tensor"], layer) for t, layer in zip(entry["targets"], layers))


def perplexity_increase(metrics: dict) -> float | None:
    """What the mask alone costs a clean model, from a mask's metrics: WikiText-2 perplexity with the mask on
    the unedited weights over the original's, minus one (what a lock costs everyone who loads it); None when
    not measured."""
    try:
        text = metrics["text"]
        ratio = text["mask_on_unedited"]["perplexity"] / text["original"]["perplexity"]
    except (KeyError, TypeError, ZeroDivisionError):
        return None
    return round(ratio - 1, 4) if math.isfinite(ratio) else None


LOCK_PERPLEXITY_BUDGET = 0.10  # the paper's bar for a pruned model: perplexity within 10 % of the original


def lock_cost_class(entry: dict) -> int:
    """0: the mask alone costs a clean model at most LOCK_PERPLEXITY_BUDGET in perplexity, 1: not measured
    (an index written before the field), 2: more."""
    cost = entry.get("perplexity_increase")
    return 1 if cost is None else 0 if cost <= LOCK_PERPLEXITY_BUDGET else 2


def best_fit(arch: Arch, checkpoint: Checkpoint, layers=None, method: str | None = None,
             lock: bool = False) -> dict | None:
    """The fitting mask to use: one trained against `method` and over `layers` (found edited or planted)
    first, then exact matches, then by RSR. For a lock, masks over the edited tensors alone come first: an
    editor solves for the edit through the locked model, so masked MLP inputs (`train --whole-mlp`) only
    change the key the edit is solved at (the layer-9 whole-MLP mask: ROME success 100 → 100 %). Among
    those, a lock also weighs what it costs: every user of a locked model runs the mask, so masks within
    the perplexity budget come before better reversers that are not (SmolLM2's MEMIT mask: +49 %)."""
    fits = fitting(arch, checkpoint)
    if lock:  # stable sorts: the last one decides first
        fits = sorted(fits, key=lock_cost_class)
    fits = prefer_layers(fits, layers, method)
    if lock:
        fits = sorted(fits, key=lambda e: not edited_tensors_only(arch, e))
    return fits[0] if fits else None
