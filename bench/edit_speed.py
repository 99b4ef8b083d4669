"""ROME edit speed: editguard's fast path against the EasyEdit-style reference loop, same facts, one run.

    python bench/edit_speed.py --model demo:smollm2-135m --n 8 [--profile] [--context-templates '5,10;10,10']

Prints facts/minute for each path, the ratio, and the largest relative difference of ΔW between them
(over the facts both paths stopped at the same step; any other fact is listed apart).
The reference is one fact at a time with a full forward of every prompt at every step (EasyEdit's
compute_v); the fast path batches facts, caches prefixes and lower layers, reads logits only where the
loss does. Both use the same preset (including its context templates).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from editguard.data.counterfact import load_split
from editguard.edit.facts import Fact
from editguard.edit.hparams import load_hparams
from editguard.edit.rome import prepare, rome_edit_reference, rome_edits, templates_for
from editguard.loading import load_model
from editguard.resolve import resolve


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo:smollm2-135m")
    parser.add_argument("--hparams", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=8, help="facts (spread over the relations of rome-train)")
    parser.add_argument("--device-map", default="cpu", help="cpu | cuda | ... (both paths run there)")
    parser.add_argument("--profile", action="store_true", help="print where the fast path spends its time")
    parser.add_argument("--context-templates", default=None, metavar="N,L;N,L",
                        help="override the preset's context_template_length_params, e.g. '5,10;10,10' "
                             "(EasyEdit's Llama value: 21 templates)")
    args = parser.parse_args()
    loaded = load_model(resolve(args.model), device_map=args.device_map)
    hp = load_hparams(args.hparams, "rome")
    if args.context_templates:
        hp.context_template_length_params = [[int(x) for x in pair.split(",")]
                                             for pair in args.context_templates.split(";")]
    hp = prepare(loaded, hp)
    templates_for(loaded, hp)  # sampled once, shared by both paths (not timed)
    records = load_split("rome-train")
    facts = [Fact.from_record(r) for r in records[:: len(records) // args.n][: args.n]]

    start = time.perf_counter()
    if args.profile:
        profiler = cProfile.Profile()
        fast = profiler.runcall(rome_edits, loaded, facts, hp)
    else:
        fast = rome_edits(loaded, facts, hp)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    reference = [rome_edit_reference(loaded, fact, hp) for fact in facts]
    ref_s = time.perf_counter() - start

    rel = [float((f.delta() - r.delta()).norm() / r.delta().norm()) for f, r in zip(fast, reference)]
    same = [f.info["steps"] == r.info["steps"] for f, r in zip(fast, reference)]
    # a fact whose loss lands on the early-stop threshold may stop one step earlier on one path (float
    # rounding decides): its ΔW then differs by a step, not by rounding; reported apart
    rel_same = max((x for x, s in zip(rel, same) if s), default=float("nan"))
    apart = [x for x, s in zip(rel, same) if not s]
    print(f"{args.model} on {loaded.device}, preset {args.hparams}: {len(facts)} facts, layer {hp.layers[0]}, "
          f"{len(templates_for(loaded, hp))} context templates, {hp.v_num_grad_steps} steps max")
    print(f"{'path':<10} {'seconds':>8} {'facts/min':>10}")
    print(f"{'reference':<10} {ref_s:>8.1f} {60 * len(facts) / ref_s:>10.2f}")
    print(f"{'fast':<10} {fast_s:>8.1f} {60 * len(facts) / fast_s:>10.2f}")
    print(f"speed-up {ref_s / fast_s:.1f}x; max relative ΔW difference {rel_same:.2e} "
          f"(same step count: {sum(same)}/{len(facts)} facts)")
    if apart:
        print(f"{len(apart)} fact(s) stopped at another step on the early-stop threshold: "
              f"relative ΔW difference {', '.join(f'{x:.2e}' for x in apart)}")
    if args.profile:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
