"""Context templates: short text prefixes sampled from the model itself, as ROME does.

ROME averages the key over prompts like "Because of the war. The mother tongue of {} is" so the edit
fires whatever precedes the subject. EasyEdit samples them (top-k 5) at run time; here they are
deterministic for a seed on every device (drawn on a CPU generator), and recorded in every edit bank.
"""

from __future__ import annotations

import torch

STARTERS = ("The", "Therefore", "Because", "I", "You")


def group_sizes(length_params: list[list[int]]) -> list[int]:
    """How many templates each (length, count) pair yields: EasyEdit's count // 5 per starter, so a count
    under 5 yields none."""
    return [count // len(STARTERS) * len(STARTERS) for _, count in length_params]


@torch.no_grad()
def context_templates(model, tokenizer, length_params: list[list[int]], seed: int = 0) -> list[str]:
    """["{}"] + for each (length, n): n templates "<sampled text>. {}" of `length` tokens in all."""
    templates = ["{}"]
    generator = torch.Generator().manual_seed(seed)
    for (length, _), size in zip(length_params, group_sizes(length_params)):
        per_starter = size // len(STARTERS)
        if per_starter == 0:
            continue
        for starter in STARTERS:
            ids = tokenizer(starter, return_tensors="pt").input_ids.repeat(per_starter, 1)
            for row in _sample(model, ids, max(length - ids.shape[1], 1), generator):
                text = tokenizer.decode(row, skip_special_tokens=True)
                templates.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return templates


def _sample(model, ids: torch.Tensor, new_tokens: int, generator: torch.Generator, top_k: int = 5) -> torch.Tensor:
    """transformers' generate(do_sample=True, top_k=5), step for step, but drawing on a CPU generator:
    the same templates on every device (a CUDA generator would draw other numbers)."""
    from transformers import DynamicCache

    from .forward import cache_kwarg

    device = next(model.parameters()).device
    cache, step_ids = {cache_kwarg(model): DynamicCache(config=model.config)}, ids
    for _ in range(new_tokens):
        out = model(input_ids=step_ids.to(device), use_cache=True, **cache)
        scores = out.logits[:, -1].float().cpu()
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        probs = torch.softmax(scores.masked_fill(scores < kth, float("-inf")), dim=-1)
        step_ids = torch.multinomial(probs, 1, generator=generator)
        ids = torch.cat([ids, step_ids], dim=1)
    return ids
