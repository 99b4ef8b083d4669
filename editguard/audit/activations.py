"""Base-free test: does one subject get far more out of an MLP output projection than it puts in?

ROME writes v* = v₀ + δ at the edited layer for the edited subject's key k*, with ‖δ‖ up to 4‖v₀‖; a small
model's top singular value barely notices (25.9 -> 25.9 on the demo model), but the activation does.
Probe prompts are cut after the subject's last token (nothing later can change that position) and run
once; at every layer the projection's gain log(‖W k‖ / ‖k‖) at that token is compared with the other
probes by a robust z-score (median / MAD). The gain, not the output norm alone: natural heavy tails of
the output norm come with big inputs, an edit raises the output for an ordinary input. Each prompt gets a
short prefix so no subject sits at position 0, where the attention sink's "massive activations" make
early-layer MLP outputs 100-5000 MADs large on a clean model. The layer score is the largest z.

Measured on demo:smollm2-135m (1,700 rome-test probes + the edited subjects; `bench/calibrate_scan.py`
repeats it on bank edits): clean model, largest z over all 30 layers 7.2 (output norm alone: 12.7 clean,
10-19 edited, unusable). Eight single ROME edits at layer 6 (the preset): z at layer 6 = 9.9-26.3, the
edited subject ranked first every time, every other layer ≤ 7.6; the README's demo edit passes 12.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..edit.facts import encode_until
from ..edit.forward import Tokenized, capture_at
from ..loading import LoadedModel
from .findings import Finding
from .probes import Probe

# From the measurements above: above every clean or unedited layer (≤ 7.6) with a margin; "edited" where
# seven of the eight measured edits lie.
SUSPICIOUS_Z = 8.5
EDITED_Z = 12.0
# Keeps subjects off position 0 (see above); neutral, and short so keys stay close to a bare prompt's.
PROMPT_PREFIX = "Fact: "


@dataclass
class LayerScores:
    z: torch.Tensor  # [layers, probes] robust z of the gain
    norms: torch.Tensor  # [layers, probes] MLP output norms
    gains: torch.Tensor  # [layers, probes] log(‖output‖ / ‖input‖) of the output projection
    keys: dict[int, torch.Tensor]  # layer -> [probes, in] MLP-output-projection inputs (for attribution)
    probes: list[Probe]
    answer_logprob: torch.Tensor | None = None  # [probes] greedy next token's log-prob (whole prompts only)
    distinct: int = 0  # probes whose text up to the subject's last token differs from every other's

    def layer_scores(self) -> list[float]:
        return [float(x) for x in self.z.max(dim=1).values]

    @property
    def nonfinite(self) -> torch.Tensor:
        """[layers, probes]: where the gain is NaN or inf (the projection met or gave such values)."""
        return ~torch.isfinite(self.gains)


def subject_sequences(loaded: LoadedModel, probes: list[Probe], whole: bool = False) -> tuple[Tokenized, list[int]]:
    """Each probe (after PROMPT_PREFIX) cut after its subject's last token, or `whole`, with the split at
    that token; probes without a subject are skipped."""
    ids, splits, kept = [], [], []
    for i, p in enumerate(probes):
        if not p.subject or p.subject not in p.prompt:
            continue
        # by position, not by a "{}" slot: a prompt may hold braces of its own
        end = len(PROMPT_PREFIX) + p.prompt.index(p.subject) + len(p.subject)
        seq, split = encode_until(loaded.tokenizer, PROMPT_PREFIX + p.prompt, end, p.subject)
        ids.append(seq if whole else seq[: split + 1])
        splits.append(split)
        kept.append(i)
    return Tokenized(ids, splits), kept


def robust_z(x: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """z of every column of x against the median and spread of `reference`'s columns (default: x's).
    NaN and inf (a damaged layer) take no part in the median and spread and get z 0: one of them would
    make every z of its row NaN (they are reported apart: findings_from_nonfinite)."""
    reference = x if reference is None else reference
    reference = reference.masked_fill(~torch.isfinite(reference), float("nan"))
    median = reference.nanmedian(dim=-1, keepdim=True).values  # the lower median, as median() takes
    deviation = (reference - median).abs()
    mad = deviation.nanmedian(dim=-1, keepdim=True).values * 1.4826
    # more than half the probes alike (e.g. subjects a tokenizer maps to the same tokens) make the MAD 0 and
    # every other probe an "outlier": then the mean absolute deviation (scaled to σ for normal data) instead
    mean_dev = deviation.nanmean(dim=-1, keepdim=True) * 1.2533
    z = (x - median) / torch.where(mad > 0, mad, mean_dev).clamp_min(1e-6)
    return torch.where(torch.isfinite(z), z, 0.0)


def first_of_each(tokens: Tokenized) -> list[int]:
    """Indices of the first of each distinct text up to the subject's last token: probes that repeat one
    (one subject, several prompts after it) have one gain, and counted many times they would set the median
    and spread (a file naming the edited subject in half its lines would hide it)."""
    seen, first = set(), []
    for i, (ids, split) in enumerate(zip(tokens.ids, tokens.split)):
        if tuple(ids[: split + 1]) not in seen:
            seen.add(tuple(ids[: split + 1]))
            first.append(i)
    return first


@torch.no_grad()
def activation_scores(loaded: LoadedModel, probes: list[Probe], key_layers: list[int] | None = None,
                      whole: bool = False) -> LayerScores:
    """`whole`: run the whole prompts (same scores: nothing after the subject reaches it) and also return
    each probe's greedy answer log-prob, which the dependence test starts from."""
    tokens, kept = subject_sequences(loaded, probes, whole)
    arch = loaded.arch
    layers = range(loaded.num_layers)
    captures = {f"out{l}": (arch.module("mlp_out", l), "out-norm") for l in layers}
    captures |= {f"in{l}": (arch.module("mlp_out", l), "in-norm") for l in layers}
    captures |= {f"key{l}": (arch.module("mlp_out", l), "in") for l in key_layers or []}
    got = capture_at(loaded.model, arch, tokens, captures, pad_id=loaded.tokenizer.pad_token_id, answers=whole)
    norms = torch.stack([got[f"out{l}"] for l in layers]).cpu()
    inputs = torch.stack([got[f"in{l}"] for l in layers]).cpu()
    gains = (norms.clamp_min(1e-12) / inputs.clamp_min(1e-12)).log()
    keys = {l: got[f"key{l}"].float().cpu() for l in key_layers or []}
    first = first_of_each(tokens)
    return LayerScores(robust_z(gains, gains[:, first]), norms, gains, keys, [probes[i] for i in kept],
                       got["__answer__"].cpu() if whole else None, len(first))


def findings_from_nonfinite(scores: LayerScores) -> list[Finding]:
    """One finding when some probe's MLP output projection meets or gives NaN / inf: named at the lowest
    such layer (a NaN stays in the residual stream, so the layers above it follow)."""
    bad = scores.nonfinite
    if not bool(bad.any()):
        return []
    layers = bad.any(dim=1).nonzero()[:, 0].tolist()
    layer = layers[0]
    probes = bad.any(dim=0)
    example = scores.probes[int(bad[layer].nonzero()[0])]
    return [Finding(
        "EG012", "error",
        f"layer {layer}: the MLP output projection's input or output is NaN or infinite on {int(probes.sum())} of "
        f"{len(scores.probes)} probes (first at this layer; e.g. subject {example.subject!r}): a damaged checkpoint, "
        "or one that overflows in this dtype", score=float(probes.sum()), layer=layer, tensor=None,
        facts=[{"prompt": example.prompt, "subject": example.subject, "answer": example.answer,
                "case_id": example.case_id}],
        details={"probes": int(probes.sum()), "layers": layers})]


def findings_from_activations(scores: LayerScores) -> list[Finding]:
    out = findings_from_nonfinite(scores)
    for layer, z_row in enumerate(scores.z):
        best = int(z_row.argmax())
        z = float(z_row[best])
        if z < SUSPICIOUS_Z:
            continue
        probe = scores.probes[best]
        severity = "error" if z >= EDITED_Z else "warning"
        out.append(Finding(
            "EG010", severity,
            f"layer {layer}: the MLP output projection amplifies subject {probe.subject!r} {z:.1f} robust SDs "
            f"more than the other {len(scores.probes) - 1} subjects (gain x{float(scores.gains[layer, best].exp()):.2f},"
            f" median x{float(scores.gains[layer].median().exp()):.2f}; output norm "
            f"{float(scores.norms[layer, best]):.2f})",
            score=z, threshold=SUSPICIOUS_Z if severity == "warning" else EDITED_Z, layer=layer,
            tensor=None, facts=[{"prompt": probe.prompt, "subject": probe.subject, "answer": probe.answer,
                                 "case_id": probe.case_id}]))
    return out
