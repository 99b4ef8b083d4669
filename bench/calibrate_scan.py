"""Calibrate scan's base-free tests on the demo model: clean model vs planted ROME edits.

    python bench/calibrate_scan.py --bank banks/smollm2-135m_rome_L6.safetensors --edits 20 [--mask masks/...]
    python bench/calibrate_scan.py --bank banks/smollm2-135m_rome_L6.safetensors --edits 0 --memit 1,16

Activation test: the largest robust z per layer on the clean model, and on the model carrying one bank
edit at a time (the edits' subjects are among the probes, as when auditing CounterFact-style edits).
Hidden facts (with --mask): how many probe answers change under the mask on the clean model (false
alarms) and whether the planted fact is among them on each edited model. `--memit N[,N]`: the same
activation test on the model carrying one MEMIT batch edit of the first N memit-train records (the
demo preset, layers 2-6), with the edited subjects' z at the edited layers. `--dependence`: the
answer-dependence test on the same models (clean, each ROME edit, each MEMIT batch): the largest drop
on the clean model, and for each edit whether its fact is flagged, as which method, at which layers.
"""

from __future__ import annotations

import argparse

import torch

from editguard.audit import dependence as dep_test
from editguard.audit.activations import EDITED_Z, SUSPICIOUS_Z, activation_scores
from editguard.audit.dependence import split_innocent
from editguard.audit.hidden import EDITED_PROB, hidden_facts
from editguard.audit.probes import Probe, counterfact_probes
from editguard.data.counterfact import load_split
from editguard.edit.bank import EditBank
from editguard.edit.edits import edits_applied
from editguard.edit.facts import Fact
from editguard.edit.hparams import load_hparams
from editguard.edit.memit import memit_edit
from editguard.loading import load_model
from editguard.mask.file import MaskFile
from editguard.resolve import resolve


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo:smollm2-135m")
    parser.add_argument("--bank", default=None, help="edit bank holding the ROME edits (needed unless --edits 0)")
    parser.add_argument("--hparams", default="smollm2-135m", help="MEMIT preset for --memit")
    parser.add_argument("--edits", type=int, default=20, help="planted edits to test (taken from the bank's end)")
    parser.add_argument("--probes", default="rome-test")
    parser.add_argument("--mask", default=None)
    parser.add_argument("--memit", default=None, help="comma-separated MEMIT batch sizes to test")
    parser.add_argument("--dependence", action="store_true", help="also calibrate the answer-dependence test")
    args = parser.parse_args()
    loaded = load_model(resolve(args.model))
    if args.edits and not args.bank:
        parser.error("--bank is needed for --edits")
    probes = counterfact_probes((args.probes,))
    bank = EditBank.open(args.bank) if args.edits else None
    edits = bank.edits(list(range(len(bank) - args.edits, len(bank)))) if bank else []
    # every planted subject is a probe too (its own rewrite prompt)
    probes += [Probe(e.facts[0].text, e.facts[0].subject, e.facts[0].target_true, e.facts[0].relation,
                     e.facts[0].case_id) for e in edits]
    sizes = [int(n) for n in args.memit.split(",")] if args.memit else []
    memit_facts = [Fact.from_record(r) for r in load_split("memit-train")[: max(sizes, default=0)]]
    probes += [Probe(f.text, f.subject, f.target_true, f.relation, f.case_id) for f in memit_facts]
    clean = activation_scores(loaded, probes).layer_scores()
    print(f"{args.model}: {len(probes)} probes; clean model, max robust z per layer:")
    print("  " + " ".join(f"{z:.1f}" for z in clean))
    print(f"  clean maximum {max(clean):.1f} (layer {clean.index(max(clean))}); thresholds suspicious {SUSPICIOUS_Z}, "
          f"edited {EDITED_Z}")
    if args.dependence:
        dep = dep_test.dependence_scores(loaded, probes)
        maxima = dep.window_maxima()
        worst = max(range(len(maxima)), key=maxima.__getitem__)
        print(f"answer dependence (windows {dep.windows[0]}..{dep.windows[-1]}, answers with p ≥ {dep_test.MIN_PROB}): "
              f"clean model, {dep.tested} answers tested, largest drop {maxima[worst]:.2f} nats (layers "
              f"{dep.windows[worst][0]}-{dep.windows[worst][1] - 1}); flagged {len(dep.flagged)}; thresholds "
              f"suspicious {dep_test.SUSPICIOUS_NATS}, edited {dep_test.EDITED_NATS}")
    mask = MaskFile.load(args.mask) if args.mask else None
    clean_hidden = split_innocent(hidden_facts(loaded, mask, probes)) if mask else None
    if mask:
        print(f"  hidden facts on the clean model (false alarms): {len(clean_hidden[0])} of {len(probes)} probes "
              f"(and {len(clean_hidden[1])} discounted: the model gives the expected answer); their answers' p: "
              + " ".join(f"{f['current_prob']:.2f}" for f in clean_hidden[0]))
    rows = []
    for edit in edits:
        with edits_applied(loaded.model, loaded.arch, [edit]):
            scores = activation_scores(loaded, probes)
            z = scores.layer_scores()
            top = int(torch.tensor(z).argmax())
            best_subject = scores.probes[int(scores.z[top].argmax())].subject
            found = None
            if mask:
                kept, _ = split_innocent(hidden_facts(loaded, mask, probes))
                planted = [f for f in kept if f["case_id"] == edit.facts[0].case_id]
                found = planted[0]["current_prob"] if planted else None  # its answer's p when listed
                others = [f["current_prob"] for f in kept if f["case_id"] != edit.facts[0].case_id]
                print(f"  edit {len(rows)}: planted fact listed: {_listed(found)}; {len(others)} other hidden facts, "
                      f"p ≥ {EDITED_PROB}: {sum(p >= EDITED_PROB for p in others)}")
            if args.dependence:
                _dependence_row(loaded, probes, [edit.facts[0]], f"ROME edit at layer {edit.layer}", "rome-like",
                                [edit.layer])
        rows.append((edit.layer, z[edit.layer], top, best_subject == edit.facts[0].subject, max(z), found))
    if rows:
        print(f"{'edit':>4} {'z at edited layer':>18} {'top layer':>9} {'right subject':>13} {'max z':>6} {'hidden fact':>11}")
        for i, (layer, z_layer, top, right, zmax, found) in enumerate(rows):
            print(f"{i:>4} {z_layer:>18.1f} {top:>9} {str(right):>13} {zmax:>6.1f} {_listed(found) if mask else '-':>11}")
        z_edit = torch.tensor([r[1] for r in rows])
        print(f"edited layer z: min {float(z_edit.min()):.1f}, median {float(z_edit.median()):.1f}; clean max "
              f"{max(clean):.1f}; detected (≥ suspicious) {float((z_edit >= SUSPICIOUS_Z).float().mean()):.0%}, "
              f"(≥ edited) {float((z_edit >= EDITED_Z).float().mean()):.0%}; right layer and subject "
              f"{sum(r[2] == r[0] and r[3] for r in rows)}/{len(rows)}")
        if mask:
            listed = [r[5] for r in rows if r[5] is not None]
            print(f"planted fact among hidden facts: {len(listed)}/{len(rows)}, at p ≥ {EDITED_PROB}: "
                  f"{sum(p >= EDITED_PROB for p in listed)}/{len(rows)}")
    hp = load_hparams(args.hparams, "memit") if sizes else None
    for n in sizes:
        edits = memit_edit(loaded, memit_facts[:n], hp)
        with edits_applied(loaded.model, loaded.arch, edits):
            scores = activation_scores(loaded, probes)
            if args.dependence:
                _dependence_row(loaded, probes, memit_facts[:n], f"MEMIT x{n}", "memit-like", hp.layers)
        z = scores.layer_scores()
        where = {p.subject: i for i, p in enumerate(scores.probes)}
        edited = torch.stack([scores.z[hp.layers, where[f.subject]] for f in memit_facts[:n]])  # [n, layers]
        best = edited.max(dim=1).values
        print(f"MEMIT x{n} (layers {hp.layers[0]}-{hp.layers[-1]}): max z per edited layer "
              + " ".join(f"{z[l]:.1f}" for l in hp.layers) + f"; over all layers {max(z):.1f}; edited subjects' best z "
              f"at the edited layers: min {float(best.min()):.1f}, max {float(best.max()):.1f}; "
              f"≥ suspicious {int((best >= SUSPICIOUS_Z).sum())}/{n}")


def _listed(p: float | None) -> str:
    """A planted fact's answer probability among the hidden facts, or that it was not listed."""
    return "no" if p is None else f"{p:.2f}"


def _dependence_row(loaded, probes, facts, label: str, method: str, layers: list[int]) -> None:
    """The answer-dependence test on an edited model: how many of the edited facts it flags, and right?"""
    dep = dep_test.dependence_scores(loaded, probes)
    subjects = {f.subject for f in facts}
    hits = list({f["prompt"]: f for f in dep.flagged if f["subject"] in subjects}.values())  # probes may repeat
    right = [f for f in hits if f["method"] == method and set(f["layers"]) & set(layers)]
    others = [f["drop"] for f in dep.flagged if f["subject"] not in subjects]
    drops = sorted((round(f["drop"], 1) for f in hits), reverse=True)
    print(f"  dependence, {label}: {len(hits)}/{len(facts)} edited facts flagged (drops {drops[:8]}), "
          f"{len(right)} as {method} at the right layers "
          f"({', '.join(sorted({'-'.join(map(str, (f['layers'][0], f['layers'][-1]))) for f in hits}))}); "
          f"{len(others)} other probes flagged" + (f" (largest {max(others):.1f})" if others else ""))


if __name__ == "__main__":
    main()
