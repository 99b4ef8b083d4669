"""Shipped masks side by side on the same MEMIT batch edits of the demo model.

    python bench/masks_on_memit.py masks/smollm2-135m_memit.safetensors masks/smollm2-135m_rome_L9.safetensors \
        masks/smollm2-135m_rome_L9_mlp.safetensors masks/smollm2-135m_rome.safetensors

The bank's batch edits of memit-test (the MEMIT mask's test split: the first N records, whole batches),
each fact judged with its own batch edit applied and then each mask, whatever method or layer the mask
was trained for: does a mask trained against ROME at one layer also undo MEMIT edits spread over
layers 2-6? Columns: RSR (the edited, masked model prefers the true object, full multi-token
log-prob), RSR among the facts the original model knew, the mask on the unedited model (control), and
RSR over the original model's own ceiling. `--per-layer` adds, for a mask over several layers, a row for
each layer's part alone and one for each run of its lowest layers (which layers does the reversal come
from?).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from editguard.data.counterfact import load_split
from editguard.edit.bank import EditBank
from editguard.edit.facts import Fact
from editguard.loading import load_model
from editguard.mask.file import MaskFile
from editguard.mask.splits import MemitSplit
from editguard.resolve import resolve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("masks", nargs="+")
    parser.add_argument("--model", default="demo:smollm2-135m")
    parser.add_argument("--bank", default="banks/smollm2-135m_memit.safetensors")
    parser.add_argument("--n", type=int, default=200, help="memit-test records (whole batch edits)")
    parser.add_argument("--per-layer", action="store_true", help="also each layer's part of a mask, alone and "
                        "with the layers below it")
    args = parser.parse_args()

    loaded = load_model(resolve(args.model))
    bank = EditBank.open(args.bank)
    # the MEMIT mask's own test split, as `train --method memit --test-size N` takes it
    split = MemitSplit.from_bank(bank, [Fact.from_record(r) for r in load_split("memit-test")[: args.n]])
    rows = []
    for path in args.masks:
        mask = MaskFile.load(path)
        mask.check_fits(loaded.arch, loaded.checkpoint)
        parts = [(Path(path).name, list(range(len(mask.targets))))]
        layers = sorted({t.layer for t in mask.targets})
        if args.per_layer and len(layers) > 1:
            def of(chosen: set[int]) -> list[int]:
                return [i for i, t in enumerate(mask.targets) if t.layer in chosen]

            parts += [(f"  layer {layer} alone", of({layer})) for layer in layers]
            parts += [(f"  layers {layers[0]}-{top}", of(set(layers[:k + 1])))
                      for k, top in enumerate(layers) if 0 < k < len(layers) - 1]  # the last run is the mask
        modules, masks = mask.modules(), mask.masks()
        for name, chosen in parts:
            started = time.time()
            r = split.report(loaded, [modules[i] for i in chosen], [masks[i] for i in chosen], baselines=False)
            at = sorted({mask.targets[i].layer for i in chosen})
            rows.append((name, mask.method, f"{at[0]}-{at[-1]}" if len(at) > 1 else str(at[0]), len(chosen),
                         r["rsr"], r["rsr_known"], r["mask_on_unedited_prefers_true"],
                         r["rsr"] / r["original_prefers_true"], time.time() - started))
    print(f"{len(split.facts)} memit-test facts in {len(split.groups)} batch edit(s) of {args.bank}; original prefers "
          f"true {100 * r['original_prefers_true']:.1f} %, edited {100 * r['edited_prefers_true']:.1f} %")
    print("| mask | trained on | layers | tensors | RSR | RSR known | mask on unedited | RSR / ceiling | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, method, layers, n, rsr, known, control, ratio, secs in rows:
        print(f"| {name} | {method} | {layers} | {n} | {100 * rsr:.1f} % | {100 * known:.1f} % | {100 * control:.1f} % "
              f"| {ratio:.2f} | {secs:.0f} |")


if __name__ == "__main__":
    main()
