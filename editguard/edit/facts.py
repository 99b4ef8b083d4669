"""A fact to plant ("{subject} ... " -> target), and how its prompts tokenize around the subject."""

from __future__ import annotations

from dataclasses import dataclass

from ..data.counterfact import subject_slot
from ..errors import EditguardError


@dataclass(frozen=True)
class Fact:
    prompt: str  # with "{}" where the subject goes
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: int | None = None
    relation: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()

    @classmethod
    def from_record(cls, record) -> "Fact":
        return cls(record.prompt, record.subject, record.target_new, record.target_true, record.case_id,
                   record.relation, tuple(record.paraphrase_prompts), tuple(record.neighborhood_prompts))

    @property
    def text(self) -> str:
        return self.prompt.replace("{}", self.subject, 1)

    def validate(self) -> None:
        if self.prompt.count("{}") != 1:
            raise EditguardError(f"prompt {self.prompt!r} must contain {{}} exactly once, where the subject goes")
        if not self.subject.strip():
            raise EditguardError("empty subject")
        if not self.target_new.strip():
            raise EditguardError(f"empty target for {self.text!r}")


def fact_from_text(prompt: str, subject: str, target: str) -> Fact:
    """`--fact`: the prompt may hold `{}` or the subject itself."""
    if "{}" not in prompt:
        try:
            prompt = subject_slot(prompt, subject)
        except ValueError as exc:
            raise EditguardError(f"{exc} (and it has no {{}})") from None
    fact = Fact(prompt, subject, target)
    fact.validate()
    return fact


# A word the object follows when it is tokenized in context (see target_ids).
_LEAD = "a"


def target_ids(tokenizer, target: str) -> list[int]:
    """Token ids of " " + target (a leading space, as ROME tokenizes objects), without special tokens, as
    they follow a prompt. Tokenizers with a dummy prefix (Llama-2, Mistral: sentencepiece's "▁" prepended
    to every text) read " English" alone as ["▁", "▁English"], a first token shared by every object, which
    would leave nothing for a first-token margin to compare; after a word it is ["▁English"], as after the
    prompt. Other tokenizers give the same ids either way."""
    text = target if target.startswith(" ") else " " + target
    lead = tokenizer(_LEAD, add_special_tokens=False).input_ids
    joined = tokenizer(_LEAD + text, add_special_tokens=False).input_ids
    if len(joined) > len(lead) and joined[: len(lead)] == lead:
        ids = joined[len(lead):]
    else:  # the lead word merged with the object: its tokens alone
        ids = tokenizer(text, add_special_tokens=False).input_ids
    if not ids or not tokenizer.decode(ids).strip():  # nothing, or a dummy "▁" alone
        raise EditguardError(f"target {target!r} tokenizes to nothing")
    return list(ids)


def encode_at_subject(tokenizer, template: str, subject: str) -> tuple[list[int], int]:
    """Token ids of template with the subject filled in, and the index of the subject's last token."""
    start = template.index("{}")
    return encode_until(tokenizer, template.replace("{}", subject, 1), start + len(subject), subject)


def encode_until(tokenizer, text: str, end: int, subject: str) -> tuple[list[int], int]:
    """Token ids of `text` and the index of the token holding its character `end - 1` (a subject's last
    character): for text whose own braces must not be read as the subject's slot."""
    encoded = tokenizer(text, return_offsets_mapping=True)
    ids = list(encoded.input_ids)
    offsets = encoded.get("offset_mapping")
    if offsets:
        candidates = [i for i, (a, b) in enumerate(offsets) if a < end and b > a]
        index = candidates[-1] if candidates else None
    else:  # slow tokenizers: count the tokens of the text up to the subject's end
        index = len(tokenizer(text[:end]).input_ids) - 1
    if index is None or index < 0:
        raise EditguardError(f"cannot find subject {subject!r} in the tokens of {text!r}")
    return ids, index
