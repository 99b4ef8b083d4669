"""Reverse knowledge edits and write a restored checkpoint (only the changed shards rewritten).

* mask: Ŵ ⊙ K on the mask's target tensor(s) (the paper's method; reverses edits it has never seen);
* project: remove the flagged subjects' keys from the flagged layers' input side (base- and mask-free;
  see project.py);
* svd: drop the top singular component of each flagged tensor (the training-free baseline, which
  fails on small models where an edit does not dominate the spectrum);
* base: copy the flagged tensors back from the unedited base.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import Checkpoint
from ..errors import EditguardError
from ..mask.file import MaskFile


def masked_replacements(checkpoint: Checkpoint, arch, mask: MaskFile, threshold: float | None = None) -> dict:
    return mask.applied_to(checkpoint, mask.check_fits(arch, checkpoint), threshold)


def svd_replacements(checkpoint: Checkpoint, arch, layers: list[int]) -> dict:
    out = {}
    for layer in layers:
        stored = checkpoint.find(arch.tensor_candidates(arch.weight_name("mlp_out", layer)))
        if stored is None:
            raise EditguardError(f"layer {layer}: no MLP output projection in this checkpoint")
        weight = checkpoint.read(stored)
        if not torch.isfinite(weight).all():  # no spectrum to take apart; a damaged tensor is named, not decomposed
            raise EditguardError(f"{stored} holds NaN or infinite values: --method svd cannot treat it")
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        out[stored] = (weight.float() - s[0] * torch.outer(u[:, 0], vh[0])).to(weight.dtype)
    return out


def base_replacements(checkpoint: Checkpoint, arch, tensors: list[str], base_of) -> dict:
    """The base's values of `tensors` (canonical names) under the model's stored names; `base_of` reads the
    base as the diff compared it (`DiffResult.base_of`: in the model's residual basis and order of hidden
    units where the model reparametrised them, so a restored tensor fits the ones left as they are)."""
    out = {}
    for name in tensors:
        stored = checkpoint.find(arch.tensor_candidates(name))
        if stored is None:
            raise EditguardError(f"{name} is missing from the model")
        out[stored] = base_of(name).to(checkpoint.read(stored).dtype)
    return out


def write_reversed(checkpoint: Checkpoint, replacements: dict, out_dir: Path, force: bool = False) -> list[str]:
    """The reversed copy; the rewritten files. A lock whose tensors the reversal changes stays behind: its
    manifest would call the output tampered with, and the output is no longer the locked checkpoint."""
    if not replacements:
        raise EditguardError("nothing to reverse: no flagged tensor")
    return checkpoint.write_copy(out_dir, replacements, force=force, omit=lock_files_undone(checkpoint, replacements))


def lock_files_undone(checkpoint: Checkpoint, replacements: dict) -> tuple[str, ...]:
    """The lock's files (manifest, mask) when `replacements` change a tensor the checkpoint's lock protects."""
    from .lock import MANIFEST, MASK_NAME, read_manifest

    manifest = read_manifest(checkpoint.folder)
    return (MANIFEST, MASK_NAME) if manifest and set(replacements) & set(manifest["tensors"]) else ()
