"""Residual-stream decomposition (paper Fig. 3/4): how much each layer's attention and MLP output push
the answer, measured as direct logit attribution to logit(new) − logit(true) at the last prompt position.

Each sublayer's output at the last position is projected on the difference of the two unembedding rows,
scaled by the final norm's weight and the final residual's RMS (the norm is linearised around the
actual final state). Positive: the sublayer favours the new (edited) object.
"""

from __future__ import annotations

import torch

from ..edit.facts import target_ids
from ..loading import LoadedModel


@torch.no_grad()
def decompose(loaded: LoadedModel, prompt: str, new: str, true: str) -> dict:
    arch, model, tok = loaded.arch, loaded.model, loaded.tokenizer
    ids = torch.tensor([tok(prompt).input_ids], device=loaded.device)
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for layer in range(loaded.num_layers):
        for role in ("attn", "mlp"):
            def hook(module, args, output, key=f"{role}{layer}"):
                out = output[0] if isinstance(output, tuple) else output
                seen[key] = out[0, -1].float()
            handles.append(model.get_submodule(arch.module(role, layer)).register_forward_hook(hook))
    final_norm = model.get_submodule(arch.final_norm)
    handles.append(final_norm.register_forward_hook(
        lambda m, a, o: seen.__setitem__("final_in", a[0][0, -1].float())))
    try:
        model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    unembed = model.get_submodule(arch.unembed).weight.float()
    direction = unembed[target_ids(tok, new)[0]] - unembed[target_ids(tok, true)[0]]
    gamma = getattr(final_norm, "weight", None)
    if gamma is not None:
        gamma = gamma.float()
        if arch.model_type.startswith("gemma"):
            gamma = 1 + gamma  # Gemma norms scale by (1 + w)
        direction = direction * gamma
    final = seen["final_in"]
    rms = final.pow(2).mean().sqrt().clamp_min(1e-6)
    attn = [float(seen[f"attn{l}"] @ direction / rms) for l in range(loaded.num_layers)]
    mlp = [float(seen[f"mlp{l}"] @ direction / rms) for l in range(loaded.num_layers)]
    return {"prompt": prompt, "new": new, "true": true, "attention": attn, "mlp": mlp}
