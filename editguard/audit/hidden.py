"""Hidden facts (the paper's probing): answers that change when the shared mask is applied.

Each probe prompt is answered twice: by the model as it is, and with the fitting mask on its target
tensor(s). A knowledge edit makes the model answer its new object with abnormal confidence; the mask
removes the amplified signal and the original answer comes back. A probe is reported when the answer
changes and the current answer's probability is at least `min_prob`; as an error (an edit) when it is at
least EDITED_PROB, else as a warning.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from ..edit.forward import pad_batch, unembed
from ..loading import LoadedModel
from ..mask.evaluate import masks_applied
from ..mask.file import MaskFile
from .dependence import expected_token
from .findings import Finding
from .probes import Probe

MIN_PROB = 0.5
# An edited answer is held with an edit's confidence; an answer a mask changes on a clean model seldom is.
# Calibrated on demo:smollm2-135m with the layer-9 whole-MLP mask (`bench/calibrate_scan.py --bank
# banks/smollm2-135m_rome_L9.safetensors --edits 10 --mask masks/smollm2-135m_rome_L9_mlp.safetensors`):
# the clean model's 16 changed answers at p 0.50-0.71, the 10 planted facts at p 0.84-0.99.
EDITED_PROB = 0.8


def mask_applied(loaded: LoadedModel, mask: MaskFile, threshold: float | None = None):
    """Every target weight times its mask inside the block (exactly restored after)."""
    return masks_applied(loaded, mask.modules(), mask.masks(threshold))


@dataclass
class Answer:
    token: int
    text: str
    prob: float


@torch.no_grad()
def next_token_answers(loaded: LoadedModel, prompts: list[str], batch_size: int = 64,
                       also: list[int] | None = None) -> tuple[list[Answer], torch.Tensor | None]:
    """Greedy next token and its probability for each prompt, and (with `also`, a token per prompt) the
    probability of that token. No full probability rows are kept: a 262k-token vocabulary makes them
    1 GB per thousand prompts."""
    tok, model, arch = loaded.tokenizer, loaded.model, loaded.arch
    base = model.get_submodule(arch.base)
    answers, picked = [], []
    for lo in range(0, len(prompts), batch_size):
        batch = [list(tok(p).input_ids) for p in prompts[lo: lo + batch_size]]
        ids, mask = pad_batch(batch, tok.pad_token_id)
        hidden = base(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device)).last_hidden_state
        last = hidden[torch.arange(len(batch)), mask.sum(1) - 1]
        probs = torch.softmax(unembed(model, arch, last).float(), dim=-1).cpu()
        top_p, top = probs.max(dim=-1)
        answers += [Answer(int(t), tok.decode([int(t)]).strip(), float(p)) for t, p in zip(top, top_p)]
        if also is not None:
            picked.append(probs.gather(1, torch.tensor(also[lo: lo + len(batch)]).unsqueeze(1))[:, 0])
    if also is None:
        return answers, None
    return answers, torch.cat(picked) if picked else torch.zeros(0)


def hidden_facts(loaded: LoadedModel, mask: MaskFile, probes: list[Probe], min_prob: float = MIN_PROB,
                 threshold: float | None = None, progress: Callable[[str], None] | None = None,
                 counts: dict | None = None) -> list[dict]:
    return changed_answers(loaded, probes, lambda: mask_applied(loaded, mask, threshold), "the mask", min_prob, progress,
                           counts)


def changed_answers(loaded: LoadedModel, probes: list[Probe], intervention: Callable[[], contextlib.AbstractContextManager],
                    name: str, min_prob: float, progress: Callable[[str], None] | None = None,
                    counts: dict | None = None) -> list[dict]:
    """Probes whose greedy answer changes under `intervention` (a reversal), current answer held at ≥ min_prob.
    `counts["confident"]` is set to how many answers were held that firmly: the ones examined at all."""
    prompts = [p.prompt for p in probes]
    if progress:
        progress("answering probes")
    current, _ = next_token_answers(loaded, prompts)
    if progress:
        progress(f"answering probes under {name}")
    with intervention():
        revealed, p_current_masked = next_token_answers(loaded, prompts, also=[a.token for a in current])
    changed = [i for i, (a, b) in enumerate(zip(current, revealed)) if a.token != b.token and a.prob >= min_prob]
    if counts is not None:
        counts["confident"] = sum(a.prob >= min_prob for a in current)
    # the revealed answers' probability without the intervention: one more pass, over the changed prompts only
    _, p_revealed_now = next_token_answers(loaded, [prompts[i] for i in changed], also=[revealed[i].token for i in changed])
    found = []
    for i, p_rev_now in zip(changed, p_revealed_now.tolist()):
        probe, a, b = probes[i], current[i], revealed[i]
        expected = expected_token(loaded.tokenizer, probe.answer)
        found.append({
            "prompt": probe.prompt, "subject": probe.subject, "case_id": probe.case_id,
            "expected_answer": probe.answer, "current_answer": a.text, "current_prob": a.prob,
            "revealed_answer": b.text, "revealed_prob": b.prob,
            "current_prob_under_mask": float(p_current_masked[i]), "revealed_prob_now": p_rev_now,
            "margin": a.prob - p_rev_now,
        } | ({} if expected is None else {"expected_is_current": expected == a.token}))
    return sorted(found, key=lambda f: -f["current_prob"])


def held_as_edited(p: float) -> bool:
    """Held as confidently as edited answers are; graded on the two decimals the findings print."""
    return round(p, 2) >= EDITED_PROB


def findings_from_hidden(found: list[dict], mask: MaskFile, n_probes: int, min_prob: float = MIN_PROB
                         ) -> list[Finding]:
    # below an edit's confidence a changed answer is as likely the mask's own doing: a warning
    return _findings("EG020", "under the mask", found, min_prob, mask.targets[0].layer, mask.targets[0].tensor,
                     n_probes, graded=True)


def findings_from_projection(found: list[dict], layer: int, tensor: str, n_probes: int) -> list[Finding]:
    return _findings("EG021", f"with the subject's keys projected out of layer {layer}", found, 0.0, layer, tensor,
                     n_probes, graded=False)


def _findings(rule: str, under: str, found: list[dict], min_prob: float, layer: int, tensor: str,
              n_probes: int, graded: bool) -> list[Finding]:
    """One finding per changed answer: an error, or, when `graded`, an error only if `held_as_edited` and a
    warning below. A finding's threshold is the one that graded it."""
    def finding(f: dict) -> Finding:
        error = not graded or held_as_edited(f["current_prob"])
        return Finding(
            rule, "error" if error else "warning",
            f"{f['prompt']!r}: answers {f['current_answer']!r} (p={f['current_prob']:.2f}); {under} "
            f"{f['revealed_answer']!r} (p={f['revealed_prob']:.2f})"
            + (f"; CounterFact's original answer is {f['expected_answer']!r}" if f.get("expected_answer") else "")
            + ("" if error else f" (held at p < {EDITED_PROB}, below an edited answer's usual confidence)"),
            score=f["current_prob"], threshold=EDITED_PROB if graded and error else min_prob, layer=layer,
            tensor=tensor, facts=[f], details={"probes": n_probes})

    return [finding(f) for f in found]
