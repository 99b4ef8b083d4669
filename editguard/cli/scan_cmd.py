"""`editguard scan MODEL`: find hidden knowledge edits; exit 1 when the verdict reaches --fail-on."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..audit.findings import VERDICT_RANK
from ..audit.scan import TESTS, ScanOptions, scan, skipped_tests
from ..errors import EXIT_FINDINGS, EditguardError
from ..mask.file import gamma_text
from ..report.sarif import to_sarif
from ..outputs import check_output_file
from . import state
from .app import app
from .options import (AllowPickle, BaseRevision, DeviceMap, Dtype, MaxMemory, ModelArg, OffloadFolder, Revision,
                      check_share, input_paths, load_options, resolve_model)


@app.command("scan")
def scan_command(
    model: ModelArg,
    base: Annotated[Optional[str], typer.Option("--base", help="The unedited model to diff against.")] = None,
    mask: Annotated[Optional[str], typer.Option("--mask", help="Mask for the hidden-facts test (default: a shipped mask over a layer the other tests flag).")] = None,
    probes: Annotated[str, typer.Option("--probes", help="counterfact (rome-test), counterfact:all (8,400 records), "
                                                     "counterfact:SPLIT[,SPLIT] or a JSONL file.")] = "counterfact",
    tests: Annotated[str, typer.Option("--tests", help=f"Comma-separated subset of {','.join(TESTS)}.")] = ",".join(TESTS),
    min_prob: Annotated[float, typer.Option("--min-prob", help="Hidden facts: least confidence of the current answer.")] = 0.5,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Mask threshold γ (default: the mask's).")] = None,
    fail_on: Annotated[str, typer.Option("--fail-on", help="Exit 1 at this verdict or worse: suspicious | edited | never.")] = "suspicious",
    report: Annotated[Optional[Path], typer.Option("--report", help="Also write a self-contained HTML report.")] = None,
    lock_digest: Annotated[Optional[str], typer.Option("--lock-digest", help="The lock manifest's sha256 that `lock` "
                                                       "printed: a locked model whose manifest has another digest, or "
                                                       "a model without one, is a finding (EG030).")] = None,
    revision: Revision = None,
    base_revision: BaseRevision = None,
    allow_pickle: AllowPickle = False,
    device_map: DeviceMap = "cpu",
    dtype: Dtype = "float32",
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
) -> None:
    """Was MODEL knowledge-edited? Where, how, which facts, and what were the original answers?"""
    out = state.out()
    chosen = tuple(t.strip() for t in tests.split(",") if t.strip())
    if not chosen:
        raise EditguardError(f"--tests names no test; choose from {', '.join(TESTS)}")
    unknown = [t for t in chosen if t not in TESTS]
    if unknown:
        raise EditguardError(f"unknown test(s) {', '.join(unknown)}; choose from {', '.join(TESTS)}")
    if fail_on not in ("suspicious", "edited", "never"):
        raise EditguardError("--fail-on must be suspicious, edited or never")
    if mask is not None and not Path(mask).is_file():
        raise EditguardError(f"no such mask file: {mask}")
    check_share("--threshold", threshold)
    check_share("--min-prob", min_prob, closed=True)
    if lock_digest is not None:
        from ..harden.lock import check_digest

        lock_digest = check_digest(lock_digest, "--lock-digest")
    if base is not None and not base.strip():  # an empty CI variable: not silently "no base"
        raise EditguardError("--base is empty")
    if base_revision is not None and base is None:  # not applied to a base the upload names for itself
        raise EditguardError("--base-revision needs --base")
    ref = resolve_model(model, revision, allow_pickle)
    if report is not None:  # before the scan: a bad path fails in a second, not after minutes
        from ..audit.probes import probe_file

        report = check_output_file(report, input_paths(ref, base, mask, probe_file(probes)), (".html", ".htm"))
    options = ScanOptions(base=base, mask=mask, probes=probes, tests=chosen, min_prob=min_prob, threshold=threshold,
                          allow_pickle=allow_pickle, base_revision=base_revision, lock_digest=lock_digest,
                          load_options=load_options(device_map, dtype, max_memory, offload_folder),
                          decompose=3 if report is not None else 0)
    with out.progress(f"scanning {model}") as advance:
        result = scan(ref, options, progress=lambda message: advance(0, description=message))
    findings = result.pop("_findings")
    if report is not None:
        from ..report.html import write_report

        write_report(report, result, findings)
        result["report"] = str(report)
    skipped = skipped_tests(result["tests"], chosen)
    sarif = to_sarif(findings, result["model"], ref.source,
                     {"verdict": result["verdict"], "severity": result["severity"],
                      "tests_run": [name for name in chosen if name in result["tests"] and name not in skipped],
                      "tests_skipped": skipped}, skipped=skipped)
    out.emit(result, _render, sarif=sarif)
    if fail_on != "never" and VERDICT_RANK[result["verdict"]] >= VERDICT_RANK[fail_on]:
        raise typer.Exit(EXIT_FINDINGS)


def _render(console, r) -> None:
    colour = {"clean": "green", "suspicious": "yellow", "edited": "bold red"}[r["verdict"]]
    console.print(f"[{colour}]{r['verdict'].upper()}[/] ({r['severity']}): {escape(r['model'])} — {r['architecture']}, "
                  f"{r['num_layers']} layers, {len(r['findings'])} finding(s), {r['seconds']} s")
    tests = r["tests"]
    for name in ("lock", "diff", "activations", "dependence", "revealed", "hidden", "attribution"):
        if name not in tests:
            continue
        t = tests[name]
        if isinstance(t, dict) and "skipped" in t:
            console.print(f"  {name}: skipped — {escape(t['skipped'])}")
        elif name == "diff":
            declared = f" (named by the {t['declared_by']}: unverified)" if t.get("declared_by") else ""
            locked = (f" (its {len(t['masked_by_lock'])} locked tensor(s) against the base ⊙ the lock's mask)"
                      if t.get("masked_by_lock") else "")
            console.print(f"  base diff vs {escape(t['base'])}{declared}{locked}: {t['classification']}"
                          + (f", layers {t['layers']}" if t["layers"] else "") + f" ({len(t['changed'])} of {t['compared']} tensors changed)")
        elif name == "activations":
            scores = t["layer_scores"]
            console.print(f"  activation test: top layer {t['top_layer']} (robust z {max(scores):.1f}; suspicious ≥ "
                          f"{t['suspicious_z']}, edited ≥ {t['edited_z']}; {t['probes_with_subject']} subjects)")
        elif name == "dependence":
            console.print(f"  answer dependence: largest drop {max(t['window_max_drop'], default=0):.1f} nats over "
                          f"{t['tested']} confident answers (suspicious ≥ {t['suspicious_nats']}, edited ≥ "
                          f"{t['edited_nats']}); {t['flagged']} flagged")
        elif name == "revealed":
            console.print(f"  revealed by key projection (layers {t['layers']}): {t['changed']} of {t['probes']} probe "
                          f"answers of {', '.join(escape(x) for x in t['subjects'])} change")
        elif name == "hidden":
            console.print(f"  hidden facts under {escape(t['mask'])} (γ={gamma_text(t['threshold'])}): "
                          f"{t['changed_confident']} of {t['probes']} probe answers change, "
                          f"{t['changed_at_edited_prob']} of them held at p ≥ {t['edited_prob']} as edited answers are"
                          + (f" (graded {t['graded_at_most']} at most, as the tests that flagged its layer)"
                             if t.get("graded_at_most") not in (None, "error") else ""))
        elif name == "lock":
            status = "intact" if t["intact"] else "BROKEN" if t["locked"] else "MISSING"
            expected = (", as expected" if t["intact"] else f", expected {t['expected_sha256']}") if t.get("expected_sha256") else ""
            console.print(f"  lock: {status} (manifest sha256 {t['manifest_sha256'] or 'none'}{expected})")
        elif name == "attribution":
            for a in t:
                subj = a["subjects"][0] if a["subjects"] else {}
                objs = ", ".join(o["token"] for o in a["objects"][:3])
                console.print(f"  attribution, layer {a['layer']}: subject {escape(str(subj.get('subject')))} "
                              f"(score {subj.get('score', 0):.1f}), pushes {escape(objs)}")
    if r["findings"]:
        table = Table(box=None, title="findings", title_justify="left")
        for column in ("rule", "severity", "layer", "message"):
            table.add_column(column)
        for f in r["findings"][:30]:
            table.add_row(f"{f['rule']} {f['name']}", f["severity"], "" if f["layer"] is None else str(f["layer"]),
                          escape(f["message"]))
        console.print(table)
        if len(r["findings"]) > 30:
            console.print(f"  … {len(r['findings']) - 30} more (use --format json)")
    if r.get("report"):
        console.print(f"report: {r['report']}")
