"""Edit quality on the demo model, as in ROME's CounterFact evaluation.

    python bench/edit_quality.py --rome 200 --memit 100

ROME: the first N/10 records of each relation in the paper's train split (`--rome-first`: the first N
records in file order), each edited alone (independent edits, as in an edit bank) and judged alone;
`--bank BANK` judges the edits already in a bank (e.g. the committed one) instead of recomputing them.
MEMIT: the first M records of the MEMIT train split in one batch edit, judged together; `--memit-weights 15000,5000,1500` sweeps MEMIT's λ (mom2_update_weight) on the same z
targets (computed once). Prints efficacy, paraphrase success and neighbourhood specificity for each, and the
unedited model's scores on the same records for reference.
"""

from __future__ import annotations

import argparse
import time

from editguard.data.counterfact import load_split
from editguard.edit.bank import EditBank
from editguard.edit.edits import edits_applied
from editguard.edit.facts import Fact
from editguard.edit.hparams import load_hparams
from editguard.edit.memit import memit_spread, memit_targets
from editguard.edit.quality import edit_quality, judge, summarize
from editguard.edit.rome import rome_edits
from editguard.loading import load_model
from editguard.mask.pipeline import per_relation
from editguard.resolve import resolve


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo:smollm2-135m")
    parser.add_argument("--hparams", default="smollm2-135m")
    parser.add_argument("--rome", type=int, default=200)
    parser.add_argument("--memit", type=int, default=100)
    parser.add_argument("--rome-first", action="store_true",
                        help="the first N records of rome-train in file order (the first relations only) "
                             "instead of N/10 per relation")
    parser.add_argument("--bank", default=None, help="take the ROME edits from this bank")
    parser.add_argument("--memit-weights", default=None, help="comma-separated λ values (default: the preset's)")
    args = parser.parse_args()
    loaded = load_model(resolve(args.model))
    rows = []
    if args.rome:
        records = load_split("rome-train")
        chosen = records[: args.rome] if args.rome_first else per_relation(records, args.rome)
        facts = [Fact.from_record(r) for r in chosen]
        start = time.time()
        if args.bank:
            bank = EditBank.open(args.bank)
            index = {r["case_id"]: i for i, r in enumerate(bank.meta["records"])}
            missing = [f.case_id for f in facts if f.case_id not in index]
            if missing:
                raise SystemExit(f"{args.bank} lacks {len(missing)} of these records (e.g. case {missing[0]})")
            edits = bank.edits([index[f.case_id] for f in facts])
            seconds = None
        else:
            edits = rome_edits(loaded, facts, load_hparams(args.hparams, "rome"))
            seconds = time.time() - start
        rows.append(("unedited", summarize(judge(loaded, facts)), None))
        rows.append((f"ROME x{len(facts)} (each alone)", summarize(edit_quality(loaded, edits)), seconds))
    if args.memit:
        facts = [Fact.from_record(r) for r in load_split("memit-train")[: args.memit]]
        hp = load_hparams(args.hparams, "memit")
        weights = [float(w) for w in args.memit_weights.split(",")] if args.memit_weights else [hp.mom2_update_weight]
        rows.append(("unedited", summarize(judge(loaded, facts)), None))
        start = time.time()
        z = memit_targets(loaded, facts, hp)
        z_seconds = time.time() - start
        for weight in weights:
            hp.mom2_update_weight = weight
            start = time.time()
            edits = memit_spread(loaded, facts, hp, z)
            seconds = z_seconds + time.time() - start
            with edits_applied(loaded.model, loaded.arch, edits):
                rows.append((f"MEMIT x{len(facts)} one batch, L{hp.layers[0]}-{hp.layers[-1]}, λ={weight:g}",
                             summarize(judge(loaded, facts)), seconds))
    print(f"{args.model}, preset {args.hparams}")
    print(f"{'run':<44} {'n':>4} {'efficacy':>9} {'paraphrase':>10} {'neighbour':>9} {'seconds':>8}")
    for name, q, seconds in rows:
        print(f"{name:<44} {q['n']:>4} {q['efficacy']:>9.1%} {q['paraphrase']:>10.1%} {q['neighborhood']:>9.1%} "
              f"{'' if seconds is None else f'{seconds:.0f}':>8}")


if __name__ == "__main__":
    main()
