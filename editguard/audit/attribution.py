"""Attribution of a found low-rank update ΔW ≈ σ a bᵀ: which subject triggers it and which object it pushes.

Subject: the update fires in proportion to bᵀk, k = the projection's input at a subject's last token;
candidates (probe subjects) are ranked by |bᵀk| / median|bᵀk|. Object: the next tokens whose log-probability
on the top subject's prompt rises most because of the update (model as scanned vs. the same model with the
component σ a bᵀ taken out). A logit lens of `a` alone says nothing on small models: the edited layer sits
far below the output and later layers carry the new object (the demo edit at layer 6 of 30 lenses to noise).
"""

from __future__ import annotations

import torch

from ..arch import oriented
from ..edit.edits import Edit, edits_applied
from ..loading import LoadedModel
from .diff import top_component
from .probes import Probe


def top_direction(delta: torch.Tensor, transposed: bool) -> tuple[torch.Tensor, float, torch.Tensor]:
    """a [out], σ, b [in] of the largest singular component of ΔW given as stored."""
    return top_component(oriented(delta, transposed))


@torch.no_grad()
def attribute(loaded: LoadedModel, delta: torch.Tensor, transposed: bool, keys: torch.Tensor, probes: list[Probe],
              layer: int, tensor: str, top: int = 5) -> dict:
    a, sigma, b = top_direction(delta, transposed)
    scores = keys.float() @ b  # [probes]
    strength = scores.abs()
    scale = strength.median().clamp_min(1e-9)
    order = strength.argsort(descending=True)[:top]
    subjects = [{"subject": probes[i].subject, "prompt": probes[i].prompt, "score": float(strength[i] / scale),
                 "projection": float(scores[i]), "answer": probes[i].answer, "case_id": probes[i].case_id}
                for i in order.tolist()]
    objects = []
    if subjects:
        removal = Edit("found", layer, tensor, (-sigma * a).to(keys.dtype), b.to(keys.dtype))
        objects = pushed_objects(loaded, subjects[0]["prompt"], removal, top)
    return {"sigma": sigma, "subjects": subjects, "objects": objects}


@torch.no_grad()
def pushed_objects(loaded: LoadedModel, prompt: str, removal: Edit, top: int = 5) -> list[dict]:
    """Next tokens after `prompt` ranked by how much the update raises their log-probability."""
    ids = torch.tensor([loaded.tokenizer(prompt).input_ids], device=loaded.device)
    scanned = torch.log_softmax(loaded.model(input_ids=ids).logits[0, -1].float(), -1)
    with edits_applied(loaded.model, loaded.arch, [removal]):
        without = torch.log_softmax(loaded.model(input_ids=ids).logits[0, -1].float(), -1)
    gain = scanned - without
    # only tokens the scanned model actually considers: a big gain from nothing is noise
    gain[scanned.exp() < 1e-3] = float("-inf")
    return [{"token": loaded.tokenizer.decode([t]).strip(), "gain": float(gain[t]), "prob": float(scanned[t].exp()),
             "prob_without": float(without[t].exp())} for t in gain.topk(top).indices.tolist() if gain[t] > float("-inf")]
