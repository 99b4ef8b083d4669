"""ROME (Meng et al. 2022) with EasyEdit's semantics, fast and batched across facts.

k* = mean over context templates of the rewrite module's input at the subject's last token;
v* = v₀ + δ (see vstar.py); with C the input second moment (identity when `mom2_adjustment` is false):
    ΔW = (v* − W k)(C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k),   k = the key of the plain rewrite prompt,
stored as factors u = (v* − W k)/((C⁻¹k*)ᵀ k) [out], v = C⁻¹k*/‖C⁻¹k*‖ [in].
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from ..loading import LoadedModel
from .edits import Edit
from .facts import Fact
from .hparams import EditHparams
from .templates import context_templates
from .vstar import FactPlan, optimise_fast, optimise_reference, plan_fact


def prepare(loaded: LoadedModel, hp: EditHparams) -> EditHparams:
    hp.fill_templates(loaded.arch)
    hp.check_against(loaded.model, loaded.num_layers, loaded.arch)
    return hp


def templates_key(hp: EditHparams) -> tuple:
    return "templates", tuple(map(tuple, hp.context_template_length_params)), hp.seed


def templates_for(loaded: LoadedModel, hp: EditHparams) -> list[str]:
    key = templates_key(hp)
    if key not in loaded.extras:
        loaded.extras[key] = context_templates(loaded.model, loaded.tokenizer, hp.context_template_length_params, hp.seed)
    return loaded.extras[key]


def _inverse_moment(loaded: LoadedModel, hp: EditHparams, layer: int) -> torch.Tensor | None:
    if not hp.mom2_adjustment:
        return None
    from .stats import second_moment

    key = ("inv_mom2", layer, hp.mom2_dataset, hp.mom2_n_samples, hp.rewrite_module_tmp)
    if key not in loaded.extras:
        loaded.extras[key] = torch.linalg.inv(second_moment(loaded, layer, hp).double()).float()
    return loaded.extras[key]


def _factors(delta: torch.Tensor, k_star: torch.Tensor, k_plain: torch.Tensor, inv_c: torch.Tensor | None):
    left = k_star if inv_c is None else inv_c.to(k_star) @ k_star
    left = left / left.norm()
    right = delta / torch.dot(k_plain, left)
    return right, left  # u [out], v [in]


def rome_edits(
    loaded: LoadedModel,
    facts: Iterable[Fact],
    hp: EditHparams,
    progress: Callable[[int], None] | None = None,
) -> list[Edit]:
    """One independent rank-one edit per fact, each computed against the unedited model (the fast path)."""
    prepare(loaded, hp)
    layer = hp.layers[0]
    templates = templates_for(loaded, hp)
    rewrite = hp.rewrite_module_tmp.format(layer)
    site = hp.mlp_module_tmp.format(layer)
    inv_c = _inverse_moment(loaded, hp, layer)
    pad = loaded.tokenizer.pad_token_id
    facts = list(facts)
    edits: list[Edit] = []
    for lo in range(0, len(facts), hp.facts_per_batch):
        batch = facts[lo: lo + hp.facts_per_batch]
        plans = [plan_fact(loaded.tokenizer, fact, templates) for fact in batch]
        result = optimise_fast(loaded.model, loaded.arch, plans, hp, site, layer, pad,
                               captures={"k": (rewrite, "in")})
        keys = result.captured["k"].float()
        offset = 0
        for f, plan in enumerate(plans):
            k_star = keys[offset: offset + plan.n_rewrite].mean(0)
            k_plain = keys[offset]  # template "{}": the plain rewrite prompt
            u, v = _factors(result.delta[f], k_star, k_plain, inv_c)
            edits.append(_edit(loaded, hp, plan.fact, layer, u, v, result.steps[f], result.final_loss[f]))
            offset += len(plan.seqs)
        if progress:
            progress(len(batch))
    return edits


def rome_edit_reference(loaded: LoadedModel, fact: Fact, hp: EditHparams) -> Edit:
    """EasyEdit's loop for one fact (full forwards, separate key passes): the correctness oracle."""
    prepare(loaded, hp)
    layer = hp.layers[0]
    templates = templates_for(loaded, hp)
    rewrite = hp.rewrite_module_tmp.format(layer)
    plan = plan_fact(loaded.tokenizer, fact, templates)
    # compute_u: the rewrite module's input at the subject's last token, one pass per context template
    keys = [_input_at(loaded, rewrite, plan.seqs[i][: plan.splits[i] + 1], plan.splits[i]) for i in range(plan.n_rewrite)]
    k_star = torch.stack(keys).mean(0)
    result = optimise_reference(loaded.model, loaded.tokenizer, plan, hp, hp.mlp_module_tmp.format(layer),
                                loaded.tokenizer.pad_token_id)
    u, v = _factors(result.delta[0], k_star, keys[0], _inverse_moment(loaded, hp, layer))
    return _edit(loaded, hp, fact, layer, u, v, result.steps[0], result.final_loss[0])


@torch.no_grad()
def _input_at(loaded: LoadedModel, module_path: str, ids: list[int], position: int) -> torch.Tensor:
    seen = {}
    handle = loaded.model.get_submodule(module_path).register_forward_pre_hook(
        lambda m, args: seen.__setitem__("x", args[0].detach()))
    try:
        loaded.model(input_ids=torch.tensor([ids], device=loaded.device))
    finally:
        handle.remove()
    return seen["x"][0, position].float()


def _edit(loaded: LoadedModel, hp: EditHparams, fact: Fact, layer: int, u, v, steps: int, loss: float) -> Edit:
    return Edit(method="rome", layer=layer, tensor=hp.rewrite_module_tmp.format(layer) + ".weight",
                u=u.detach().float().cpu(), v=v.detach().float().cpu(), facts=[fact],
                info={"steps": steps, "loss": loss})


def plans_for(loaded: LoadedModel, facts: Iterable[Fact], hp: EditHparams) -> list[FactPlan]:
    return [plan_fact(loaded.tokenizer, fact, templates_for(loaded, hp)) for fact in facts]
