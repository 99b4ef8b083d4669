"""Context templates: short text prefixes sampled from the model itself, as ROME does.

ROME averages the key over prompts like "Because of the war. The mother tongue of {} is" so the edit
fires whatever precedes the subject. EasyEdit samples them (top-k 5) at run time; here they are
deterministic for a seed, and recorded in every edit bank.
"""

from __future__ import annotations

import torch

STARTERS = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def context_templates(model, tokenizer, length_params: list[list[int]], seed: int = 0) -> list[str]:
    """["{}"] + for each (length, n): n templates "<sampled text>. {}" of `length` tokens in all."""
    templates = ["{}"]
    device = next(model.parameters()).device
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        for length, count in length_params:
            per_starter = max(count // len(STARTERS), 1)
            for starter in STARTERS:
                ids = tokenizer(starter, return_tensors="pt").input_ids.to(device)
                new = max(length - ids.shape[1], 1)
                out = model.generate(
                    ids.repeat(per_starter, 1), attention_mask=torch.ones_like(ids).repeat(per_starter, 1),
                    do_sample=True, top_k=5, top_p=1.0, temperature=1.0, max_new_tokens=new, min_new_tokens=new,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=None,
                )
                for row in out:
                    text = tokenizer.decode(row, skip_special_tokens=True)
                    templates.append(text.replace("{", " ").replace("}", " ") + ". {}")
    finally:
        torch.random.set_rng_state(generator_state)
    return templates
