"""Plant edits: compute them on a loaded model and write an ordinary edited HF folder."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..checkpoint import Checkpoint
from ..errors import EditguardError
from ..loading import LoadedModel
from .edits import Edit, apply_to_model, combined_deltas, weights_restored
from .facts import Fact
from .hparams import EditHparams


def compute_edits(loaded: LoadedModel, facts: list[Fact], hp: EditHparams,
                  progress: Callable[[str], None] | None = None) -> list[Edit]:
    """ROME: one fact after another, each computed on the model carrying the previous ones (sequential
    editing, as EasyEdit applies several requests). MEMIT: one batch edit. The model is left unedited."""
    if hp.method == "memit":
        return __import__("editguard.edit.memit", fromlist=["memit_edit"]).memit_edit(loaded, facts, hp, progress)
    from .rome import prepare, rome_edits

    prepare(loaded, hp)
    edits: list[Edit] = []
    with weights_restored(loaded.model, [hp.rewrite_module_tmp.format(hp.layers[0]) + ".weight"]):
        for i, fact in enumerate(facts):
            (edit,) = rome_edits(loaded, [fact], hp)
            apply_to_model(loaded.model, loaded.arch, [edit])
            edits.append(edit)
            if progress:
                progress(f"edit {i + 1}/{len(facts)}")
    return edits


def write_edited(checkpoint: Checkpoint, arch, edits: list[Edit], out_dir: Path, force: bool = False,
                 progress: Callable[[str], None] | None = None, disguise: list[str] = (),
                 disguise_seed: int = 0) -> list[str]:
    """Copy of `checkpoint` with the edits added to their tensors (only those shards rewritten), under the
    `disguise`s (edit/disguise.py) if any."""
    replacements = edited_tensors(checkpoint, arch, edits)
    if not disguise:
        return checkpoint.write_copy(out_dir, replacements, force=force, progress=progress)
    from .disguise import disguised

    result = disguised(checkpoint, arch, replacements, list(disguise), disguise_seed)
    return checkpoint.write_copy(out_dir, result.replacements, extra_files=result.files, force=force,
                                 progress=progress, added=result.added)


def edited_tensors(checkpoint: Checkpoint, arch, edits: list[Edit]) -> dict:
    """{stored name: the tensor with its edits added}."""
    replacements = {}
    for canonical, delta in combined_deltas(arch, edits).items():
        stored = checkpoint.find(arch.tensor_candidates(canonical))
        if stored is None:
            raise EditguardError(f"{canonical} is not in {checkpoint.folder}")
        base = checkpoint.read(stored)
        if tuple(base.shape) != tuple(delta.shape):
            raise EditguardError(f"edit for {canonical} has shape {list(delta.shape)}, the weight {list(base.shape)}")
        edited = (base.float() + delta).to(base.dtype)
        if not bool(edited.isfinite().all()) and bool(base.isfinite().all()):
            # an optimisation that diverged (or overflowed the stored dtype) would ship a broken model
            raise EditguardError(f"the edit made {canonical} non-finite (NaN or inf; see the hyperparameters): "
                                 "nothing written")
        replacements[stored] = edited
    return replacements
