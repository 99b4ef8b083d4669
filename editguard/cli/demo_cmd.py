"""`editguard demo`: the whole audit on the demo model, offline — plant, scan, reverse, lock."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from .. import masks_index
from ..errors import EditguardError
from ..home import user_path
from . import state
from .app import app
from .options import num_layers_of, resolve_model

# A CounterFact test fact the demo model knows (it answers French), planted as English.
DEMO_CASE = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target": "English",
             "true": "French"}


@app.command("demo")
def demo_command(
    model: Annotated[str, typer.Option("--model", help="Demo model to audit.")] = "demo:smollm2-135m",
    workdir: Annotated[Optional[Path], typer.Option("--workdir", help="Keep the edited/reversed/locked models here.")] = None,
    lock_check: Annotated[bool, typer.Option("--lock-check/--no-lock-check",
                                             help="Try a ROME edit on the locked model.")] = True,
    layer: Annotated[Optional[int], typer.Option("--layer", min=0, help="Layer of the planted ROME edit (default: "
                                                 "the model's preset; 9 on SmolLM2 is where its best mask was trained).")] = None,
) -> None:
    """Plant a ROME edit into the demo model, scan it, reverse it, lock the original — and report."""
    if not model.startswith("demo:"):
        raise EditguardError("editguard demo runs on a demo model (demo:smollm2-135m or demo:gemma3-270m)")
    from ..edit.hparams import load_hparams

    ref = resolve_model(model)
    hp = load_hparams(ref.spec.split(":", 1)[1], "rome", {"layers": [layer]} if layer is not None else None)
    hp.check_layers(num_layers_of(ref))  # before any folder is made or the model loaded
    temporary = workdir is None  # four model copies (~2 GB for SmolLM2): removed unless asked to keep them
    if not temporary:
        _check_workdir(Path(workdir), ref)
    folder = Path(tempfile.mkdtemp(prefix="editguard-demo-")) if temporary else Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / WORKDIR_MARKER).touch()
    try:
        report = _audit(model, ref, hp, folder, lock_check)
    finally:
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)
    report["models_kept"] = not temporary
    state.out().emit(report, _render)


WORKDIR_MARKER = ".editguard-demo"  # the demo replaces its own folders in a workdir it made, nothing else


def _check_workdir(folder: Path, ref) -> None:
    """A kept workdir: new, empty, or an earlier demo's (its folders are replaced), and apart from the model."""
    inside = lambda a, b: a == b or b in a.parents  # noqa: E731
    here, source = user_path(folder).resolve(), Path(ref.path).resolve()
    if inside(here, source) or inside(source, here):
        raise EditguardError(f"--workdir {folder} overlaps the model folder {ref.path}")
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / WORKDIR_MARKER).exists())):
        raise EditguardError(f"--workdir {folder} exists and was not made by editguard demo; choose a new or empty folder")


def _audit(model: str, ref, hp, folder: Path, lock_check: bool) -> dict:
    from ..audit.scan import BASE_FREE_TESTS, ScanOptions, scan
    from ..edit.edits import edits_applied
    from ..edit.facts import Fact
    from ..edit.plant import compute_edits, write_edited
    from ..edit.quality import judge
    from ..loading import load_model
    from ..mask.file import MaskFile
    from ..resolve import resolve

    out = state.out()
    report: dict = {"model": model, "workdir": str(folder)}
    with out.progress("loading the model"):
        loaded = load_model(ref)
    fact = Fact(DEMO_CASE["prompt"], DEMO_CASE["subject"], DEMO_CASE["target"], DEMO_CASE["true"])
    # 1. plant
    with out.progress(f"1/4 planting a ROME edit: {fact.text} → {fact.target_new}"):
        edits = compute_edits(loaded, [fact], hp)
        edited_dir = folder / "edited"
        write_edited(loaded.checkpoint, loaded.arch, edits, edited_dir, force=True)
        with edits_applied(loaded.model, loaded.arch, edits):
            quality = judge(loaded, [fact])[0]
    report["plant"] = {"fact": fact.text, "new": fact.target_new, "true": fact.target_true, "layer": edits[0].layer,
                       "efficacy": quality.efficacy, "p_new": quality.new_prob, "model": str(edited_dir)}
    # 2. scan: without a base (activations + hidden facts), then with the base
    edited_ref = resolve(str(edited_dir))
    with out.progress("2/4 loading the edited model"):
        edited = load_model(edited_ref)  # from the written checkpoint, as an auditor would get it
    with out.progress("2/4 scanning the edited model without a base") as advance:
        blind = scan(edited_ref, ScanOptions(tests=BASE_FREE_TESTS + ("hidden",), loaded=edited),
                     progress=lambda m: advance(0, description=f"2/4 {m}"))
    with out.progress("2/4 scanning the edited model against its base") as advance:
        based = scan(edited_ref, ScanOptions(base=str(ref.path), tests=("diff", "attribution"), probes="counterfact",
                                             loaded=edited),
                     progress=lambda m: advance(0, description=f"2/4 {m}"))
    report["scan_without_base"] = {"verdict": blind["verdict"], "findings": blind["findings"][:5],
                                   "tests": {k: v for k, v in blind["tests"].items() if k in ("activations", "dependence", "revealed", "hidden")}}
    report["scan_with_base"] = {"verdict": based["verdict"], "diff": based["tests"].get("diff"),
                                "attribution": based["tests"].get("attribution")}
    # 3. reverse: base- and mask-free by key projection on what the blind scan found; with the mask too
    from ..harden.project import flagged_subjects, projection_replacements
    from ..harden.reverse import masked_replacements, write_reversed

    edited_ck = edited_ref.checkpoint()
    flagged = flagged_subjects(blind["_findings"])
    reversals = {}
    if flagged:
        with out.progress("3/4 reversing: projecting the flagged subject's keys out"):
            replacements = projection_replacements(edited, edited_ck, flagged)
            write_reversed(edited_ck, replacements, folder / "reversed-project", force=True)
        reversals["project"] = folder / "reversed-project"
    edited_scores = _true_vs_new(edited, fact)
    del edited
    fit = masks_index.best_fit(loaded.arch, loaded.checkpoint, [edits[0].layer], edits[0].method)
    mask_path = masks_index.mask_path(fit) if fit else None
    if mask_path:
        mask = MaskFile.load(mask_path)
        with out.progress("3/4 reversing with the shipped mask"):
            write_reversed(edited_ck, masked_replacements(edited_ck, loaded.arch, mask), folder / "reversed-mask",
                           force=True)
        reversals["mask"] = folder / "reversed-mask"
    report["reverse"] = {"edited": edited_scores}
    for name, path in reversals.items():
        scores = _true_vs_new(load_model(resolve(str(path))), fact)
        report["reverse"][name] = {"model": str(path), **scores, "restored": scores["logp_true"] > scores["logp_new"]}
    if mask_path:
        report["reverse"]["mask"]["mask"] = str(mask_path)
    if flagged:
        report["reverse"]["project"]["subjects"] = sorted({f["subject"] for fs in flagged.values() for f in fs})
        report["reverse"]["project"]["layers"] = sorted(flagged)
    # 4. lock needs a shipped mask; the one `lock` would take (edited tensors alone first), not the reversal's
    lock_fit = masks_index.best_fit(loaded.arch, loaded.checkpoint, [edits[0].layer], edits[0].method, lock=True)
    if not lock_fit:
        report["lock"] = {"skipped": "no shipped mask fits this model yet (see masks/README.md)"}
    else:
        from ..harden.lock import install_mask, lock_checkpoint

        if Path(lock_fit["path"]) != mask_path:  # reuse the reversal mask when lock takes the same file
            mask_path = masks_index.mask_path(lock_fit)
            mask = MaskFile.load(mask_path)
        with out.progress("4/4 locking the original model"):
            locked_dir = folder / "locked"
            lock_checkpoint(loaded.checkpoint, loaded.arch, mask, mask_path, locked_dir, force=True)
        report["lock"] = {"model": str(locked_dir), "mask": str(mask_path)}
        if lock_check:
            with out.progress("4/4 trying the same ROME edit on the locked model"):
                install_mask(loaded.model, loaded.arch, mask)
                locked_edits = compute_edits(loaded, [fact], hp)
                with edits_applied(loaded.model, loaded.arch, locked_edits):
                    locked_quality = judge(loaded, [fact])[0]
            report["lock"].update(edit_success_locked=locked_quality.efficacy, p_new_locked=locked_quality.new_prob,
                                  p_true_locked=locked_quality.true_prob)
    return report


def _true_vs_new(loaded, fact) -> dict:
    from ..scoring import continuation_logprobs

    sums, _ = continuation_logprobs(loaded, [fact.text, fact.text],
                                    [fact.target_true, fact.target_new])
    return {"logp_true": float(sums[0]), "logp_new": float(sums[1])}


def _render(console, r) -> None:
    p = r["plant"]
    console.rule("[bold]editguard demo")
    console.print(f"1. planted: {escape(p['fact'])} [red]{escape(p['new'])}[/] (was {escape(p['true'])}); ROME at layer "
                  f"{p['layer']}, P(new) = {p['p_new']:.2f}, edit {'succeeded' if p['efficacy'] else 'failed'}{_at(r, p['model'])}")
    blind = r["scan_without_base"]
    console.print(f"2. scan without a base: [bold]{blind['verdict'].upper()}[/]")
    acts = blind["tests"].get("activations", {})
    if acts:
        console.print(f"   activation test: top layer {acts['top_layer']} (robust z {max(acts['layer_scores']):.1f}, "
                      f"edited ≥ {acts['edited_z']})")
    dep = blind["tests"].get("dependence", {})
    for f in dep.get("facts", [])[:1]:
        layers = f["layers"]
        console.print(f"   answer-dependence test: {escape(f['prompt'])} → {escape(f['current_answer'])} loses {f['drop']:.1f} "
                      f"nats without the MLP outputs at {escape(f['subject'])} in layer(s) {layers[0]}-{layers[-1]} "
                      f"({f['method']}; edited ≥ {dep['edited_nats']} nats)")
    if dep.get("window_max_drop") and not dep.get("facts"):
        console.print(f"   answer-dependence test: nothing flagged (largest drop {max(dep['window_max_drop']):.1f} nats, "
                      f"suspicious ≥ {dep['suspicious_nats']}; a new object that stays plausible without the edit, "
                      f"like this one, drops little)")
    revealed = blind["tests"].get("revealed", {})
    for f in revealed.get("facts", [])[:3]:
        console.print(f"   hidden fact revealed by key projection: {escape(f['prompt'])} → now {escape(f['current_answer'])} "
                      f"({f['current_prob']:.2f}), originally {escape(f['revealed_answer'])} ({f['revealed_prob']:.2f})")
    hidden = blind["tests"].get("hidden", {})
    if "skipped" in hidden:
        console.print(f"   hidden facts: skipped ({escape(hidden['skipped'])})")
    elif hidden:
        console.print(f"   hidden facts under the mask: {hidden['changed_confident']} answer(s) change, "
                      f"{hidden['changed_at_edited_prob']} held at p ≥ {hidden['edited_prob']} as edited answers are")
        for f in hidden["facts"][:3]:
            console.print(f"     {escape(f['prompt'])} → now {escape(f['current_answer'])} ({f['current_prob']:.2f}), "
                          f"under the mask {escape(f['revealed_answer'])}")
    based = r["scan_with_base"]
    diff = based.get("diff") or {}
    console.print(f"   scan with the base: [bold]{based['verdict'].upper()}[/], {diff.get('classification')} change at "
                  f"layer(s) {diff.get('layers')}")
    attribution = based.get("attribution")
    for a in attribution if isinstance(attribution, list) else []:
        console.print(f"   attribution: subject {escape(str(a['subjects'][0]['subject']))}, pushes "
                      f"{escape(', '.join(o['token'] for o in a['objects'][:3]))}")
    rev = r["reverse"]
    e = rev["edited"]
    for name, label in (("project", "by key projection (no base, no mask)"), ("mask", "with the shipped mask")):
        if name in rev:
            x = rev[name]
            if "mask" in x:
                label += f" {escape(Path(x['mask']).name)}"
            console.print(f"3. reversed {label}: true answer {'[green]restored[/]' if x['restored'] else '[red]NOT restored[/]'} "
                          f"(log p true/new: edited {e['logp_true']:.2f}/{e['logp_new']:.2f}, "
                          f"reversed {x['logp_true']:.2f}/{x['logp_new']:.2f}){_at(r, x['model'])}")
    if "project" not in rev and "mask" not in rev:
        console.print("3. reverse: skipped (the blind scan flagged no subject and no shipped mask fits)")
    lock = r["lock"]
    if "skipped" in lock:
        console.print(f"4. lock: skipped ({escape(lock['skipped'])})")
    else:
        extra = ""
        if "edit_success_locked" in lock:
            p = r["plant"]
            extra = (f"; the same ROME edit on the locked model {'still succeeds' if lock['edit_success_locked'] else 'fails'} "
                     f"(P({escape(p['new'])}) {lock['p_new_locked']:.3f} against P({escape(p['true'])}) "
                     f"{lock['p_true_locked']:.3f}; planted on the unlocked model: P({escape(p['new'])}) {p['p_new']:.2f})")
        console.print(f"4. locked the original with {escape(lock['mask'])}{_at(r, lock['model'])}{extra}")
    if r["models_kept"]:
        console.print(f"models kept in {escape(r['workdir'])}")
    else:
        console.print("the edited, reversed and locked models were removed (--workdir DIR keeps them)")


def _at(r: dict, path: str) -> str:
    """Where a model copy was written, when it is still there to look at."""
    return f" → {escape(path)}" if r["models_kept"] else ""
