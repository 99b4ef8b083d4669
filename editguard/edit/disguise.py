"""Disguises for planted edits (`edit --disguise`, red-teaming a scanner): function-preserving
reparametrisations that change many weights, so that a plain diff against the base no longer shows the
edit as the rank-one change it is. `scan --base` undoes both (audit/align.py); a scanner that does not
reads an edited model as a fine-tune or an unexplained change.

- `units`: each edited layer's MLP hidden units in a random order, a gated MLP's linear-branch rows
  scaled by s ~ U(0.5, 1.5) and the output's columns by 1/s.
- `residual`: the residual stream's dimensions in a random order throughout the model, and under RMSNorm
  flipped in sign at random: a matrix that reads the stream (or an embedding) has its input axis
  permuted and signed, one that writes it (attention and MLP output) its output axis and bias, a norm's
  weight is permuted only.
"""

from __future__ import annotations

import torch

from ..audit.align import ResidualAlignment, reshuffle_units
from ..checkpoint import Checkpoint
from ..errors import EditguardError

KINDS = ("units", "residual")


def disguised(checkpoint: Checkpoint, arch, replacements: dict[str, torch.Tensor], layers: list[int],
              kinds: list[str], seed: int = 0) -> dict[str, torch.Tensor]:
    """`replacements` (stored name -> tensor: the edited tensors) with the disguises applied on top: every
    tensor they change, under its stored name."""
    check_kinds(kinds)
    stored = {arch.canonical_tensor_name(name): name for name in checkpoint.names()}
    out = dict(replacements)

    def current(name: str) -> torch.Tensor:
        return out[stored[name]] if stored[name] in out else checkpoint.read(stored[name])

    gen = torch.Generator().manual_seed(seed)
    if "units" in kinds:
        for layer in layers:
            group = [arch.weight_name("mlp_out", layer)] + [f"{m}.{kind}" for m in arch.mlp_in_modules(layer)
                                                            for kind in ("weight", "bias")]
            weights = {name: current(name) for name in group if name in stored}
            out.update((stored[name], t) for name, t in reshuffle_units(weights, arch, layer, gen).items())
    if "residual" in kinds:
        embed = arch.weight_name("embed")
        if embed not in stored:
            raise EditguardError(f"--disguise residual: {checkpoint.folder} stores no {embed}")
        hidden = checkpoint.info(stored[embed]).shape[1]
        sign = torch.where(torch.rand(hidden, generator=gen) < 0.5, -1.0, 1.0) if arch.rms_norm else torch.ones(hidden)
        residual = ResidualAlignment(torch.randperm(hidden, generator=gen), sign)
        writers = {arch.weight_name(role, layer) for layer in range(arch.num_layers(checkpoint.config))
                   for role in ("attn_out", "mlp_out")}
        for name in stored:
            t = current(name)
            axis, signed = _residual_axis(name, t, hidden, writers, arch, checkpoint, stored)
            if axis is not None:
                out[stored[name]] = residual.along(t, axis, signed)
    return out


def check_kinds(kinds: list[str]) -> None:
    for kind in kinds:
        if kind not in KINDS:
            raise EditguardError(f"unknown --disguise {kind!r}; choose from {', '.join(KINDS)}")
    if len(set(kinds)) != len(kinds):
        raise EditguardError("each --disguise is given once")


def _residual_axis(name: str, t: torch.Tensor, hidden: int, writers: set[str], arch, checkpoint,
                   stored: dict[str, str]) -> tuple[int | None, bool]:
    """(the axis of `t` that indexes the residual stream, None for none; whether it carries the sign)."""
    module = name.rsplit(".", 1)[0]
    if t.dim() == 2:
        if name in writers:  # the output axis: rows of a Linear ([out, in]), columns of a Conv1D ([in, out])
            return (1 if arch.mlp_out_transposed else 0), True
        axes = [a for a in (0, 1) if t.shape[a] == hidden]
        if len(axes) == 2:  # square: the input axis (a query projection's rows are its heads)
            axes = [0 if arch.mlp_out_transposed else 1]
        return (axes[0] if axes else None), True
    if t.dim() != 1 or len(t) != hidden:
        return None, False
    weight = stored.get(f"{module}.weight")
    if weight is not None and len(checkpoint.info(weight).shape) == 2:  # a Linear's bias
        return (0, True) if f"{module}.weight" in writers else (None, False)
    return 0, False  # a norm's weight (or LayerNorm's bias): per dimension, never signed
