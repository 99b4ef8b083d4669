"""Edit quality as in ROME's CounterFact evaluation: efficacy, paraphrase success, neighbourhood
specificity. A prompt counts as a success when the mean per-token NLL of the wanted object is below
that of the other one (ROME's comparison)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..loading import LoadedModel
from ..scoring import RowEdits, continuation_logprobs
from .edits import Edit
from .facts import Fact


@dataclass
class FactQuality:
    efficacy: float  # rewrite prompt prefers the new object
    paraphrase: float  # share of paraphrase prompts preferring the new object
    neighborhood: float  # share of neighbourhood prompts still preferring the true object
    new_prob: float  # P(new object) on the rewrite prompt (multi-token product)
    true_prob: float = float("nan")  # P(true object) on the rewrite prompt


def _row_edits(edits: list[Edit], rows_per_edit: list[int]) -> RowEdits:
    if len({e.tensor for e in edits}) != 1:
        raise ValueError("per-row edits must all target one tensor")
    us, vs = [], []
    for edit, n in zip(edits, rows_per_edit):
        us += [edit.u.reshape(edit.u.shape[0], -1)] * n
        vs += [edit.v.reshape(edit.v.shape[0], -1)] * n
    return RowEdits(edits[0].tensor.removesuffix(".weight"), torch.stack(us), torch.stack(vs))


def judge(loaded: LoadedModel, facts: list[Fact], alone: list[Edit] | None = None,
          batch_size: int = 64) -> list[FactQuality]:
    """Quality of each fact under the model as loaded, or (with `alone`) with fact i's edit alone[i]
    added to the unedited model; all facts in batched passes."""
    prompts, objects, rows_per_fact, layout = [], [], [], []
    for i, fact in enumerate(facts):
        groups = [("rewrite", [fact.text]), ("paraphrase", list(fact.paraphrase_prompts)),
                  ("neighborhood", list(fact.neighborhood_prompts))]
        n = 0
        for kind, texts in groups:
            for text in texts:
                prompts += [text, text]
                objects += [fact.target_new, fact.target_true or fact.target_new]
                n += 2
                layout.append((i, kind))
        rows_per_fact.append(n)
    rows = _row_edits(alone, rows_per_fact) if alone is not None else None
    sums, counts = continuation_logprobs(loaded, prompts, objects, rows, batch_size=batch_size)
    nll = -(sums / counts)
    results = [{"rewrite": [], "paraphrase": [], "neighborhood": []} for _ in facts]
    new_prob = [float("nan")] * len(facts)
    true_prob = [float("nan")] * len(facts)
    for k, (i, kind) in enumerate(layout):
        nll_new, nll_true = nll[2 * k], nll[2 * k + 1]
        if facts[i].target_true:  # without the old object there is nothing to compare the new one with
            results[i][kind].append(float(nll_true < nll_new) if kind == "neighborhood" else float(nll_new < nll_true))
        if kind == "rewrite":
            new_prob[i], true_prob[i] = float(torch.exp(sums[2 * k])), float(torch.exp(sums[2 * k + 1]))
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return [FactQuality(mean(r["rewrite"]), mean(r["paraphrase"]), mean(r["neighborhood"]), p, t)
            for r, p, t in zip(results, new_prob, true_prob)]


def edit_quality(loaded: LoadedModel, edits: list[Edit], batch_size: int = 64) -> list[FactQuality]:
    """Each (single-fact) edit judged on its own, applied alone to the unedited model."""
    return judge(loaded, [e.facts[0] for e in edits], alone=edits, batch_size=batch_size)


def bank_quality(loaded: LoadedModel, bank, facts: list[Fact], batch_size: int = 64) -> list[FactQuality]:
    """The quality of `facts`' edits in an edit bank: a ROME edit alone on the unedited model; a MEMIT
    fact under its whole batch edit (the edit it was solved in), one batch at a time."""
    from .edits import edits_applied

    wanted = set(bank.indices_of(facts))
    if bank.method == "rome":
        return edit_quality(loaded, bank.edits(sorted(wanted)), batch_size)
    qualities = []
    for g, group in enumerate(bank.meta["groups"]):
        picked = [k for k, i in enumerate(group["records"]) if i in wanted]
        if not picked:
            continue
        edits = bank.edits([g])
        with edits_applied(loaded.model, loaded.arch, edits):
            qualities += judge(loaded, [edits[0].facts[k] for k in picked], batch_size=batch_size)
    return qualities


def summarize(qualities: list[FactQuality]) -> dict[str, float]:
    import math

    def avg(name):
        values = [getattr(q, name) for q in qualities if not math.isnan(getattr(q, name))]
        return sum(values) / len(values) if values else float("nan")

    return {"n": len(qualities), "efficacy": avg("efficacy"), "paraphrase": avg("paraphrase"),
            "neighborhood": avg("neighborhood"), "new_prob": avg("new_prob")}
