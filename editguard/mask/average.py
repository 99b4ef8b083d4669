"""Averaging masks: the soft scores of masks trained over the same tensors (another seed, other records)
meaned into one mask, to be cut again. Runs of one recipe agree on most of what they prune and disagree
near the cut, where a single run's choice is partly noise; the mean keeps what they share."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..errors import EditguardError
from .file import MaskFile


def _mismatch(first: MaskFile, other: MaskFile) -> str | None:
    """Why `other` cannot be averaged into `first`, or None."""
    if (other.model_type, other.method) != (first.model_type, first.method):
        return (f"it is a {other.model_type} mask against {other.method.upper()} edits, the first is a "
                f"{first.model_type} mask against {first.method.upper()} edits")
    if other.edit_layers() != first.edit_layers():
        return f"it was trained against edits at layers {other.edit_layers()}, the first at {first.edit_layers()}"

    def fields(m: MaskFile) -> list:
        return [(t.tensor, t.shape, t.transposed, t.fingerprint) for t in m.targets]

    if fields(other) != fields(first):
        return "it masks other tensors (or another model's weights) than the first"
    return None


def _source(mask: MaskFile, path: Path) -> dict:
    """What the averaged mask's card says about one of its sources (each keeps its own card)."""
    m = mask.metrics
    return {"file": path.name, "seed": (mask.hparams.get("train") or {}).get("seed"), "threshold": mask.threshold,
            "command": m.get("command"), "steps": m.get("steps"), "shipped_step": m.get("shipped_step"),
            "train_seconds": m.get("train_seconds"), "data_hash": mask.data.get("hash")}


def averaged(masks: list[MaskFile], paths: list[Path]) -> MaskFile:
    """One mask whose soft scores are the mean of `masks`' (Θ dropped: a mean of Θ is no trained state to
    resume). It has no cut of its own yet: `evaluate-mask --average` cuts it and measures it."""
    if len(masks) < 2:
        raise EditguardError("averaging needs at least two masks")
    first = masks[0]
    for mask, path in zip(masks[1:], paths[1:]):
        why = _mismatch(first, mask)
        if why:
            raise EditguardError(f"cannot average {path} into {paths[0]}: {why}")
    targets = [replace(t, theta=None, scores=torch.stack([m.targets[i].scores.float() for m in masks]).mean(0))
               for i, t in enumerate(first.targets)]
    sources = [_source(m, p) for m, p in zip(masks, paths)]
    hparams = {**first.hparams, "train": {**(first.hparams.get("train") or {}), "seed": [s["seed"] for s in sources]}}
    return replace(first, targets=targets, binaries=None, hparams=hparams, metrics={"averaged": sources})
