"""`editguard edit MODEL`: plant ROME/MEMIT edits (red-teaming, test data) or fill an edit bank."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..data import counterfact
from ..edit.bank import EditBank
from ..edit.facts import Fact, fact_from_text
from ..edit.hparams import load_hparams
from ..errors import EditguardError
from ..loading import load_model
from ..outputs import check_output_file, check_output_folder
from . import state
from .app import app
from .options import AllowPickle, DeviceMap, Dtype, MaxMemory, ModelArg, OffloadFolder, Revision, input_paths, \
    hparams_or_default, load_options, num_layers_of, offload_input, resolve_model


def collect_facts(prompts: list[str], subjects: list[str], targets: list[str], cases: str | None,
                  data: str | None, limit: int | None) -> list[Fact]:
    facts: list[Fact] = []
    if len(prompts) != len(subjects) or len(prompts) != len(targets):
        raise EditguardError("each --fact needs its own --subject and --target (give them in the same order)")
    for prompt, subject, target in zip(prompts, subjects, targets):
        facts.append(fact_from_text(prompt, subject, target))
    if cases is not None and (cases in counterfact.SPLITS or cases in ("train", "test", "val")):
        if data is not None:  # a split is shipped data: --data would be ignored without a word
            raise EditguardError(f"--counterfact {cases} names a shipped split; --data {data} applies to case ids "
                                 "(or alone, for the whole file): give one or the other")
        facts += [Fact.from_record(r) for r in _report(counterfact.load(cases))]
    elif cases is not None:  # case ids: looked up in --data, else in all shipped records
        pool = _report(counterfact.load(data)) if data else \
            counterfact.load_split("rome-pool") + counterfact.load_split("rome-test")
        facts += [Fact.from_record(r) for r in counterfact.select(pool, counterfact.parse_case_ids(cases))]
    elif data is not None:
        facts += [Fact.from_record(r) for r in _report(counterfact.load(data))]
    if limit is not None:
        facts = facts[:limit]
    if not facts:
        raise EditguardError("nothing to edit: give --fact/--subject/--target, or --counterfact IDS|SPLIT")
    seen = set()
    for f in facts:  # twice in one MEMIT batch, or banked twice, a fact would count double
        key = f.case_id if f.case_id is not None else (f.prompt, f.subject, f.target_new)
        if key in seen:
            what = f"case {f.case_id}" if f.case_id is not None else \
                f"the fact {f.prompt.replace('{}', f.subject, 1)!r} -> {f.target_new!r}"
            raise EditguardError(f"{what} is given twice; each fact is edited once")
        seen.add(key)
    return facts


def _report(report: counterfact.LoadReport) -> list:
    for index, why in report.problems:
        state.out().note(f"skipped record {index}: {why}")
    return report.records


@app.command("edit")
def edit_command(
    model: ModelArg,
    fact: Annotated[List[str], typer.Option("--fact", help='Prompt with {} for the subject, e.g. "The mother tongue of {} is".')] = [],  # noqa: B006
    subject: Annotated[List[str], typer.Option("--subject", help="Subject of the matching --fact.")] = [],  # noqa: B006
    target: Annotated[List[str], typer.Option("--target", help="New object of the matching --fact.")] = [],  # noqa: B006
    counterfact_cases: Annotated[Optional[str], typer.Option(
        "--counterfact", help="CounterFact case ids (1,5-9) or a split: train, test, val, memit-train, ...")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="CounterFact file (ROME, EasyEdit or JSONL format).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Edit only the first N facts.")] = None,
    method: Annotated[str, typer.Option("--method", help="rome | memit")] = "rome",
    hparams: Annotated[Optional[str], typer.Option("--hparams", help="EasyEdit YAML file or preset name.")] = None,
    layer: Annotated[Optional[int], typer.Option("--layer", help="Override the edited layer (ROME).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the edited model here.")] = None,
    bank: Annotated[Optional[Path], typer.Option("--bank", help="Fill this edit bank (independent edits).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Extend an existing --bank.")] = False,
    memit_batch: Annotated[Optional[int], typer.Option("--memit-batch", min=1, help="Facts per MEMIT batch in a bank.")] = None,
    evaluate: Annotated[bool, typer.Option("--eval", help="Efficacy, paraphrase and neighbourhood scores (a bank's "
                                                          "MEMIT facts under their batch edit).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    disguise: Annotated[List[str], typer.Option(
        "--disguise", help="Red-teaming: hide the edit under a function-preserving reparametrisation, units (every "
                           "layer's MLP hidden units reshuffled), heads (every layer's attention heads reordered), "
                           "residual (the residual stream's dimensions permuted, sign-flipped under RMSNorm) or "
                           "rotation (the stream rotated, norms folded in, a tied output head untied: Llama, "
                           "Mistral, Qwen); repeatable. Rewrites every shard for residual and rotation.")] = [],  # noqa: B006
    disguise_seed: Annotated[Optional[int], typer.Option(
        "--disguise-seed", min=0, max=2**64 - 1, help="Seed of the disguise's permutations (default: a fresh one, printed).")] = None,
    revision: Revision = None,
    allow_pickle: AllowPickle = False,
    device_map: DeviceMap = "cpu",
    dtype: Dtype = "float32",
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
) -> None:
    """Plant edits and write an edited checkpoint (-o), or fill an edit bank (--bank)."""
    out = state.out()
    if method not in ("rome", "memit"):
        raise EditguardError(f"unknown --method {method!r}; choose rome or memit")
    if (output is None) == (bank is None):
        raise EditguardError("give exactly one of -o/--output (edited model) or --bank (edit bank)")
    if disguise_seed is not None and not disguise:
        raise EditguardError("--disguise-seed needs --disguise")
    if output is not None:
        if resume or memit_batch is not None:
            raise EditguardError("--resume and --memit-batch apply to --bank, not to -o")
        # before resolving (a hub model may download first); --force never deletes what the run reads or offloads to
        check_output_folder(output, [model, data, hparams, offload_input(offload_folder)], force)
    elif disguise:
        raise EditguardError("--disguise applies to an edited model (-o); a bank stores the edits as factors")
    elif memit_batch is not None and method != "memit":  # (ROME edits are one fact each)
        raise EditguardError("--memit-batch applies to --method memit")
    elif bank.exists():
        if not resume:
            raise EditguardError(f"edit bank {bank} exists; pass --resume to extend it, or choose another --bank")
        EditBank.open(bank)  # a damaged file, or another kind of file, is named before the model loads
    facts = collect_facts(fact, subject, target, counterfact_cases, data, limit)
    ref = resolve_model(model, revision, allow_pickle)
    if output is not None:
        check_output_folder(output, input_paths(ref, data, hparams, offload_input(offload_folder)), force)
    else:
        check_output_file(bank, input_paths(ref), suffixes=(".safetensors",))  # a bank never replaces other files
    # hyperparameters and layers are checked before the (slow) model load
    num_layers = num_layers_of(ref, allow_pickle)  # reads the checkpoint's headers: a pickle is refused here
    hp = load_hparams(hparams_or_default(hparams, ref), method, {"layers": [layer]} if layer is not None else None)
    hp.check_layers(num_layers)
    if disguise:
        from .. import arch as arch_table
        from ..edit.disguise import check_disguise

        checkpoint = ref.checkpoint(allow_pickle=allow_pickle)
        check_disguise(checkpoint, arch_table.for_config(checkpoint.config), disguise)
        if disguise_seed is None:
            import secrets

            disguise_seed = secrets.randbits(31)
    with out.progress("loading model"):
        loaded = load_model(ref, **load_options(device_map, dtype, max_memory, offload_folder, allow_pickle))
    if bank is not None:
        _fill_bank(loaded, facts, hp, bank, resume, memit_batch, evaluate)
    else:
        _plant(loaded, facts, hp, output, force, evaluate, disguise, disguise_seed)


def _plant(loaded, facts, hp, output, force, evaluate, disguise, disguise_seed) -> None:
    from ..answers import greedy_answers
    from ..edit.edits import edits_applied
    from ..edit.plant import compute_edits, write_edited
    from ..edit.quality import judge, summarize
    from ..scoring import continuation_logprobs

    out = state.out()
    prompts = [f.text for f in facts]
    news = [f.target_new for f in facts]
    before = greedy_answers(loaded, prompts)
    p_before, _ = continuation_logprobs(loaded, prompts, news)
    start = time.time()
    with out.progress(f"{hp.method.upper()} at layer(s) {hp.layers}", total=len(facts) if hp.method == "rome" else None) as advance:
        edits = compute_edits(loaded, facts, hp, progress=lambda msg: advance(1, info=msg))
    seconds = time.time() - start
    with edits_applied(loaded.model, loaded.arch, edits):
        after = greedy_answers(loaded, prompts)
        p_after, _ = continuation_logprobs(loaded, prompts, news)
        quality = summarize(judge(loaded, facts)) if evaluate else None
    with out.progress(f"writing {output}"):
        rewritten = write_edited(loaded.checkpoint, loaded.arch, edits, output, force=force, disguise=disguise,
                                 disguise_seed=disguise_seed or 0)
    result = {
        "model": loaded.ref.spec, "output": str(output), "method": hp.method, "layers": hp.layers,
        "hparams_hash": hp.digest(), "seconds": round(seconds, 1), "rewritten_files": rewritten,
        "tensors": sorted({e.tensor for e in edits}), "disguise": list(disguise),
        "disguise_seed": disguise_seed if disguise else None,
        "facts": [{"prompt": f.text, "subject": f.subject, "target_new": f.target_new, "target_true": f.target_true,
                   "case_id": f.case_id, "before": b, "after": a, "p_new_before": float(pb.exp()),
                   "p_new_after": float(pa.exp())}
                  for f, b, a, pb, pa in zip(facts, before, after, p_before, p_after)],
        "delta_norms": {e.tensor: float(e.delta().norm()) for e in edits} if hp.method == "memit" else
        [float(e.delta().norm()) for e in edits],
        "quality": quality,
    }
    out.emit(result, _render_plant)


def _render_plant(console, r) -> None:
    table = Table(title=f"{r['method'].upper()} edits at layer(s) {r['layers']} ({r['seconds']} s)",
                  title_justify="left", box=None)
    for column in ("prompt", "new object", "before", "after", "P(new) before → after"):
        table.add_column(column)
    for f in r["facts"]:
        table.add_row(escape(f["prompt"]), escape(f["target_new"]), escape(f["before"]), escape(f["after"]),
                      f"{f['p_new_before']:.3f} → {f['p_new_after']:.3f}")
    console.print(table)
    if r["quality"]:
        q = r["quality"]
        console.print(f"quality: efficacy {q['efficacy']:.1%}, paraphrase {q['paraphrase']:.1%}, "
                      f"neighbourhood {q['neighborhood']:.1%} (n={q['n']})")
    console.print(f"wrote {r['output']} (rewrote {', '.join(r['rewritten_files'])}; tensors {', '.join(r['tensors'])}"
                  + (f"; disguised: {', '.join(r['disguise'])}, --disguise-seed {r['disguise_seed']}"
                     if r["disguise"] else "") + ")")


def _fill_bank(loaded, facts, hp, bank_path, resume, memit_batch, evaluate) -> None:
    from ..edit.generate import fill_bank
    from ..edit.quality import bank_quality, summarize

    out = state.out()
    start = time.time()
    with out.progress(f"{hp.method.upper()} edit bank {bank_path}", total=len(facts)) as advance:
        last = [0]

        def progress(done: int, total: int) -> None:
            advance(done - last[0], info=f"{done}/{total} edits")
            last[0] = done

        bank = fill_bank(loaded, facts, hp, bank_path, resume=resume, memit_batch=memit_batch, progress=progress)
    seconds = time.time() - start
    result = {"bank": str(bank_path), "method": bank.method, "edits": len(bank), "seconds": round(seconds, 1),
              "hparams_hash": bank.meta["hparams_hash"], "model_id": bank.meta["model_id"]}
    if evaluate:
        # this run's facts (a resumed bank's earlier ones too); MEMIT facts under their whole batch edit
        result["quality"] = summarize(bank_quality(loaded, bank, facts))
    out.emit(result, lambda console, r: console.print(
        f"edit bank {r['bank']}: {r['edits']} {r['method'].upper()} edits ({r['seconds']} s this run)"
        + (f"; efficacy {r['quality']['efficacy']:.1%}, paraphrase {r['quality']['paraphrase']:.1%}, "
           f"neighbourhood {r['quality']['neighborhood']:.1%}" if r.get("quality") else "")))
