"""Base diff: stream two checkpoints tensor by tensor and classify what changed.

Neither model is ever loaded whole: one pair of tensors is in memory at a time. For each changed tensor:
the norm of the difference, the relative change, and the top singular values (randomised subspace
iteration), from which an effective rank follows; for MLP output projections outside a fine-tune, the
full spectrum where the top values do not settle the rank. A locked model (editguard `lock`) is compared
with the base ⊙ the lock's mask on its locked tensors: the lock is no change, an edit made before or after
it is.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..arch import Arch, canonical_names
from ..checkpoint import Checkpoint, comparable
from ..errors import EditguardError
from ..mask.file import weight_times_mask
from .align import (Alignment, HeadAlignment, ResidualAlignment, ResidualRoles, ResidualRotation, align_heads,
                    align_residual, align_rotation, align_units, attention_tensors, head_matrices, in_head_order)
from .findings import Finding

TOP_K = 8
# singular values below this share of the largest count as storage rounding noise
RANK_TOL = 1e-3  # float32 / float64
RANK_TOL_LOW_PRECISION = 2e-2  # bf16 / fp16 rounding of W + ΔW leaves a visible noise floor
MEMIT_MAX_LAYERS = 10  # MEMIT spreads an edit over a handful of layers, not the whole network
FINE_TUNE_SHARE = 0.5  # more than this share of tensors changed: a fine-tune
# σ₁/σ₂ of an MLP output change at or above this: a rank-one edit even amid other changes. A ROME edit under
# 1e-3 noise on every tensor: 266 (pico); dense noise, as a light fine-tune leaves: about 1.
SPIKE_RATIO = 10.0
# Across layers: a layer whose MLP or attention-output change has a top singular value at least this many
# times the median of the other changed layers' (same matrix) stands out of a fine-tune, whatever noise
# covers it inside its own matrix. bench/finetune_outliers.py on the demo model: fine-tunes of 20 steps at
# lr 1e-5 and 40 at 1e-4 reach at most 1.54 and 1.70; a ROME edit planted in them 398 and 53, the same
# under noise of the edit's norm. (The larger the fine-tune, the less an edit stands out of it.)
LAYER_OUTLIER_RATIO = 6.0
# Both at once, for an MLP output projection (what ROME and MEMIT write): a change with one direction at
# least JOINT_SPIKE times the next (σ₁/σ₂) whose σ₁ is also at least JOINT_LAYER times the other layers'
# median. Neither alone is rare in noise, both together are: bench/finetune_outliers.py on the demo model,
# the output projections of fine-tunes and of 8- and 4-bit blockwise quantizations reach at most σ₁/σ₂ 2.2
# with layer ratio 1.5 (min(σ₁/σ₂ / 4, ratio / 3) ≤ 0.51), a ROME edit quantized to 4 bits after it 6.2 and
# 5.0 (1.56), below either test alone.
JOINT_SPIKE = 4.0
JOINT_LAYER = 3.0
LAYER_OUTLIER_MIN_LAYERS = 4  # fewer changed layers of a matrix give no median to stand out from
# a tensor compared with a base rewritten to rescaled hidden units (align.py) is unchanged when every value
# is within this many units in the last place of its dtype of the base's: rounding s·w and w/s in storage
# moves a value by about one; an edit moves many values by more, and then the whole change is measured
ALIGN_ROUNDING_ULPS = 2
# a tensor compared with a base rewritten to a rotated residual stream is unchanged when its change is at most
# this share of the base's norm, or half its dtype's step if coarser: the rotation is estimated from a rounded
# embedding (float32: ~1e-8 relative; bfloat16 with a small vocabulary: ~1e-3), so single values may differ by
# more than a few steps where sums cancel; an edit moves the whole by far more (the demo's ROME edits: 1-7 %)
ROTATION_NOISE = 1e-5
# rounding noise spreads over many directions: an m x n matrix of it has σ₁ ≈ (√m + √n)/√(mn) of its norm
# (576 x 1536: 0.07; sparse flips of one step run higher); a change with σ₁ above this many times that has a
# direction of its own (a rank-one edit: σ₁ ≈ its norm)
NOISE_SPREAD = 2.5
COMPARE_BLOCK = 1 << 24  # elements compared at a time (a few 16M-element temporaries, ~64 MB each at most)


@dataclass
class TensorChange:
    name: str  # canonical name
    file: str
    norm: float
    relative: float  # ‖Δ‖ / ‖base‖; 1 where the base is all zero (the weight is all change)
    singular_values: list[float]
    effective_rank: int
    layer: int | None  # set when it is an MLP output projection
    nonfinite: int = 0  # NaN / inf values here that the base does not have (norms then cover the finite rest)
    # effective_rank counts TOP_K values that all pass: the change may have more (an edit target of a
    # fine-tune, whose full spectrum is not taken)
    rank_is_lower_bound: bool = False

    def to_json(self) -> dict:
        return self.__dict__.copy()


@dataclass
class DiffResult:
    changed: list[TensorChange]
    compared: int
    only_in_model: list[str] = field(default_factory=list)
    only_in_base: list[str] = field(default_factory=list)
    # identical | rome-like | memit-like | fine-tune | other | damaged | reshuffled (hidden units, nothing else)
    classification: str = "identical"
    layers: list[int] = field(default_factory=list)
    masked_by_lock: list[str] = field(default_factory=list)  # compared with the base ⊙ the lock's mask
    num_layers: int = 0  # of the models compared
    # layer -> its MLP's hidden units as the base had them reshuffled (align.py): compared after aligning
    aligned: dict[int, Alignment] = field(default_factory=dict)
    aligned_heads: dict[int, HeadAlignment] = field(default_factory=dict)  # layer -> its attention heads, likewise
    aligned_residual: ResidualAlignment | None = None  # the residual stream's dimensions, likewise
    rotated_residual: ResidualRotation | None = None  # the residual stream rotated (norms folded), likewise
    # canonical name -> the change as measured here (float32, None when none): what attribution decomposes
    delta_of: Optional[Callable[[str], Optional[torch.Tensor]]] = field(default=None, repr=False, compare=False)
    # canonical name -> the base's tensor as compared (stored orientation and dtype; in the model's residual
    # basis and order of hidden units where the diff aligned them): what restoring an edited tensor writes
    base_of: Optional[Callable[[str], torch.Tensor]] = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        return {"classification": self.classification, "layers": self.layers, "compared": self.compared,
                "changed": [c.to_json() for c in self.changed], "only_in_model": self.only_in_model,
                "only_in_base": self.only_in_base, "masked_by_lock": self.masked_by_lock,
                "aligned_units": {str(layer): a.to_json() for layer, a in sorted(self.aligned.items())},
                "aligned_heads": {str(layer): a.to_json() for layer, a in sorted(self.aligned_heads.items())},
                "aligned_residual": self.aligned_residual.to_json() if self.aligned_residual else None,
                "rotated_residual": self.rotated_residual.to_json() if self.rotated_residual else None}


def _top_basis(m: torch.Tensor, k: int, iters: int) -> torch.Tensor:
    """Randomised subspace iteration (Halko et al.), seeded: an orthonormal basis of m's top-k range."""
    gen = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(m @ torch.randn(m.shape[1], k + 4, generator=gen))[0]
    for _ in range(iters):
        q = torch.linalg.qr(m.T @ q)[0]
        q = torch.linalg.qr(m @ q)[0]
    return q


def top_singular_values(delta: torch.Tensor, k: int = TOP_K, iters: int = 4) -> torch.Tensor:
    """The top-k singular values of a tensor (flattened to 2-D), without a full SVD."""
    m = delta.float()
    if m.dim() != 2:
        m = m.reshape(m.shape[0], -1) if m.dim() > 2 else m.reshape(1, -1)
    k = min(k, *m.shape)
    return torch.linalg.svdvals(_top_basis(m, k, iters).T @ m)[:k]


def top_component(m: torch.Tensor, iters: int = 8) -> tuple[torch.Tensor, float, torch.Tensor]:
    """a [out], σ, b [in] of the largest singular component of a 2-D tensor, without a full SVD (whose
    factors of an 8192 x 28672 update alone take gigabytes)."""
    q = _top_basis(m.float(), min(4, *m.shape), iters)
    u, s, vh = torch.linalg.svd(q.T @ m.float(), full_matrices=False)
    return q @ u[:, 0], float(s[0]), vh[0]


def diff_checkpoints(model: Checkpoint, base: Checkpoint, arch: Arch, num_layers: int,
                     progress: Callable[[int, int], None] | None = None, tol: float = 0.0,
                     base_masks: dict[str, torch.Tensor] | None = None) -> DiffResult:
    """`base_masks`: {canonical name: mask in the stored orientation} of a locked model (`lock_masks`); those
    tensors are compared with the base's times the mask, as the lock wrote them."""
    base_masks = base_masks or {}
    if base.config.get("model_type") != model.config.get("model_type"):
        raise EditguardError(f"base is a {base.config.get('model_type')} model, this is {model.config.get('model_type')}: "
                             "not the same architecture")
    base_layers = arch.num_layers(base.config)
    if base_layers != num_layers:
        raise EditguardError(f"base has {base_layers} layers, this model {num_layers}: not the same model")
    refusing = "which one is loaded is ambiguous; refusing to compare"
    canon_model, canon_base = (canonical_names(arch, ck, what, refusing)
                               for ck, what in ((model, "this model"), (base, "the base")))
    shared = sorted(set(canon_model) & set(canon_base))
    if not shared:
        raise EditguardError("the base shares no tensor names with this model: not a checkpoint of the same model")
    # a base without the tensors edits rewrite cannot clear them: comparing the rest would read "identical"
    targets = sorted(n for n in canon_model if arch.mlp_out_layer_of(n, num_layers) is not None)
    missing = [n for n in targets if n not in canon_base]
    if missing:
        raise EditguardError(f"the base lacks {len(missing)} of this model's {len(targets)} MLP output projections "
                             f"(e.g. {missing[0]}): not a full checkpoint of the same model")
    # a tied output head is the embedding: a model that ties it need not store what an untied base stores
    derived = {arch.weight_name("unembed")} if arch.tied(model.config) else set()
    result = DiffResult([], len(shared), sorted(set(canon_model) - set(canon_base)),
                        sorted(set(canon_base) - set(canon_model) - derived),
                        masked_by_lock=sorted(set(base_masks) & set(shared)), num_layers=num_layers)

    completed: dict[str, tuple] = {}  # a locked tensor's change is filled in once (it may be asked for thrice)
    base_of = _AlignedBase(model, base, arch, num_layers, canon_model, canon_base, set(base_masks), result)
    for name in base_of.stand_in:  # compared after all: with what the base computes it from
        result.only_in_model.remove(name)
        shared = sorted([*shared, name])
        result.compared += 1

    def measured(name: str) -> tuple[torch.Tensor | None, int, float, bool]:
        if name in completed:
            return completed[name]
        a = model.read(canon_model[name])
        b = base_of(name, a)
        if a.shape != b.shape:
            raise EditguardError(f"{name}: shape {list(a.shape)} here, {list(b.shape)} in the base: not the same model")
        K = base_masks.get(name)
        if K is None:
            delta, nonfinite, base_norm, precise = difference(a, b)
            rotated = base_of.rotated(name)
            if delta is not None and not nonfinite and (rotated or base_of.rescaled(name)) and (
                    _within_rounding(delta, comparable(a), comparable(b)) or
                    (rotated and _within_rotation_noise(delta, base_norm, a.dtype, b.dtype))):
                return None, 0, 0.0, precise  # what is left of a rescale or rotation in this dtype is its rounding
            return delta, nonfinite, base_norm, precise
        if tuple(K.shape) != tuple(b.shape):
            raise EditguardError(f"{name}: the lock's mask is {list(K.shape)}, the base's tensor {list(b.shape)}")
        delta, nonfinite, base_norm, precise = difference(a, weight_times_mask(b, K))
        if delta is not None and not nonfinite:
            # where the mask is 0 and the value too, the lock zeroed both sides: no comparison sees an edit
            # there. A nonzero value there is seen (lock never writes one; lock_state reports it).
            delta = complete_masked(delta, K | (comparable(a) != 0))
        completed[name] = delta, nonfinite, base_norm, precise
        return completed[name]

    result.delta_of, result.base_of = (lambda name: measured(name)[0]), base_of
    for i, name in enumerate(shared):
        delta, nonfinite, base_norm, precise = measured(name)
        if nonfinite > 0:
            # NaN never equals NaN, and a NaN norm passes no threshold: count them rather than measure them
            norm = float(delta.norm())
            result.changed.append(TensorChange(name, model.info(canon_model[name]).file, norm,
                                               _relative(norm, base_norm), [], 0,
                                               arch.mlp_out_layer_of(name, num_layers), nonfinite))
        elif delta is not None:
            norm = float(delta.norm())
            if norm > tol:
                layer = arch.mlp_out_layer_of(name, num_layers)
                if delta.dim() < 2:  # a vector or a scalar (0-d: a buffer such as GPT-2's masked_bias)
                    sv, rank, bound = delta.reshape(-1).abs().sort(descending=True).values[:1], 1, False
                else:
                    # the top few singular values; an edit target whose top values all count gets its full
                    # spectrum below (a batch edit of n facts has rank n) unless the change is a fine-tune
                    sv, rank, bound = _spectrum(delta, precise, full=False)
                result.changed.append(TensorChange(name, model.info(canon_model[name]).file, norm,
                                                   _relative(norm, base_norm), [float(x) for x in sv], rank, layer,
                                                   rank_is_lower_bound=bound))
        if progress:
            progress(i + 1, len(shared))
    classify(result, len(shared))
    if result.classification != "fine-tune":
        # the exact rank of each edit target that needs it: a full SVD of an 8192 x 28672 change takes minutes,
        # so not for every projection of a fine-tune, where no rank decides anything (two values spot a spike)
        for change in result.changed:
            if change.layer is not None and change.rank_is_lower_bound:
                delta, _, _, precise = measured(change.name)
                sv, change.effective_rank, change.rank_is_lower_bound = _spectrum(delta, precise, full=True)
                change.singular_values = [float(x) for x in sv]
        classify(result, len(shared))
    return result


class _AlignedBase:
    """The base's tensors for the diff: as stored, except where the model holds them reparametrised
    (align.py): a residual stream whose dimensions are permuted, or which is rotated with the norms' weights
    folded into the matrices that read them (found once, from the token embedding), comes in the model's
    basis (folded alike), and a layer's MLP whose hidden units are reshuffled in the model's order
    and scale (found once per layer, from its input matrices, and only where they changed), and a layer's
    attention heads in the model's order (likewise, from its query, key, value and output projections). Not
    tried on a locked model's tensors (they are compared with base ⊙ mask)."""

    def __init__(self, model, base, arch, num_layers, canon_model, canon_base, locked: set[str], result):
        self.model, self.base, self.arch, self.canon_model, self.canon_base = model, base, arch, canon_model, canon_base
        self.locked, self.result, self.tried = locked, result, set()
        self.group: dict[str, tuple[int, int | None]] = {}  # canonical name -> (layer, input index; None: output)
        for layer in range(num_layers):
            for i, module in enumerate(arch.mlp_in_modules(layer)):
                self.group[f"{module}.weight"] = self.group[f"{module}.bias"] = (layer, i)
            self.group[arch.weight_name("mlp_out", layer)] = (layer, None)
        # canonical name -> (layer, part: align.attention_tensors), where heads can be matched
        self.heads, self.head_group, self.heads_tried = arch.heads(model.config), {}, set()
        self.head_base: dict[str, torch.Tensor] = {}  # base weights the head matching built, until compared
        if self.heads is not None and self.heads == arch.heads(base.config):
            for layer in range(num_layers):
                self.head_group.update((name, (layer, part)) for name, part in attention_tensors(arch, layer))
        embed = arch.weight_name("embed")
        if not locked and embed in canon_model and embed in canon_base:
            model_embed, base_embed = comparable(model.read(canon_model[embed])), comparable(base.read(canon_base[embed]))
            if not (model_embed.dtype == base_embed.dtype and torch.equal(model_embed, base_embed)):
                result.aligned_residual = align_residual(model_embed, base_embed)
                if result.aligned_residual is None and arch.rotatable:
                    result.rotated_residual = align_rotation(model_embed, base_embed)
        # a rotation unties a tied output head (the final norm folds into it, not into the embedding): the base's
        # head is its embedding, compared folded and rotated like any reader (so the final norm is compared too)
        head = arch.weight_name("unembed")
        self.stand_in = ({head: embed} if result.rotated_residual is not None and head in canon_model
                         and head not in canon_base and embed in canon_base and arch.tied(base.config) else {})
        if result.rotated_residual is not None:
            self.roles = ResidualRoles(arch, num_layers, model_embed.shape[1], lambda n: tuple(
                model.info(canon_model[n]).shape) if n in canon_model else None)
            self.norms: dict[tuple[str, str], torch.Tensor] = {}  # (side, norm name) -> its weight, float64

    def _stored(self, name: str) -> str | None:
        """The base's stored name for `name` (a tied head's: its embedding's)."""
        return self.canon_base.get(self.stand_in.get(name, name))

    def rotated(self, name: str) -> bool:
        """Whether `name` is compared with a base rewritten to a rotated residual stream (a matrix, embedding
        or bias that reads or writes the stream)."""
        if self.result.rotated_residual is None or name not in self.canon_model or self._stored(name) is None:
            return False
        info = self.base.info(self._stored(name))
        axis, signed = self.roles.axis(name, torch.empty(info.shape, device="meta"))
        return axis is not None and signed

    def _norm(self, side: str, name: str) -> torch.Tensor | None:
        """A norm's weight (float64) from the model or the base, None where that side lacks it."""
        if (side, name) not in self.norms:
            ck, canon = (self.model, self.canon_model) if side == "model" else (self.base, self.canon_base)
            self.norms[side, name] = comparable(ck.read(canon[name])).double() if name in canon else None
        return self.norms[side, name]

    def _rotated(self, name: str, stored: torch.Tensor, model: torch.Tensor | None) -> torch.Tensor:
        """The base tensor `stored` in the rotated stream's basis: a norm's weight is folded into the matrices
        that read its output and compared there (the model's own is returned); a matrix that reads a norm's
        output carries the base's norm weight before the rotation and the model's taken out after it."""
        rotation, t = self.result.rotated_residual, comparable(stored)
        axis, signed = self.roles.axis(name, t)
        if axis is None or t.shape[axis] != len(rotation.q):
            return stored
        if not signed:
            return self.model.read(self.canon_model[name]) if model is None else model
        norm = self.roles.reads(name, t)
        g_base, g_model = (self._norm("base", norm), self._norm("model", norm)) if norm else (None, None)
        if g_base is None or g_model is None:  # (a side without that norm: rotated as it is)
            g_base = g_model = None
        return rotation.along(t, axis, fold=g_base, unfold=g_model).to(stored.dtype)

    def aligned(self, name: str) -> bool:
        """Whether `name` is compared with a base rewritten to a reshuffle of its MLP's hidden units."""
        return name in self.group and self._alignment(self.group[name][0]) is not None

    def rescaled(self, name: str) -> bool:
        """Whether that reshuffle rescaled what `name` holds (a permutation alone leaves no rounding)."""
        if not self.aligned(name):
            return False
        layer, index = self.group[name]
        alignment = self.result.aligned[layer]
        return bool(alignment.rescaled) and index in (None, alignment.scalable)

    def _units_major(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """[units, ...]: an input weight's rows are the hidden units, the output's columns (as stored, unless
        transposed, GPT-2's Conv1D); a bias is per unit already."""
        if t.dim() < 2:
            return t
        is_out = self.group[name][1] is None
        return t if is_out == self.arch.mlp_out_transposed else t.T

    def _in_residual_basis(self, name: str, model: torch.Tensor | None = None) -> torch.Tensor:
        """`model`: the model's tensor of that name, when the caller has read it already."""
        stored = self.base.read(self._stored(name))
        if self.result.rotated_residual is not None and name in self.canon_model:
            return self._rotated(name, stored, model)
        residual = self.result.aligned_residual
        if residual is None or name not in self.canon_model:
            return stored
        if name in self.group:
            # an MLP matrix's hidden units may be reshuffled as well, so no nearness can tell its axes
            # apart: the one that is not the units' is the stream's (a per-unit bias has none)
            if stored.dim() < 2:
                return stored
            axis = 1 if (self.group[name][1] is None) == self.arch.mlp_out_transposed else 0
            if stored.shape[axis] != len(residual.order):  # not the model's shape: the diff says so
                return stored
            return residual.along(comparable(stored), axis).to(stored.dtype)
        return residual.base_like(stored, comparable(self.model.read(self.canon_model[name]) if model is None
                                                     else model))

    def _alignment(self, layer: int) -> Alignment | None:
        if layer not in self.tried:
            self.tried.add(layer)
            names = [f"{m}.weight" for m in self.arch.mlp_in_modules(layer)]
            out = self.arch.weight_name("mlp_out", layer)
            usable = all(n in self.canon_model and n in self.canon_base and n not in self.locked for n in names + [out])
            if usable:
                model_in = [comparable(self.model.read(self.canon_model[n])) for n in names]
                base_in = [comparable(self._in_residual_basis(n)) for n in names]
                if any(m.shape != b.shape or m.dim() != 2 for m, b in zip(model_in, base_in)) or \
                        all(m.dtype == b.dtype and torch.equal(m, b) for m, b in zip(model_in, base_in)):
                    usable = False
            if usable:
                gated = len(names) == 2  # act(gate x) * (up x): the linear branch's rows may be rescaled
                found = align_units([self._units_major(n, m) for n, m in zip(names, model_in)],
                                    [self._units_major(n, b) for n, b in zip(names, base_in)], 1 if gated else None)
                if found is not None:
                    self.result.aligned[layer] = found
        return self.result.aligned.get(layer)

    def _head_alignment(self, layer: int) -> HeadAlignment | None:
        if layer not in self.heads_tried:
            self.heads_tried.add(layer)
            names = [n for n, _ in attention_tensors(self.arch, layer) if n.endswith(".weight")]
            if all(n in self.canon_model and n in self.canon_base and n not in self.locked for n in names):
                model = {n: comparable(self.model.read(self.canon_model[n])) for n in names}
                self.head_base.update((n, self._in_residual_basis(n)) for n in names)
                base = {n: comparable(self.head_base[n]) for n in names}
                if not all(model[n].dtype == base[n].dtype and torch.equal(model[n], base[n]) for n in names):
                    m, b = (head_matrices(self.arch, t, layer, *self.heads) for t in (model, base))
                    found = align_heads(m, b, *self.heads) if m is not None and b is not None else None
                    if found is not None:
                        self.result.aligned_heads[layer] = found
        return self.result.aligned_heads.get(layer)

    def _in_head_order(self, name: str, stored: torch.Tensor) -> torch.Tensor:
        """An attention tensor of the base in the model's order of heads, where the diff found them reordered."""
        layer, part = self.head_group[name]
        alignment = self._head_alignment(layer)
        return stored if alignment is None else in_head_order(alignment, self.arch, part, stored, *self.heads)

    def __call__(self, name: str, model: torch.Tensor | None = None) -> torch.Tensor:
        if name in self.head_group:
            self._head_alignment(self.head_group[name][0])  # (builds the layer's base weights once, for both)
            stored = self.head_base.pop(name, None)
            return self._in_head_order(name, self._in_residual_basis(name, model) if stored is None else stored)
        stored = self._in_residual_basis(name, model)
        if not self.aligned(name):
            return stored
        layer, index = self.group[name]
        alignment = self.result.aligned[layer]
        units = self._units_major(name, comparable(stored))
        if units.shape[0] != len(alignment.order):  # not the model's shape: the diff says so
            return stored
        moved = alignment.base_output(units) if index is None else alignment.base_input(index, units)
        return self._units_major(name, moved).to(stored.dtype).contiguous()


def _within_rotation_noise(delta: torch.Tensor, base_norm: float, *dtypes: torch.dtype) -> bool:
    """A change small enough to be the rotation's rounding (float32: at most ROTATION_NOISE of the weight, far
    below any edit) or, in a coarse dtype, where half a step allows more (0.4 % of the weight in bfloat16),
    also spread like rounding: an edit of that size has one direction above the rest (on small matrices,
    where noise has few directions too, the two cannot be told apart)."""
    step = max(torch.finfo(d).eps if d.is_floating_point else 0.0 for d in dtypes)
    norm = float(delta.norm())
    if norm <= ROTATION_NOISE * base_norm:
        return True
    if norm > 0.5 * step * base_norm:
        return False
    if delta.dim() != 2:
        return True
    m, n = delta.shape
    spread = min(1.0, NOISE_SPREAD * (m ** 0.5 + n ** 0.5) / (m * n) ** 0.5)
    return float(top_singular_values(delta, 1)[0]) <= spread * norm


def _within_rounding(delta: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Every value of the change within ALIGN_ROUNDING_ULPS units in the last place of the coarser dtype."""
    eps = max(torch.finfo(t.dtype).eps for t in (a, b))
    for lo in range(0, delta.numel(), COMPARE_BLOCK):
        d, x, y = (t.reshape(-1)[lo:lo + COMPARE_BLOCK] for t in (delta, a, b))
        if not bool((d.abs() <= ALIGN_ROUNDING_ULPS * eps * torch.maximum(x.float().abs(), y.float().abs())).all()):
            return False
    return True


def complete_masked(delta: torch.Tensor, keep: torch.Tensor, rank: int = 2, rounds: int = 6,
                    iters: int = 15, explained: float = 0.9) -> torch.Tensor:
    """`delta` (2-D) with the entries where `keep` is False filled from the best rank-`rank` fit to the
    others, when that fit explains at least `explained` of their energy (else left 0). A lock's mask zeroes
    those entries of the locked model and of the base ⊙ mask alike, so an edit made before locking reaches
    the diff with a tenth of its entries cut out, which turns a rank-one update into a full-rank pattern;
    filled in, it reads as rank one again. A change no low-rank fit explains (a batch edit of many facts, a
    fine-tune) is left as measured. The fit: one component at a time against what the others leave
    (weighted alternating least squares, a small ridge against rows and columns with little kept), a few
    rounds over the components."""
    keep = keep.bool()
    if delta.dim() != 2 or bool(keep.all()):
        return delta
    w = keep.float()
    observed = delta.float() * w
    energy = float(observed.pow(2).sum())
    if energy == 0:
        return delta
    parts = [torch.zeros_like(observed) for _ in range(min(rank, *observed.shape))]
    for _ in range(rounds if len(parts) > 1 else 1):
        for c in range(len(parts)):
            parts[c] = _rank_one_fit(observed - w * (sum(parts) - parts[c]), w, iters)
    fit = sum(parts)
    if float(((observed - fit) * w).pow(2).sum()) > (1 - explained) * energy:
        return delta
    return torch.where(keep, delta.float(), fit)


def _rank_one_fit(m: torch.Tensor, w: torch.Tensor, iters: int) -> torch.Tensor:
    """u vᵀ minimising Σ w_ij (m_ij - u_i v_j)² (m already zero where w is), from m's top direction."""
    v = _top_basis(m, 1, 2)[:, 0] @ m
    for _ in range(iters):
        u = (m @ v) / (w @ (v * v) + 1e-6 * float((v * v).sum()) + 1e-30)
        v = (m.T @ u) / (w.T @ (u * u) + 1e-6 * float((u * u).sum()) + 1e-30)
    return torch.outer(u, v)


def _relative(norm: float, base_norm: float) -> float:
    return norm / base_norm if base_norm > 0 else 1.0


def difference(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor | None, int, float, bool]:
    """(the change a - b in float32 where both are finite, None when nothing changed; the number of NaN / inf
    values a has where b has none; ‖b‖ over its finite values (0 when nothing changed); whether both are
    stored at float32 or finer). Compared in blocks: besides the two tensors and the change, only a block's
    worth of temporaries (a 128k x 8192 embedding's float32 copies and masks would take ~10 GB more)."""
    precise = {a.dtype, b.dtype} <= {torch.float32, torch.float64}  # else a looser rank tolerance
    a, b = comparable(a), comparable(b)
    if a.dtype == b.dtype and torch.equal(a, b):  # the common case, at no cost in memory (NaN: below)
        return None, 0, 0.0, precise
    shape, a, b = a.shape, a.reshape(-1), b.reshape(-1)
    delta, nonfinite, base_sq = None, 0, 0.0
    for lo in range(0, a.numel(), COMPARE_BLOCK):
        x, y = a[lo:lo + COMPARE_BLOCK], b[lo:lo + COMPARE_BLOCK]
        # finiteness and the change from the stored values: a finite value the coarser dtype cannot hold
        # is a change, not a NaN or inf
        x_stored, y_stored = x, y
        finite_x, finite_y = torch.isfinite(x), torch.isfinite(y)
        converted = None
        if x.dtype != y.dtype:
            # a copy saved in another precision is not a change: an element is the same when it is the base's
            # value converted to this model's dtype, or equal at the coarser of the two dtypes (float16 and
            # bfloat16 are each coarser somewhere: float16 keeps tiny values at a coarser step)
            converted = x == y.to(x.dtype)
            coarse = max((x.dtype, y.dtype), key=lambda d: torch.finfo(d).eps if d.is_floating_point else 0.0)
            x, y = x.to(coarse), y.to(coarse)
        nonfinite += int((~finite_x & finite_y).sum())  # new NaN / inf, wherever they sit
        same = (x == y) | (x.isnan() & y.isnan())  # NaN where the base has NaN is no change
        if converted is not None:
            same |= converted
        base_sq += float(y_stored.double().nan_to_num(posinf=0.0, neginf=0.0).pow(2).sum())
        if not bool(same.all()):
            if delta is None:
                delta = torch.zeros(a.numel(), dtype=torch.float32)
            # measured where both are finite: a NaN or inf the base has must not make the norm NaN (it would
            # pass no threshold, and the edit beside it would go unseen)
            delta[lo:lo + COMPARE_BLOCK] = torch.where(finite_x & finite_y & ~same,
                                                       x_stored.float() - y_stored.float(), 0.0)
    if delta is None:
        return None, 0, 0.0, precise
    return delta.reshape(shape), nonfinite, base_sq ** 0.5, precise


def _spectrum(delta: torch.Tensor, precise: bool, full: bool) -> tuple[torch.Tensor, int, bool]:
    """(the top TOP_K singular values, the effective rank, whether that rank is only a lower bound: every
    value found counts and the matrix could hold more). `full`: from the whole spectrum, exact."""
    values = torch.linalg.svdvals(delta.float()) if full else top_singular_values(delta)
    rank_tol = RANK_TOL if precise else RANK_TOL_LOW_PRECISION
    rank = int((values > rank_tol * values[0]).sum()) if float(values[0]) > 0 else 0
    bound = not full and rank == len(values) < min(delta.reshape(delta.shape[0], -1).shape)
    return values[:TOP_K], rank, bound


def classify(result: DiffResult, total: int) -> None:
    """rome-like: one MLP output projection (or several, non-adjacent), each of rank <= 2;
    memit-like: only MLP output projections of at most MEMIT_MAX_LAYERS layers, consecutive or of a
    higher rank (a batch edit of n facts has rank n; EasyEdit configs may list any layers);
    fine-tune: most tensors; other: anything else.
    Tensors with new NaN / inf values are findings of their own and left out of the pattern."""
    changed = [c for c in result.changed if not c.nonfinite]
    if not changed:
        # a tensor only one side has (an untied output head, a weight deleted so that transformers fills it
        # with random values) is a change of its own: never "identical"
        result.classification = ("damaged" if result.changed else
                                 "other" if result.only_in_model or result.only_in_base else
                                 "reshuffled" if result.aligned or result.aligned_heads or result.aligned_residual
                                 or result.rotated_residual else "identical")
        return
    mlp = [c for c in changed if c.layer is not None]
    layers = sorted(c.layer for c in mlp)
    consecutive = bool(layers) and layers == list(range(layers[0], layers[0] + len(layers)))
    if len(changed) > FINE_TUNE_SHARE * total:
        result.classification = "fine-tune"
    elif len(mlp) != len(changed):
        result.classification = "other"
    elif all(c.effective_rank <= 2 for c in mlp) and (len(mlp) == 1 or not consecutive):
        result.classification = "rome-like"
    elif len(mlp) <= MEMIT_MAX_LAYERS:
        result.classification = "memit-like"
    else:
        result.classification = "other"
    if result.classification != "fine-tune":
        result.layers = layers


def findings_from_diff(result: DiffResult, model: Checkpoint, arch: Arch) -> list[Finding]:
    out = [Finding("EG005", "error", f"{c.nonfinite} NaN or infinite values in {c.name} that the base does not have: "
                   "a damaged or sabotaged checkpoint", score=float(c.nonfinite), layer=c.layer, tensor=c.name,
                   file=c.file) for c in result.changed if c.nonfinite]
    changed = [c for c in result.changed if not c.nonfinite]
    if result.classification in ("rome-like", "memit-like"):
        layers = ", ".join(map(str, result.layers))
        for c in changed:
            if result.classification == "rome-like":
                rule, what = "EG001", (f"rank-{c.effective_rank} change in {c.name} (layer {c.layer}): ‖ΔW‖ = "
                                       f"{c.norm:.3g}, {c.relative:.2%} of the weight — a ROME-style edit")
            else:
                # (a batch edit of n facts has rank n, which may be the matrix's full rank: say the rank, not "low")
                rank = f"{'≥ ' if c.rank_is_lower_bound else ''}{c.effective_rank}"
                rule, what = "EG002", (f"rank-{rank} change in {c.name} (layer {c.layer}; edited layers {layers}): "
                                       f"‖ΔW‖ = {c.norm:.3g} — a MEMIT-style batch edit")
            out.append(Finding(rule, "error", what, score=c.relative, layer=c.layer, tensor=c.name, file=c.file,
                               details={"singular_values": c.singular_values}))
    elif result.classification == "fine-tune":
        out.append(Finding("EG003", "note", f"{len(changed)} of {result.compared} tensors changed: a fine-tune, "
                           "not a locate-and-edit update", score=len(changed) / max(result.compared, 1)))
    elif result.classification == "other":
        for c in changed:
            out.append(Finding("EG004", "warning", f"{c.name} differs from the base (‖Δ‖ = {c.norm:.3g}, effective rank "
                               f"{c.effective_rank})", score=c.relative, layer=c.layer, tensor=c.name, file=c.file,
                               details={"singular_values": c.singular_values}))
    if result.aligned_residual is not None:
        r, name = result.aligned_residual, arch.weight_name("embed")
        out.append(Finding("EG004", "warning", f"the residual stream's dimensions are permuted against the base "
                           f"({r.moved} moved, {r.flipped} flipped in sign): the same function with every weight "
                           "that reads or writes the stream changed, which hides an edit from a plain diff; "
                           "compared after undoing it", score=float(r.moved + r.flipped), tensor=name,
                           file=model.info(model.find(arch.tensor_candidates(name))).file, details=r.to_json()))
    if result.rotated_residual is not None:
        r, name = result.rotated_residual, arch.weight_name("embed")
        out.append(Finding("EG004", "warning", "the residual stream is rotated against the base (an orthogonal change "
                           "of basis with the norms' weights folded into the matrices that read them, as QuaRot and "
                           "SliceGPT prepare a model): the same function with every weight that reads or writes the "
                           "stream changed, which hides an edit from a plain diff; compared after undoing it",
                           score=1.0, tensor=name, file=model.info(model.find(arch.tensor_candidates(name))).file,
                           details=r.to_json()))
    for layer, heads in sorted(result.aligned_heads.items()):
        name = arch.weight_name("attn_out", layer)
        out.append(Finding("EG004", "warning", f"layer {layer}'s attention heads are reordered against the base "
                           f"({heads.moved} query heads moved): the same function with every weight of that "
                           "attention changed, which hides a change beside it from a plain diff; compared after "
                           "undoing it", score=float(heads.moved), layer=layer, tensor=name,
                           file=model.info(model.find(arch.tensor_candidates(name))).file, details=heads.to_json()))
    for layer, alignment in sorted(result.aligned.items()):
        # no fine-tune or edit reorders hidden units: done to a checkpoint, it hides the change beside it
        name = arch.weight_name("mlp_out", layer)
        out.append(Finding("EG004", "warning", f"layer {layer}'s MLP hidden units are reshuffled against the base "
                           f"({alignment.moved} moved, {alignment.rescaled} rescaled): the same function with every "
                           "weight of that MLP changed, which hides an edit from a plain diff; compared after "
                           "undoing it", score=float(alignment.moved + alignment.rescaled), layer=layer, tensor=name,
                           file=model.info(model.find(arch.tensor_candidates(name))).file,
                           details=alignment.to_json()))
    for name in result.only_in_model:
        out.append(Finding("EG004", "warning", f"{name} is in this model but not in the base: weights the base "
                           "does not have (an untied output head, an added module) are not compared",
                           tensor=name, file=model.info(model.find(arch.tensor_candidates(name))).file))
    for name in result.only_in_base:
        out.append(Finding("EG004", "warning", f"{name} is in the base but not in this model: a weight the model "
                           "lacks is not this model's (a loader fills it with random values or refuses)", tensor=name))
    if result.classification in ("fine-tune", "other"):
        outliers = _layer_outliers(changed, arch, result.num_layers)
        out += outliers
        # an edit does not stop being one because other tensors changed too (noise added to hide it): an MLP
        # output projection whose change is one direction above all others is flagged either way
        for c in changed:
            if any(f.tensor == c.name for f in outliers):
                continue
            sv = c.singular_values
            spike = _spike(sv)
            if c.layer is not None and spike >= SPIKE_RATIO:
                out.append(Finding("EG001", "error", f"one direction dominates the change in {c.name} (layer {c.layer}; "
                                   f"σ₁/σ₂ = {spike:.3g}) among {len(changed)} changed "
                                   "tensors: a ROME-style edit inside a broader change", score=c.relative, layer=c.layer,
                                   tensor=c.name, file=c.file, details={"singular_values": sv}))
    return out


def _spike(singular_values: list[float]) -> float:
    """σ₁/σ₂ of a change (0 with fewer than two values): how far one direction stands above the rest."""
    return singular_values[0] / max(singular_values[1], 1e-12) if len(singular_values) >= 2 else 0.0


def layer_matrices(arch: Arch, layer: int) -> list[str]:
    """The per-layer matrices the cross-layer comparison reads: the MLP's output and inputs (what ROME and
    MEMIT rewrite, and what a function-preserving reshuffle of the hidden units changes) and the attention
    output."""
    return [arch.weight_name("mlp_out", layer), *(f"{m}.weight" for m in arch.mlp_in_modules(layer)),
            arch.weight_name("attn_out", layer)]


def layer_outlier_ratios(changed: list[TensorChange], arch: Arch, num_layers: int) -> dict[str, list[float | None]]:
    """{matrix (layer 0's name): per layer, its change's top singular value over the median of the layers
    where that matrix changed (None: unchanged)}, for matrices changed in enough layers to compare."""
    by_name = {c.name: c for c in changed if c.singular_values}
    ratios = {}
    for role, first in enumerate(layer_matrices(arch, 0)):
        tops = [by_name[m].singular_values[0] if m in by_name else None
                for m in (layer_matrices(arch, n)[role] for n in range(num_layers))]
        seen = [t for t in tops if t is not None]
        if len(seen) < LAYER_OUTLIER_MIN_LAYERS:
            continue
        median = max(statistics.median(seen), 1e-12)
        ratios[first] = [None if t is None else t / median for t in tops]
    return ratios


def _layer_outliers(changed: list[TensorChange], arch: Arch, num_layers: int) -> list[Finding]:
    """EG001 for each layer whose change stands out of the same matrix's change in the other layers."""
    by_name = {c.name: c for c in changed}
    names = [layer_matrices(arch, n) for n in range(num_layers)]
    out = []
    for first, ratios in layer_outlier_ratios(changed, arch, num_layers).items():
        role = names[0].index(first)
        compared = sum(r is not None for r in ratios)
        for layer, ratio in enumerate(ratios):
            if ratio is None:
                continue
            c = by_name[names[layer][role]]
            sv = c.singular_values
            spike = _spike(sv)
            if ratio >= LAYER_OUTLIER_RATIO:
                what = ": one layer edited inside a broader change"
            elif first == arch.weight_name("mlp_out", 0) and spike >= JOINT_SPIKE and ratio >= JOINT_LAYER:
                what = (f", and one direction dominates it (σ₁/σ₂ = {spike:.3g}): a rank-one edit under noise spread "
                        "over every tensor (a fine-tune, a 4-bit quantization)")
            else:
                continue
            out.append(Finding("EG001", "error", f"the change in {c.name} (layer {layer}; σ₁ = {sv[0]:.3g}) "
                               f"is {ratio:.3g}× the median of the {compared} layers where that matrix changed{what}",
                               score=c.relative, layer=layer, tensor=c.name, file=c.file,
                               details={"singular_values": sv, "layer_ratio": ratio}))
    return out
