"""Base diff: stream two checkpoints tensor by tensor and classify what changed.

Neither model is ever loaded whole: one pair of tensors is in memory at a time. For each changed tensor:
the norm of the difference, the relative change, and the top singular values (randomised subspace
iteration), from which an effective rank follows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..arch import Arch
from ..checkpoint import Checkpoint
from ..errors import EditguardError
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


@dataclass
class TensorChange:
    name: str  # canonical name
    file: str
    norm: float
    relative: float
    singular_values: list[float]
    effective_rank: int
    layer: int | None  # set when it is an MLP output projection
    nonfinite: int = 0  # NaN / inf values here that the base does not have (norms then cover the finite rest)

    def to_json(self) -> dict:
        return self.__dict__.copy()


@dataclass
class DiffResult:
    changed: list[TensorChange]
    compared: int
    only_in_model: list[str] = field(default_factory=list)
    only_in_base: list[str] = field(default_factory=list)
    classification: str = "identical"  # identical | rome-like | memit-like | fine-tune | other | damaged
    layers: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"classification": self.classification, "layers": self.layers, "compared": self.compared,
                "changed": [c.to_json() for c in self.changed], "only_in_model": self.only_in_model,
                "only_in_base": self.only_in_base}


def top_singular_values(delta: torch.Tensor, k: int = TOP_K, iters: int = 4) -> torch.Tensor:
    """Randomised subspace iteration (Halko et al.): the top-k singular values of a 2-D tensor."""
    m = delta.float()
    if m.dim() != 2:
        m = m.reshape(m.shape[0], -1) if m.dim() > 2 else m.reshape(1, -1)
    k = min(k, *m.shape)
    gen = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(m @ torch.randn(m.shape[1], k + 4, generator=gen))[0]
    for _ in range(iters):
        q = torch.linalg.qr(m.T @ q)[0]
        q = torch.linalg.qr(m @ q)[0]
    return torch.linalg.svdvals(q.T @ m)[:k]


def diff_checkpoints(model: Checkpoint, base: Checkpoint, arch: Arch, num_layers: int,
                     progress: Callable[[int, int], None] | None = None, tol: float = 0.0) -> DiffResult:
    if base.config.get("model_type") != model.config.get("model_type"):
        raise EditguardError(f"base is a {base.config.get('model_type')} model, this is {model.config.get('model_type')}: "
                             "not the same architecture")
    base_layers = arch.num_layers(base.config)
    if base_layers != num_layers:
        raise EditguardError(f"base has {base_layers} layers, this model {num_layers}: not the same model")
    canon_model = {arch.canonical_tensor_name(n): n for n in model.names()}
    canon_base = {arch.canonical_tensor_name(n): n for n in base.names()}
    shared = sorted(set(canon_model) & set(canon_base))
    if not shared:
        raise EditguardError("the base shares no tensor names with this model: not a checkpoint of the same model")
    # a base without the tensors edits rewrite cannot clear them: comparing the rest would read "identical"
    targets = sorted(n for n in canon_model if arch.mlp_out_layer_of(n, num_layers) is not None)
    missing = [n for n in targets if n not in canon_base]
    if missing:
        raise EditguardError(f"the base lacks {len(missing)} of this model's {len(targets)} MLP output projections "
                             f"(e.g. {missing[0]}): not a full checkpoint of the same model")
    result = DiffResult([], len(shared), sorted(set(canon_model) - set(canon_base)),
                        sorted(set(canon_base) - set(canon_model)))
    for i, name in enumerate(shared):
        a, b = model.read(canon_model[name]), base.read(canon_base[name])
        if a.shape != b.shape:
            raise EditguardError(f"{name}: shape {list(a.shape)} here, {list(b.shape)} in the base: not the same model")
        if a.dtype != b.dtype:
            # a copy saved in another precision is not a change: compare at the coarser of the two dtypes
            coarse = max((a.dtype, b.dtype), key=lambda d: torch.finfo(d).eps if d.is_floating_point else 0.0)
            a, b = a.to(coarse), b.to(coarse)
        finite_a, finite_b = torch.isfinite(a), torch.isfinite(b)
        nonfinite = int((~finite_a & finite_b).sum())  # new NaN / inf, wherever they sit
        if nonfinite > 0:
            # NaN never equals NaN, and a NaN norm passes no threshold: count them rather than measure them
            norm = float(torch.where(finite_a & finite_b, a.float() - b.float(), 0.0).norm())
            result.changed.append(TensorChange(name, model.info(canon_model[name]).file, norm,
                                               norm / max(float(b.float().nan_to_num().norm()), 1e-12),
                                               [], 0, arch.mlp_out_layer_of(name, num_layers), nonfinite))
        elif not torch.equal(a, b):
            delta = a.float() - b.float()
            norm = float(delta.norm())
            if norm > tol:
                layer = arch.mlp_out_layer_of(name, num_layers)
                if delta.dim() < 2:
                    sv, rank = delta.abs().sort(descending=True).values[:1], 1
                else:
                    # the full spectrum for edit targets (a batch edit of n facts has rank n), the top
                    # few singular values for everything else
                    full = torch.linalg.svdvals(delta) if layer is not None else top_singular_values(delta)
                    # (not `tol`: that is the caller's norm threshold, still needed for the next tensors)
                    rank_tol = RANK_TOL if a.dtype in (torch.float32, torch.float64) else RANK_TOL_LOW_PRECISION
                    rank = int((full > rank_tol * full[0]).sum()) if float(full[0]) > 0 else 0
                    sv = full[:TOP_K]
                result.changed.append(TensorChange(name, model.info(canon_model[name]).file, norm,
                                                   norm / max(float(b.float().norm()), 1e-12),
                                                   [float(x) for x in sv], rank, layer))
        if progress:
            progress(i + 1, len(shared))
    classify(result, len(shared))
    return result


def classify(result: DiffResult, total: int) -> None:
    """rome-like: one MLP output projection (or several, non-adjacent), each of rank <= 2;
    memit-like: only MLP output projections of consecutive layers (a batch edit of n facts has rank n),
    or one projection with a higher-rank change; fine-tune: most tensors; other: anything else.
    Tensors with new NaN / inf values are findings of their own and left out of the pattern."""
    changed = [c for c in result.changed if not c.nonfinite]
    if not changed:
        result.classification = "damaged" if result.changed else "identical"
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
    elif len(mlp) == 1 or (consecutive and len(mlp) <= MEMIT_MAX_LAYERS):
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
                rule, what = "EG002", (f"low-rank change in {c.name} (layer {c.layer}; edited layers {layers}): ‖ΔW‖ = "
                                       f"{c.norm:.3g}, effective rank {c.effective_rank} — a MEMIT-style batch edit")
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
    if result.classification in ("fine-tune", "other"):
        # an edit does not stop being one because other tensors changed too (noise added to hide it): an MLP
        # output projection whose change is one direction above all others is flagged either way
        for c in changed:
            sv = c.singular_values
            spike = sv[0] / max(sv[1], 1e-12) if len(sv) >= 2 else 0.0
            if c.layer is not None and spike >= SPIKE_RATIO:
                out.append(Finding("EG001", "error", f"one direction dominates the change in {c.name} (layer {c.layer}; "
                                   f"σ₁/σ₂ = {spike:.3g}) among {len(changed)} changed "
                                   "tensors: a ROME-style edit inside a broader change", score=c.relative, layer=c.layer,
                                   tensor=c.name, file=c.file, details={"singular_values": sv}))
    return out
