"""`editguard reverse` and `editguard lock`: write a restored or a locked checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from .. import arch as arch_table
from .. import masks_index
from ..audit.scan import BASE_FREE_TESTS
from ..errors import EditguardError, NothingExamined
from ..mask.file import MaskFile
from ..outputs import check_output_folder
from . import state
from .app import app
from .options import (AllowPickle, BaseRevision, DeviceMap, Dtype, MaxMemory, ModelArg, OffloadFolder, Revision,
                      check_share, hparams_or_default, input_paths, load_options, offload_input, resolve_model)


def _mask_for(mask: str | None, arch, checkpoint, layers=None, method: str | None = None, lock: bool = False) -> Path:
    """--mask, else the fitting mask (`masks_index.best_fit`)."""
    if mask:
        if not Path(mask).is_file():
            raise EditguardError(f"no such mask file: {mask}")
        return Path(mask)
    fit = masks_index.best_fit(arch, checkpoint, layers, method, lock=lock)
    if fit is None:
        raise EditguardError("no shipped mask fits this model; give --mask FILE (`editguard train` makes one)")
    return masks_index.mask_path(fit)


EVAL_TEXT_TOKENS = 8192  # reverse --eval: WikiText-2 tokens for the perplexities


@app.command("reverse")
def reverse_command(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the restored checkpoint.")],
    method: Annotated[Optional[str], typer.Option("--method", help="project | mask | svd | base (default: base with --base, mask "
                                                                   "with --mask or --threshold, svd with --layers, else "
                                                                   "project when scan's base-free tests flag subjects, "
                                                                   "else the shipped mask).")] = None,
    mask: Annotated[Optional[str], typer.Option("--mask", help="Mask file (default: the shipped mask that fits); with svd "
                                                               "or base, the mask whose hidden facts are shown.")] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Mask threshold γ.")] = None,
    base: Annotated[Optional[str], typer.Option("--base", help="Unedited base (for --method base).")] = None,
    layers: Annotated[Optional[str], typer.Option("--layers", help="Layers to treat (svd); default: found by scan.")] = None,
    probes: Annotated[str, typer.Option("--probes", help="Probes for finding flagged facts (see scan).")] = "counterfact",
    whiten: Annotated[Optional[bool], typer.Option("--whiten/--no-whiten", help="project: the span of C⁻¹ keys (C: the "
                                                   "layer input's second moment on WikiText-2), the directions MEMIT and "
                                                   "whitened ROME write; default: when the flagged facts read MEMIT-like.")] = None,
    evaluate: Annotated[bool, typer.Option("--eval", help="RSR on the flagged facts (original answer preferred over the "
                                                          "edited one), perplexity of input and output, top-1 agreement.")] = False,
    text_tokens: Annotated[Optional[int], typer.Option("--text-tokens", min=2, help="WikiText-2 tokens for --eval "
                                                                                   f"(default {EVAL_TEXT_TOKENS}).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    revision: Revision = None,
    base_revision: BaseRevision = None,
    allow_pickle: AllowPickle = False,
    device_map: DeviceMap = "cpu",
    dtype: Dtype = "float32",
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
) -> None:
    """Reverse edits in MODEL and write a restored checkpoint; prints answers before and after."""
    from ..audit.probes import load_probes
    from ..harden.project import flagged_method, whiten_by_default
    from ..harden.reverse import (base_replacements, lock_files_undone, masked_replacements, svd_replacements,
                                   write_reversed)

    out = state.out()
    check_share("--threshold", threshold)
    if base_revision is not None and base is None:
        raise EditguardError("--base-revision needs --base")
    if text_tokens is not None and not evaluate:
        raise EditguardError("--text-tokens applies to --eval")
    text_tokens = text_tokens or EVAL_TEXT_TOKENS
    load_probes(probes)  # a missing or malformed probe file is named before minutes of scanning
    read = [mask, base, probes, offload_input(offload_folder)]  # --force must never delete what the run reads or offloads to
    check_output_folder(output, [model, *read], force)  # before resolving: a hub model may download first
    ref = resolve_model(model, revision, allow_pickle)
    check_output_folder(output, input_paths(ref, *read), force)
    placement = load_options(device_map, dtype, max_memory, offload_folder, allow_pickle)  # load_model keywords
    checkpoint = ref.checkpoint(allow_pickle=allow_pickle)
    arch = arch_table.for_config(checkpoint.config)
    num_layers = arch.num_layers(checkpoint.config)
    inputs = _ReverseInput(ref, probes, placement)
    flagged = None
    if method is None:  # an option of one method picks it; else the measured best first: key projection, the mask
        if base or mask or threshold is not None or layers:
            method = "base" if base else "mask" if mask or threshold is not None else "svd"
        else:
            flagged = inputs.flagged(SHOWN_TESTS, required=False)  # with "hidden": the mask path shows its facts
            method = "project" if flagged else "mask"
    if method not in ("mask", "project", "svd", "base"):
        raise EditguardError("--method must be mask, project, svd or base")
    if whiten is not None and method != "project":
        raise EditguardError(f"--whiten/--no-whiten apply to --method project, not {method}")
    if base is not None and method != "base":
        raise EditguardError(f"--base applies to --method base, not {method}")
    if threshold is not None and method != "mask":
        raise EditguardError(f"--threshold applies to --method mask, not {method}")
    if layers and method != "svd":
        raise EditguardError(f"--layers applies to --method svd, not {method}")
    if mask is not None and method == "project":  # it neither reverses nor picks the facts shown there
        raise EditguardError("--mask applies to --method mask (and picks the facts shown for svd and base), not project")
    if mask is not None:  # its modules hold real weights (MLP output projections always do); nothing loaded yet
        placement["keep_on_device"] = MaskFile.load(mask).module_paths()
    info: dict = {"model": ref.spec, "output": str(output), "method": method}
    if method == "mask":
        if mask is None and flagged is None:  # the shipped mask over the layer the base-free tests flag; the
            # same scan finds the facts shown before/after (cached), so choosing by it costs nothing more
            flagged = inputs.flagged(SHOWN_TESTS, required=False, threshold=threshold)
        mask_path = _mask_for(mask, arch, checkpoint, sorted(flagged or []), flagged_method(flagged))
        mask_file = MaskFile.load(mask_path)
        replacements = masked_replacements(checkpoint, arch, mask_file, threshold)
        info["mask"] = str(mask_path)
    elif method == "base":
        if not base:
            raise EditguardError("--method base needs --base")
        from ..audit.diff import diff_checkpoints, findings_from_diff

        base_ck = resolve_model(base, base_revision, allow_pickle).checkpoint(allow_pickle=allow_pickle)
        check_output_folder(output, [base_ck.folder], force)  # a base named by id or demo: name has a folder too
        with out.progress("diffing against the base"):
            diff = diff_checkpoints(checkpoint, base_ck, arch, num_layers)
        # the tensors the diff calls edits (ROME/MEMIT-like, or a rank-one spike inside a broader change);
        # when none reads as an edit, every changed tensor. What stays different is said, not hidden.
        inputs.acted_on = findings_from_diff(diff, checkpoint, arch)
        edits = {f.tensor for f in inputs.acted_on if f.rule in ("EG001", "EG002")}
        restored = [c.name for c in diff.changed if c.name in edits] or [c.name for c in diff.changed]
        replacements = base_replacements(checkpoint, arch, restored, diff.base_of)
        info["restored"] = restored
        info["left_as_they_are"] = [c.name for c in diff.changed if c.name not in restored]
    elif method == "project":
        from ..harden.project import projection_replacements

        flagged = flagged or inputs.flagged(BASE_FREE_TESTS)
        if whiten is None:
            whiten = whiten_by_default(flagged)
        model_in = inputs.model()
        with out.progress("projecting the flagged subjects' keys out" + (" (whitened)" if whiten else "")):
            replacements = projection_replacements(model_in, checkpoint, flagged, whiten)
        info["whitened"] = whiten
        info["layers"] = sorted(flagged)
        info["subjects"] = sorted({f["subject"] for facts in flagged.values() for f in facts})
    else:
        chosen = _parse_layers(layers, num_layers) if layers else sorted(inputs.flagged(SHOWN_TESTS))
        replacements = svd_replacements(checkpoint, arch, chosen)
        info["layers"] = chosen
    if method == "project":  # the facts just projected out are the ones to show
        facts = list({f["prompt"]: _shown(f) for layer_facts in flagged.values() for f in layer_facts}.values())[:20]
    else:
        facts = inputs.shown_facts(mask, threshold)
    info["lock_removed"] = bool(lock_files_undone(checkpoint, replacements))
    with out.progress(f"writing {output}"):
        info["rewritten_files"] = write_reversed(checkpoint, replacements, output, force=force)
    info["tensors"] = sorted(replacements)
    info["facts"], evaluation = _before_after(inputs, output, facts, evaluate, text_tokens)
    if evaluate:
        info["evaluation"] = evaluation
    from ..report.sarif import to_sarif

    # SARIF: the findings behind this reversal (what it acted on, what found the facts it shows), with
    # what it wrote as the run's properties
    sarif = to_sarif(inputs.all_findings(), ref.spec, ref.source,
                     {"reversed_with": method, "output": str(output), "tensors": info["tensors"]})
    out.emit(info, _render_reverse, sarif=sarif)


def _parse_layers(text: str, num_layers: int) -> list[int]:
    try:
        chosen = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise EditguardError(f"--layers: expected numbers like 5,6,7, got {text!r}") from None
    bad = [x for x in chosen if not 0 <= x < num_layers]
    if bad:
        raise EditguardError(f"layer {bad[0]} is out of range: this model has layers 0-{num_layers - 1}")
    return chosen


SHOWN_TESTS = BASE_FREE_TESTS + ("hidden",)  # what finds the facts to show before/after


class _ReverseInput:
    """The model being reversed, loaded once, and scan's findings on it, each set of tests run once: the
    base-free tests find the edited layers and subjects, "hidden" adds the facts to show before/after."""

    def __init__(self, ref, probes: str, placement: dict):
        self.ref, self.probes, self.placement = ref, probes, placement
        self._loaded = None
        self._scans: dict[tuple, list] = {}
        self.acted_on: list = []  # findings from elsewhere (the base diff) that the reversal acts on

    def model(self):
        if self._loaded is None:
            from ..loading import load_model

            self._loaded = load_model(self.ref, **self.placement)
        return self._loaded

    def release(self):
        """The loaded model, forgotten here so that it is freed once the caller drops it."""
        loaded, self._loaded = self.model(), None
        return loaded

    def findings(self, tests: tuple[str, ...], mask: str | None = None, threshold: float | None = None) -> list:
        from ..audit.scan import ScanOptions, scan

        key = (tests, mask, threshold)
        if key not in self._scans:
            what = "finding flagged facts" if "hidden" in tests else "finding edited layers"
            with state.out().progress(f"{what} (activation and answer-dependence tests)"):
                try:
                    result = scan(self.ref, ScanOptions(mask=mask, threshold=threshold, probes=self.probes, tests=tests,
                                                        loaded=self.model(),
                                                        **_scan_placement(self.placement)))
                except NothingExamined:  # nothing flagged (a method that needs flags says so itself)
                    result = {"_findings": []}
            self._scans[key] = result["_findings"]
        return self._scans[key]

    def flagged(self, tests: tuple[str, ...], required: bool = True,
                threshold: float | None = None) -> dict[int, list[dict]]:
        """{layer: facts whose subject the layer carries an edit for} from the base-free tests (with "hidden",
        under the shipped mask cut at `threshold`: the same scan `shown_facts` reads)."""
        from ..harden.project import flagged_subjects

        flagged = flagged_subjects(self.findings(tests, None, threshold))
        if not flagged and required:
            raise EditguardError("scan's base-free tests flag no layer; give --layers (svd) or --base")
        return flagged

    def all_findings(self) -> list:
        """Every finding behind this reversal, each once (the scans overlap)."""
        seen, out = set(), []
        for f in [*self.acted_on, *(f for found in self._scans.values() for f in found)]:
            key = (f.rule, f.tensor, f.layer, f.message)
            if key not in seen:
                seen.add(key)
                out.append(f)
        return out

    def shown_facts(self, mask: str | None, threshold: float | None = None) -> list[dict]:
        """The facts to show before/after: what scan flags (outliers, revealed and hidden facts; the latter
        under the mask at `threshold`, as applied)."""
        shown = {}
        for f in self.findings(SHOWN_TESTS, mask, threshold):
            for fact in f.facts:
                shown.setdefault(fact["prompt"], _shown(fact))
        return list(shown.values())[:20]


def _scan_placement(placement: dict) -> dict:
    """ScanOptions keywords for the same placement (scan takes allow_pickle apart from the load options)."""
    return {"allow_pickle": placement["allow_pickle"],
            "load_options": {k: v for k, v in placement.items() if k != "allow_pickle"}}


def _shown(fact: dict) -> dict:
    return {"prompt": fact["prompt"], "original": fact.get("expected_answer") or fact.get("answer")}


def _before_after(inputs: _ReverseInput, output: Path, facts: list[dict], evaluate: bool, text_tokens: int):
    from ..harden.evaluate import evaluate_reversal
    from ..loading import load_model
    from ..resolve import resolve

    def load(which):  # the input model as already loaded (then freed: one model in memory at a time)
        return inputs.release() if which is inputs.ref else load_model(which, **inputs.placement)

    with state.out().progress("answers before and after" + (", RSR and perplexity" if evaluate else "")):
        # the folder just written, by its absolute path: the -o text again could name a demo model or "~"
        return evaluate_reversal(load, inputs.ref, resolve(str(Path(output).resolve())), facts,
                                 text_tokens if evaluate else 0, scores=evaluate)


def _render_reverse(console, r) -> None:
    how = r["method"] + (" (whitened keys)" if r.get("whitened") else "")
    console.print(f"reversed {escape(r['model'])} with --method {how} → {escape(r['output'])} "
                  f"(rewrote {', '.join(r['rewritten_files'])}; tensors {', '.join(r['tensors'])})")
    if r.get("lock_removed"):
        console.print("[yellow]the input's lock protected tensors this reversal changed: the output carries no "
                      "lock (run `editguard lock` on it again)[/]")
    if r.get("left_as_they_are"):
        console.print(f"[yellow]still different from the base (not edit-like, left as they are):[/] "
                      f"{escape(', '.join(r['left_as_they_are']))}")
    if r["facts"]:
        table = Table(box=None, title="flagged facts", title_justify="left")
        for column in ("prompt", "original answer", "before", "after"):
            table.add_column(column)
        for f in r["facts"]:
            table.add_row(escape(f["prompt"]), escape(str(f.get("original") or "")), escape(f.get("before", "")),
                          escape(f.get("after", "")))
        console.print(table)
    e = r.get("evaluation")
    if e:
        if e.get("facts_counted"):
            console.print(f"RSR on the {e['facts_counted']} flagged facts the edit changed (original answer preferred "
                          f"over the edited one): {100 * e['rsr_before']:.1f} % before → {100 * e['rsr_after']:.1f} % after")
        else:
            console.print("RSR: no flagged fact with a known original answer that the edit changed")
        if "perplexity_before" in e:
            console.print(f"WikiText-2 ({e['text_tokens']} tokens): perplexity {e['perplexity_before']:.2f} → "
                          f"{e['perplexity_after']:.2f}; top-1 agreement with the input {100 * e['top1_agreement']:.1f} %")


@app.command("lock")
def lock_command(
    model: ModelArg,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Folder for the locked checkpoint.")] = None,
    mask: Annotated[Optional[str], typer.Option("--mask", help="Mask file (default: the shipped mask that fits).")] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Mask threshold γ.")] = None,
    evaluate: Annotated[Optional[int], typer.Option("--evaluate", min=1, help="Measure edit success (the mask's "
                                                                          "method) on N CounterFact records, unlocked vs locked.")] = None,
    hparams: Annotated[Optional[str], typer.Option("--hparams", help="Edit hyperparameters for --evaluate.")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="CounterFact file for --evaluate (default: the "
                                                "paper's held-out ROME test split).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    revision: Revision = None,
    allow_pickle: AllowPickle = False,
    device_map: DeviceMap = "cpu",
    dtype: Dtype = "float32",
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
) -> None:
    """Write a locked checkpoint: masked weights + a lock manifest; editguard re-applies the mask on load."""
    from ..harden.lock import MANIFEST, lock_checkpoint, read_manifest

    out = state.out()
    if output is None and evaluate is None:
        raise EditguardError("give -o/--output (write a locked copy) and/or --evaluate N")
    if evaluate is None and (hparams is not None or data is not None):
        raise EditguardError("--hparams and --data apply to --evaluate")
    check_share("--threshold", threshold)
    placement = load_options(device_map, dtype, max_memory, offload_folder, allow_pickle)  # checked before writing
    read = [mask, hparams, data, offload_input(offload_folder)]  # --force must never delete what the run reads or offloads to
    if output is not None:
        check_output_folder(output, [model, *read], force)  # before resolving: a hub model may download first
    ref = resolve_model(model, revision, allow_pickle)
    if output is not None:
        check_output_folder(output, input_paths(ref, *read), force)
    checkpoint = ref.checkpoint(allow_pickle=allow_pickle)
    if read_manifest(checkpoint.folder) is not None:
        # a second lock would replace the first one's manifest and mask: tensors only the first covered would
        # lose both their hash and the mask in the forward pass (and --evaluate's "unlocked" model is locked)
        raise EditguardError(f"{ref.spec} is already locked ({MANIFEST}); lock the unlocked model instead")
    arch = arch_table.for_config(checkpoint.config)
    mask_path = _mask_for(mask, arch, checkpoint, lock=True)
    mask_file = MaskFile.load(mask_path)
    mask_file.check_fits(arch, checkpoint)
    info: dict = {"model": ref.spec, "mask": str(mask_path),
                  "mask_perplexity_increase": masks_index.perplexity_increase(mask_file.metrics)}
    # the evaluation's hparams and records are read before anything is written: a bad one leaves no output
    evaluation = _lock_evaluation_inputs(ref, mask_file, evaluate, hparams, data) if evaluate is not None else None
    if output is not None:
        with out.progress(f"writing {output}"):
            manifest = lock_checkpoint(checkpoint, arch, mask_file, mask_path, output, threshold, force=force)
        info.update(output=str(output), locked_tensors=sorted(manifest["tensors"]), mask_sha256=manifest["mask_sha256"],
                    manifest_sha256=manifest["manifest_sha256"])
    if evaluation is not None:
        info["evaluation"] = _evaluate_lock(ref, mask_file, *evaluation, threshold, placement)
    out.emit(info, _render_lock)


def _lock_evaluation_inputs(ref, mask_file: MaskFile, n: int, hparams: str | None, data: str | None) -> tuple:
    """(hparams, facts) for `lock --evaluate N`."""
    from ..data.counterfact import load, load_split
    from ..edit.facts import Fact
    from ..edit.hparams import load_hparams
    from ..mask.pipeline import per_relation

    # the method the mask was trained against, at the layers of those edits
    hp = load_hparams(hparams_or_default(hparams, ref, "--evaluate needs --hparams"), mask_file.method,
                      {"layers": mask_file.edit_layers()})
    records = load(data, strict=True).records[:n] if data else per_relation(load_split("rome-test"), n)
    if len(records) < n:
        raise EditguardError(f"--evaluate {n}: {data or 'the rome-test split'} holds only {len(records)} records")
    return hp, [Fact.from_record(r) for r in records]


def _evaluate_lock(ref, mask_file: MaskFile, hp, facts: list, threshold: float | None, placement: dict) -> dict:
    from ..harden.lock import evaluate_lock, install_mask
    from ..loading import load_model

    n = len(facts)
    placement = {**placement, "keep_on_device": mask_file.module_paths()}  # the lock's mask goes on them
    unlocked = load_model(ref, **placement)
    locked = load_model(ref, **placement)
    install_mask(locked.model, locked.arch, mask_file, threshold)
    with state.out().progress(f"{hp.method.upper()} on {n} facts, unlocked then locked") as advance:
        return evaluate_lock(unlocked, locked, facts, hp, progress=lambda m: advance(0, description=m))


def _render_lock(console, r) -> None:
    if r.get("output"):
        console.print(f"locked {escape(r['model'])} → {escape(r['output'])} (tensors {', '.join(r['locked_tensors'])}; "
                      f"mask {escape(r['mask'])})")
        console.print(f"lock manifest sha256 {r['manifest_sha256']} (keep it: `editguard scan --lock-digest` checks it)")
    if r.get("mask_perplexity_increase") is not None:
        console.print(f"the mask's cost, from its card: WikiText-2 perplexity {100 * r['mask_perplexity_increase']:+.1f} % "
                      "on the unedited model")
    if r.get("evaluation"):
        e = r["evaluation"]
        console.print(f"{e['method'].upper()} edit success on {e['unlocked']['n']} CounterFact facts: unlocked "
                      f"{_lock_side(e['unlocked'])} → locked {_lock_side(e['locked'])}")


def _lock_side(side: dict) -> str:
    paraphrase = side.get("paraphrase_success")
    ci = side.get("edit_success_ci95")
    return (f"{side['edit_success']:.0%} ("
            + (f"95 % CI {ci[0]:.0%}-{ci[1]:.0%}, " if ci else "")
            + (f"paraphrases {paraphrase:.0%}, " if paraphrase is not None else "")
            + f"median P(new) {side['median_p_new']:.3f})")
