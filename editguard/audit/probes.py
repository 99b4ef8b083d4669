"""Probe prompts for the base-free tests: CounterFact records, or a user's JSONL of
{"prompt": ..., "subject": ..., "answer": ...} (subject and answer optional)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..data import counterfact
from ..errors import BAD_JSON, EditguardError
from ..home import user_path


@dataclass(frozen=True)
class Probe:
    prompt: str  # full text, subject included
    subject: str | None = None
    answer: str | None = None  # the expected (original) answer, when known
    relation: str | None = None
    case_id: int | None = None


# `counterfact:all`: every shipped record (8,400 distinct, 8,267 subjects), for edits of any subject there
ALL_SPLITS = ("rome-pool", "rome-test", "memit-train", "memit-test")


def counterfact_probes(splits=("rome-test",)) -> list[Probe]:
    """The rewrite prompts of `splits` ("all": ALL_SPLITS), each record once (the MEMIT splits share
    records with the ROME pool)."""
    probes, seen = [], set()
    for split in ALL_SPLITS if tuple(splits) == ("all",) else splits:
        for r in counterfact.load_split(split):
            if r.case_id not in seen:
                seen.add(r.case_id)
                probes.append(Probe(r.rewrite_prompt, r.subject, r.target_true, r.relation, r.case_id))
    return probes


def probe_file(source: str) -> str | None:
    """The file a --probes value names (None for the shipped CounterFact splits)."""
    return None if source == "counterfact" or source.startswith("counterfact:") else source


def load_probes(source: str) -> list[Probe]:
    """`counterfact` (the shipped test split), `counterfact:SPLIT[,SPLIT]`, `counterfact:all`, or a JSONL file."""
    if probe_file(source) is None:
        splits = source.split(":", 1)[1].split(",") if ":" in source else None
        return counterfact_probes(tuple(splits)) if splits else counterfact_probes()
    if not source.strip():
        raise EditguardError("--probes is empty: give counterfact, counterfact:SPLIT[,SPLIT] or a JSONL file")
    path = user_path(source)
    try:
        # utf-8-sig: a byte-order mark is no part of line 1; "\n" only: JSON text may hold U+2028 and the
        # like, which splitlines() would cut a record at
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except FileNotFoundError:
        raise EditguardError(f"no such probe file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EditguardError(f"probe file {path} is unreadable ({exc.__class__.__name__})") from None
    probes = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except BAD_JSON:  # (also nesting deeper than the stack, or an integer past the digit limit)
            raise EditguardError(f"probe file {path}, line {number}: not JSON") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
            raise EditguardError(f"probe file {path}, line {number}: needs a \"prompt\" string")
        for key in ("subject", "answer", "relation"):
            if item.get(key) is not None and not isinstance(item[key], str):
                raise EditguardError(f"probe file {path}, line {number}: \"{key}\" must be a string")
        for key in ("prompt", "subject", "answer", "relation"):
            try:  # a lone surrogate escape ("\ud800") is valid JSON but no text a tokenizer takes
                (item.get(key) or "").encode("utf-8")
            except UnicodeEncodeError:
                raise EditguardError(f"probe file {path}, line {number}: \"{key}\" is not valid Unicode text") from None
        subject = item.get("subject")
        if subject is not None:
            subject = subject.strip()  # spaces around it would move its last token onto the next word
            if not subject or subject not in item["prompt"]:
                raise EditguardError(f"probe file {path}, line {number}: subject must occur in the prompt")
        probes.append(Probe(item["prompt"], subject, item.get("answer"), item.get("relation")))
    if not probes:
        raise EditguardError(f"probe file {path} holds no probes")
    return probes


def check_probe_lengths(loaded, probes: list[Probe], slack: int = 8) -> None:
    """Every probe fits the model's context (with room for the scan's prefix): a longer one fails inside
    the forward pass (GPT-2) or is read at positions the model never learnt (RoPE models)."""
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if not isinstance(limit, int) or not probes:
        return
    lengths = [len(ids) for ids in loaded.tokenizer([p.prompt for p in probes]).input_ids]
    for number, (probe, n) in enumerate(zip(probes, lengths), 1):
        if n + slack > limit:
            raise EditguardError(f"probe {number} is {n} tokens long; this model reads at most {limit - slack} "
                                 f"here (prompt {probe.prompt[:60]!r}...)")
