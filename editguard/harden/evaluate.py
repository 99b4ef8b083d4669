"""What a reversal did: the flagged facts before and after, and what else it changed.

One model is read at a time (the input, then the reversed output), so a reversal of a large model
needs no more memory than one copy of it. For the flagged facts, RSR is the share whose original
answer (the probe's expected answer) the model prefers over the answer the edited input gives (its first
word), by full multi-token log-probability. Facts whose edited answer already is the original (a neighbour a
test flagged) are shown but not counted. On WikiText-2, the perplexity of both models and the share
of positions where the reversed model's top-1 token is the input's (how much else the reversal moved).
"""

from __future__ import annotations

import math
import re
from typing import Callable

import torch

from ..answers import greedy_answers
from ..loading import LoadedModel
from ..scoring import continuation_logprobs, next_token_logprobs, text_windows


def answer_head(text: str) -> str:
    """The edited answer to score: the first word of a greedy answer (" English. The" -> "English"). A
    prefix of a multi-word object scores at least as high as the object, so the RSR this feeds errs
    against the reversal."""
    words = re.split(r"[\s.,;:!?()\"]+", text.strip(), maxsplit=1)
    return words[0] if words else ""


def _same_answer(edited: str, original: str) -> bool:
    return edited.lower().startswith(original.lower()) or original.lower().startswith(edited.lower())


def _text_pass(loaded: LoadedModel, windows: list[list[int]], reference: list[torch.Tensor] | None):
    """(NLL sum, token count, top-1 tokens per window, top-1 agreements with `reference`)."""
    nll, count, agree, top1 = 0.0, 0, 0, []
    for w, chunk in enumerate(windows):
        token_lp, logp = next_token_logprobs(loaded, chunk)
        nll += float(-token_lp.sum())
        count += len(chunk) - 1
        top1.append(logp.argmax(-1).cpu())
        if reference is not None:
            agree += int((top1[-1] == reference[w]).sum())
    return nll, count, top1, agree


def evaluate_reversal(load: Callable[[object], LoadedModel], before, after, facts: list[dict],
                      text_tokens: int = 8192, window: int = 1024, scores: bool = True) -> tuple[list[dict], dict]:
    """Rows for `facts` ({prompt, original?}) with the greedy answers "before"/"after" (and, with
    `scores`, p(original) and the preference for it over the edited answer), and a summary: RSR before
    and after on the facts the edit changed, perplexity of both models, top-1 agreement of `after`
    with `before`. `load(which)` returns the model for "before" or "after"; `text_tokens` 0 skips the text."""
    rows = [dict(f) for f in facts]
    prompts = [r["prompt"] for r in rows]
    summary: dict = {}
    windows: list[list[int]] = []
    reference = None
    for label, ref in (("before", before), ("after", after)):
        loaded = load(ref)
        for row, answer in zip(rows, greedy_answers(loaded, prompts) if prompts else []):
            row[label] = answer
        if scores:
            _score_facts(loaded, rows, label)
        if text_tokens:
            windows = windows or text_windows(loaded, text_tokens, window)
            nll, count, top1, agree = _text_pass(loaded, windows, reference)
            summary[f"perplexity_{label}"] = math.exp(nll / count)
            summary["text_tokens"] = count
            if reference is None:
                reference = top1
            else:
                summary["top1_agreement"] = agree / count
        del loaded
    if scores:
        counted = [r for r in rows if "preference_before" in r]
        summary["facts_counted"] = len(counted)
        if counted:
            for label in ("before", "after"):
                summary[f"rsr_{label}"] = sum(r[f"preference_{label}"] > 0 for r in counted) / len(counted)
    return rows, summary


def _score_facts(loaded: LoadedModel, rows: list[dict], label: str) -> None:
    """p(original) for rows that name one; the preference log p(original) − log p(edited answer) for rows
    the edit changed (the edited answer is the "before" greedy answer, read first)."""
    known = [r for r in rows if r.get("original")]
    if not known:
        return
    sums, _ = continuation_logprobs(loaded, [r["prompt"] for r in known], [r["original"] for r in known])
    logp = {id(row): float(s) for row, s in zip(known, sums)}
    for row in known:
        row[f"p_original_{label}"] = math.exp(logp[id(row)])
        row.setdefault("edited_answer", answer_head(row.get("before", "")))
    changed = [r for r in known if r["edited_answer"] and not _same_answer(r["edited_answer"], r["original"])]
    if changed:
        edited, _ = continuation_logprobs(loaded, [r["prompt"] for r in changed], [r["edited_answer"] for r in changed])
        for row, e in zip(changed, edited):
            row[f"preference_{label}"] = logp[id(row)] - float(e)
