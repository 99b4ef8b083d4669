"""Attribution of a found low-rank update ΔW ≈ σ a bᵀ: which subject triggers it and which object it pushes.

Subject: the update fires in proportion to bᵀk, k = the projection's input at a subject's last token;
candidates (probe subjects) are ranked by |bᵀk| / median|bᵀk|. Object: the logit lens of the output
direction ±a (through the final norm and the unembedding), sign taken from the top subject's bᵀk.
"""

from __future__ import annotations

import torch

from ..edit.forward import unembed
from ..loading import LoadedModel
from .probes import Probe


def top_direction(delta: torch.Tensor, transposed: bool) -> tuple[torch.Tensor, float, torch.Tensor]:
    """a [out], σ, b [in] of the largest singular component of ΔW given as stored."""
    m = (delta.T if transposed else delta).float()
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[:, 0], float(s[0]), vh[0]


@torch.no_grad()
def attribute(loaded: LoadedModel, delta: torch.Tensor, transposed: bool, keys: torch.Tensor, probes: list[Probe],
              top: int = 5) -> dict:
    a, sigma, b = top_direction(delta, transposed)
    scores = keys.float() @ b  # [probes]
    strength = scores.abs()
    scale = strength.median().clamp_min(1e-9)
    order = strength.argsort(descending=True)[:top]
    subjects = [{"subject": probes[i].subject, "prompt": probes[i].prompt, "score": float(strength[i] / scale),
                 "projection": float(scores[i]), "answer": probes[i].answer, "case_id": probes[i].case_id}
                for i in order.tolist()]
    sign = 1.0 if not subjects or subjects[0]["projection"] >= 0 else -1.0
    direction = (sign * a).to(loaded.device)
    final_norm = loaded.model.get_submodule(loaded.arch.final_norm)
    logits = unembed(loaded.model, loaded.arch, final_norm(direction[None, None, :])[0, 0]).float()
    probs = torch.softmax(logits, -1)
    objects = [{"token": loaded.tokenizer.decode([int(t)]).strip(), "logit": float(logits[t]), "prob": float(probs[t])}
               for t in logits.topk(top).indices.tolist()]
    return {"sigma": sigma, "subjects": subjects, "objects": objects}
