"""Base-free test: does one subject drive an MLP output far beyond every other subject?

ROME writes v* = v₀ + δ at the edited layer for the edited subject's key, with ‖δ‖ up to 4‖v₀‖; a small
model's top singular value barely notices (25.9 -> 25.9 on the demo model), but the activation does.
Probe prompts are cut after the subject's last token (nothing later can change that position) and run
once; at every layer, the norm of the MLP output at that token is compared with the other probes by a
robust z-score (median / MAD). The layer score is the largest z; `bench/calibrate_scan.py` measures it
on clean and edited demo models to set the thresholds below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..edit.facts import encode_at_subject
from ..edit.forward import Tokenized, capture_at
from ..loading import LoadedModel
from .findings import Finding
from .probes import Probe

# Calibrated on demo:smollm2-135m (bench/calibrate_scan.py; numbers in the CHANGELOG and masks/README.md).
SUSPICIOUS_Z = 12.0
EDITED_Z = 20.0


@dataclass
class LayerScores:
    z: torch.Tensor  # [layers, probes] robust z of the MLP output norm
    norms: torch.Tensor  # [layers, probes]
    keys: dict[int, torch.Tensor]  # layer -> [probes, in] MLP-output-projection inputs (for attribution)
    probes: list[Probe]

    def layer_scores(self) -> list[float]:
        return [float(x) for x in self.z.max(dim=1).values]


def subject_sequences(loaded: LoadedModel, probes: list[Probe]) -> tuple[Tokenized, list[int]]:
    """Each probe cut after its subject's last token; probes without a subject are skipped."""
    ids, splits, kept = [], [], []
    for i, p in enumerate(probes):
        if not p.subject or p.subject not in p.prompt:
            continue
        template = p.prompt.replace(p.subject, "{}", 1)
        seq, split = encode_at_subject(loaded.tokenizer, template, p.subject)
        ids.append(seq[: split + 1])
        splits.append(split)
        kept.append(i)
    return Tokenized(ids, splits), kept


def robust_z(x: torch.Tensor) -> torch.Tensor:
    median = x.median(dim=-1, keepdim=True).values
    mad = (x - median).abs().median(dim=-1, keepdim=True).values * 1.4826
    return (x - median) / mad.clamp_min(1e-6)


@torch.no_grad()
def activation_scores(loaded: LoadedModel, probes: list[Probe], key_layers: list[int] | None = None,
                      progress: Callable[[int, int], None] | None = None) -> LayerScores:
    tokens, kept = subject_sequences(loaded, probes)
    arch = loaded.arch
    captures = {f"out{l}": (arch.module("mlp_out", l), "out") for l in range(loaded.num_layers)}
    for l in key_layers or []:
        captures[f"in{l}"] = (arch.module("mlp_out", l), "in")
    got = capture_at(loaded.model, arch, tokens, captures, pad_id=loaded.tokenizer.pad_token_id)
    norms = torch.stack([got[f"out{l}"].float().norm(dim=-1) for l in range(loaded.num_layers)]).cpu()
    keys = {l: got[f"in{l}"].float().cpu() for l in key_layers or []}
    return LayerScores(robust_z(norms), norms, keys, [probes[i] for i in kept])


def findings_from_activations(scores: LayerScores) -> list[Finding]:
    out = []
    for layer, z_row in enumerate(scores.z):
        best = int(z_row.argmax())
        z = float(z_row[best])
        if z < SUSPICIOUS_Z:
            continue
        probe = scores.probes[best]
        severity = "error" if z >= EDITED_Z else "warning"
        out.append(Finding(
            "EG010", severity,
            f"layer {layer}: the MLP output for subject {probe.subject!r} is {z:.1f} robust SDs above the other "
            f"{len(scores.probes) - 1} subjects (norm {float(scores.norms[layer, best]):.2f}, median "
            f"{float(scores.norms[layer].median()):.2f})",
            score=z, threshold=SUSPICIOUS_Z if severity == "warning" else EDITED_Z, layer=layer,
            tensor=None, facts=[{"prompt": probe.prompt, "subject": probe.subject, "answer": probe.answer,
                                 "case_id": probe.case_id}]))
    return out
