"""`scan`: was this checkpoint knowledge-edited, where, how, which facts, and what were the originals?

Independent tests, each with its own score, then one verdict:
1. base diff (with a base): stream both checkpoints, classify the change (diff.py);
2. activation outliers (no base needed): a subject whose MLP output towers over the rest (activations.py);
3. answer dependence (no base needed): an answer that collapses without the MLP outputs at its subject's
   last token in a few layers, as edited answers do and clean ones do not (dependence.py);
4. hidden facts: answers that change when the flagged subjects' keys are projected out, or under a
   fitting mask (hidden.py);
5. attribution of a found low-rank update: triggering subject and pushed object (attribution.py).
A locked checkpoint is also checked against its lock manifest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from .. import arch as arch_table
from .. import masks_index
from ..errors import EditguardError, NothingExamined
from ..harden.lock import MANIFEST, LockState, lock_state
from ..home import user_path
from ..mask.file import MaskFile
from ..resolve import HUB_ID, ModelRef, resolve
from .findings import DAMAGE_RULES, SEVERITY_ORDER, Finding, verdict

if TYPE_CHECKING:
    from ..loading import LoadedModel

TESTS = ("diff", "activations", "dependence", "hidden", "attribution")
BASE_FREE_TESTS = ("activations", "dependence")  # what finds an edited layer and subject without a base
# Below this many distinct probes naming their subject, the median/MAD of the activation test is too rough to
# call anything an outlier: three clean probes gave z = 120 on the demo model. Calibrated on 1,700;
# the end-to-end tests find edits with ~290.
MIN_ACTIVATION_PROBES = 100
Progress = Callable[[str], None]


@dataclass
class ScanOptions:
    base: str | None = None
    base_revision: str | None = None
    mask: str | None = None
    probes: str = "counterfact"
    tests: tuple[str, ...] = TESTS
    min_prob: float = 0.5
    threshold: float | None = None
    allow_pickle: bool = False
    load_options: dict = field(default_factory=dict)
    lock_digest: str | None = None  # the lock manifest's sha256 as `lock` printed it: another, or none, is EG030
    decompose: int = 0  # residual-stream decompositions of this many flagged facts (for the HTML report)
    loaded: LoadedModel | None = field(default=None, repr=False)  # the model of `ref`, already loaded: reused


def skipped_tests(tests: dict, names) -> dict[str, str]:
    """{test: why it did not run} for those of `names` that a scan's `tests` report as skipped."""
    return {name: tests[name]["skipped"] for name in names
            if isinstance(tests.get(name), dict) and "skipped" in tests[name]}


def declared_base(checkpoint, model_id: str | None = None) -> tuple[str | None, str | None]:
    """(base, where it is named): the model card's `base_model:`, else config.json's `_name_or_path` (what
    transformers 4 recorded as the model a checkpoint was loaded from before it was saved), unless that is
    the model itself. Only a hub id counts: both come with the upload, so they must not point a scan at a
    local path (or a demo or .gguf) of the machine."""
    def other(value) -> bool:  # naming the model itself would compare it with itself: "identical"
        return isinstance(value, str) and _hub_only(value) and value.lower() != (model_id or "").lower()

    readme = checkpoint.folder / "README.md"
    if readme.is_file():
        text = readme.read_text(errors="replace")
        if text.startswith("---"):
            value = _card_base_model(text.split("---", 2)[1].splitlines())
            if other(value):
                return value, "model card"
    value = checkpoint.config.get("_name_or_path")
    if other(value):
        return value, "config.json"
    return None, None


def _card_base_model(front_matter: list[str]) -> str | None:
    """The first `base_model:` of a model card's YAML front matter, written as a value, an inline list
    (`[org/a, org/b]`) or a block list (the Hub's editor: `- org/a` on the next lines)."""
    for i, line in enumerate(front_matter):
        if not line.strip().startswith("base_model:"):
            continue
        value = line.split(":", 1)[1].strip()
        if value.startswith("["):
            value = value.strip("[]").split(",")[0]
        elif not value:
            following = front_matter[i + 1].strip() if i + 1 < len(front_matter) else ""
            value = following[1:] if following.startswith("-") else ""
        return value.strip().strip("'\"") or None
    return None


def _lock_masks_against(lock: LockState, base_ck) -> dict | None:
    """The lock's masks when the model is a locked copy of an unlocked base, for the base diff; None when the
    model carries no lock, its mask file changed or a locked tensor is missing, doubled or retyped (EG030
    says so; the masks no longer say what was locked), or the base is locked too (like is then compared
    with like). Changed bytes leave the masks in use: the diff then shows what was added."""
    if (lock.manifest is None or (base_ck.folder / MANIFEST).is_file()
            or any(p["kind"] not in ("bytes", "unmasked") for p in lock.problems)):
        return None
    return lock.masks


def _hub_only(value: str) -> bool:
    """A hub id that is not also a path here (`models/base` may be both: resolve would take the folder)."""
    return bool(HUB_ID.match(value)) and not user_path(value).exists()


def _lock_problem_text(problem: dict) -> str:
    """'locked tensor NAME: why' (or mask FILE); the manifest itself (--lock-digest) is not a locked part."""
    if problem["kind"] in ("digest", "unlocked", "loaded"):
        return f"{problem['what']}: {problem['reason']}"
    return f"locked {problem['what']} {problem.get('tensor', problem.get('file'))}: {problem['reason']}"


def scan(ref: ModelRef, options: ScanOptions, progress: Progress | None = None) -> dict:
    progress = progress or (lambda message: None)
    started = time.time()
    checkpoint = ref.checkpoint(allow_pickle=options.allow_pickle)
    arch = arch_table.for_config(checkpoint.config)
    num_layers = arch.num_layers(checkpoint.config)
    findings: list[Finding] = []
    tests: dict = {}
    # 0. lock manifest
    lock = lock_state(checkpoint, arch, options.lock_digest)
    manifest, problems = lock.manifest, lock.problems
    if manifest is not None or options.lock_digest is not None:
        tests["lock"] = {"locked": manifest is not None, "intact": not problems, "problems": problems,
                         "manifest_sha256": manifest["manifest_sha256"] if manifest else None,
                         **({"expected_sha256": options.lock_digest} if options.lock_digest else {})}
        for p in problems:
            findings.append(Finding("EG030", "error", _lock_problem_text(p), tensor=p.get("tensor"), file=p.get("file")))
    need_model = any(t in options.tests for t in ("activations", "dependence", "hidden", "attribution"))
    if need_model:  # a bad probe file is found before a long base download and diff, not after
        from .probes import load_probes

        probes = load_probes(options.probes)
    # 1. base diff
    diff = base_ck = None
    diff_findings: list[Finding] = []
    base_spec, declared_by = (options.base, None) if options.base else declared_base(checkpoint, ref.model_id)
    if "diff" in options.tests and base_spec:
        from .diff import diff_checkpoints, findings_from_diff

        try:
            base_ref = resolve(base_spec, revision=options.base_revision, allow_pickle=options.allow_pickle,
                               progress=progress)
            progress(f"diffing against {base_spec}")
            base_ck = base_ref.checkpoint(allow_pickle=options.allow_pickle)
            diff = diff_checkpoints(checkpoint, base_ck, arch, num_layers,
                                    base_masks=_lock_masks_against(lock, base_ck))
        except (EditguardError, OSError) as exc:
            if options.base:
                raise
            # a base the upload names for itself (unverified) that cannot be read or compared must not stop
            # the other tests: an upload could otherwise disable every scan with a wrong base_model line
            diff = base_ck = None
            why = exc.message if isinstance(exc, EditguardError) else f"{type(exc).__name__}: {exc}"
            tests["diff"] = {"skipped": f"declared base {base_spec[:200]!r} not usable ({why})"}
        if diff is not None:
            # a base the upload names for itself proves nothing about the upload: say which kind this is
            tests["diff"] = {"base": base_spec, "base_revision": base_ref.revision, "declared_by": declared_by,
                             "declared_by_card": declared_by == "model card", **diff.to_json()}
            diff_findings = findings_from_diff(diff, checkpoint, arch)
            findings += diff_findings
    elif "diff" in options.tests:
        tests["diff"] = {"skipped": "no base given (--base) or declared in the model card or config.json"}
    # the remaining tests run the network
    if need_model:
        from ..loading import load_model
        from .probes import check_probe_lengths

        if options.loaded is not None:
            loaded = options.loaded
        else:
            progress("loading the model")
            loaded = load_model(ref, allow_pickle=options.allow_pickle, **options.load_options)
        broken = (loaded.extras.get("lock") or {}).get("broken")
        if manifest is not None and broken and not problems:  # what only loading shows: the mask not applied
            problems.append({"what": "lock", "kind": "loaded", "reason": f"its mask is not applied: {broken}"})
            tests["lock"]["intact"] = False
            findings.append(Finding("EG030", "error", _lock_problem_text(problems[-1])))
        check_probe_lengths(loaded, probes)
        tests["probes"] = {"source": options.probes, "n": len(probes)}
        attributable = _attributable(diff, diff_findings) if diff is not None else []
        key_layers = sorted({c.layer for c in attributable})
        scores = None
        dependence = "dependence" in options.tests
        if not any(p.subject and p.subject in p.prompt for p in probes):
            for name in BASE_FREE_TESTS:  # both read the subject's last token
                if name in options.tests:
                    tests[name] = {"skipped": "no probe names its subject (give probes with \"subject\")"}
            dependence = False
        elif "activations" in options.tests or dependence or ("attribution" in options.tests and key_layers):
            from .activations import EDITED_Z, SUSPICIOUS_Z, activation_scores, findings_from_activations

            progress(f"activation test on {len(probes)} probes")
            scores = activation_scores(loaded, probes, key_layers, whole=dependence)
            if "activations" in options.tests and scores.distinct < MIN_ACTIVATION_PROBES:
                tests["activations"] = {"skipped": f"{scores.distinct} distinct probes name their subject; the "
                                                   f"robust z-score needs at least {MIN_ACTIVATION_PROBES}"}
            elif "activations" in options.tests:
                layer_scores = scores.layer_scores()
                tests["activations"] = {"layer_scores": layer_scores, "suspicious_z": SUSPICIOUS_Z,
                                        "edited_z": EDITED_Z, "top_layer": int(torch.tensor(layer_scores).argmax()),
                                        "probes_with_subject": len(scores.probes),
                                        "nonfinite_probes": int(scores.nonfinite.any(dim=0).sum())}
                findings += findings_from_activations(scores)
        if dependence:
            from . import dependence as dep_test

            progress("answer-dependence test")
            dep = dep_test.dependence_scores(loaded, probes, scores.answer_logprob)
            tests["dependence"] = {
                "windows": [list(w) for w in dep.windows], "tested": dep.tested, "min_prob": dep_test.MIN_PROB,
                "window_max_drop": dep.window_maxima(), "suspicious_nats": dep_test.SUSPICIOUS_NATS,
                "edited_nats": dep_test.EDITED_NATS, "flagged": len(dep.flagged),
                "facts": dep.flagged[:dep_test.MAX_REPORTED], "discounted": dep.discounted[:dep_test.MAX_REPORTED]}
            if not dep.tested:  # it looked at nothing: not evidence that the model is clean
                tests["dependence"]["skipped"] = (f"no probe answer is confident enough to test "
                                                  f"(p ≥ {dep_test.MIN_PROB})")
            findings += dep_test.findings_from_dependence(loaded, dep)
        reversals = {}  # name -> intervention revealing hidden facts, for the decompositions
        # the layers the tests above flag, and how severely: what the hidden-fact tests follow up, never outrank
        flagged = _flagged_layers(findings)
        if "hidden" in options.tests and scores is not None:
            reversals["keys projected out"] = _reveal_by_projection(loaded, probes, findings, flagged, tests,
                                                                    progress)
        if "hidden" in options.tests:
            mask_file, why_not = _fitting_mask(options.mask, arch, checkpoint, list(flagged))
            if mask_file is None:
                tests["hidden"] = {"skipped": why_not}
            else:
                from .dependence import split_innocent
                from .hidden import EDITED_PROB, findings_from_hidden, held_as_edited, hidden_facts

                mask = MaskFile.load(mask_file)
                mask.check_fits(arch, checkpoint)
                counts: dict = {}
                found, discounted = split_innocent(
                    hidden_facts(loaded, mask, probes, options.min_prob, options.threshold, progress, counts))
                tests["hidden"] = {"mask": str(mask_file), "threshold": options.threshold or mask.threshold,
                                   "probes": len(probes), "changed_confident": len(found), "edited_prob": EDITED_PROB,
                                   "changed_at_edited_prob": sum(held_as_edited(f["current_prob"]) for f in found),
                                   "facts": found[:50],
                                   "discounted": len(discounted), "discounted_facts": discounted[:10]}
                hidden_findings = findings_from_hidden(found[:50], mask, len(probes), options.min_prob)
                # a mask taken unasked is graded at most as the tests that flagged its layers (JSON: graded_at_most)
                tests["hidden"]["graded_at_most"] = (None if options.mask else
                                                     _cap_severity(hidden_findings, flagged, set(mask.edit_layers())))
                findings += hidden_findings
                from .hidden import mask_applied

                reversals["with the mask"] = lambda: mask_applied(loaded, mask, options.threshold)
                if not counts["confident"]:  # it compared nothing: not evidence that the model is clean
                    tests["hidden"]["skipped"] = f"no probe answer is confident enough to test (p ≥ {options.min_prob})"
        if options.decompose:
            decompositions = _decompositions(loaded, tests, diff, reversals, options.decompose, progress)
            if decompositions:
                tests["decomposition"] = decompositions
        if "attribution" in options.tests and diff is not None and key_layers and scores is not None:
            from .attribution import attribute

            tests["attribution"] = []
            for change in attributable:
                # the change as the diff measured it (finite values; a locked tensor against base ⊙ mask)
                delta = diff.delta_of(change.name)
                result = attribute(loaded, delta, arch.mlp_out_transposed, scores.keys[change.layer], scores.probes,
                                   change.layer, change.name)
                tests["attribution"].append({"layer": change.layer, "tensor": change.name, **result})
    if "attribution" in options.tests and "attribution" not in tests:
        if diff is None:
            why = ("it attributes an update found by the base diff: " +
                   ("add diff to --tests" if "diff" not in options.tests else "give --base"))
        elif not any(c.layer is not None and not c.nonfinite for c in diff.changed):
            why = "the base diff changed no MLP output projection"
        elif not attributable:
            why = "the base diff found a fine-tune and no edit inside it (a fine-tune's changes push no one subject)"
        else:
            why = "no probe names its subject (give probes with \"subject\")"
        tests["attribution"] = {"skipped": why}
    skipped = skipped_tests(tests, options.tests)
    # A CI gate must not pass a model that nothing examined. A lock's check counts where it found a problem
    # (a finding) or was asked to prove the lock the user made (--lock-digest): an intact unsigned lock
    # vouches for its own tensors only, under a manifest anyone can rewrite.
    lock_examined = "lock" in tests and (bool(problems) or options.lock_digest is not None)
    if not lock_examined and not any(name in tests and name not in skipped for name in options.tests):
        reasons = "; ".join(f"{name}: {why}" for name, why in skipped.items())
        raise NothingExamined(f"no test could run{' (' + reasons + ')' if reasons else ''}")
    label, severity = verdict(findings)
    return {
        "model": ref.spec, "model_id": ref.model_id, "revision": ref.revision, "architecture": arch.model_type,
        "num_layers": num_layers, "verdict": label, "severity": severity,
        "findings": [f.to_json() for f in findings], "tests": tests, "seconds": round(time.time() - started, 1),
        "_findings": findings,
    }


def _reveal_by_projection(loaded, probes: list, findings: list, layer_severity: dict[int, str], tests: dict,
                          progress) -> None:
    """Hidden facts without a mask: the base-free tests' flagged subjects, their keys projected out; each
    layer's findings no more severe than the tests that flagged it (`layer_severity`)."""
    from ..harden.project import flagged_subjects, projection_applied, whiten_by_default
    from .hidden import changed_answers, findings_from_projection

    flagged = flagged_subjects(findings)
    if not flagged:
        return None
    subjects = {f["subject"] for facts in flagged.values() for f in facts}
    whiten = whiten_by_default(flagged)  # as `reverse` does
    chosen = [p for p in probes if p.subject in subjects]
    found = changed_answers(loaded, chosen, lambda: projection_applied(loaded, flagged, whiten), "key projection",
                            0.0, progress)
    tests["revealed"] = {"layers": sorted(flagged), "subjects": sorted(subjects), "whitened": whiten,
                         "probes": len(chosen), "changed": len(found), "facts": found}
    for layer in sorted(flagged):
        layer_subjects = {x["subject"] for x in flagged[layer]}
        layer_found = [f for f in found if f["subject"] in layer_subjects]
        revealed = findings_from_projection(layer_found, layer, loaded.arch.weight_name("mlp_out", layer), len(chosen))
        _cap_severity(revealed, layer_severity, {layer})
        findings += revealed
    return lambda: projection_applied(loaded, flagged, whiten)


def _decompositions(loaded, tests: dict, diff, reversals: dict, limit: int, progress) -> list[dict]:
    """Residual-stream decompositions (paper Fig. 3/4) of the first `limit` hidden facts the scan revealed:
    the model as scanned, the original (the edited tensors restored from the base, when there is one) and
    each reversal that revealed facts. The direction is logit(current answer) − logit(original answer)."""
    import contextlib

    from ..edit.edits import weight_param, weights_restored
    from .decompose import decompose

    facts, seen = [], set()
    for key in ("hidden", "revealed"):
        for fact in (tests.get(key) or {}).get("facts") or []:
            if fact["prompt"] not in seen:
                seen.add(fact["prompt"])
                facts.append(fact)
    if not facts:
        return []
    edited = [c.name for c in diff.changed if c.layer is not None] if diff is not None else []

    @contextlib.contextmanager
    def original():
        with weights_restored(loaded.model, edited), torch.no_grad():
            for name in edited:
                param = weight_param(loaded.model, name)
                param.copy_(diff.base_of(name).reshape(param.shape))  # in the model's basis and unit order
            yield

    variants = {"model as scanned": contextlib.nullcontext}
    if edited:
        variants["original (base tensors restored)"] = original
    variants.update((name, make) for name, make in reversals.items() if make is not None)
    progress(f"decomposing {min(limit, len(facts))} hidden facts")
    out = []
    for fact in facts[:limit]:
        new, true = fact["current_answer"], fact.get("expected_answer") or fact["revealed_answer"]
        decomposed = {}
        for name, make in variants.items():
            with make():
                decomposed[name] = decompose(loaded, fact["prompt"], new, true)
        out.append({"prompt": fact["prompt"], "variants": decomposed})
    return out


# A shipped mask is used unasked only if it meets the quality bar masks are trained to (held-out RSR
# >= 80 %): a weaker one reveals more noise than facts (the shipped 15 % SmolLM2 mask changes 30 of 1,708
# confident answers of the clean demo model, `bench/calibrate_scan.py`; the 52 % layer-9 mask changes
# the Top-1 answer on 17 % of WikiText-2 tokens), and a CI gate must not fail clean uploads on it.
MIN_SHIPPED_MASK_RSR = 0.8


def _flagged_layers(findings: list) -> dict[int, str]:
    """Layer -> the highest severity (warning or error) a finding of an edit gives it (every layer of a
    MEMIT-like window the answer-dependence test names, not only the first)."""
    flagged = {}
    for f in findings:
        if (f.layer is not None and f.rule not in DAMAGE_RULES
                and SEVERITY_ORDER[f.severity] >= SEVERITY_ORDER["warning"]):
            for layer in (f.details or {}).get("layers") or [f.layer]:
                flagged[layer] = max(flagged.get(layer, f.severity), f.severity, key=SEVERITY_ORDER.get)
    return flagged


def _cap_severity(findings: list, flagged: dict[int, str], layers: set[int]) -> str:
    """A follow-up test (a mask taken unasked, key projection of flagged subjects) corroborates the tests that
    flagged its layers, never escalates: its findings are no more severe than theirs (a warning stays
    "suspicious", it does not become "edited"). Returns that ceiling."""
    cap = max((flagged[layer] for layer in layers if layer in flagged), key=SEVERITY_ORDER.get, default="note")
    for f in findings:
        if SEVERITY_ORDER[f.severity] > SEVERITY_ORDER[cap]:
            f.severity = cap
            f.message += f" (graded {cap}: no more severe than the tests that flagged layer(s) {sorted(layers)})"
    return cap


def _attributable(diff, diff_findings: list[Finding]) -> list:
    """The changed MLP output projections (finite: NaN has no top direction, EG005 reports it) whose update
    attribution reads: all of them, but in a fine-tune only those the diff flagged as an edit inside it
    (EG001). A fine-tune's changes push no one subject, and attributing each costs the probes' keys at its
    layer (every layer of the model, for a fine-tune)."""
    flagged = {f.tensor for f in diff_findings if f.rule == "EG001"}
    return [c for c in diff.changed if c.layer is not None and not c.nonfinite
            and (diff.classification != "fine-tune" or c.name in flagged)]


def _fitting_mask(explicit: str | None, arch, checkpoint, layers: list[int]) -> tuple[Path | None, str]:
    """The mask for the hidden-facts test (`explicit`, else a good one over a flagged layer), or None and why not."""
    if explicit:
        return Path(explicit), ""
    fits = masks_index.fitting(arch, checkpoint)
    if not fits:
        return None, "no mask fits this model (give --mask)"
    # A mask reverses only edits of the tensors it was trained on, and a trained mask also corrects some of
    # a clean model's wrong answers (the layer-9 whole-MLP mask: 16 of 1,700 confident answers of the clean
    # demo model, "Mount Mentzel belongs to the continent of" Europe -> Antarctica): unasked, it is used
    # only over a layer the other tests flagged, never to judge a model nothing else finds edited.
    if not layers:
        return None, "no layer flagged by the other tests (a mask changes some clean answers too; give --mask)"
    fits = [f for f in fits if set(layers) & set(masks_index.edit_layers(f))]
    if not fits:
        return None, f"no mask fits the flagged layers {sorted(set(layers))} (give --mask)"
    good = [f for f in fits if (f.get("test_rsr") or 0) >= MIN_SHIPPED_MASK_RSR]
    if not good:
        return None, (f"the fitting mask {fits[0]['file']} reverses only {100 * (fits[0].get('test_rsr') or 0):.0f} % "
                      f"of held-out edits (< {100 * MIN_SHIPPED_MASK_RSR:.0f} %); give --mask to use it anyway")
    try:
        return masks_index.mask_path(good[0]), ""
    except EditguardError as exc:  # a damaged shipped mask: the other tests' findings stand, this one says why
        return None, exc.message
