"""The edit bank: many edits of one model, stored as factors in one safetensors file.

Tensors: ROME edits stacked as `rome.u` [N, out] and `rome.v` [N, in] (ΔW_i = u_i v_iᵀ, [out, in]);
MEMIT batch edits as `memit.{g}.{layer}.u` [out, r] / `.v` [in, r] per group g. Metadata (JSON in the
safetensors header): format version, model id + revision + fingerprints of the edited base weights and
of the whole model (older banks lack the latter), method, layer(s), tensor names, hyperparameters and
their hash, context templates, and one record per edit (case id, relation, subject, prompt, old and new
object, optimisation steps and loss).

Appending rewrites the file atomically (temp + rename), so a killed run loses at most the edits since
its last flush and `--resume` continues from the case ids already stored. The header records the tensors'
sha256 (`checkpoint.load_checked`): damaged factors are refused, never planted.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from .. import __version__
from ..checkpoint import load_checked, read_safetensors_header, write_safetensors
from ..errors import BAD_JSON, EditguardError, malformed
from .edits import Edit
from .facts import Fact

FORMAT = "editguard-edit-bank/1"


class EditBank:
    def __init__(self, path: Path, meta: dict, tensors: dict[str, torch.Tensor]):
        self.path = Path(path)
        self.meta = meta
        self.tensors = tensors

    # -- creation and loading -----------------------------------------------------------------
    @classmethod
    def create(cls, path, *, model_id: str, revision: str | None, model_type: str, method: str, hparams: dict,
               hparams_hash: str, templates: list[str], fingerprints: dict[str, str],
               model_fingerprint: str | None = None, dtype: str | None = None) -> "EditBank":
        meta = {
            "format": FORMAT, "editguard_version": __version__, "model_id": model_id, "revision": revision,
            "model_type": model_type, "method": method, "hparams": hparams, "hparams_hash": hparams_hash,
            "context_templates": templates, "fingerprints": fingerprints, "model_fingerprint": model_fingerprint,
            "dtype": dtype,  # the precision the edits were computed in (banks before it was recorded: unknown)
            "records": [], "groups": [],
        }
        return cls(Path(path), meta, {})

    @classmethod
    def open(cls, path) -> "EditBank":
        path = Path(path)
        if not path.is_file():
            raise EditguardError(f"no such edit bank: {path}")
        try:
            infos, raw_meta = read_safetensors_header(path)
        except EditguardError as exc:
            raise EditguardError(f"corrupted edit bank {path}: {exc.message}") from None
        if "editguard" not in raw_meta:  # a readable safetensors file of another kind (a mask, a model shard)
            raise EditguardError(f"{path} is not an editguard edit bank (no editguard metadata)")
        try:
            meta = json.loads(raw_meta["editguard"])
        except BAD_JSON:
            raise EditguardError(f"corrupted edit bank {path}: metadata is not JSON") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise EditguardError(f"{path} is not an editguard edit bank (format {meta.get('format') if isinstance(meta, dict) else None!r})")
        tensors, _ = load_checked(path, "edit bank")
        bank = cls(path, meta, tensors)
        try:
            bank._validate()
        except (KeyError, TypeError, ValueError) as exc:  # a field missing or of the wrong kind
            raise EditguardError(f"corrupted edit bank {path}: {malformed(exc)}") from None
        return bank

    def _validate(self) -> None:
        for key in ("records", "method", "groups", "hparams", "hparams_hash", "fingerprints", "context_templates"):
            if key not in self.meta:
                raise KeyError(key)
        if not isinstance(self.meta["hparams"], dict):
            raise TypeError("hparams must be an object")
        if not isinstance(self.meta["records"], list) or not isinstance(self.meta["groups"], list):
            raise TypeError("records and groups must be lists")
        if not isinstance(self.meta["fingerprints"], dict):
            raise TypeError("fingerprints must be an object")
        if self.meta.get("model_fingerprint") is not None and not (
                isinstance(self.meta["model_fingerprint"], str) and self.meta["model_fingerprint"]):
            raise TypeError("model_fingerprint must be a non-empty string")
        templates = self.meta["context_templates"]
        if not isinstance(templates, list) or not all(isinstance(t, str) for t in templates):
            raise TypeError("context_templates must be a list of strings")
        for record in self.meta["records"]:
            if not isinstance(record, dict) or "case_id" not in record or not (
                    record["case_id"] is None or isinstance(record["case_id"], int)):
                raise TypeError("every record must be an object with a case_id (an integer or null)")
        n = len(self.meta["records"])
        if self.meta["method"] == "rome":
            for record in self.meta["records"]:
                if not isinstance(record.get("layer"), int) or not isinstance(record.get("tensor"), str):
                    raise TypeError("every ROME record must name its layer (an integer) and tensor")
        for group in self.meta["groups"]:
            if not (isinstance(group, dict) and isinstance(group.get("records"), list)
                    and all(isinstance(i, int) and 0 <= i < n for i in group["records"])):
                raise TypeError(f"every group's records must be record numbers below {n}")
            if not (isinstance(group.get("layers"), list) and isinstance(group.get("tensors"), list)
                    and len(group["layers"]) == len(group["tensors"])):
                raise TypeError("every group must list as many tensors as layers")
        if self.meta["method"] == "rome":
            u, v = self.tensors.get("rome.u"), self.tensors.get("rome.v")
            # with no records, factors may be absent, never rows that an append would pair with other edits
            if (n or u is not None or v is not None) and (
                    u is None or v is None or u.ndim != 2 or v.ndim != 2 or u.shape[0] != n or v.shape[0] != n):
                raise EditguardError(f"corrupted edit bank {self.path}: {n} records but factors of another shape")
        for g, group in enumerate(self.meta["groups"]):
            for layer in group["layers"]:
                u, v = (self.tensors.get(f"memit.{g}.{layer}.{side}") for side in ("u", "v"))
                if u is None or v is None or u.ndim != 2 or v.ndim != 2 or u.shape[1] != v.shape[1]:
                    raise EditguardError(f"corrupted edit bank {self.path}: group {g} layer {layer} is missing "
                                         f"or malformed")

    def check_widths(self, shapes: dict[int, tuple[int, int]]) -> None:
        """The factors fit the edited tensors, {layer: [out, in]}: a bank damaged by hand or built for
        other shapes is named here, not met as a shape error deep in the evaluation."""
        def bad(name: str, got: int, want: int) -> None:
            if got != want:
                raise EditguardError(f"corrupted edit bank {self.path}: {name} has width {got}, the edited "
                                     f"tensor needs {want}")

        if self.meta["method"] == "rome" and len(self) and len(shapes) == 1:
            (out, inp), = shapes.values()
            bad("rome.u", self.tensors["rome.u"].shape[1], out)
            bad("rome.v", self.tensors["rome.v"].shape[1], inp)
        for g, group in enumerate(self.meta["groups"]):
            for layer in group["layers"]:
                if layer in shapes:
                    bad(f"memit.{g}.{layer}.u", self.tensors[f"memit.{g}.{layer}.u"].shape[0], shapes[layer][0])
                    bad(f"memit.{g}.{layer}.v", self.tensors[f"memit.{g}.{layer}.v"].shape[0], shapes[layer][1])

    # -- queries ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.meta["records"])

    @property
    def method(self) -> str:
        return self.meta["method"]

    def case_ids(self) -> set[int]:
        return {r["case_id"] for r in self.meta["records"] if r.get("case_id") is not None}

    def unbanked(self, facts: list[Fact]) -> list[Fact]:
        """The facts whose edit the bank lacks. A fact with a case id is banked under that id, which must
        name the same fact (another data file reusing the ids is refused, not mixed in); a fact without
        one (`--fact`) is banked when a record without one holds the same content."""
        by_case = {r["case_id"]: _content(r) for r in self.meta["records"] if r.get("case_id") is not None}
        free = {_content(r) for r in self.meta["records"] if r.get("case_id") is None}
        todo = []
        for fact in facts:
            content = _content(_record(fact))
            if fact.case_id is None:
                if content not in free:
                    todo.append(fact)
            elif fact.case_id not in by_case:
                todo.append(fact)
            elif by_case[fact.case_id] != content:
                raise EditguardError(f"edit bank {self.path} holds case {fact.case_id} as another fact (subject "
                                     f"{by_case[fact.case_id][1]!r} → {by_case[fact.case_id][2]!r}; here "
                                     f"{fact.subject!r} → {fact.target_new!r}): other data? use another bank")
        return todo

    def indices_of(self, facts: list[Fact]) -> list[int]:
        """The records that hold these facts' edits: by case id, or (`--fact`) by content, so records
        without a case id from earlier runs are not taken for this run's."""
        wanted = {("case", f.case_id) if f.case_id is not None else ("content", _content(_record(f))) for f in facts}
        return [i for i, r in enumerate(self.meta["records"])
                if (("case", r["case_id"]) if r.get("case_id") is not None else ("content", _content(r))) in wanted]

    def check_matches(self, model_id: str, method: str, hparams_hash: str, fingerprints: dict[str, str],
                      model_fingerprint: str | None = None) -> None:
        """A bank is extended only with edits of the same model, method and hyperparameters (the whole
        model's fingerprint is compared where the bank records one: older banks record the edited tensors
        only)."""
        problems = []
        if self.meta["method"] != method:
            problems.append(f"method {self.meta['method']} (not {method})")
        if self.meta["hparams_hash"] != hparams_hash:
            problems.append("other hyperparameters")
        if set(self.meta["fingerprints"]) != set(fingerprints):
            problems.append(f"edits of other tensors ({', '.join(sorted(self.meta['fingerprints']))})")
        elif self.meta["fingerprints"] != fingerprints or not self.same_model(model_fingerprint):
            problems.append(f"another model's weights ({self.meta['model_id']})")
        if problems:
            raise EditguardError(f"edit bank {self.path} was built with {', '.join(problems)}; use another --bank")

    def same_model(self, model_fingerprint: str | None) -> bool:
        """False only when both sides have a whole-model fingerprint and they differ."""
        theirs = self.meta.get("model_fingerprint")
        return theirs is None or model_fingerprint is None or theirs == model_fingerprint

    def rome_factors(self, indices=None) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, out], [N, in] for the selected ROME edits."""
        u, v = self.tensors["rome.u"], self.tensors["rome.v"]
        if indices is None:
            return u, v
        idx = torch.as_tensor(indices, dtype=torch.long)
        return u[idx], v[idx]

    def edits(self, indices=None) -> list[Edit]:
        if self.method == "rome":
            records = self.meta["records"]
            indices = range(len(records)) if indices is None else indices
            u, v = self.tensors["rome.u"], self.tensors["rome.v"]
            return [Edit("rome", records[i]["layer"], records[i]["tensor"], u[i], v[i],
                         [_fact(records[i])], {"steps": records[i].get("steps"), "loss": records[i].get("loss")})
                    for i in indices]
        out = []
        for g, group in enumerate(self.meta["groups"]):
            if indices is not None and g not in indices:
                continue
            facts = [_fact(self.meta["records"][i]) for i in group["records"]]
            for layer, tensor in zip(group["layers"], group["tensors"]):
                out.append(Edit("memit", layer, tensor, self.tensors[f"memit.{g}.{layer}.u"],
                                self.tensors[f"memit.{g}.{layer}.v"], facts, {"group": g}))
        return out

    # -- writing ------------------------------------------------------------------------------
    def append(self, edits: list[Edit]) -> None:
        if not edits:
            return
        if self.method == "rome":
            records = []
            for edit in edits:
                if edit.method != "rome":
                    raise EditguardError("a ROME bank holds only ROME edits")
                records.append({**_record(edit.facts[0]), "layer": edit.layer, "tensor": edit.tensor, **edit.info})
            u = torch.stack([e.u.float().reshape(-1) for e in edits])
            v = torch.stack([e.v.float().reshape(-1) for e in edits])
            if "rome.u" in self.tensors:
                u = torch.cat([self.tensors["rome.u"], u])
                v = torch.cat([self.tensors["rome.v"], v])
            self.tensors["rome.u"], self.tensors["rome.v"] = u, v
            self.meta["records"].extend(records)
        else:  # one MEMIT batch: the edits are its per-layer factors, sharing their facts
            g = len(self.meta["groups"])
            start = len(self.meta["records"])
            facts = edits[0].facts
            self.meta["records"].extend(_record(f) for f in facts)
            self.meta["groups"].append({"records": list(range(start, start + len(facts))),
                                        "layers": [e.layer for e in edits], "tensors": [e.tensor for e in edits]})
            for e in edits:
                self.tensors[f"memit.{g}.{e.layer}.u"] = e.u.float().reshape(e.u.shape[0], -1)
                self.tensors[f"memit.{g}.{e.layer}.v"] = e.v.float().reshape(e.v.shape[0], -1)

    def flush(self) -> None:
        write_safetensors(self.path, self.tensors, {"editguard": json.dumps(self.meta)}, digest=True)


def _record(fact: Fact) -> dict:
    data = asdict(fact)
    data["paraphrase_prompts"] = list(data["paraphrase_prompts"])
    data["neighborhood_prompts"] = list(data["neighborhood_prompts"])
    return data


def _content(record: dict) -> tuple:
    """What makes an edit the same edit: the prompt, subject and both objects."""
    return tuple(record.get(k) for k in ("prompt", "subject", "target_new", "target_true"))


def _fact(record: dict) -> Fact:
    fields = {k: record.get(k) for k in Fact.__dataclass_fields__}
    fields["paraphrase_prompts"] = tuple(fields["paraphrase_prompts"] or ())
    fields["neighborhood_prompts"] = tuple(fields["neighborhood_prompts"] or ())
    return Fact(**fields)
