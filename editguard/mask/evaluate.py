"""How well a mask reverses edits, and what it costs the model.

RSR (reversal success rate): share of edited facts where the masked edited model gives the true object a
higher full multi-token log-probability than the new one, on the rewrite prompt. Always reported next
to its ceiling (the unedited model's own preference), RSR among facts the model knew, the edited model
without a mask, and the mask on the unedited model (a control: a mask that merely pushed true objects
would score there too). Baselines: weight-only SVD reversal (drop the top singular component of Ŵ_i)
and magnitude pruning of ΔW_i at the mask's pruned fraction. Model cost: WikiText-2 perplexity (1024-
token windows) of original / edited / masked, Top-1 agreement and mean KL with the original.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from typing import Callable, Iterator

import torch

from ..arch import oriented
from ..edit.edits import weight_param, weights_restored
from ..intervals import share_interval, wilson_interval
from ..loading import LoadedModel
from ..scoring import RowEdits, continuation_logprobs, next_token_logprobs, text_windows


@contextlib.contextmanager
def masked_weight(loaded: LoadedModel, module_path: str, K: torch.Tensor | None, transposed: bool) -> Iterator[None]:
    """The base weight multiplied by the [out, in] mask K inside the block (exactly restored after)."""
    if K is None:
        yield
        return
    weight = weight_param(loaded.model, module_path + ".weight")
    with weights_restored(loaded.model, [module_path + ".weight"]):
        with torch.no_grad():
            weight.mul_(oriented(K, transposed).to(weight))
        yield


@contextlib.contextmanager
def masks_applied(loaded: LoadedModel, targets: list[tuple[str, bool]], masks: list[torch.Tensor] | None
                  ) -> Iterator[None]:
    """`masked_weight` for several (module path, transposed) targets at once; no masks: no change."""
    with contextlib.ExitStack() as stack:
        for (path, transposed), K in zip(targets, masks or []):
            stack.enter_context(masked_weight(loaded, path, K, transposed))
        yield


MASK_ON = ("both", "weights", "edit")


def check_mask_on(mask_on: str) -> None:
    if mask_on not in MASK_ON:
        raise ValueError(f"mask_on must be one of {MASK_ON}, not {mask_on!r}")


def preference(loaded: LoadedModel, facts: list, module_path: str | None, u: torch.Tensor | None,
               v: torch.Tensor | None, K: torch.Tensor | None, transposed: bool, batch_size: int = 64,
               mask_on: str = "both") -> torch.Tensor:
    """log p(true) − log p(new) on each fact's rewrite prompt (full multi-token objects), with fact i's
    edit (u[i] v[i]ᵀ, rank r if 3-D) added and the mask K on the whole edited weight (`mask_on` "both"),
    on the base weight only ("weights": W ⊙ K + ΔW) or on the edit only ("edit": W + ΔW ⊙ K). Without u
    and K (module_path may then be None): the model as it is."""
    check_mask_on(mask_on)
    prompts = [f.text for f in facts for _ in (0, 1)]
    objects = [o for f in facts for o in (f.target_true, f.target_new)]
    edits = None
    if u is not None:
        uu = u if u.dim() == 3 else u.unsqueeze(-1)
        vv = v if v.dim() == 3 else v.unsqueeze(-1)
        edits = RowEdits(module_path, uu.repeat_interleave(2, 0), vv.repeat_interleave(2, 0),
                         mask=None if mask_on == "weights" else K)
    with masked_weight(loaded, module_path, None if mask_on == "edit" else K, transposed):
        sums, _ = continuation_logprobs(loaded, prompts, objects, edits, batch_size=batch_size)
    return sums[0::2] - sums[1::2]


def top_singular(u: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, iters: int = 40):
    """Top singular triplet of W + u_i v_iᵀ for every row i, by batched power iteration (never dense)."""
    gen = torch.Generator().manual_seed(0)
    u, v = u.to(weight.device), v.to(weight.device)
    b = torch.randn(u.shape[0], weight.shape[1], generator=gen).to(weight.device)
    for _ in range(iters):
        a = b @ weight.T + (b * v).sum(1, keepdim=True) * u  # Ŵ b
        a = a / a.norm(dim=1, keepdim=True)
        b = a @ weight + (a * u).sum(1, keepdim=True) * v  # Ŵᵀ a
        sigma = b.norm(dim=1, keepdim=True)
        b = b / sigma
    return a, sigma[:, 0], b


def svd_reversal_factors(u, v, weight):
    """Ŵ − σ₁ a bᵀ = W + u vᵀ − σ₁ a bᵀ: rank-2 factors per row."""
    u, v = u.to(weight.device), v.to(weight.device)
    a, sigma, b = top_singular(u, v, weight)
    return torch.stack([u, -sigma[:, None] * a], dim=-1), torch.stack([v, b], dim=-1)


def outside_largest(delta: torch.Tensor, fraction: float) -> torch.Tensor:
    """0/1 mask that prunes the `fraction` of entries where |ΔW| is largest (the magnitude baseline)."""
    magnitude = delta.abs()
    k = round(fraction * magnitude.numel())
    if k == 0:  # the same share as a mask that prunes nothing here: nothing
        return torch.ones_like(magnitude)
    cut = magnitude.reshape(-1).kthvalue(magnitude.numel() - k + 1).values
    return (magnitude < cut).float()


@torch.no_grad()
def magnitude_baseline(loaded: LoadedModel, facts: list, module_path: str, u, v, fraction: float,
                       transposed: bool) -> torch.Tensor:
    """Prune the `fraction` of Ŵ_i's entries where |ΔW_i| is largest (a per-edit mask, one edit at a time)."""
    weight = weight_param(loaded.model, module_path + ".weight")
    prefs = []
    with weights_restored(loaded.model, [module_path + ".weight"]):
        base = weight.detach().clone()
        for i, fact in enumerate(facts):
            delta = torch.outer(u[i], v[i]).to(base.device)
            edited = (oriented(base, transposed).float() + delta) * outside_largest(delta, fraction)
            weight.copy_(oriented(edited, transposed).to(weight))
            prefs.append(preference(loaded, [fact], module_path, None, None, None, transposed)[0])
    return torch.stack(prefs)


def rsr_report(loaded: LoadedModel, facts: list, module_path: str, transposed: bool, u, v, K,
               baselines: bool = True, magnitude_n: int = 100,
               also_masked: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> dict:
    """All the RSR numbers for one split of ROME edits (fact i carries u[i] v[i]ᵀ), per relation too.
    `also_masked` applies the masks of further (unedited) tensors wherever K is on the base weights."""
    orig = preference(loaded, facts, module_path, None, None, None, transposed)
    edited = preference(loaded, facts, module_path, u, v, None, transposed)
    with also_masked():
        masked = preference(loaded, facts, module_path, u, v, K, transposed)
        control = preference(loaded, facts, module_path, None, None, K, transposed)
        weights_only = preference(loaded, facts, module_path, u, v, K, transposed, mask_on="weights")
    report = summarise(facts, orig, edited, masked, control)
    report |= reversal_sources(weights_only, preference(loaded, facts, module_path, u, v, K, transposed, mask_on="edit"))
    if baselines:
        weight = loaded.model.get_submodule(module_path).weight.detach().float()
        canonical = oriented(weight, transposed)
        su, sv = svd_reversal_factors(u.float(), v.float(), canonical)
        svd = preference(loaded, facts, module_path, su, sv, None, transposed)
        report["baseline_svd_rsr"] = share(svd > 0)
        pruned = float((1 - K).mean()) if K is not None else 0.0
        n = min(magnitude_n, len(facts))
        mag = magnitude_baseline(loaded, facts[:n], module_path, u[:n], v[:n], pruned, transposed)
        report["baseline_magnitude_rsr"] = share(mag > 0)
        report["baseline_magnitude_n"] = n
    return report


def summarise(facts: list, orig: torch.Tensor, edited: torch.Tensor, masked: torch.Tensor,
              control: torch.Tensor) -> dict:
    """RSR with its ceiling and controls from the four preference vectors (log p(true) − log p(new))."""
    known, reversed_ = orig > 0, masked > 0
    report = {
        "n": len(facts),
        "original_prefers_true": share(known),
        "edited_prefers_true": share(edited > 0),
        "rsr": share(reversed_),
        "rsr_ci95": wilson_interval(int(reversed_.sum()), len(facts)),
        "rsr_known": share(reversed_[known]) if known.any() else float("nan"),
        "known": int(known.sum()),
        "mask_on_unedited_prefers_true": share(control > 0),
        "per_relation": {},
    }
    by_rel = defaultdict(list)
    for i, fact in enumerate(facts):
        by_rel[fact.relation or "unknown"].append(i)
    for rel, idx in sorted(by_rel.items()):
        idx_t = torch.tensor(idx)
        report["per_relation"][rel] = {"n": len(idx), "rsr": share(masked[idx_t] > 0),
                                       "original": share(orig[idx_t] > 0)}
    return report


def reversal_sources(weights_only: torch.Tensor, edit_only: torch.Tensor) -> dict:
    """Where the reversal comes from: RSR with K on the base weights only (W ⊙ K + ΔW) and on the edit
    only (W + ΔW ⊙ K). A mask that works through the base weights, not by cutting ΔW, leaves an editor
    who computes the edit through the masked model (`lock --evaluate`) free to compensate."""
    return {"rsr_mask_on_weights_only": share(weights_only > 0), "rsr_mask_on_edit_only": share(edit_only > 0)}


def rsr_interval(report: dict) -> list[float] | None:
    """A split report's RSR interval: as measured, or from its RSR and n (reports written before it was)."""
    return report.get("rsr_ci95") or share_interval(report.get("rsr"), report.get("n") or 0)


def share(mask: torch.Tensor) -> float:
    return float(mask.float().mean()) if mask.numel() else float("nan")


@torch.no_grad()
def text_metrics(loaded: LoadedModel, variants: dict[str, Callable[[], contextlib.AbstractContextManager]],
                 tokens: int = 70_000, window: int = 1024, progress: Callable[[int, int], None] | None = None) -> dict:
    """Perplexity of each variant on WikiText-2 (non-overlapping `window`-token windows over the first
    `tokens` tokens), and Top-1 agreement and mean KL against the first variant (the original)."""
    windows = text_windows(loaded, tokens, window)
    names = list(variants)
    nll = {n: 0.0 for n in names}
    agree = {n: 0 for n in names}
    kl = {n: 0.0 for n in names}
    count = 0
    for w, chunk in enumerate(windows):
        reference = None
        for name in names:
            with variants[name]():
                token_lp, logp = next_token_logprobs(loaded, chunk)
            nll[name] += float(-token_lp.sum())
            if reference is None:
                reference = logp
            else:
                agree[name] += int((logp.argmax(-1) == reference.argmax(-1)).sum())
                kl[name] += float((reference.exp() * (reference - logp)).sum())
        count += len(chunk) - 1
        if progress:
            progress(w + 1, len(windows))
    out = {"tokens": count, "windows": len(windows)}
    for name in names:
        out[name] = {"perplexity": math.exp(nll[name] / count)}
        if name != names[0]:
            out[name]["top1_agreement"] = agree[name] / count
            out[name]["mean_kl"] = kl[name] / count
    return out
