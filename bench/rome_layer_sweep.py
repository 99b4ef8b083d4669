"""Which layer should the demo preset edit? ROME on records spread over all ten relations, per layer:
efficacy, paraphrase, neighbourhood specificity, P(new), and edit time.

    python bench/rome_layer_sweep.py --model demo:smollm2-135m --layers 3,6,9,12,15,18 --n 50
"""

from __future__ import annotations

import argparse
import time

from editguard.data.counterfact import load_split
from editguard.edit.facts import Fact
from editguard.edit.hparams import load_hparams
from editguard.edit.quality import edit_quality, summarize
from editguard.edit.rome import rome_edits
from editguard.loading import load_model
from editguard.resolve import resolve


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo:smollm2-135m")
    parser.add_argument("--hparams", default="smollm2-135m")
    parser.add_argument("--layers", default="3,6,9,12,15,18")
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--templates", default=None, help="override context_template_length_params, e.g. 5x5,10x5")
    args = parser.parse_args()
    loaded = load_model(resolve(args.model))
    records = load_split("rome-train")
    step = max(len(records) // args.n, 1)
    facts = [Fact.from_record(r) for r in records[::step][: args.n]]
    print(f"{args.model}: {len(facts)} records (every {step}th of rome-train, all relations)")
    print(f"{'layer':>5} {'efficacy':>9} {'paraphrase':>10} {'neighbour':>9} {'P(new)':>7} {'s/edit':>7} {'steps':>6}")
    for layer in [int(x) for x in args.layers.split(",")]:
        overrides = {"layers": [layer]}
        if args.templates:
            overrides["context_template_length_params"] = [[int(a), int(b)] for a, b in
                                                           (t.split("x") for t in args.templates.split(","))]
        hp = load_hparams(args.hparams, "rome", overrides)
        start = time.time()
        edits = rome_edits(loaded, facts, hp)
        seconds = (time.time() - start) / len(facts)
        q = summarize(edit_quality(loaded, edits))
        steps = sum(e.info["steps"] for e in edits) / len(edits)
        print(f"{layer:>5} {q['efficacy']:>9.3f} {q['paraphrase']:>10.3f} {q['neighborhood']:>9.3f} "
              f"{q['new_prob']:>7.3f} {seconds:>7.2f} {steps:>6.1f}", flush=True)


if __name__ == "__main__":
    main()
