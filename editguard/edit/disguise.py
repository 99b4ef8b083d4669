"""Disguises for planted edits (`edit --disguise`, red-teaming a scanner): function-preserving
reparametrisations that change many weights, so that a plain diff against the base no longer shows the
edit as the rank-one change it is. `scan --base` undoes both (audit/align.py); a scanner that does not
reads an edited model as a fine-tune or an unexplained change.

- `units`: every layer's MLP hidden units in a random order, a gated MLP's linear-branch rows scaled by
  s ∈ {1/2, 2} (exact in every float dtype) and the output's columns by 1/s.
- `residual`: the residual stream's dimensions in a random order throughout the model, and under RMSNorm
  flipped in sign at random: a matrix that reads the stream (or an embedding) has its input axis
  permuted and signed, one that writes it (attention and MLP output) its output axis and bias, a norm's
  weight is permuted only.
"""

from __future__ import annotations

import torch

from ..arch import canonical_names
from ..audit.align import ResidualAlignment, ResidualRoles, reshuffle_units
from ..checkpoint import Checkpoint
from ..errors import EditguardError

KINDS = ("units", "residual")


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
    if "residual" in kinds and arch.weight_name("embed") not in stored:
        raise EditguardError(f"--disguise residual: {checkpoint.folder} stores no {arch.weight_name('embed')}")
    return stored


def disguised(checkpoint: Checkpoint, arch, replacements: dict[str, torch.Tensor], kinds: list[str],
              seed: int) -> dict[str, torch.Tensor]:
    """`replacements` (stored name -> tensor: the edited tensors) with the disguises applied on top: every
    tensor they change, under its stored name. Holds every tensor it changes in memory (`residual`: the
    whole model). Rescales are by powers of two, exact in every float dtype: the function is the same."""
    stored = check_disguise(checkpoint, arch, kinds)
    out = dict(replacements)
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
    if "residual" in kinds:
        hidden = checkpoint.info(stored[arch.weight_name("embed")]).shape[1]
        sign = torch.where(torch.rand(hidden, generator=gen) < 0.5, -1.0, 1.0) if arch.rms_norm else torch.ones(hidden)
        residual = ResidualAlignment(torch.randperm(hidden, generator=gen), sign)
        roles = ResidualRoles(arch, num_layers, hidden,
                              lambda n: tuple(checkpoint.info(stored[n]).shape) if n in stored else None)
        for name in stored:
            t = current(name)
            axis, signed = roles.axis(name, t)
            if axis is not None:
                out[stored[name]] = residual.along(t, axis, signed)
    return out
