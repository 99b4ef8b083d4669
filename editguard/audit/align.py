"""Undo function-preserving reparametrisations before diffing: a reshuffle of one MLP's hidden units, a
signed permutation of the residual stream's dimensions, and a rotation of the stream with the norms' weights
folded into the matrices that read them.

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
from typing import Callable

import torch

# a row whose cosine with the base row at its own index is at least this is in place (drifted, perhaps, as a
# fine-tune leaves it: a moved row points elsewhere, near 0); a moved row is matched with a base row at
# least this near
MATCHED = 0.9
# a linear-branch row counts as rescaled (base row times s) when what s leaves of the row's change is at most
# EXPLAINED of it (99 % of its energy: a fine-tune's drift of a few percent under a rescale by 2 leaves that),
# or, where storage rounding leaves more (bfloat16: ~4e-3), when the row is s times the base row to within
# PROPORTIONAL of its norm with s at least that far from 1; and its gate row changed by at most GATE_SHARE of
# what the linear branch's did (a rescale leaves the gate as it was: weight decay shrinks both). A
# fine-tune's drift alone is none of these: it is not along the row.
EXPLAINED = 0.1
PROPORTIONAL = 1e-2
GATE_SHARE = 0.1
BLOCK = 2048  # model rows compared against all base rows at a time (a block of n similarities each)
EMBED_SAMPLE = 16384  # vocabulary rows whose values tell the residual dimensions apart
AXIS_SAMPLE = 1024  # indices per axis on which a tensor's candidate residual bases are compared
# a rotation of the residual stream explains the token embedding's change when what it leaves is at most this
# share of the embedding (storage rounding: bfloat16 ~3e-3) and of the change itself (a fine-tune's drift:
# the best rotation is near the identity and leaves the drift as it was)
ROTATION_FIT = 1e-2


def _normalized(t: torch.Tensor) -> torch.Tensor:
    t = t.float()
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-30)


def _exact_matches(model: torch.Tensor, base: torch.Tensor, unsigned: bool) -> torch.Tensor:
    """For each model row, the base row it equals bit for bit (up to sign if `unsigned`), or -1: a permutation
    (and a sign flip) moves values exactly, so where nothing else changed this is the whole alignment, and
    rows that merely point alike (an embedding's columns may have cosines of 0.99 with each other) cannot
    take each other's place. Rows that are not unique on either side match nothing here."""
    def keys(t: torch.Tensor) -> list[bytes]:
        t = (t.abs() if unsigned else t).detach().cpu().contiguous()
        raw = t.reshape(t.shape[0], -1).view(torch.uint8).numpy()  # any dtype (numpy has no bfloat16)
        return [row.tobytes() for row in raw]

    out = torch.full((model.shape[0],), -1, dtype=torch.long)
    base_keys, model_keys = keys(base), keys(model)
    where: dict[bytes, int] = {}
    for i, key in enumerate(base_keys):
        where[key] = -1 if key in where else i  # (a repeated row: ambiguous)
    seen: dict[bytes, int] = {}
    for key in model_keys:
        seen[key] = seen.get(key, 0) + 1
    for i, key in enumerate(model_keys):
        if where.get(key, -1) >= 0 and seen[key] == 1:
            out[i] = where[key]
    if unsigned:  # equal up to sign as a whole row, not value by value
        hit = torch.nonzero(out >= 0).flatten()
        m, b = model[hit], base[out[hit]]
        out[hit[~((m == b).all(1) | (m == -b).all(1))]] = -1
    return out


def match_rows(model: list[torch.Tensor], base: list[torch.Tensor], unsigned: set[int]) -> tuple[torch.Tensor, int]:
    """For row-aligned matrices (each [rows, ...]; several describe the same rows together): (`order`, with
    base row order[i] the one model row i points along (mean cosine over the matrices, up to sign for
    those in `unsigned`), the number of rows that moved yet match no base row one to one). A row in place,
    or one that matches nothing, keeps its index: a unit scrambled beside a reshuffle costs its own row
    of the comparison, not the alignment of the others."""
    rows = model[0].shape[0]
    order = torch.arange(rows)
    exact = _exact_matches(model[0], base[0], 0 in unsigned)
    cosines = torch.stack([(_normalized(m) * _normalized(b)).sum(1) for m, b in zip(model, base)])
    cosines[list(unsigned)] = cosines[list(unsigned)].abs()
    if len(model) > 1 and bool((exact >= 0).any()):  # the other matrices must agree (a row pasted over another)
        hit = torch.nonzero(exact >= 0).flatten()
        agree = torch.stack([(_normalized(m[hit]) * _normalized(b[exact[hit]])).sum(1) for m, b in zip(model, base)])
        agree[list(unsigned)] = agree[list(unsigned)].abs()
        exact[hit[~(agree.mean(0) >= MATCHED)]] = -1
    # rows found bit for bit are matched there; the rest are in place when near their own base row (drifted,
    # as a fine-tune leaves them), else moved
    near = cosines.mean(0) >= MATCHED  # each model row against the base row at its own index
    # a bit-for-bit copy of base row i elsewhere is a move only if model row i left that place: one pasted
    # over another row while the original stays (drifted) is a change, compared where it is
    target = exact.clamp(min=0)
    exact[(exact >= 0) & (exact != torch.arange(rows)) & near[target] & (exact[target] < 0)] = -1
    order[exact >= 0] = exact[exact >= 0]
    held = torch.zeros(rows, dtype=torch.bool)
    held[exact[exact >= 0]] = True  # a base row matched bit for bit is no other row's, in place or moved
    in_place = (exact < 0) & ~held & near
    moved = torch.nonzero((exact < 0) & ~in_place).flatten()  # NaN: moved
    if not len(moved):
        return order, 0
    # a moved row is matched among the base rows no other row holds: a reshuffle maps them onto each other
    free = ~in_place & ~held
    candidates = torch.nonzero(free).flatten()
    best, score = torch.zeros(len(moved), dtype=torch.long), torch.full((len(moved),), float("nan"))
    rows_m = [_normalized(m[moved]) for m in model]
    rows_b = [_normalized(b[candidates]) for b in base]
    for lo in range(0, len(moved), BLOCK) if len(candidates) else ():
        sim = sum((rm[lo:lo + BLOCK] @ rb.T).abs() if i in unsigned else rm[lo:lo + BLOCK] @ rb.T
                  for i, (rm, rb) in enumerate(zip(rows_m, rows_b))) / len(rows_m)
        score[lo:lo + BLOCK], best[lo:lo + BLOCK] = sim.max(1)
    matched = score >= MATCHED  # (NaN: not)
    taken = torch.bincount(best[matched], minlength=max(len(candidates), 1))
    matched &= taken[best] == 1  # a base row two model rows point along goes to neither
    order[moved[matched]] = candidates[best[matched]]
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
            explained = residual <= EXPLAINED * (m - b).norm(dim=1)
            coarse = (residual <= PROPORTIONAL * m.norm(dim=1)) & ((fit - 1).abs() >= PROPORTIONAL)
            gate = sum((x[lo:lo + BLOCK].double() - y[rows].double()).norm(dim=1)
                       for i, (x, y) in enumerate(zip(model_in, base_in)) if i != scalable)
            kept = gate <= GATE_SHARE * (m - b).norm(dim=1)
            proportional = (explained | coarse) & kept & ((b * b).sum(1) > 0) & (fit != 1)
            scale[lo:lo + BLOCK] = torch.where(proportional, fit, scale[lo:lo + BLOCK])
    alignment = Alignment(order, scale, scalable, unmatched)
    return alignment if alignment.moved or alignment.rescaled else None


@dataclass
class HeadAlignment(_Reordering):
    """A layer's attention heads: the base's query head `order[i]` is the model's query head i, and its
    key/value head `kv_order[j]` the model's key/value head j. Heads move whole (rows of the query, key and
    value projections and their biases, columns of the output projection), a query head with its key/value
    group: that, and nothing else, keeps the attention's function."""
    kv_order: torch.Tensor

    def rows(self, base: torch.Tensor, heads: int, kv: bool) -> torch.Tensor:
        """`base` with its first axis (a projection's rows or its bias; `heads` blocks of equal size) in the
        model's head order: the key/value heads' if `kv`, else the query heads'."""
        order = self.kv_order if kv else self.order
        blocks = base.reshape(heads, -1, *base.shape[1:])
        return blocks[order].reshape(base.shape)

    @property
    def kv_moved(self) -> int:
        return int((self.kv_order != torch.arange(len(self.kv_order))).sum())

    def to_json(self) -> dict:
        return {"moved": self.moved, "kv_moved": self.kv_moved}


def attention_tensors(arch, layer: int) -> list[tuple[str, int | str]]:
    """Layer `layer`'s attention tensors that heads index, as (canonical name, part): 0 / 1 / 2 the query /
    key / value projection's weight or bias, "qkv" the fused matrix (or its bias) that holds all three, 3 the
    output projection's weight. Empty where the table names neither."""
    if arch.attn_qkv:
        module = arch.module("attn_qkv", layer)
        parts: list[tuple[str, int | str]] = [(f"{module}.weight", "qkv"), (f"{module}.bias", "qkv")]
    else:
        parts = [(f"{m}.{kind}", i) for i, m in enumerate(arch.attn_in_modules(layer)) for kind in ("weight", "bias")]
    return parts + [(arch.weight_name("attn_out", layer), 3)] if parts else []


def split_qkv(t: torch.Tensor, layout: str, heads: int, transposed: bool) -> list[torch.Tensor]:
    """A fused query-key-value weight (stored; [in, out] if `transposed`) or bias as [q, k, v], each rows
    first ([heads x head size, ...])."""
    rows = t.T if transposed and t.dim() == 2 else t
    if layout == "sections":
        return list(rows.chunk(3, 0))
    per_head = rows.reshape(heads, 3, -1, *rows.shape[1:])  # "per_head": each head's q, k, v together
    return [per_head[:, i].reshape(-1, *rows.shape[1:]) for i in range(3)]


def join_qkv(parts: list[torch.Tensor], layout: str, heads: int, transposed: bool) -> torch.Tensor:
    """The inverse of `split_qkv`."""
    if layout == "sections":
        rows = torch.cat(parts, 0)
    else:
        rows = torch.stack([p.reshape(heads, -1, *p.shape[1:]) for p in parts], 1).reshape(-1, *parts[0].shape[1:])
    return (rows.T if transposed and rows.dim() == 2 else rows).contiguous()


def head_matrices(arch, tensors: dict[str, torch.Tensor], layer: int, heads: int,
                  kv_heads: int) -> list[torch.Tensor] | None:
    """[q, k, v, o] of layer `layer` from its stored weights in `tensors` (canonical names; shapes are all the
    checks read, so meta tensors do), each [out, in] (o's columns are the query heads' outputs); None where
    one is missing or they do not split into `heads` query and `kv_heads` key/value heads of one size."""
    named = [name for name, _ in attention_tensors(arch, layer) if name.endswith(".weight")]
    if not named or any(name not in tensors or tensors[name].dim() != 2 for name in named):
        return None
    t = arch.mlp_out_transposed  # (GPT-2's Conv1D attention is stored [in, out] like its MLP)
    weights = [tensors[name] for name in named]
    if arch.attn_qkv:
        if heads != kv_heads or weights[0].shape[1 if t else 0] % (3 * heads):
            return None
        q, k, v = split_qkv(weights[0], arch.qkv_layout, heads, t)
    else:
        q, k, v = weights[:3]
    o = weights[-1].T if t else weights[-1]
    size = q.shape[0] // heads
    if q.shape[0] % heads or k.shape[0] != kv_heads * size or v.shape[0] % kv_heads or o.shape[1] != q.shape[0]:
        return None
    return [q, k, v, o]


def heads_split(arch, tensors: dict[str, torch.Tensor], layer: int, heads: int, kv_heads: int) -> bool:
    """Whether layer `layer`'s attention tensors in `tensors` are all there and split into the heads, biases
    too (`head_matrices`): what a reordering of its heads needs to keep the function."""
    matrices = head_matrices(arch, tensors, layer, heads, kv_heads)
    if matrices is None:
        return False
    q, k, v, _ = matrices
    rows = {0: q.shape[0], 1: k.shape[0], 2: v.shape[0], "qkv": q.shape[0] + k.shape[0] + v.shape[0]}
    return all(tuple(tensors[name].shape) == (rows[part],) for name, part in attention_tensors(arch, layer)
               if name.endswith(".bias") and name in tensors)


def align_heads(model: list[torch.Tensor], base: list[torch.Tensor], heads: int, kv_heads: int) -> HeadAlignment | None:
    """The base's attention heads matched to the model's from [q, k, v, o] (`head_matrices` of each): key/value
    heads by their key and value rows, query heads by their query rows and output columns. None when nothing
    moved, when the two sides differ in shape, or when the matches are no reordering that keeps the function
    (a query head matched into another key/value group than its own)."""
    q, k, v, o = model
    bq, bk, bv, bo = base
    if any(m.shape != b.shape for m, b in zip(model, base)):
        return None
    kv_order, _ = match_rows([k.reshape(kv_heads, -1), v.reshape(kv_heads, -1)],
                             [bk.reshape(kv_heads, -1), bv.reshape(kv_heads, -1)], set())
    order, _ = match_rows([q.reshape(heads, -1), o.T.reshape(heads, -1)],
                          [bq.reshape(heads, -1), bo.T.reshape(heads, -1)], set())
    group = heads // kv_heads
    if not bool((kv_order[torch.arange(heads) // group] == order // group).all()):
        return None
    alignment = HeadAlignment(order, kv_order)
    return alignment if alignment.moved or alignment.kv_moved else None


def in_head_order(alignment: HeadAlignment, arch, part: int | str, t: torch.Tensor, heads: int,
                  kv_heads: int) -> torch.Tensor:
    """A stored attention tensor (`part` as `attention_tensors` names it) in the head order `alignment`
    gives; as it is where its shape does not split into the heads (the diff then reports the shape)."""
    transposed = arch.mlp_out_transposed and t.dim() == 2
    if part == "qkv":
        if not t.dim() or t.shape[1 if transposed else 0] % (3 * heads):
            return t
        parts = split_qkv(t, arch.qkv_layout, heads, transposed)
        return join_qkv([alignment.rows(p, heads, kv=False) for p in parts], arch.qkv_layout, heads, transposed)
    if part == 3:  # the output projection: its input axis holds the query heads' outputs
        if t.dim() != 2 or t.shape[0 if transposed else 1] % heads:
            return t
        rows_first = t if transposed else t.T
        moved = alignment.rows(rows_first, heads, kv=False)
        return (moved if transposed else moved.T).contiguous()
    n = heads if part == 0 else kv_heads
    return alignment.rows(t, n, kv=part != 0).contiguous() if t.dim() and t.shape[0] % n == 0 else t


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
    # a sign only where the dimension matched (|cosine| ≥ MATCHED): one that matches nothing (a rotation
    # of the stream) points nowhere in particular, and its sign says nothing
    cosine = (_normalized(m) * _normalized(b[order])).sum(1)
    sign = torch.where(cosine <= -MATCHED, -1.0, 1.0)
    alignment = ResidualAlignment(order, sign, unmatched)
    # a permutation with a few dimensions scrambled beside it is one; most matching nothing (a rotation) is not
    if unmatched >= alignment.moved + alignment.flipped:
        return None
    return alignment if alignment.moved or alignment.flipped else None


@dataclass
class ResidualRotation:
    """The residual stream rotated: the model's activations are the base's times `q` (orthogonal [hidden,
    hidden]), every matrix that reads or writes the stream has that axis contracted with `q`, and the RMSNorm
    weights, which no rotation commutes with, are folded into the matrices that read the norms' output
    (QuaRot and SliceGPT do this to prepare a model for quantisation or slicing)."""
    q: torch.Tensor  # float64
    fit: float  # ‖E_base q − E_model‖ / ‖E_model‖ on the token embedding's sampled rows

    def along(self, base: torch.Tensor, axis: int, fold: torch.Tensor | None = None,
              unfold: torch.Tensor | None = None) -> torch.Tensor:
        """`base` (float64) with its `axis` (the stream's) in the model's basis; a matrix that reads a norm's
        output carries that norm's weight `fold` into it first, and `unfold` (the weight the model's own norm
        applies; zeros left alone) is taken out after."""
        shape = [-1 if d == axis else 1 for d in range(base.dim())]
        out = base.double() if fold is None else base.double() * fold.double().reshape(shape)
        out = (out.movedim(axis, -1) @ self.q.double()).movedim(-1, axis)
        return out if unfold is None else out / torch.where(unfold == 0, 1.0, unfold.double()).reshape(shape)

    def to_json(self) -> dict:
        return {"fit_residual": self.fit, "largest_entry": float(self.q.abs().max())}


def align_rotation(model_embed: torch.Tensor, base_embed: torch.Tensor) -> ResidualRotation | None:
    """The orthogonal q that best maps the base's token embedding onto the model's ([vocab, hidden]; a sample
    of rows), when it explains the change: what is left is at most ROTATION_FIT of the embedding and of the
    change (a fine-tune's drift is no rotation: q near the identity explains none of it). None otherwise."""
    if model_embed.shape != base_embed.shape or model_embed.dim() != 2:
        return None
    rows = torch.linspace(0, model_embed.shape[0] - 1, min(EMBED_SAMPLE, model_embed.shape[0])).long()
    m, b = model_embed[rows].double(), base_embed[rows].double()
    if not (bool(torch.isfinite(m).all()) and bool(torch.isfinite(b).all())):
        return None
    u, _, vh = torch.linalg.svd(b.T @ m)  # orthogonal Procrustes
    q = u @ vh
    left, change, size = float((b @ q - m).norm()), float((b - m).norm()), float(m.norm())
    if not (left <= ROTATION_FIT * size and left <= ROTATION_FIT * change):
        return None
    return ResidualRotation(q, left / max(size, 1e-30))


class ResidualRoles:
    """Which axis of a tensor indexes the residual stream, and whether it carries a sign (a permutation's)
    or a rotation: a matrix that writes the stream (attention and MLP output) by its output axis, with its
    bias; one that reads it by its input axis; an embedding or output head (outside the layers) by its
    columns, whatever its other axis's length; a norm's weight (a layer's own norms, the final norm) per
    dimension, never signed nor rotated. Anything else (a query projection's per-head norm, a bias in head
    space) is not the stream's. `shape_of`: a canonical name's stored shape, None where the model lacks it."""

    def __init__(self, arch, num_layers: int, hidden: int, shape_of: Callable[[str], tuple | None]):
        self.arch, self.hidden, self.shape_of = arch, hidden, shape_of
        self.layers = [arch.module("layer", n) + "." for n in range(num_layers)]
        self.writers = {arch.weight_name(role, n) for n in range(num_layers) for role in ("attn_out", "mlp_out")}

    def _layer_of(self, module: str) -> int | None:
        """The layer `module` is in (None outside the layers)."""
        return next((n for n, p in enumerate(self.layers) if module.startswith(p)), None)

    def _in_layer(self, module: str) -> str | None:
        """The part of `module`'s path below its layer's ("" outside the layers: None)."""
        layer = self._layer_of(module)
        return None if layer is None else module[len(self.layers[layer]):]

    def axis(self, name: str, t: torch.Tensor) -> tuple[int | None, bool]:
        module = name.rsplit(".", 1)[0]
        below = self._in_layer(module)
        if t.dim() == 2:
            if below is None:  # token / position embeddings, an untied output head: [n, hidden]
                return (1 if t.shape[1] == self.hidden else None), True
            if name in self.writers:  # output axis: rows of a Linear ([out, in]), columns of a Conv1D ([in, out])
                return (1 if self.arch.mlp_out_transposed else 0), True
            axes = [a for a in (0, 1) if t.shape[a] == self.hidden]
            if len(axes) == 2:  # square: the input axis (a query projection's rows are its heads)
                axes = [0 if self.arch.mlp_out_transposed else 1]
            return (axes[0] if axes else None), True
        if t.dim() != 1 or len(t) != self.hidden:
            return None, False
        weight = self.shape_of(f"{module}.weight")
        if weight is not None and len(weight) == 2:  # a Linear's bias
            return (0, True) if f"{module}.weight" in self.writers else (None, False)
        if module == self.arch.final_norm or (below is not None and "." not in below):
            return 0, False  # a layer's own norm (not a projection's per-head one) or the final norm
        return None, False

    def reads(self, name: str, t: torch.Tensor) -> str | None:
        """The norm (canonical weight name) whose output the matrix `name` reads from the stream: a layer's
        attention inputs its attention norm, its MLP inputs its MLP norm, the output head the final norm;
        None for anything else (a writer, an embedding)."""
        axis, signed = self.axis(name, t)
        if axis is None or not signed or t.dim() != 2 or name in self.writers:
            return None
        module = name.rsplit(".", 1)[0]
        layer = self._layer_of(module)
        if layer is None:
            return f"{self.arch.final_norm}.weight" if module == self.arch.unembed else None
        if module in self.arch.mlp_in_modules(layer):
            return self.arch.weight_name("mlp_norm", layer)
        if module.startswith(self.arch.module("attn", layer) + "."):
            return self.arch.weight_name("attn_norm", layer)
        return None


def rotate_residual(weights: dict[str, torch.Tensor], arch, num_layers: int, q: torch.Tensor) -> dict[str, torch.Tensor]:
    """What `align_rotation` undoes (tests, benchmarks): every tensor of `weights` (canonical names: the whole
    model) with the residual stream rotated by `q` as QuaRot prepares a model: each norm's weight folded into
    the matrices that read its output (then 1), the stream's axis of every matrix, embedding and bias that
    reads or writes it contracted with `q` (float64, stored back in each tensor's dtype). A tied output head
    is untied (the final norm folds into it, not into the embedding): the caller's config must say so."""
    if not arch.rotatable:
        raise ValueError(f"{arch.model_type}: a rotation of the residual stream changes its function")
    weights = dict(weights)
    head, embed = arch.weight_name("unembed"), arch.weight_name("embed")
    weights.setdefault(head, weights[embed])
    roles = ResidualRoles(arch, num_layers, len(q), lambda n: tuple(weights[n].shape) if n in weights else None)
    rotation, out = ResidualRotation(q, 0.0), {}
    for name, t in weights.items():
        axis, signed = roles.axis(name, t)
        if axis is not None and not signed:
            t = torch.ones_like(t)  # folded into the matrices that read it
        elif axis is not None:
            t = rotation.along(t, axis, fold=weights.get(roles.reads(name, t))).to(t.dtype)
        out[name] = t.contiguous()
    return out


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


def reshuffle_heads(weights: dict[str, torch.Tensor], arch, layer: int, heads: int, kv_heads: int,
                    generator: torch.Generator) -> dict[str, torch.Tensor]:
    """What `align_heads` undoes (`edit --disguise heads`, tests, benchmarks): layer `layer`'s attention
    tensors from `weights` (canonical names, `attention_tensors`) with the key/value heads in a random
    order, each group's query heads moving with it and reordered within it."""
    group = heads // kv_heads
    kv_order = torch.randperm(kv_heads, generator=generator)
    within = torch.stack([torch.randperm(group, generator=generator) for _ in range(kv_heads)])
    alignment = HeadAlignment((kv_order[:, None] * group + within).reshape(-1), kv_order)
    return {name: in_head_order(alignment, arch, part, weights[name], heads, kv_heads)
            for name, part in attention_tensors(arch, layer) if name in weights}
