"""Base-free test: does an answer hang on the MLP outputs at its subject's last token?

ROME and MEMIT store a new fact in MLP output projections, read at the subject's last token: ROME in one
layer, MEMIT spread over a window of consecutive layers, about a fifth of the push in each (too little in
any one layer for the activation test to see a small MEMIT batch). Zeroing the MLP outputs of a window of
layers at that one token takes such an edit out of the forward pass, and the answer it planted, never
plausible without it, collapses. A clean model's answers hardly depend on those outputs: its facts are
held by other layers and tokens too.

For each probe whose current answer has p ≥ MIN_PROB and each window of WIDTH consecutive layers, the
drop of log p(current answer) when the window's MLP outputs are zeroed at the subject's last token.
Layers below FIRST_LAYER are left out: zeroing them at the subject erases the subject itself (clean
answers lose up to 12 nats). A flagged probe is then ablated one layer at a time inside its window: one
layer carrying the drop alone is ROME's signature, a drop that needs several layers MEMIT's. Everything
runs on the cached-prefix path: only layers from the first window up, only tokens from the subject's
last one on.

Measured on demo:smollm2-135m (`python bench/calibrate_scan.py --bank banks/smollm2-135m_rome_L6.safetensors
--edits 6 --memit 1,16,64 --dependence`, 1,770 probes, of which ~350 answered with p ≥ 0.5): clean model,
largest drop 4.27 nats over all windows, nothing flagged. ROME at layer 6 (6 bank edits): 4 flagged
(8.5-12.9 nats), all four as ROME-like at layer 6; 2 not (their answers lose < 6 nats: a new object that
stays plausible without the edit drops little, e.g. the README demo's "mother tongue ... English" 2.6
nats while French comes back), though a neighbouring answer they drag along is (9.5, 6.6 nats); the
activation test sees all 6.
MEMIT at layers 2-6, where the activation test sees none: 1 of 1 fact flagged (8.2), 11 of 16 (7.8-12.9),
41 of 64; each as MEMIT-like at windows 2-6 or 4-8 (39 of the 41), with 0, 0 and 1 other probe flagged.
A flagged ROME edit often drags neighbours along (up to 7 other probes, same layer): those answers did
change. About a minute on 1,700 probes with this CPU (the probes' first pass is shared with the
activation test).
On all 8,400 shipped CounterFact probes (`--probes counterfact:all`, ~6 min) the clean model's answers
have heavier tails: of 1,760 answers with p ≥ 0.5, four lost 6.1-9.9 nats (the model "edited" by this
test alone), all four held at p 0.50-0.57 while every flagged edit had p ≥ 0.63. MIN_PROB 0.6 leaves them
untested (1,257 tested, verdict clean, 5.4 min); one of them is also the probe's expected answer
(innocent_reading), a second guard for models whose fragile answers are more confident: on demo:gemma3-270m
carrying the README's demo edit, the largest drop (10.2 nats, "LaFerrari ... Ferrari", p 0.66) is one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..edit.facts import target_ids
from ..edit.forward import Tokenized, build_prefix_cache, capture_at, run_suffix, unembed
from ..errors import EditguardError
from ..loading import LoadedModel
from .activations import subject_sequences
from .findings import Finding
from .probes import Probe

WIDTH = 5  # MEMIT's usual span (EasyEdit: 5 layers for gpt2-xl, llama, qwen; 6 for gpt-j)
STEP = 2
FIRST_LAYER = 2
# Edits make their object confident; answers held with less are not tested. Measured on the demo model:
# every flagged edited fact (6 ROME edits, MEMIT batches of 16 and 64) had p ≥ 0.63; the four clean
# answers that lost ≥ 6 nats on 8,400 probes, p 0.50-0.57.
MIN_PROB = 0.6
SUSPICIOUS_NATS = 6.0
EDITED_NATS = 8.0
ROME_SHARE = 0.6  # one layer alone carries at least this share of the window's drop ...
ROME_OTHERS = 0.25  # ... and no other layer of the window more than this: ROME-like
MAX_REPORTED = 50


def windows_for(num_layers: int) -> list[tuple[int, int]]:
    """[first, last) layer windows covering FIRST_LAYER.. (all layers, narrower, on tiny models)."""
    first = FIRST_LAYER if num_layers >= FIRST_LAYER + WIDTH else 0
    width = min(WIDTH, num_layers - first)
    starts = list(range(first, num_layers - width + 1, STEP))
    if starts[-1] + width < num_layers:
        starts.append(num_layers - width)
    return [(a, a + width) for a in starts]


@dataclass
class Dependence:
    windows: list[tuple[int, int]]
    tested: int  # probes whose answer was confident enough to test
    drops: torch.Tensor  # [tested, windows] drops in nats (answer_drop)
    flagged: list[dict]  # probes whose largest drop reaches SUSPICIOUS_NATS, largest first
    discounted: list[dict] = field(default_factory=list)  # drops that big with an innocent reading ("reason")

    def window_maxima(self) -> list[float]:
        return [float(x) for x in self.drops.max(dim=0).values] if self.tested else [0.0] * len(self.windows)


def answer_drop(now: torch.Tensor, ablated: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """[rows] the drop of each current answer's log-probability (nats) with the window zeroed.

    Tried and dropped: the swing of the log-odds between the current answer and whatever the model
    answers instead. It would catch edits whose new object is plausible anyway (the demo's "mother
    tongue ... English" drops only 2.6 nats, the odds against French swing 12.5), but clean answers
    that hand over to another token swing as far (up to 11.7 nats on the demo model)."""
    return now[torch.arange(len(answer)), answer] - ablated[torch.arange(len(answer)), answer]


def _log_probs(loaded: LoadedModel, cache, rows: torch.Tensor, layers) -> torch.Tensor:
    """[rows, vocab] next-token log-probs at each row's last token, the rows' MLP outputs of `layers`
    zeroed at the subject's last token."""
    arch = loaded.arch
    hidden = run_suffix(loaded.model, arch, cache, rows, zero_at_split=[arch.module("mlp_out", l) for l in layers])
    last = (cache.suffix_len[rows] - 1).to(hidden.device)
    return torch.log_softmax(unembed(loaded.model, arch, hidden[torch.arange(len(rows)), last]).float(), dim=-1)


@torch.no_grad()
def dependence_scores(loaded: LoadedModel, probes: list[Probe], answer_logprob: torch.Tensor | None = None,
                      progress: Callable[[int, int], None] | None = None, chunk: int = 256) -> Dependence:
    """`answer_logprob`: the activation test's (run on whole prompts), saving a pass over all probes."""
    tokens, kept = subject_sequences(loaded, probes, whole=True)
    windows = windows_for(loaded.num_layers)
    if answer_logprob is None:
        answer_logprob = capture_at(loaded.model, loaded.arch, tokens, {}, pad_id=loaded.tokenizer.pad_token_id,
                                    answers=True)["__answer__"].cpu()
    # only confident answers are tested; the windows then run on those alone
    confident = (answer_logprob >= math.log(MIN_PROB)).nonzero().squeeze(1).tolist()
    all_drops, big = [], []
    for lo in range(0, len(confident), chunk):
        chosen = confident[lo: lo + chunk]
        part = Tokenized([tokens.ids[i] for i in chosen], [tokens.split[i] for i in chosen])
        cache = build_prefix_cache(loaded.model, loaded.arch, part, windows[0][0], pad_id=loaded.tokenizer.pad_token_id)
        rows = torch.arange(len(chosen))
        now = _log_probs(loaded, cache, rows, [])
        lp, answer = now.max(dim=-1)
        drops = torch.stack([answer_drop(now, _log_probs(loaded, cache, rows, range(*w)), answer)
                             for w in windows], dim=1).cpu()
        all_drops.append(drops)
        for j in (drops.max(dim=1).values >= SUSPICIOUS_NATS).nonzero().squeeze(1).tolist():
            big.append(_describe(loaded, cache, rows[j: j + 1], probes[kept[chosen[j]]], windows, drops[j],
                                 answer[j: j + 1], now[j: j + 1]))
        if progress:
            progress(min(lo + chunk, len(confident)), len(confident))
    flagged, discounted = split_innocent(big)
    drops = torch.cat(all_drops) if all_drops else torch.zeros(0, len(windows))
    return Dependence(windows, len(confident), drops, sorted(flagged, key=lambda f: -f["drop"]),
                      sorted(discounted, key=lambda f: -f["drop"]))


def innocent_reading(fact: dict) -> str | None:
    """Why a big drop (or an answer the mask changes, hidden.py) is no edit: the model gives the probe's
    expected (true) answer, which an edit replaces. For hidden facts, measured on demo:gemma3-270m with its
    mask (1,710 probes): 11 of the clean model's 16 changed answers are such (the other 5 held at
    p ≤ 0.67); each of 10 single ROME edits changed 49-555 answers, its planted one kept in 9.
    Tried and dropped: discounting drops that take the expected answer down too (the layers holding the
    subject rather than a planted answer; edits mostly bring the truth back up). It explained a clean
    SmolLM2 drop (truth -6.4 nats) but also hid an edit's dragged neighbour on demo:gemma3-270m (truth
    -5.1 nats), and edited facts' truth fell up to 3.7 nats (MEMIT x64): no safe margin."""
    if fact.get("expected_is_current"):
        return "the model gives the probe's expected answer"
    return None


def split_innocent(facts: list[dict]) -> tuple[list[dict], list[dict]]:
    """(kept, discounted): the facts without an innocent reading, and those with one (with its "reason")."""
    kept, discounted = [], []
    for fact in facts:
        reason = innocent_reading(fact)
        if reason:
            discounted.append({**fact, "reason": reason})
        else:
            kept.append(fact)
    return kept, discounted


def expected_token(tokenizer, answer: str | None) -> int | None:
    """First token of a probe's expected answer (as ROME tokenizes objects), None when there is none."""
    if not answer:
        return None
    try:
        return target_ids(tokenizer, answer)[0]
    except EditguardError:
        return None


def classify(window: tuple[int, int], layer_drops: list[float], drop: float) -> tuple[str, list[int]]:
    """("rome-like", [layer]) when one layer of the window carries the drop alone, else ("memit-like",
    the window's layers). Measured on the demo model, one layer zeroed at a time: a ROME edit at layer 6
    loses 6.6 nats from layer 6 alone and ≤ 0.1 from each of layers 0-13; MEMIT edits (layers 2-6, window
    drops 12.2 and 12.1) lose 2.3, 10.3, 4.0, 1.9, 5.3 or 8.0, 8.6, 0.5, 3.4, 7.0 from layers 2-6."""
    order = sorted(range(len(layer_drops)), key=lambda i: -layer_drops[i])
    others = layer_drops[order[1]] if len(layer_drops) > 1 else 0.0
    if layer_drops[order[0]] >= ROME_SHARE * drop and others <= ROME_OTHERS * drop:
        return "rome-like", [window[0] + order[0]]
    return "memit-like", list(range(*window))


def _describe(loaded, cache, row, probe: Probe, windows, drops: torch.Tensor, answer: torch.Tensor,
              now: torch.Tensor) -> dict:
    """A flagged probe: its window, the drop layer by layer inside it, and what it answers without them."""
    best = int(drops.argmax())
    window = windows[best]
    drop = float(drops[best])
    ablated = _log_probs(loaded, cache, row, range(*window))
    single = [float(answer_drop(now, _log_probs(loaded, cache, row, [l]), answer)[0]) for l in range(*window)]
    method, layers = classify(window, single, drop)
    tok = loaded.tokenizer
    current, revealed = int(answer[0]), int(ablated[0].argmax())
    fact = {"prompt": probe.prompt, "subject": probe.subject, "case_id": probe.case_id,
            "expected_answer": probe.answer, "current_answer": tok.decode([current]).strip(),
            "current_prob": float(now[0, current].exp()), "drop": drop, "window": list(window), "layer_drops": single,
            "method": method, "layers": layers,
            "revealed_answer": tok.decode([revealed]).strip(), "revealed_prob": float(ablated[0, revealed].exp())}
    expected = expected_token(tok, probe.answer)
    if expected is not None:
        fact["expected_logprob"] = float(now[0, expected])
        fact["expected_is_current"] = expected == current
        fact["expected_logprob_without"] = float(ablated[0, expected])
    return fact


def findings_from_dependence(loaded: LoadedModel, dep: Dependence) -> list[Finding]:
    out = []
    for f in dep.flagged[:MAX_REPORTED]:
        layers = f["layers"]
        where = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}"
        expected = ""
        if "expected_logprob" in f:
            expected = (f"; the probe's expected answer {f['expected_answer']!r}: log p {f['expected_logprob']:.1f} → "
                        f"{f['expected_logprob_without']:.1f} without them")
        severity = "error" if f["drop"] >= EDITED_NATS else "warning"
        out.append(Finding(
            "EG011", severity,
            f"{f['prompt']!r}: answer {f['current_answer']!r} (p={f['current_prob']:.2f}) loses {f['drop']:.1f} nats "
            f"when the MLP outputs of {where} at subject {f['subject']!r} are zeroed (the model then answers "
            f"{f['revealed_answer']!r}, p={f['revealed_prob']:.2f}); {f['method']}{expected}",
            score=f["drop"], threshold=EDITED_NATS if severity == "error" else SUSPICIOUS_NATS, layer=layers[0],
            tensor=loaded.arch.weight_name("mlp_out", layers[0]), facts=[f],
            details={"method": f["method"], "layers": layers, "window": f["window"], "layer_drops": f["layer_drops"]}))
    return out
