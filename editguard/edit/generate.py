"""Fill an edit bank: independent edits of many facts against the unedited model, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..checkpoint import fingerprint, remove_stale_temps
from ..errors import EditguardError
from ..home import path_lock
from ..loading import LoadedModel
from .bank import EditBank
from .facts import Fact
from .hparams import EditHparams
from .rome import prepare, rome_edits, templates_for, templates_key


def target_fingerprints(loaded: LoadedModel, hp: EditHparams) -> dict[str, str]:
    """{canonical tensor name: fingerprint} of the tensors `hp` edits (checked against this model)."""
    prepare(loaded, hp)
    out = {}
    for layer in hp.layers:
        canonical = hp.rewrite_module_tmp.format(layer) + ".weight"
        stored = loaded.checkpoint.find(loaded.arch.tensor_candidates(canonical))
        out[canonical] = fingerprint(loaded.checkpoint.read(stored)) if stored else "unknown"
    return out


def edited_shapes(loaded: LoadedModel, hp: EditHparams) -> dict[int, tuple[int, int]]:
    """{layer: [out, in]} of the tensors the method edits."""
    shapes = {}
    for layer in hp.layers:
        shape = tuple(loaded.model.get_submodule(hp.rewrite_module_tmp.format(layer)).weight.shape)
        shapes[layer] = shape[::-1] if loaded.arch.mlp_out_transposed else shape
    return shapes


def open_or_create_bank(loaded: LoadedModel, hp: EditHparams, path: Path, resume: bool) -> EditBank:
    fingerprints = target_fingerprints(loaded, hp)
    if path.exists():
        if not resume:
            raise EditguardError(f"edit bank {path} exists; pass --resume to extend it, or choose another --bank")
        remove_stale_temps(path)  # a killed flush's half-written copy (the bank writer's lock is held here)
        bank = EditBank.open(path)
        bank.check_matches(loaded.ref.model_id, hp.method, hp.digest(), fingerprints, loaded.fingerprint)
        if bank.meta.get("dtype") not in (None, dtype_name(loaded)):  # edits of one bank share one precision
            raise EditguardError(f"edit bank {path} holds edits computed in {bank.meta['dtype']}; resume it with "
                                 f"--dtype {bank.meta['dtype']}, or use another --bank")
        bank.check_widths(edited_shapes(loaded, hp))  # before appending: a damaged bank is named, not met by cat
        # a bank keeps its own context templates: edits added on another machine use the same ones
        loaded.extras[templates_key(hp)] = list(bank.meta["context_templates"])
        return bank
    return EditBank.create(
        path, model_id=loaded.ref.model_id, revision=loaded.ref.revision, model_type=loaded.arch.model_type,
        method=hp.method, hparams=hp.to_dict(), hparams_hash=hp.digest(), templates=templates_for(loaded, hp),
        fingerprints=fingerprints, model_fingerprint=loaded.fingerprint, dtype=dtype_name(loaded))


def dtype_name(loaded: LoadedModel) -> str:
    """The precision the model computes in, as --dtype names it."""
    return str(loaded.model.dtype).removeprefix("torch.")


def fill_bank(
    loaded: LoadedModel,
    facts: list[Fact],
    hp: EditHparams,
    path: Path,
    resume: bool = False,
    memit_batch: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EditBank:
    """Edit every fact whose edit the bank lacks, flushing after each batch (a killed run resumes).

    ROME: one independent rank-one edit per fact. MEMIT: batch edits of `memit_batch` facts each."""
    with bank_writer(Path(path)):
        return _fill_bank(loaded, facts, hp, Path(path), resume, memit_batch, progress)


def bank_writer(path: Path):
    """One process at a time extends a bank: each flush rewrites the whole file, so a second writer would
    drop the first one's edits. The lock lives in editguard's cache, not beside the bank."""
    return path_lock("bank", path, busy=f"edit bank {path} is being extended by another editguard process; wait "
                                        f"for it to finish, or use another --bank")


def _fill_bank(loaded: LoadedModel, facts: list[Fact], hp: EditHparams, path: Path, resume: bool,
               memit_batch: int | None, progress: Callable[[int, int], None] | None) -> EditBank:
    bank = open_or_create_bank(loaded, hp, path, resume)
    todo = bank.unbanked(facts)
    if progress:
        progress(len(facts) - len(todo), len(facts))
    if hp.method == "rome":
        step = hp.facts_per_batch
        for lo in range(0, len(todo), step):
            bank.append(rome_edits(loaded, todo[lo: lo + step], hp))
            bank.flush()
            if progress:
                progress(len(facts) - len(todo) + min(lo + step, len(todo)), len(facts))
    else:
        from .memit import memit_edit

        pending = bank.meta.get("filling")  # left by a run killed between its batch edits
        if todo and isinstance(pending, dict) and type(pending.get("memit_batch")) is int \
                and pending["memit_batch"] != memit_batch:
            # other batches would make other edits than the killed run was making (and its settings record)
            raise EditguardError(f"edit bank {path} was being filled in MEMIT batch edits of "
                                 f"{pending['memit_batch']} facts by a run that stopped; resume with "
                                 f"--memit-batch {pending['memit_batch']}")
        step = memit_batch or len(todo) or 1
        if todo:
            bank.meta["filling"] = {"memit_batch": memit_batch}
        for lo in range(0, len(todo), step):
            bank.append(memit_edit(loaded, todo[lo: lo + step], hp))
            if lo + step >= len(todo):
                bank.meta.pop("filling", None)  # done: the last flush leaves no pending run behind
            bank.flush()
            if progress:
                progress(len(facts) - len(todo) + min(lo + step, len(todo)), len(facts))
    if not todo and not path.exists():
        bank.flush()
    return bank
