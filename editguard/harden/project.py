"""Key projection: undo a knowledge edit without a base and without a mask, from what `scan` found.

A ROME edit writes ΔW = u k̂ᵀ into one MLP output projection: with `mom2_adjustment: false` (the paper's
configs and our presets) its input side is the edited subject's key k* itself. Removing the span Q of that
subject's keys from the weight's input side, Ŵ' = Ŵ (I − Q Qᵀ), deletes such an edit exactly, whatever its
size, and silences the layer at that subject for any other edit too (MEMIT, whitened ROME). It also drops
the layer's original response to the subject, which the model does not need to recall the fact: the
other layers hold it.

MEMIT (and ROME with `mom2_adjustment`) writes ΔW = R Kᵀ (λC + K Kᵀ)⁻¹, whose input side spans C⁻¹K
(Woodbury), C the second moment of the layer's input: `whiten` projects that span out instead, with C
from WikiText-2. It removes such an update and hardly touches the weight's response to the keys
themselves, so the knowledge of the layers MEMIT spreads over survives. Demo model, a 16-fact MEMIT
batch over layers 2-6 (one-off measurement, all 16 subjects): RSR 12.5 % edited → 50.0 % with the
keys' span (37.5 % on the unedited model), 75.0 % whitened (= the original's ceiling; 75.0 % unedited).

Measured on demo:smollm2-135m, 100 rome-val ROME edits at layer 6 (keys recomputed with context templates
of another seed than the edits used; `bench/reverse_quality.py` repeats it on any bank): RSR 71 % with the
original model's own ceiling at 71 %; the same projection on the unedited model leaves it preferring the
true object on 70 %.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterable, Iterator

import torch

from ..arch import oriented
from ..checkpoint import Checkpoint
from ..edit.facts import encode_until
from ..edit.forward import Tokenized, capture_at
from ..edit.stats import second_moments
from ..edit.templates import context_templates
from ..errors import EditguardError
from ..loading import LoadedModel

# Prefixes for the keys: the edit's k* is a mean over the editor's own (unknown) context templates; a few
# of ours, plus the bare prompt, span it closely (cos > 0.98 measured).
KEY_TEMPLATES = [[5, 5]]
WHITEN_WINDOWS = 64  # WikiText-2 windows for C (~65k tokens for a covariance of a few thousand dimensions)
KEY_RANK_TOLERANCE = 1e-9  # singular values below this share of the largest: repeated keys, not new directions


def edit_method(facts: Iterable[dict]) -> str | None:
    """"memit" when more flagged facts read MEMIT-like (the answer-dependence test saw the drop spread
    over a window of layers) than ROME-like (one layer; the activation test's outliers count as
    ROME-like), else "rome"; None without facts. A majority, not any one fact: measured on the demo
    model, 10 ROME edits at layer 6 read 6 ROME-like and 3 MEMIT-like windows around layer 6, a
    64-fact MEMIT batch 39 MEMIT-like and 2 others."""
    methods = {f.get("prompt"): f.get("method", "rome-like") for f in facts}
    if not methods:
        return None
    votes = Counter(methods.values())
    return "memit" if votes["memit-like"] > votes["rome-like"] else "rome"


def flagged_method(flagged: dict[int, list[dict]] | None) -> str | None:
    """edit_method of the facts in a flagged_subjects() map."""
    return edit_method(f for facts in (flagged or {}).values() for f in facts)


def whiten_by_default(flagged: dict[int, list[dict]] | None) -> bool:
    """Project whitened keys when the flagged facts read MEMIT-like (measured on a 16-fact MEMIT batch of
    the demo model: the keys' own span RSR 50 %, 37.5 % on the unedited model, so it erases what those
    layers knew; C⁻¹ keys 75 % = the original's ceiling). A ROME edit without mom2_adjustment lies on the
    keys themselves."""
    return flagged_method(flagged) == "memit"


def flagged_subjects(findings: list) -> dict[int, list[dict]]:
    """{layer: facts whose subject the layer carries an edit for} from the base-free tests: the activation
    test (EG010, one layer) and the answer-dependence test (EG011, its ROME layer or MEMIT window). When
    most facts read ROME-like, a MEMIT-like window holding a ROME-like finding's layer is taken as that
    ROME edit seen wider and narrowed to the layer."""
    base_free = [f for f in findings if f.rule in ("EG010", "EG011")]
    rome = edit_method(fact for f in base_free for fact in f.facts) == "rome"
    rome_layers = {f.layer for f in base_free if f.rule == "EG010"} | {
        f.details["layers"][0] for f in base_free if f.rule == "EG011" and f.details["method"] == "rome-like"}
    flagged: dict[int, list[dict]] = {}
    for f in base_free:
        layers = [f.layer] if f.rule == "EG010" else f.details["layers"]
        if rome and len(layers) > 1:
            layers = [layer for layer in layers if layer in rome_layers] or layers
        for layer in layers:
            flagged.setdefault(layer, []).extend(f.facts)
    return flagged


def subject_keys(loaded: LoadedModel, layer: int, facts: list[dict], templates: list[str] | None = None) -> torch.Tensor:
    """Inputs of the layer's MLP output projection at each subject's last token, [keys, in], under each
    context template ("{}" + prefixes the model writes itself when not given)."""
    templates = templates or context_templates(loaded.model, loaded.tokenizer, KEY_TEMPLATES, seed=0)
    ids, splits, seen = [], [], set()
    for fact in facts:
        prompt, subject = fact.get("prompt") or "", fact.get("subject") or ""
        if not subject or subject not in prompt:
            continue
        cut = prompt[: prompt.index(subject)] + subject  # nothing after the subject reaches its last token
        if cut in seen:  # one fact flagged by two tests, or two prompts alike up to the subject
            continue
        seen.add(cut)
        for template in templates:
            text = template[: template.index("{}")] + cut  # by position: the prompt may hold braces of its own
            seq, split = encode_until(loaded.tokenizer, text, len(text), subject)
            ids.append(seq[: split + 1])
            splits.append(split)
    if not ids:
        raise EditguardError(f"layer {layer}: no flagged fact names its subject; nothing to project out")
    path = loaded.arch.module("mlp_out", layer)
    got = capture_at(loaded.model, loaded.arch, Tokenized(ids, splits), {"k": (path, "in")},
                     pad_id=loaded.tokenizer.pad_token_id)
    return got["k"].float().cpu()


def key_basis(keys: torch.Tensor, moment: torch.Tensor | None = None) -> torch.Tensor:
    """Orthonormal basis Q [in, rank] of the span of keys [r, in], or with `moment` C of the span of C⁻¹ keys.
    From the SVD, not QR: QR of keys that repeat still returns r columns, the extra ones arbitrary
    directions that projecting out would cut from the weight for nothing."""
    if not bool(torch.isfinite(keys).all()) or (moment is not None and not bool(torch.isfinite(moment).all())):
        # NaN / inf from a damaged lower layer or statistics cache: projecting them out would write NaN weights
        raise EditguardError("the flagged subjects' keys or the layer's input statistics hold NaN or inf (a damaged "
                             "checkpoint?); nothing can be projected out")
    k = keys.T.double()
    if moment is not None:
        c = moment.double().to(k.device)
        # an input dimension the corpus never moves stays solvable; the floor keeps an all-zero C solvable too
        ridge = max(1e-10 * float(c.diagonal().mean()), 1e-12)
        k = torch.linalg.solve(c + ridge * torch.eye(c.shape[0], dtype=c.dtype, device=c.device), k)
    u, sv, _ = torch.linalg.svd(k, full_matrices=False)
    rank = int((sv > sv[0] * KEY_RANK_TOLERANCE).sum()) if sv.numel() and sv[0] > 0 else 0
    return u[:, :rank].float()


def input_moments(loaded: LoadedModel, layers: list[int]) -> dict[int, torch.Tensor]:
    """C of each layer's MLP-output-projection input over WikiText-2 (cached per checkpoint)."""
    return second_moments(loaded, layers, loaded.arch.mlp_out.replace("{layer}", "{}"), "wikitext2", WHITEN_WINDOWS)


def project_out(weight: torch.Tensor, keys: torch.Tensor, transposed: bool,
                moment: torch.Tensor | None = None) -> torch.Tensor:
    """Ŵ (I − Q Qᵀ) for Q = key_basis(keys, moment) (weight in its stored layout)."""
    w = oriented(weight.float(), transposed)
    q = key_basis(keys, moment).to(w.device)
    projected = w - (w @ q) @ q.T
    return oriented(projected, transposed).contiguous().to(weight.dtype)


@contextlib.contextmanager
def projection_applied(loaded: LoadedModel, flagged: dict[int, list[dict]], whiten: bool = False) -> Iterator[None]:
    """The loaded model with the flagged subjects' keys (whitened: C⁻¹ keys) projected out of their layers
    (exactly restored after)."""
    from ..edit.edits import weight_param, weights_restored

    arch = loaded.arch
    names = [arch.weight_name("mlp_out", layer) for layer in flagged]
    moments = input_moments(loaded, sorted(flagged)) if whiten else {}
    with weights_restored(loaded.model, names), torch.no_grad():
        for layer, name in zip(flagged, names):
            weight = weight_param(loaded.model, name)
            weight.copy_(project_out(weight.detach(), subject_keys(loaded, layer, flagged[layer]),
                                     arch.mlp_out_transposed, moments.get(layer)))
        yield


def projection_replacements(loaded: LoadedModel, checkpoint: Checkpoint, flagged: dict[int, list[dict]],
                            whiten: bool = False) -> dict:
    """{stored tensor name: projected weight} for each flagged layer and its flagged facts; with `whiten`,
    the span of C⁻¹ keys (MEMIT's update directions) instead of the keys'."""
    arch, out = loaded.arch, {}
    moments = input_moments(loaded, sorted(flagged)) if whiten else {}
    for layer, facts in sorted(flagged.items()):
        stored = checkpoint.find(arch.tensor_candidates(arch.weight_name("mlp_out", layer)))
        if stored is None:
            raise EditguardError(f"layer {layer}: no MLP output projection in this checkpoint")
        out[stored] = project_out(checkpoint.read(stored), subject_keys(loaded, layer, facts),
                                  arch.mlp_out_transposed, moments.get(layer))
    return out
