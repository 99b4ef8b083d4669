"""An edit as factors: ΔW = u @ v.T on one MLP output projection, in [out, in] orientation.

ROME edits are rank one (u: [out], v: [in]); a MEMIT batch edit is, per layer, u = R ([out, n]) and
v = (λC + KKᵀ)⁻¹K ([in, n]). Dense ΔW is built only when a weight is actually written.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..arch import Arch
from ..loading import real_weight
from .facts import Fact


@dataclass
class Edit:
    method: str  # "rome" | "memit"
    layer: int
    tensor: str  # canonical weight name, e.g. model.layers.9.mlp.down_proj.weight
    u: torch.Tensor  # [out] or [out, r]
    v: torch.Tensor  # [in] or [in, r]
    facts: list[Fact] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # steps, final loss, ...

    @property
    def rank(self) -> int:
        return 1 if self.u.dim() == 1 else self.u.shape[1]

    def delta(self, dtype=torch.float32) -> torch.Tensor:
        """Dense ΔW in [out, in] orientation."""
        u = self.u.to(dtype).reshape(self.u.shape[0], -1)
        v = self.v.to(dtype).reshape(self.v.shape[0], -1)
        return u @ v.T

    def stored_delta(self, arch: Arch, dtype=torch.float32, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW (⊙ an [out, in] mask) in the orientation the checkpoint stores the weight (GPT-2 Conv1D: [in, out])."""
        delta = self.delta(dtype) if mask is None else self.delta(dtype) * mask.to(dtype)
        return delta.T.contiguous() if arch.mlp_out_transposed else delta


def weight_param(model, tensor: str) -> torch.Tensor:
    """The stored parameter behind `tensor`: with a lock's parametrisation (weight = original ⊙ K) edits
    must go to the original, so the mask still applies to them in the forward pass."""
    from torch.nn.utils import parametrize

    module = model.get_submodule(tensor.removesuffix(".weight"))
    if parametrize.is_parametrized(module, "weight"):
        return real_weight(module.parametrizations.weight.original, tensor)
    return real_weight(module.weight, tensor)


@torch.no_grad()
def apply_to_model(model, arch: Arch, edits: list[Edit], sign: float = 1.0,
                   masks: dict[str, torch.Tensor] | None = None) -> None:
    """Add (or with sign=-1 remove) edits in place on a loaded model; `masks` ({tensor: [out, in] K}) cut
    the edits of those tensors to ΔW ⊙ K."""
    for edit in edits:
        weight = weight_param(model, edit.tensor)
        delta = edit.stored_delta(arch, torch.float32, (masks or {}).get(edit.tensor))
        weight += sign * delta.to(weight.device, weight.dtype)


def combined_deltas(arch: Arch, edits: list[Edit]) -> dict[str, torch.Tensor]:
    """Sum of stored-orientation ΔW per canonical tensor name."""
    total: dict[str, torch.Tensor] = {}
    for edit in edits:
        delta = edit.stored_delta(arch)
        total[edit.tensor] = total[edit.tensor] + delta if edit.tensor in total else delta
    return total


@contextlib.contextmanager
def weights_restored(model, tensor_names: list[str]) -> Iterator[None]:
    """Whatever happens to these weights inside the block, they leave bit-identical to how they came."""
    saved = {name: weight_param(model, name).detach().clone() for name in tensor_names}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                weight_param(model, name).copy_(value)


@contextlib.contextmanager
def edits_applied(model, arch: Arch, edits: list[Edit], masks: dict[str, torch.Tensor] | None = None
                  ) -> Iterator[None]:
    """The model carries `edits` (cut by `masks`, see `apply_to_model`) inside the block only."""
    with weights_restored(model, sorted({e.tensor for e in edits})):
        apply_to_model(model, arch, edits, masks=masks)
        yield
