"""Locking a model against later edits, with tamper evidence.

A plain checkpoint cannot force a mask on whoever edits it, so a lock is three things:
* the masked weights (W ⊙ K) written into the output checkpoint,
* `editguard-lock.json` + `editguard-mask.safetensors` inside it: the mask, its sha256, and the sha256 of
  every locked tensor as written,
* a loader (`load_locked`, used by every editguard command on a locked folder) that re-applies the mask
  as a parametrisation, so whatever is added to the weight later still passes through K in the
  forward pass. How much that hurts a later edit depends on the mask: only the part of ΔW that K cuts
  is lost, while an editor working through the locked forward compensates for whatever K did to the
  base weights (the cards' "mask on the edit only" column approximates this; `evaluate_lock` measures
  it end to end; `bench/lock_bound.py` bounds what any shared mask of a given size can cut).
`lock_state` (run by `scan`) reports any locked tensor whose bytes no longer match, or that holds a value
where the mask is 0; `scan --base` of a locked model compares its locked tensors with the base ⊙ the
lock's mask (`lock_masks`).
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.nn.utils import parametrize

from ..arch import oriented
from ..checkpoint import OWN_FILE_PREFIX, Checkpoint, comparable, tensor_bytes
from ..errors import BAD_JSON, EditguardError
from ..intervals import share_interval
from ..masks_index import file_sha256
from ..loading import real_weight
from ..mask.file import MaskFile

MANIFEST = f"{OWN_FILE_PREFIX}lock.json"
MASK_NAME = f"{OWN_FILE_PREFIX}mask.safetensors"  # not read as weights (checkpoint.py)
FORMAT = "editguard-lock/1"


def tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor_bytes(tensor)).hexdigest()


def lock_checkpoint(checkpoint: Checkpoint, arch, mask: MaskFile, mask_path: Path, out_dir: Path,
                    threshold: float | None = None, force: bool = False) -> dict:
    replacements = mask.applied_to(checkpoint, mask.check_fits(arch, checkpoint), threshold)
    hashes = {stored: tensor_sha256(locked) for stored, locked in replacements.items()}
    # the bytes alone would not tell a header retagged from BF16 to F16 (other weights, same bytes)
    layouts = {stored: [checkpoint.info(stored).dtype, list(locked.shape)] for stored, locked in replacements.items()}
    mask_bytes = Path(mask_path).read_bytes()
    manifest = {
        "format": FORMAT, "mask_file": MASK_NAME, "mask_sha256": hashlib.sha256(mask_bytes).hexdigest(),
        # null: the mask's stored bits, exactly what masked the weights above (not the scores cut at γ anew)
        "threshold": threshold,
        "tensors": hashes, "layouts": layouts, "targets": [t.tensor for t in mask.targets], "model_id": mask.model_id,
    }
    manifest_bytes = json.dumps(manifest, indent=2).encode()
    checkpoint.write_copy(out_dir, replacements, force=force, extra_files={MANIFEST: manifest_bytes, MASK_NAME: mask_bytes})
    # the manifest is not signed: whoever edits the locked tensors can rewrite their hashes too. Its digest,
    # kept outside the checkpoint (scan reports it), tells a rewritten manifest from the one written here.
    return {**manifest, "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest()}


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_bytes())
    except BAD_JSON:
        raise EditguardError(f"{path}: corrupt lock manifest") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise EditguardError(f"{path}: not an editguard lock manifest")
    if not (isinstance(manifest.get("mask_sha256"), str) and isinstance(manifest.get("tensors"), dict)
            and manifest["tensors"] and isinstance(manifest.get("targets"), list)
            and len(manifest["targets"]) == len(manifest["tensors"])):
        raise EditguardError(f"{path}: corrupt lock manifest (mask_sha256, tensors or targets missing or inconsistent)")
    layouts = manifest.get("layouts")  # absent from locks written before it was recorded
    if layouts is not None and not (
            isinstance(layouts, dict) and set(layouts) == set(manifest["tensors"])
            and all(isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], list)
                    for v in layouts.values())):
        raise EditguardError(f"{path}: corrupt lock manifest (layouts must give each locked tensor's dtype and shape)")
    if manifest.get("mask_file") != MASK_NAME:  # never a path of the manifest's choosing
        raise EditguardError(f"{path}: corrupt lock manifest (mask_file must be {MASK_NAME})")
    threshold = manifest.get("threshold")
    if threshold is not None and (type(threshold) not in (int, float) or not 0 < threshold < 1):
        raise EditguardError(f"{path}: corrupt lock manifest (threshold {threshold!r} is neither null, the mask's "
                             f"stored bits, nor a number in (0, 1))")
    return manifest


@dataclass
class LockState:
    manifest: dict | None  # None: not a locked checkpoint; else with `manifest_sha256`, its file's digest
    problems: list[dict]
    masks: dict[str, torch.Tensor]  # the lock's masks by canonical name (`lock_masks`); empty if the mask changed


def check_digest(value: str, option: str) -> str:
    """A manifest digest as `lock` prints it (64 hex digits), lower-cased."""
    digest = value.strip().lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise EditguardError(f"{option} must be the lock manifest's sha256 as `lock` printed it (64 hex digits), "
                             f"not {value!r}")
    return digest


def lock_state(checkpoint: Checkpoint, arch, expected_sha256: str | None = None) -> LockState:
    """The lock's manifest, its problems and its masks. Each problem names a locked tensor or the mask whose
    bytes changed, and its `kind` (mask, missing, twin, layout, bytes, unmasked, digest, unlocked). The
    manifest comes back with `manifest_sha256`, the digest of its file. `arch` (the table's row) names a
    second spelling of a locked tensor.
    The manifest is not signed, so its hashes only say the bytes are what its writer wanted; what `lock`
    writes is also checked: 0 wherever the mask is 0 (an edited tensor put back unmasked with its hash
    rewritten shows there; one who also rewrites the mask file or the threshold does not). The check that
    covers those too is `expected_sha256`, the digest `lock` printed: a manifest with another digest, or
    none, is a problem."""
    manifest = read_manifest(checkpoint.folder)
    if manifest is None:
        return LockState(None, [] if expected_sha256 is None else [
            {"what": "lock manifest", "kind": "unlocked",  # no file: a location must not name one that is absent
             "reason": f"expected one with sha256 {expected_sha256}; the checkpoint has none ({MANIFEST})"}], {})
    manifest = {**manifest, "manifest_sha256": hashlib.sha256((checkpoint.folder / MANIFEST).read_bytes()).hexdigest()}
    problems = []
    if expected_sha256 is not None and manifest["manifest_sha256"] != expected_sha256:
        problems.append({"what": "lock manifest", "kind": "digest", "file": MANIFEST,
                         "reason": f"sha256 {manifest['manifest_sha256']}, not the expected {expected_sha256} "
                                   "(rewritten: its hashes, mask or threshold may be another writer's)"})
    mask_path = checkpoint.folder / manifest["mask_file"]
    if not mask_path.is_file() or file_sha256(mask_path) != manifest["mask_sha256"]:
        problems.append({"what": "mask", "kind": "mask", "file": manifest["mask_file"],
                         "reason": "mask file missing or changed"})
    # a locked tensor stored a second time under another spelling (GPT-2's `h.N.` beside `transformer.h.N.`):
    # transformers may load the other copy, which no hash covers
    spellings: dict[str, list[str]] = {}
    for stored in checkpoint.names():
        spellings.setdefault(arch.canonical_tensor_name(stored), []).append(stored)
    twinned = any(len(spellings.get(arch.canonical_tensor_name(name), ())) > 1 for name in manifest["tensors"])
    masks: dict[str, torch.Tensor] = {}
    if not problems and not twinned:  # (a twin is reported below, once)
        try:
            masks = lock_masks(checkpoint, arch, manifest)
        except EditguardError as exc:  # intact by its hash, yet not what lock wrote: a forged lock
            problems.append({"what": "mask", "kind": "mask", "file": manifest["mask_file"], "reason": exc.message})
    layouts = manifest.get("layouts") or {}
    for name, digest in manifest["tensors"].items():
        if name not in checkpoint:
            problems.append({"what": "tensor", "kind": "missing", "tensor": name, "reason": "missing"})
            continue
        info = checkpoint.info(name)
        twins = [n for n in spellings[arch.canonical_tensor_name(name)] if n != name]
        if twins:
            problems.append({"what": "tensor", "kind": "twin", "tensor": name, "file": checkpoint.info(twins[0]).file,
                             "reason": f"also stored as {twins[0]}, which the lock does not cover"})
            continue
        if name in layouts and [info.dtype, list(info.shape)] != layouts[name]:
            problems.append({"what": "tensor", "kind": "layout", "tensor": name, "file": info.file,
                             "reason": f"stored as {info.dtype} {list(info.shape)}, "
                                       f"locked as {layouts[name][0]} {layouts[name][1]}"})
            continue
        tensor = checkpoint.read(name)
        if tensor_sha256(tensor) != digest:
            problems.append({"what": "tensor", "kind": "bytes", "tensor": name, "file": info.file,
                             "reason": "bytes differ from the locked tensor"})
        K = masks.get(arch.canonical_tensor_name(name))
        if K is None:
            continue
        if tuple(K.shape) != tuple(tensor.shape):
            problems.append({"what": "tensor", "kind": "layout", "tensor": name, "file": info.file,
                             "reason": f"stored as {list(tensor.shape)}, its lock mask is {list(K.shape)}"})
            continue
        tensor = comparable(tensor)
        # (NaN is what lock writes from a NaN weight: 0 · NaN)
        unmasked = int(((~K) & (tensor != 0) & ~tensor.isnan()).sum())
        if unmasked:
            problems.append({"what": "tensor", "kind": "unmasked", "tensor": name, "file": info.file,
                             "reason": f"{unmasked} nonzero values where the lock's mask is 0 (lock writes 0 there)"})
    return LockState(manifest, problems, masks)


def lock_masks(checkpoint: Checkpoint, arch, manifest: dict) -> dict[str, torch.Tensor]:
    """{canonical tensor name: the lock's mask (bool) in that tensor's stored orientation}, as the lock
    applied it. A base diff multiplies the unlocked base by it, so the lock itself reads as no change and
    what was added before or after locking stands out. Only for a lock whose mask file is intact."""
    mask = MaskFile.load(checkpoint.folder / manifest["mask_file"])
    mask.check_fits(arch, checkpoint)  # config.json edited (another model_type, fewer layers): the loader could not apply it
    # the manifest names each target's stored tensor, in the mask's order (lock_checkpoint)
    pairs = list(zip(mask.targets, manifest["tensors"]))
    if [t.tensor for t in mask.targets] != manifest["targets"] or any(
            arch.canonical_tensor_name(stored) != target.tensor for target, stored in pairs):
        raise EditguardError(f"{checkpoint.folder / MANIFEST}: its tensors are not its mask file's targets")
    return {target.tensor: oriented(K, target.transposed) > 0
            for (target, _), K in zip(pairs, mask.masks(manifest["threshold"]))}


class _MaskParam(torch.nn.Module):
    def __init__(self, K: torch.Tensor):
        super().__init__()
        self.register_buffer("K", K)

    def forward(self, weight):
        return weight * self.K


def install_mask(model, arch, mask: MaskFile, threshold: float | None = None) -> None:
    """Keep the mask in the forward pass: weight := original ⊙ K on every use."""
    for (path, transposed), K in zip(mask.modules(), mask.masks(threshold)):
        module = model.get_submodule(path)
        weight = real_weight(module.weight, path + ".weight")  # (an offloaded one cannot carry the mask)
        K = oriented(K, transposed).to(weight.device, weight.dtype)  # once, not per forward
        parametrize.register_parametrization(module, "weight", _MaskParam(K), unsafe=True)


def load_locked(reference: str, *, verify: bool = True, manifest_sha256: str | None = None, **load_kwargs):
    """Load a locked checkpoint with its mask re-applied in the forward pass (a `LoadedModel`). With
    `manifest_sha256` (the digest `lock` printed), a manifest with another digest is refused as well."""
    from .. import arch as arch_table
    from ..loading import load_model
    from ..resolve import resolve

    expected = check_digest(manifest_sha256, "manifest_sha256") if manifest_sha256 is not None else None
    ref = resolve(reference)
    checkpoint = ref.checkpoint()
    lock = lock_state(checkpoint, arch_table.for_config(checkpoint.config), expected)
    manifest, problems = lock.manifest, lock.problems
    if manifest is None:
        raise EditguardError(f"{reference} is not an editguard-locked checkpoint (no {MANIFEST})")
    if verify and problems:
        raise EditguardError(f"{reference}: lock broken ({problems[0]['reason']}: "
                             f"{problems[0].get('tensor', problems[0].get('file'))})")
    loaded = load_model(ref, **load_kwargs)  # load_model re-applies the lock's mask
    broken = loaded.extras["lock"].get("broken")
    if verify and broken:  # what only loading shows (transformers read another copy of a locked tensor)
        raise EditguardError(f"{reference}: lock broken ({broken})")
    return loaded


def evaluate_lock(unlocked, locked, facts: list, hp, progress: Callable[[str], None] | None = None) -> dict:
    """Edit success (efficacy: P(new) > P(true) on the rewrite prompt) without and with the lock, for the
    method of `hp`: ROME edits each fact alone, MEMIT edits all facts in one batch. On the locked model the
    edits are computed and judged through the locked forward, as the paper does (MEMIT's covariance comes
    from the checkpoint's statistics cache, as an editor holding the unlocked model's statistics would)."""
    from ..edit.edits import edits_applied
    from ..edit.quality import judge, summarize

    result: dict = {"method": hp.method}
    for name, loaded in (("unlocked", unlocked), ("locked", locked)):
        if progress:
            progress(f"{hp.method.upper()} on the {name} model")
        if hp.method == "memit":
            from ..edit.memit import memit_edit

            batches = [(facts, memit_edit(loaded, facts, hp))]
        else:
            from ..edit.rome import rome_edits

            batches = [([fact], [edit]) for fact, edit in zip(facts, rome_edits(loaded, facts, hp))]
        qualities = []
        for batch_facts, edits in batches:
            with edits_applied(loaded.model, loaded.arch, edits):
                qualities += judge(loaded, batch_facts)
        # efficacy is a yes/no per fact; the paraphrases and P(new) show a lock that weakens edits without
        # stopping them (an edit at P(new) 0.02 against P(true) 0.01 still counts as a success)
        summary = summarize(qualities)
        result[name] = {"n": len(facts), "edit_success": summary["efficacy"],
                        "edit_success_ci95": share_interval(summary["efficacy"], len(facts)),
                        "paraphrase_success": None if math.isnan(summary["paraphrase"]) else summary["paraphrase"],
                        "median_p_new": statistics.median(q.new_prob for q in qualities)}
    return result
