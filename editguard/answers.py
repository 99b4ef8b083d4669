"""What a model says: greedy continuations and object probabilities for a list of prompts."""

from __future__ import annotations

import torch

from .loading import LoadedModel


@torch.no_grad()
def greedy_answers(loaded: LoadedModel, prompts: list[str], max_new_tokens: int = 4) -> list[str]:
    tokenizer, model = loaded.tokenizer, loaded.model
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last real token
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True).to(loaded.device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    finally:
        tokenizer.padding_side = side
    texts = tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    return [t.split("\n")[0].strip() for t in texts]
