"""Undo function-preserving reparametrisations before diffing: a reshuffle of one MLP's hidden units, and a
signed permutation of the residual stream's dimensions.

An MLP computes out = W_out · act(W_in x): permuting its hidden units (the rows of every input matrix,
with their biases, and the columns of the output matrix alike) leaves the function as it was, and so
does scaling a unit's row of the linear branch of a gated MLP (act(gate x) · (up x)) by s and its output
column by 1/s. Likewise the residual stream's dimensions can be permuted throughout the model (every
matrix that reads or writes it, the embeddings, the norms' weights), and under RMSNorm also flipped in
sign. Either changes every weight it touches, so an edit under it reads as full-rank changes of many
matrices instead of a rank-one change of one. Here the base's units (or dimensions) are matched to the
model's by the rows that point the same way, and the base is rewritten in the model's order, scale and
sign; what then still differs is what the reparametrisation hid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# a row whose cosine with the base row at its own index is at least this is in place (drifted, perhaps, as a
# fine-tune leaves it: a moved row points elsewhere, near 0); a moved row is matched with a base row at
# least this near
MATCHED = 0.9
# a linear-branch row counts as rescaled (base row times s) when s explains all but this share of the row's
# change, or, where storage rounding leaves more (bfloat16: ~4e-3), when the row is s times the base row to
# within this share of its norm with s at least this far from 1; and its gate row changed by at most
# GATE_SHARE of what the linear branch's did (a rescale leaves the gate as it was: weight decay shrinks both).
# A fine-tune's drift is none of these: it is not along the row.
PROPORTIONAL = 1e-2
GATE_SHARE = 0.1
BLOCK = 2048  # model rows compared against all base rows at a time (a block of n similarities each)
EMBED_SAMPLE = 16384  # vocabulary rows whose values tell the residual dimensions apart
AXIS_SAMPLE = 1024  # indices per axis on which a tensor's candidate residual bases are compared


def _normalized(t: torch.Tensor) -> torch.Tensor:
    t = t.float()
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-30)


def match_rows(model: list[torch.Tensor], base: list[torch.Tensor], unsigned: set[int]) -> tuple[torch.Tensor, int]:
    """For row-aligned matrices (each [rows, ...]; several describe the same rows together): (`order`, with
    base row order[i] the one model row i points along (mean cosine over the matrices, up to sign for
    those in `unsigned`), the number of rows that moved yet match no base row one to one). A row in place,
    or one that matches nothing, keeps its index: a unit scrambled beside a reshuffle costs its own row
    of the comparison, not the alignment of the others."""
    rows = model[0].shape[0]
    cosines = torch.stack([(_normalized(m) * _normalized(b)).sum(1) for m, b in zip(model, base)])
    cosines[list(unsigned)] = cosines[list(unsigned)].abs()
    order = torch.arange(rows)
    moved = torch.nonzero(~(cosines.mean(0) >= MATCHED)).flatten()  # NaN: moved
    if not len(moved):
        return order, 0
    # a moved row is matched among the other moved rows only: a reshuffle maps them onto each other
    best, score = torch.empty(len(moved), dtype=torch.long), torch.empty(len(moved))
    rows_m = [_normalized(m[moved]) for m in model]
    rows_b = [_normalized(b[moved]) for b in base]
    for lo in range(0, len(moved), BLOCK):
        sim = sum((rm[lo:lo + BLOCK] @ rb.T).abs() if i in unsigned else rm[lo:lo + BLOCK] @ rb.T
                  for i, (rm, rb) in enumerate(zip(rows_m, rows_b))) / len(rows_m)
        score[lo:lo + BLOCK], best[lo:lo + BLOCK] = sim.max(1)
    matched = score >= MATCHED  # (NaN: not)
    taken = torch.bincount(best[matched], minlength=len(moved))
    matched &= taken[best] == 1  # a base row two model rows point along goes to neither
    order[moved[matched]] = moved[best[matched]]
    return order, int((~matched).sum())


@dataclass
class _Reordering:
    order: torch.Tensor  # base row order[i] is the model's row i

    @property
    def moved(self) -> int:
        return int((self.order != torch.arange(len(self.order))).sum())


@dataclass
class Alignment(_Reordering):
    """An MLP's hidden units: base unit `order[i]` is the model's unit i, its linear-branch row scaled by
    `scale[i]`."""
    scale: torch.Tensor  # [units] float64, 1 where nothing is scaled
    scalable: int | None  # index of the input matrix whose rows are scaled (a gated MLP's linear branch)
    unmatched: int = 0  # units that moved yet match no base unit (compared where they are)

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
        return {"moved": self.moved, "rescaled": self.rescaled, "unmatched": self.unmatched}


def align_units(model_in: list[torch.Tensor], base_in: list[torch.Tensor],
                scalable: int | None) -> Alignment | None:
    """The alignment of the base's hidden units to the model's, from the MLP's input matrices (units first,
    [units, hidden]); None when the units are in place and unscaled. The linear branch's rows may be
    scaled, by a negative s too: matched up to sign."""
    order, unmatched = match_rows(model_in, base_in, {scalable} if scalable is not None else set())
    scale = torch.ones(len(order), dtype=torch.float64)
    if scalable is not None:
        for lo in range(0, len(order), BLOCK):
            rows = order[lo:lo + BLOCK]
            m, b = model_in[scalable][lo:lo + BLOCK].double(), base_in[scalable][rows].double()
            fit = (m * b).sum(1) / (b * b).sum(1).clamp_min(1e-30)
            residual = (m - fit[:, None] * b).norm(dim=1)
            explained = residual <= PROPORTIONAL * (m - b).norm(dim=1)
            coarse = (residual <= PROPORTIONAL * m.norm(dim=1)) & ((fit - 1).abs() >= PROPORTIONAL)
            gate = sum((x[lo:lo + BLOCK].double() - y[rows].double()).norm(dim=1)
                       for i, (x, y) in enumerate(zip(model_in, base_in)) if i != scalable)
            kept = gate <= GATE_SHARE * (m - b).norm(dim=1)
            proportional = (explained | coarse) & kept & ((b * b).sum(1) > 0) & (fit != 1)
            scale[lo:lo + BLOCK] = torch.where(proportional, fit, scale[lo:lo + BLOCK])
    alignment = Alignment(order, scale, scalable, unmatched)
    return alignment if alignment.moved or alignment.rescaled else None


@dataclass
class ResidualAlignment(_Reordering):
    """The residual stream: the model's dimension i is sign[i] times the base's dimension order[i]."""
    sign: torch.Tensor  # [hidden] ±1.0
    unmatched: int = 0  # dimensions that moved yet match no base dimension

    @property
    def flipped(self) -> int:
        return int((self.sign < 0).sum())

    def to_json(self) -> dict:
        return {"moved": self.moved, "flipped": self.flipped, "unmatched": self.unmatched}

    def along(self, base: torch.Tensor, axis: int, signed: bool = True,
              index: torch.Tensor | None = None) -> torch.Tensor:
        """`base` with its `axis` (the residual stream's) in the model's order and sign; at the model's
        indices `index` along it only, if given."""
        index = torch.arange(len(self.order)) if index is None else index
        out = base.index_select(axis, self.order[index])
        if signed:
            out = out * self.sign[index].to(out.dtype).reshape([-1 if d == axis else 1 for d in range(out.dim())])
        return out

    def base_like(self, base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
        """`base` in the model's residual basis: each of its axes as long as the residual stream either
        indexes it (a matrix reads or writes the stream, an embedding, a bias added to it: permuted and
        signed; a norm's weight: permuted only) or not (a query projection's heads of the same length),
        whichever brings it nearest the model's tensor (judged on a sample of indices per axis, so that no
        full copy is made but the chosen one); a tensor with no such axis as it is."""
        hidden = len(self.order)
        axes = [a for a in range(base.dim()) if base.shape[a] == hidden]
        if not axes or base.shape != model.shape:
            return base
        samples = [torch.linspace(0, n - 1, min(n, AXIS_SAMPLE)).long() for n in base.shape]

        def built(chosen: tuple[int, ...], signed: bool, sampled: bool) -> torch.Tensor:
            out = base
            for a in range(base.dim()):
                index = samples[a] if sampled else None
                if a in chosen:
                    out = self.along(out, a, signed, index)
                elif sampled:
                    out = out.index_select(a, index)
            return out

        target = model
        for a, index in enumerate(samples):
            target = target.index_select(a, index)
        options = [((), False)] + [(tuple(a for i, a in enumerate(axes) if subset >> i & 1), signed)
                                   for subset in range(1, 1 << len(axes))
                                   for signed in ((True, False) if base.dim() == 1 else (True,))]
        best = min(options, key=lambda o: float((target.float() - built(*o, sampled=True).float()).norm()))
        return base if best == ((), False) else built(*best, sampled=False)


def align_residual(model_embed: torch.Tensor, base_embed: torch.Tensor) -> ResidualAlignment | None:
    """The residual stream's dimensions matched by the token embedding's columns ([vocab, hidden]; a
    sample of rows tells them apart); None when they are in place."""
    if model_embed.shape != base_embed.shape or model_embed.dim() != 2:
        return None
    rows = torch.linspace(0, model_embed.shape[0] - 1, min(EMBED_SAMPLE, model_embed.shape[0])).long()
    m, b = model_embed[rows].float().T, base_embed[rows].float().T
    order, unmatched = match_rows([m], [b], {0})
    sign = torch.where((m * b[order]).sum(1) < 0, -1.0, 1.0)
    alignment = ResidualAlignment(order, sign, unmatched)
    return alignment if alignment.moved or alignment.flipped else None


def reshuffle_units(weights: dict[str, torch.Tensor], arch, layer: int, generator: torch.Generator,
                    rescale: tuple[float, float] = (0.5, 1.5),
                    scales: tuple[float, ...] | None = None) -> dict[str, torch.Tensor]:
    """What `align_units` undoes (`edit --disguise units`, tests, benchmarks): layer `layer`'s MLP tensors
    from `weights` (canonical names; input weights and biases, output weight) with the hidden units in a
    random order and, in a gated MLP, the linear branch's rows scaled by s ~ U(rescale), or drawn from
    `scales` (powers of two scale exactly), and the output's columns by 1/s."""
    ins = [f"{m}.weight" for m in arch.mlp_in_modules(layer)]
    out = arch.weight_name("mlp_out", layer)
    t = arch.mlp_out_transposed  # GPT-2's Conv1D: units are the inputs' columns and the output's rows
    units = weights[ins[0]].shape[1 if t else 0]
    order = torch.randperm(units, generator=generator)
    scale = torch.ones(units)
    if len(ins) == 2 and scales:
        scale = torch.tensor(scales)[torch.randint(len(scales), (units,), generator=generator)]
    elif len(ins) == 2:
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
