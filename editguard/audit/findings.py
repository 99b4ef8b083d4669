"""Findings: one piece of evidence each, rendered the same way by every output format, and the verdict."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# rule id -> (short name, description). SARIF gets one rule per entry.
RULES: dict[str, tuple[str, str]] = {
    "EG001": ("rome-like-edit", "A rank-one change in one MLP output projection (ROME-style knowledge edit)."),
    "EG002": ("memit-like-edit", "Low-rank changes in the MLP output projections of a few layers (MEMIT-style batch edit)."),
    "EG003": ("fine-tune", "Changes spread over most tensors (fine-tuning), not a locate-and-edit update."),
    "EG004": ("weight-change", "Tensors differ from the base in a pattern that is neither an edit nor a fine-tune, or the "
                         "model is reparametrised against the base (an MLP's hidden units or an attention's heads "
                         "reordered, the residual stream permuted or rotated: the same function, every weight "
                         "changed)."),
    "EG005": ("non-finite-weights", "A tensor holds NaN or infinite values that the base does not have."),
    "EG010": ("activation-outlier", "A subject drives an MLP output far beyond the other subjects (base-free test)."),
    "EG011": ("edited-answer", "An answer collapses when the MLP outputs at its subject's last token in a few "
                               "consecutive layers are zeroed; clean answers do not depend on them (base-free test)."),
    "EG012": ("non-finite-activations", "An MLP output projection meets or gives NaN or infinite values on probe "
                                         "prompts (base-free test): a damaged checkpoint, or one overflowing in its dtype."),
    "EG020": ("hidden-fact", "An answer changes under the edit-reversal mask and was held with abnormal confidence."),
    "EG021": ("revealed-fact", "An answer changes when the flagged subject's keys are projected out of the flagged layer "
                               "(base- and mask-free reversal): the revealed answer is the one the edit replaced."),
    "EG030": ("lock-tampered", "A tensor protected by an editguard lock no longer matches its recorded hash, or the lock manifest is not the expected one (`scan --lock-digest`)."),
}

SEVERITY_ORDER = {"note": 0, "warning": 1, "error": 2}
# findings of damage, not of an edit: no layer they name is followed up as edited
DAMAGE_RULES = {"EG005", "EG012"}


@dataclass
class Finding:
    rule: str  # key of RULES
    severity: str  # note | warning | error
    message: str
    score: float | None = None
    threshold: float | None = None
    layer: int | None = None
    tensor: str | None = None
    file: str | None = None  # checkpoint shard holding the tensor
    facts: list[dict] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return RULES[self.rule][0]

    def to_json(self) -> dict:
        return {"rule": self.rule, "name": self.name, **asdict(self)}


def verdict(findings: list[Finding]) -> tuple[str, str]:
    """(clean | suspicious | edited, severity none | low | medium | high)."""
    errors = [f for f in findings if f.severity == "error"]
    warnings = [f for f in findings if f.severity == "warning"]
    if errors:
        strong = {f.rule for f in errors}
        return "edited", "high" if len(strong) > 1 or len(errors) > 1 else "medium"
    if warnings:
        return "suspicious", "low"
    return "clean", "none"


VERDICT_RANK = {"clean": 0, "suspicious": 1, "edited": 2}
