"""Log-probabilities of continuations ("prompt" -> " object"), batched, logits only where read.

`RowEdits` adds a different factored edit to every row of a batch in the same forward pass
((W + u vᵀ)x = Wx + u (vᵀx)), so hundreds of independently edited models can be scored at once without
ever building a dense ΔW.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .edit.facts import target_ids
from .edit.forward import pad_batch, unembed
from .loading import LoadedModel


@dataclass
class RowEdits:
    """Per-row factored updates of one module's output: out[b] += u[b] @ (v[b]ᵀ x[b])."""

    module: str  # path of the edited projection (its input is x)
    u: torch.Tensor  # [B, out, r]
    v: torch.Tensor  # [B, in, r]
    mask: torch.Tensor | None = None  # optional [out, in] mask K applied to ΔW: (uvᵀ ⊙ K) x

    def hook(self):
        def fn(module, args, output):
            x = args[0]
            u, v = self.u.to(x), self.v.to(x)
            if self.mask is None:
                coeff = torch.einsum("bsi,bir->bsr", x, v)
                return output + torch.einsum("bsr,bor->bso", coeff, u)
            # (u vᵀ ⊙ K) x = Σ_r u_r ⊙ (K (v_r ⊙ x)): no dense ΔW per row
            k = self.mask.to(x)
            for r in range(u.shape[-1]):
                output = output + ((x * v[:, None, :, r]) @ k.T) * u[:, None, :, r]
            return output

        return fn


@contextlib.contextmanager
def row_edits_applied(model, edits: RowEdits | None) -> Iterator[None]:
    if edits is None:
        yield
        return
    handle = model.get_submodule(edits.module).register_forward_hook(edits.hook())
    try:
        yield
    finally:
        handle.remove()


def encode_continuations(tokenizer, prompts: Sequence[str], objects: Sequence[str]):
    """Token ids of prompt + " object" and the positions whose logits predict each object token."""
    out = []
    for prompt, obj in zip(prompts, objects):
        prompt_ids = list(tokenizer(prompt).input_ids)
        obj_ids = target_ids(tokenizer, obj)
        ids = prompt_ids + obj_ids
        positions = list(range(len(prompt_ids) - 1, len(ids) - 1))
        out.append((ids, positions, obj_ids))
    return out


@torch.no_grad()
def continuation_logprobs(
    loaded: LoadedModel,
    prompts: Sequence[str],
    objects: Sequence[str],
    edits: RowEdits | None = None,
    batch_size: int = 64,
    return_first_logits: bool = False,
):
    """Σ log p(object tokens | prompt) and the token counts, for each (prompt, object) pair.

    With `edits`, row i of the input is scored under its own edit (edits.u[i], edits.v[i]).
    With `return_first_logits`, also the full logits at the last prompt position ([N, V]).
    """
    encoded = encode_continuations(loaded.tokenizer, prompts, objects)
    model, arch = loaded.model, loaded.arch
    base = model.get_submodule(arch.base)
    device = loaded.device
    pad = loaded.tokenizer.pad_token_id
    sums = torch.zeros(len(encoded))
    counts = torch.tensor([len(e[2]) for e in encoded])
    first: list[torch.Tensor] = []
    for lo in range(0, len(encoded), batch_size):
        chunk = encoded[lo: lo + batch_size]
        ids, mask = pad_batch([seq for seq, _, _ in chunk], pad)
        rows = None
        if edits is not None:
            rows = RowEdits(edits.module, edits.u[lo: lo + len(chunk)], edits.v[lo: lo + len(chunk)], edits.mask)
        with row_edits_applied(model, rows):
            hidden = base(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        b_idx = [j for j, (_, pos, _) in enumerate(chunk) for _ in pos]
        p_idx = [p for _, pos, _ in chunk for p in pos]
        logits = unembed(model, arch, hidden[torch.tensor(b_idx), torch.tensor(p_idx)]).float()
        lp = torch.log_softmax(logits, dim=-1)
        tgt = torch.tensor([t for _, _, obj in chunk for t in obj], device=lp.device)
        token_lp = lp.gather(1, tgt[:, None])[:, 0].cpu()
        sums[lo: lo + len(chunk)] = torch.zeros(len(chunk)).index_add(0, torch.tensor(b_idx), token_lp)
        if return_first_logits:
            starts = [0]
            for _, pos, _ in chunk[:-1]:
                starts.append(starts[-1] + len(pos))
            first.append(logits[torch.tensor(starts)].cpu())
    if return_first_logits:
        return sums, counts, torch.cat(first)
    return sums, counts


def text_windows(loaded: LoadedModel, tokens: int, window: int, source: str = "wikitext2") -> list[list[int]]:
    """The first `tokens` tokens of a text (WikiText-2 by default) cut into non-overlapping windows (no
    longer than the model's context)."""
    from .data.text import load_text

    context = getattr(loaded.model.config, "max_position_embeddings", None)
    if isinstance(context, int) and context > 1:
        window = min(window, context)

    ids = loaded.tokenizer(load_text(source), add_special_tokens=False).input_ids[:tokens]
    return [ids[i: i + window] for i in range(0, len(ids) - 1, window) if len(ids[i: i + window]) > 1]


@torch.no_grad()
def next_token_logprobs(loaded: LoadedModel, chunk: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each next token of `chunk` [n − 1], the full log-distributions [n − 1, V]) in one pass."""
    x = torch.tensor([chunk], device=loaded.device)
    hidden = loaded.model.get_submodule(loaded.arch.base)(input_ids=x).last_hidden_state[0, :-1]
    logp = torch.log_softmax(unembed(loaded.model, loaded.arch, hidden).float(), dim=-1)
    return logp.gather(1, x[0, 1:, None])[:, 0], logp
