"""Disguises for planted edits (`edit --disguise`, red-teaming a scanner): function-preserving
reparametrisations that change many weights, so that a plain diff against the base no longer shows the
edit as the rank-one change it is. `scan --base` undoes both (audit/align.py); a scanner that does not
reads an edited model as a fine-tune or an unexplained change.

- `units`: every layer's MLP hidden units in a random order, a gated MLP's linear-branch rows scaled by
  s ∈ {1/2, 2} (exact in every float dtype) and the output's columns by 1/s.
- `heads`: every layer's attention heads in a random order (key/value heads, each group's query heads
  moving with it and reordered within it; the output projection's columns alike; a fused query-key-value
  matrix split by its layout).
- `residual`: the residual stream's dimensions in a random order throughout the model, and under RMSNorm
  flipped in sign at random: a matrix that reads the stream (or an embedding) has its input axis
  permuted and signed, one that writes it (attention and MLP output) its output axis and bias, a norm's
  weight is permuted only.
- `rotation`: the residual stream multiplied by a random orthogonal Q, as QuaRot and SliceGPT prepare a
  model: every norm's weight folded into the matrices that read its output (then 1). Only where no
  rotation changes the function (RMSNorm everywhere and no norm on a sublayer's output: `Arch.rotatable`);
  a tied output head is untied (written as a tensor of its own, `tie_word_embeddings` false), since the
  final norm folds into it and not into the embedding. Exact up to the stored dtype's rounding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from ..arch import canonical_names
from ..audit.align import (ResidualAlignment, ResidualRoles, attention_tensors, heads_split, reshuffle_heads,
                           reshuffle_units, rotate_residual)
from ..checkpoint import Checkpoint
from ..errors import EditguardError

KINDS = ("units", "heads", "residual", "rotation")


@dataclass
class Disguised:
    """What a disguise writes: `replacements` {stored name: tensor}, tensors the folder lacks (`added`: an
    untied output head) and files written over the copied ones (`files`: config.json)."""

    replacements: dict[str, torch.Tensor]
    added: dict[str, torch.Tensor] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)


def check_disguise(checkpoint: Checkpoint, arch, kinds: list[str]) -> dict[str, str]:
    """What `disguised` needs, checked before any edit is computed: known kinds, each once; one spelling per
    tensor (a second copy would stay as it was); the token embedding stored (it sets the stream's width).
    Returns {canonical name: stored name}."""
    for kind in kinds:
        if kind not in KINDS:
            raise EditguardError(f"unknown --disguise {kind!r}; choose from {', '.join(KINDS)}")
    if len(set(kinds)) != len(kinds):
        raise EditguardError("each --disguise is given once")
    stored = canonical_names(arch, checkpoint, f"--disguise: {checkpoint.folder}", "a disguise would change one "
                             "copy only")
    if "heads" in kinds:
        counts = arch.heads(checkpoint.config)
        if counts is None:
            raise EditguardError(f"--disguise heads: config.json of this {arch.model_type} model does not give its "
                                 "head counts")
        shapes = {name: torch.empty(checkpoint.info(s).shape, device="meta") for name, s in stored.items()}
        for layer in range(arch.num_layers(checkpoint.config)):
            if not heads_split(arch, shapes, layer, *counts):
                raise EditguardError(f"--disguise heads: layer {layer}'s attention tensors are not all there or do "
                                     f"not split into the config's {counts[0]} query and {counts[1]} key/value heads")
    if "rotation" in kinds and "residual" in kinds:
        raise EditguardError("--disguise rotation moves every residual dimension already: give it without residual")
    if "rotation" in kinds and not arch.rotatable:
        raise EditguardError(f"--disguise rotation: no rotation of the residual stream keeps a {arch.model_type} "
                             "model's function (it needs RMSNorm everywhere and no norm on a sublayer's output); "
                             "use --disguise residual")
    embed, head = arch.weight_name("embed"), arch.weight_name("unembed")
    for kind in {"residual", "rotation"} & set(kinds):
        if embed not in stored or len(checkpoint.info(stored[embed]).shape) != 2:
            raise EditguardError(f"--disguise {kind}: {checkpoint.folder} stores no {embed} matrix")
    if "rotation" in kinds and head not in stored and stored[embed] != embed:
        # the untied head is written under its canonical name, which must be the folder's spelling
        raise EditguardError(f"--disguise rotation: {checkpoint.folder} stores {embed} as {stored[embed]!r}, so "
                             f"the untied output head could not be named")
    return stored


def disguised(checkpoint: Checkpoint, arch, replacements: dict[str, torch.Tensor], kinds: list[str],
              seed: int) -> Disguised:
    """`replacements` (stored name -> tensor: the edited tensors) with the disguises applied on top: every
    tensor they change, under its stored name. Holds every tensor it changes in memory (`residual`,
    `rotation`: the whole model). Rescales are by powers of two, exact in every float dtype: the function is
    the same (a rotation: up to the stored dtype's rounding)."""
    stored = check_disguise(checkpoint, arch, kinds)
    out = dict(replacements)
    result = Disguised(out)
    num_layers = arch.num_layers(checkpoint.config)

    def current(name: str) -> torch.Tensor:
        return out[stored[name]] if stored[name] in out else checkpoint.read(stored[name])

    gen = torch.Generator().manual_seed(seed)
    if "units" in kinds:  # every layer, so that the edited one is not the only layer reshuffled
        for layer in range(num_layers):
            group = [arch.weight_name("mlp_out", layer)] + [f"{m}.{kind}" for m in arch.mlp_in_modules(layer)
                                                            for kind in ("weight", "bias")]
            weights = {name: current(name) for name in group if name in stored}
            changed = reshuffle_units(weights, arch, layer, gen, scales=(0.5, 2.0))
            out.update((stored[name], t) for name, t in changed.items())
    if "heads" in kinds:
        heads, kv_heads = arch.heads(checkpoint.config)
        for layer in range(num_layers):
            weights = {name: current(name) for name, _ in attention_tensors(arch, layer) if name in stored}
            changed = reshuffle_heads(weights, arch, layer, heads, kv_heads, gen)
            out.update((stored[name], t) for name, t in changed.items())
    hidden = checkpoint.info(stored[arch.weight_name("embed")]).shape[1] if {"residual", "rotation"} & set(kinds) else 0
    if "residual" in kinds:
        sign = torch.where(torch.rand(hidden, generator=gen) < 0.5, -1.0, 1.0) if arch.rms_norm else torch.ones(hidden)
        residual = ResidualAlignment(torch.randperm(hidden, generator=gen), sign)
        roles = ResidualRoles(arch, num_layers, hidden,
                              lambda n: tuple(checkpoint.info(stored[n]).shape) if n in stored else None)
        for name in stored:
            t = current(name)
            axis, signed = roles.axis(name, t)
            if axis is not None:
                out[stored[name]] = residual.along(t, axis, signed)
    if "rotation" in kinds:
        # a Haar-random orthogonal Q: QR of a Gaussian with R's diagonal made positive
        q, r = torch.linalg.qr(torch.randn(hidden, hidden, generator=gen, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r))
        # (a stored head is rotated as it is, even under a tied config: transformers 5 loads a stored head that
        # differs from the embedding untied)
        weights = {name: current(name) for name in stored}
        for name, t in rotate_residual(weights, arch, num_layers, q).items():
            if name not in stored:
                result.added[name] = t  # the untied output head
            elif t is not weights[name]:
                out[stored[name]] = t
        config = {**checkpoint.config, "tie_word_embeddings": False}
        if isinstance(config.get("text_config"), dict) and "tie_word_embeddings" in config["text_config"]:
            config["text_config"] = {**config["text_config"], "tie_word_embeddings": False}
        result.files["config.json"] = (json.dumps(config, indent=2) + "\n").encode()
    return result
