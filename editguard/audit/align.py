"""Hidden-unit alignment: undo a function-preserving reshuffle of one MLP's hidden units before diffing.

An MLP computes out = W_out · act(W_in x): permuting its hidden units (the rows of every input matrix,
with their biases, and the columns of the output matrix alike) leaves the function as it was, and so
does scaling a unit's row of the linear branch of a gated MLP (act(gate x) · (up x)) by s and its output
column by 1/s. A reshuffle changes every weight of the layer's MLP, so an edit under it reads as a
full-rank change of three matrices instead of a rank-one change of one. Here the base's units are matched
to the model's (the input rows that point the same way), and the base is rewritten in the model's order
and scale; what then still differs is what the reshuffle hid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SAME_UNIT = 0.999  # cosine of a unit's input rows, model against base, for it to count as in place
MATCHED = 0.9  # a moved unit's rows against the base unit it is matched with, at least
# a linear-branch row counts as rescaled (base row times s) when s explains all but this share of the row's
# change, or, where storage rounding leaves more (bfloat16: ~4e-3), when the row is s times the base row to
# within this share of its norm with s at least this far from 1. A fine-tune's drift is neither: it is not
# along the row.
PROPORTIONAL = 1e-2
BLOCK = 2048  # model units compared against all base units at a time (a block of n similarities each)


@dataclass
class Alignment:
    """Base unit `order[i]` is the model's unit i, its linear-branch row scaled by `scale[i]`."""
    order: torch.Tensor  # [units] long
    scale: torch.Tensor  # [units] float64, 1 where nothing is scaled
    scalable: int | None  # index of the input matrix whose rows are scaled (a gated MLP's linear branch)

    @property
    def moved(self) -> int:
        return int((self.order != torch.arange(len(self.order))).sum())

    @property
    def rescaled(self) -> int:
        return int((self.scale != 1).sum())

    def base_input(self, index: int, units_major: torch.Tensor) -> torch.Tensor:
        """An input matrix's (or bias's) base values, units first, in the model's order and scale."""
        out = units_major[self.order].double()
        if index == self.scalable:
            out = out * self.scale.reshape(-1, *([1] * (out.dim() - 1)))
        return out

    def base_output(self, units_major: torch.Tensor) -> torch.Tensor:
        """The output matrix's base values, units first ([units, hidden]), in the model's order and scale."""
        return units_major[self.order].double() / self.scale[:, None]

    def to_json(self) -> dict:
        return {"moved": self.moved, "rescaled": self.rescaled}


def _unit_rows(t: torch.Tensor) -> torch.Tensor:
    return t.double() / t.double().norm(dim=1, keepdim=True).clamp_min(1e-30)


def align_units(model_in: list[torch.Tensor], base_in: list[torch.Tensor],
                scalable: int | None) -> Alignment | None:
    """The alignment of the base's hidden units to the model's, from the MLP's input matrices (units first,
    [units, hidden]); None when the units are in place and unscaled, or when no one-to-one match explains
    the change (a fine-tune's drift, another model)."""
    units = model_in[0].shape[0]
    # in place: every input row points the same way (the linear branch's up to sign, which a scale may flip)
    cosines = torch.stack([(_unit_rows(m) * _unit_rows(b)).sum(1) for m, b in zip(model_in, base_in)])
    if scalable is not None:
        cosines[scalable] = cosines[scalable].abs()
    in_place = (cosines >= SAME_UNIT).all(0)
    order = torch.arange(units)
    moved = torch.nonzero(~in_place).flatten()
    if len(moved):
        # a moved unit is matched among the other moved units only: a reshuffle maps them onto each other
        best, score = torch.empty(len(moved), dtype=torch.long), torch.empty(len(moved), dtype=torch.float64)
        rows_m = [_unit_rows(m[moved]) for m in model_in]
        rows_b = [_unit_rows(b[moved]) for b in base_in]
        for lo in range(0, len(moved), BLOCK):
            sim = sum((rm[lo:lo + BLOCK] @ rb.T).abs() if i == scalable else rm[lo:lo + BLOCK] @ rb.T
                      for i, (rm, rb) in enumerate(zip(rows_m, rows_b))) / len(rows_m)
            score[lo:lo + BLOCK], best[lo:lo + BLOCK] = sim.max(1)
        if len(set(best.tolist())) != len(moved) or float(score.min()) < MATCHED:
            return None  # not one-to-one, or a unit that matches no base unit: not a reshuffle
        order[moved] = moved[best]
    scale = torch.ones(units, dtype=torch.float64)
    if scalable is not None:
        m, b = model_in[scalable].double(), base_in[scalable][order].double()
        fit = (m * b).sum(1) / (b * b).sum(1).clamp_min(1e-30)
        residual = (m - fit[:, None] * b).norm(dim=1)
        explained = residual <= PROPORTIONAL * (m - b).norm(dim=1)
        coarse = (residual <= PROPORTIONAL * m.norm(dim=1)) & ((fit - 1).abs() >= PROPORTIONAL)
        proportional = (explained | coarse) & ((b * b).sum(1) > 0) & (fit != 1)
        scale = torch.where(proportional, fit, scale)
    alignment = Alignment(order, scale, scalable)
    return alignment if alignment.moved or alignment.rescaled else None


def reshuffle_units(weights: dict[str, torch.Tensor], arch, layer: int, generator: torch.Generator,
                    rescale: tuple[float, float] = (0.5, 1.5)) -> dict[str, torch.Tensor]:
    """What `align_units` undoes, for tests and benchmarks: layer `layer`'s MLP tensors from `weights`
    (canonical names; input weights and biases, output weight) with the hidden units in a random order and,
    in a gated MLP, the linear branch's rows scaled by s ~ U(rescale) and the output's columns by 1/s."""
    ins = [f"{m}.weight" for m in arch.mlp_in_modules(layer)]
    out = arch.weight_name("mlp_out", layer)
    t = arch.mlp_out_transposed  # GPT-2's Conv1D: units are the inputs' columns and the output's rows
    units = weights[ins[0]].shape[1 if t else 0]
    order = torch.randperm(units, generator=generator)
    scale = torch.ones(units)
    if len(ins) == 2:
        scale = rescale[0] + (rescale[1] - rescale[0]) * torch.rand(units, generator=generator)
    changed = {}
    for i, name in enumerate(ins):
        s = (scale if i == 1 else torch.ones(units)).to(weights[name].dtype)
        changed[name] = (weights[name][:, order] * s) if t else weights[name][order] * s[:, None]
        bias = name[: -len("weight")] + "bias"
        if bias in weights:
            changed[bias] = weights[bias][order] * s
    s = scale.to(weights[out].dtype)
    changed[out] = (weights[out][order] / s[:, None]) if t else weights[out][:, order] / s
    return changed
