"""CounterFact records: the paper's splits (shipped, compressed) and user files in any of three formats.

Formats read: the original ROME format (`requested_rewrite`, ..., also the official single
`counterfact.json`), the flat EasyEdit/MEND format (`prompt` with the subject inline, `target_new`,
`ground_truth`, `rephrase_prompt`, `locality_prompt`), and editguard's own normalised JSONL.
Malformed records are reported with their index and skipped (or rejected with `strict=True`).
"""

from __future__ import annotations

import functools
import json
import lzma
import os
import re
import urllib.request
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable

from ..errors import BAD_JSON, EditguardError
from ..home import cache_dir, file_lock, user_path

RELATIONS = ("P103", "P17", "P495", "P176", "P413", "P136", "P30", "P937", "P27", "P1412")
OFFICIAL_URL = "https://rome.baulab.info/data/dsets/counterfact.json"


@dataclass(frozen=True)
class Record:
    case_id: int
    relation: str
    prompt: str  # template with "{}" where the subject goes
    subject: str
    target_new: str
    target_true: str
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = field(default=(), repr=False)

    @property
    def rewrite_prompt(self) -> str:
        return self.prompt.format(self.subject)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class LoadReport:
    records: list[Record]
    problems: list[tuple[int, str]]  # (index in the file, why it was skipped)


# -- the paper's splits, shipped as package data ---------------------------------------------------
_SPLIT_FILES = {
    "rome-pool": "counterfact_rome_pool.jsonl.xz",
    "rome-test": "counterfact_rome_test.jsonl.xz",
    "memit-train": "counterfact_memit_train.jsonl.xz",
    "memit-test": "counterfact_memit_test.jsonl.xz",
}
# rome-train / rome-val are slices of the pool, per relation: the paper trains on the first 300 of
# each relation; editguard validates on the next 50 (disjoint from train and test).
_POOL_SLICES = {"rome-train": (0, 300), "rome-val": (300, 350)}
SPLITS = ("rome-train", "rome-val", "rome-test", "memit-train", "memit-test", "rome-pool")


@functools.lru_cache(maxsize=None)
def _read_packaged(filename: str) -> tuple[Record, ...]:
    raw = resources.files("editguard.data").joinpath(filename).read_bytes()
    return tuple(_from_normalised(json.loads(line)) for line in lzma.decompress(raw).decode().splitlines() if line)


def load_split(name: str) -> list[Record]:
    """One of the paper's splits (see SPLITS), in the paper's order."""
    if name in _POOL_SLICES:
        start, stop = _POOL_SLICES[name]
        pool = load_split("rome-pool")
        return [r for rel in RELATIONS for r in [x for x in pool if x.relation == rel][start:stop]]
    if name not in _SPLIT_FILES:
        raise EditguardError(f"unknown CounterFact split {name!r}; choose one of {', '.join(SPLITS)} or give a file")
    return list(_read_packaged(_SPLIT_FILES[name]))


def load(source: str, strict: bool = False) -> LoadReport:
    """A split name, `official` (downloaded once and cached), or a path to a file in any supported format."""
    if source in SPLITS or source in ("train", "test", "val"):
        split = {"train": "rome-train", "test": "rome-test", "val": "rome-val"}.get(source, source)
        return LoadReport(load_split(split), [])
    path = official_path() if source == "official" else user_path(source)
    return load_path(path, strict=strict)


def load_path(path: Path, strict: bool = False) -> LoadReport:
    if not path.is_file():
        raise EditguardError(f"no such CounterFact file: {path}")
    try:
        # utf-8-sig: a byte-order mark (files exported on Windows) is not part of the first record
        raw = lzma.decompress(path.read_bytes()) if path.suffix == ".xz" else path.read_bytes()
        text = raw.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError, lzma.LZMAError) as exc:
        raise EditguardError(f"{path}: unreadable ({exc.__class__.__name__})") from None
    try:
        items = json.loads(text)
        if isinstance(items, dict) and _is_record(items):  # a file of one record (one JSON line, or one object)
            items = [items]
        elif isinstance(items, dict):  # {"0": record, ...} or {"data": [...]}
            items = items.get("data") if isinstance(items.get("data"), list) else list(items.values())
    except BAD_JSON:
        items = []
        for number, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except BAD_JSON:
                    items.append(f"line {number + 1} is not JSON")
    if not isinstance(items, list):
        raise EditguardError(f"{path}: expected a JSON list of records or JSON lines")
    records, problems = [], []
    for index, item in enumerate(items):
        try:
            records.append(parse_record(item, index))
        except ValueError as exc:
            problems.append((index, str(exc)))
    if strict and problems:
        index, why = problems[0]
        raise EditguardError(f"{path}: record {index} is malformed ({why}); {len(problems)} bad record(s) in all")
    if not records:
        raise EditguardError(f"{path}: no usable CounterFact records" + (f" (first problem: record {problems[0][0]}: "
                                                                           f"{problems[0][1]})" if problems else ""))
    return LoadReport(records, problems)


# the keys that mark each record format parse_record reads (ROME's, normalised, flat EasyEdit / MEND)
_FORMAT_KEYS = ("requested_rewrite", "target_true", "ground_truth", "rephrase_prompt")


def _is_record(item: dict) -> bool:
    return any(key in item for key in _FORMAT_KEYS)


def parse_record(item, index: int = 0) -> Record:
    """One record in any supported format; ValueError says what is wrong with it."""
    if not isinstance(item, dict):
        raise ValueError(item if isinstance(item, str) else "not a JSON object")
    if "requested_rewrite" in item:
        rewrite = item["requested_rewrite"]
        if not isinstance(rewrite, dict):
            raise ValueError("requested_rewrite is not an object")
        return _checked(
            case_id=item.get("case_id", index), relation=rewrite.get("relation_id") or "unknown",
            prompt=rewrite.get("prompt"), subject=rewrite.get("subject"),
            target_new=_str_of(rewrite.get("target_new")), target_true=_str_of(rewrite.get("target_true")),
            paraphrase_prompts=item.get("paraphrase_prompts", ()), neighborhood_prompts=item.get("neighborhood_prompts", ()),
            attribute_prompts=item.get("attribute_prompts", ()), generation_prompts=item.get("generation_prompts", ()),
        )
    if "target_true" in item:
        return _from_normalised(item)
    if "ground_truth" in item or "rephrase_prompt" in item:  # flat EasyEdit / MEND
        prompt, subject = item.get("prompt"), item.get("subject")
        if not isinstance(prompt, str) or not isinstance(subject, str) or not subject:
            raise ValueError("missing prompt or subject")
        if "{}" not in prompt:
            prompt = subject_slot(prompt, subject)
        rephrase = item.get("rephrase_prompt")
        locality = item.get("locality_prompt")
        return _checked(
            case_id=item.get("case_id", index), relation=item.get("relation_id") or "unknown", prompt=prompt,
            subject=subject, target_new=_str_of(item.get("target_new")), target_true=_str_of(item.get("ground_truth")),
            paraphrase_prompts=[rephrase] if isinstance(rephrase, str) else [],
            neighborhood_prompts=[locality] if isinstance(locality, str) else [],
        )
    raise ValueError(f"unknown record format (none of {', '.join(_FORMAT_KEYS)})")


def subject_slot(prompt: str, subject: str) -> str:
    """`prompt` with its one occurrence of `subject` replaced by {}: as a whole word where it is one ("Rome"
    in "Romeo lived in Rome" is the last word, not the start of "Romeo"), else as a substring (scripts
    without spaces). Found twice, which one is meant is the user's to say; ValueError says why not."""
    for pattern in (rf"(?<!\w){re.escape(subject)}(?!\w)", re.escape(subject)):
        found = [m.start() for m in re.finditer(pattern, prompt)]
        if len(found) == 1:
            return prompt[:found[0]] + "{}" + prompt[found[0] + len(subject):]
        if len(found) > 1:
            raise ValueError(f"subject {subject!r} occurs {len(found)} times in prompt {prompt!r}: write {{}} "
                             "where the one to edit stands")
    raise ValueError(f"subject {subject!r} does not occur in prompt {prompt!r}")


def _str_of(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("str")
    return value if isinstance(value, str) else None


def _from_normalised(item: dict) -> Record:
    return _checked(**{k: item.get(k) for k in Record.__dataclass_fields__ if k in item})


def _checked(**fields) -> Record:
    prompt, subject = fields.get("prompt"), fields.get("subject")
    if not isinstance(prompt, str) or prompt.count("{}") != 1:
        raise ValueError("prompt must contain exactly one {} for the subject")
    if not isinstance(subject, str) or not subject.strip():
        raise ValueError("empty subject")
    for key in ("target_new", "target_true"):
        if not isinstance(fields.get(key), str) or not fields[key].strip():
            raise ValueError(f"missing {key}")
    case_id = fields.get("case_id")
    # a whole number, or its digits: 1.9 is not case 1, and JSON true is not case 1 either
    if isinstance(case_id, str) and case_id.strip().isdigit():
        case_id = int(case_id)
    if isinstance(case_id, bool) or not isinstance(case_id, int) or case_id < 0:
        raise ValueError("case_id is not a non-negative integer")
    fields["case_id"] = case_id
    for key in ("paraphrase_prompts", "neighborhood_prompts", "attribute_prompts", "generation_prompts"):
        value = fields.get(key) or ()
        if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
            raise ValueError(f"{key} must be a list of strings")
        fields[key] = tuple(value)
    fields["relation"] = str(fields.get("relation") or "unknown")
    return Record(**fields)


def select(records: Iterable[Record], case_ids: Iterable[int] | None = None, limit: int | None = None) -> list[Record]:
    records = list(records)
    if case_ids is not None:
        wanted = list(case_ids)
        by_id = {r.case_id: r for r in records}
        missing = [c for c in wanted if c not in by_id]
        if missing:
            raise EditguardError(f"case id(s) not in the data: {', '.join(map(str, missing[:10]))}")
        records = [by_id[c] for c in wanted]
    return records[:limit] if limit is not None else records


# CounterFact's case ids run to 21,918; a range far beyond is a typo, and would only build a huge list.
MAX_CASE_RANGE = 100_000


def parse_case_ids(text: str) -> list[int]:
    """'1,2,5-9' -> [1, 2, 5, 6, 7, 8, 9]."""
    ids: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = (int(x) for x in part.split("-", 1))
                if not 0 <= lo <= hi or hi - lo >= MAX_CASE_RANGE:
                    raise EditguardError(f"bad case id range {part!r}: expected LOW-HIGH, 0 <= LOW <= HIGH, "
                                         f"at most {MAX_CASE_RANGE:,} ids")
                ids.extend(range(lo, hi + 1))
            elif part:
                ids.append(int(part))
        except ValueError:
            raise EditguardError(f"bad case id list {text!r}: expected numbers and ranges like 1,2,5-9") from None
    return ids


def official_path() -> Path:
    """The official counterfact.json: `$EDITGUARD_COUNTERFACT`, else downloaded once into the cache."""
    env = os.environ.get("EDITGUARD_COUNTERFACT")
    if env:
        return user_path(env)
    dest = cache_dir("data") / "counterfact.json"
    if dest.is_file():
        return dest
    with file_lock(dest.with_suffix(".lock")):
        if not dest.is_file():
            tmp = dest.with_suffix(".part")
            try:
                urllib.request.urlretrieve(OFFICIAL_URL, tmp)  # noqa: S310 (fixed https URL)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise EditguardError(f"cannot download {OFFICIAL_URL} ({exc}); pass a local path instead") from None
            os.replace(tmp, dest)
    return dest
