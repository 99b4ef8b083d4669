"""`editguard train` and `editguard evaluate-mask`: regenerate a shared mask from CounterFact."""

from __future__ import annotations

import math
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from .. import arch as arch_table
from ..cpu_precision import bfloat16_hint
from ..edit.hparams import load_hparams
from ..errors import EditguardError
from ..intervals import interval_text
from ..loading import load_model
from ..mask.evaluate import rsr_interval
from ..mask.file import gamma_text
from ..outputs import check_output_file
from . import state
from .app import app
from .options import (AllowPickle, DeviceMap, Dtype, MaxMemory, OffloadFolder, Revision, check_share, hparams_or_default,
                      input_paths, load_options, num_layers_of, resolve_model)


# TrainConfig fields with an option of their own
RESERVED_SETTINGS = {"epochs": "--epochs", "batch_records": "--batch", "lr": "--lr", "seed": "--seed",
                     "checkpoint_every": "--checkpoint-every", "threshold": "--threshold", "sparsity_max": "--max-pruned"}


class _Bars:
    """One Rich bar per pipeline stage, created when the stage first reports."""

    def __init__(self, stack: ExitStack, first_notes: dict[str, str] | None = None):
        self.stack, self.bars, self.done = stack, {}, {}
        self.first_notes = first_notes or {}  # stage -> a line printed as that stage starts

    def __call__(self, stage: str, done: int, total: int, info: str) -> None:
        if stage == "validation":
            state.out().note(f"step {done}: {info}")
            return
        if stage not in self.bars:
            if stage in self.first_notes:
                state.out().note(self.first_notes[stage])
            self.bars[stage] = self.stack.enter_context(state.out().progress(stage, total=total))
            self.done[stage] = 0
        self.bars[stage](done - self.done[stage], info=info)
        self.done[stage] = done


def _check_cut(threshold: float | None, target_pruned: float | None) -> None:
    """Where to binarise: a threshold γ or a pruned share, not both."""
    if threshold is not None and target_pruned is not None:
        raise EditguardError("give --threshold or --target-pruned, not both")
    check_share("--threshold", threshold)
    check_share("--target-pruned", target_pruned)


@app.command("train")
def train_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Mask file to write (masks/NAME.safetensors).")],
    model: Annotated[str, typer.Option("--model", help="Model reference (see `inspect`).")] = "demo:smollm2-135m",
    method: Annotated[str, typer.Option("--method", help="Edit method the mask must reverse: rome | memit.")] = "rome",
    layer: Annotated[Optional[int], typer.Option("--layer", help="Edited layer (default: the edit preset's).")] = None,
    hparams: Annotated[Optional[str], typer.Option("--hparams", help="Edit hyperparameters (YAML or preset).")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="CounterFact file (default: the paper's splits).")] = None,
    train_size: Annotated[int, typer.Option("--train-size", min=1)] = 600,
    val_size: Annotated[int, typer.Option("--val-size", min=0)] = 100,
    val_every: Annotated[Optional[int], typer.Option("--val-every", min=1, help="Validate every N epochs "
                                                     "(default: about 20 points over the run).")] = None,
    test_size: Annotated[int, typer.Option("--test-size", min=1)] = 500,
    preset: Annotated[str, typer.Option("--preset", help="Training schedule: cpu | paper.")] = "cpu",
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1)] = None,
    batch: Annotated[Optional[int], typer.Option("--batch", min=1, help="Records per step (3 prompts each).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr")] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Binarisation threshold γ.")] = None,
    target_pruned: Annotated[Optional[float], typer.Option(
        "--target-pruned", help="Instead of γ: prune this share (γ chosen from the scores).")] = None,
    max_pruned: Annotated[Optional[float], typer.Option(
        "--max-pruned", help="S_max: the pruned share above which the training loss penalises (default 0.10).")] = None,
    whole_mlp: Annotated[bool, typer.Option("--whole-mlp", help="Mask the masked layers' MLP input "
                                            "projections too (the pruned share counts all of them).")] = False,
    mask_layer: Annotated[Optional[list[int]], typer.Option("--mask-layer", min=0, help="MEMIT: mask this layer's "
                                                            "MLP output projection (below, among or above the "
                                                            "edited layers; repeatable) instead of the edited "
                                                            "ones.")] = None,
    bank: Annotated[Optional[Path], typer.Option("--bank", help="Edit bank to reuse and extend.")] = None,
    memit_batch: Annotated[Optional[int], typer.Option("--memit-batch", min=1, help="MEMIT: training records per "
                                                       "batch edit (default: all in one, as the paper).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a killed run from its checkpoint.")] = False,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    checkpoint_every: Annotated[Optional[int], typer.Option("--checkpoint-every", min=1)] = None,
    text_tokens: Annotated[int, typer.Option("--text-tokens", min=2, help="WikiText-2 tokens for perplexity.")] = 70_000,
    no_baselines: Annotated[bool, typer.Option("--no-baselines", help="Skip the SVD and magnitude baselines.")] = False,
    bank_only: Annotated[bool, typer.Option("--bank-only", help="Only build the edit bank (e.g. in the background).")] = False,
    select: Annotated[str, typer.Option("--select", help="Ship the mask from the best validation point (best) "
                                        "or the last step (last).")] = "best",
    settings: Annotated[Optional[list[str]], typer.Option(
        "--set", metavar="KEY=VALUE", help="Any other training setting, repeatable: margin, margin_unknown (the "
        "margin's weight where the original model does not prefer the true object; not in the paper), beta_kl, "
        "beta_anchor (KL of the mask on the unedited model; not in the paper), tau_start, "
        "tau_decay, lambda_start, lambda_end, temp_start, temp_end, theta_mean, theta_std, weight_decay, grad_clip, "
        "betas (B1,B2), paraphrases.")] = None,
    revision: Revision = None,
    allow_pickle: AllowPickle = False,
    device_map: DeviceMap = "cpu",
    dtype: Dtype = "float32",
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
) -> None:
    """Train a shared mask against edits of MODEL, evaluate it, and write it with its card."""
    from ..mask.pipeline import (MASK_LAYER_IS_FOR_MEMIT, TrainJob, check_mask_layers, mask_writer, preflight, run,
                                 written_beside)
    from ..mask.train import config_for, parse_settings

    if method not in ("rome", "memit"):
        raise EditguardError(f"unknown --method {method!r}; choose rome or memit")
    if select not in ("best", "last"):
        raise EditguardError(f"unknown --select {select!r}; choose best or last")
    if mask_layer and method != "memit":
        raise EditguardError(MASK_LAYER_IS_FOR_MEMIT)
    if memit_batch is not None and method != "memit":  # (ROME edits are one fact each)
        raise EditguardError("--memit-batch applies to --method memit")
    if val_size == 0 and val_every is not None:
        raise EditguardError("--val-every needs validation records: give --val-size above 0")
    _check_cut(threshold, target_pruned)
    check_share("--max-pruned", max_pruned)
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise EditguardError(f"--lr must be a positive number, got {lr}")
    # settings with an option of their own take it; all are checked before the model is loaded
    overrides = dict(epochs=epochs, batch_records=batch, lr=lr, seed=seed, checkpoint_every=checkpoint_every,
                     threshold=threshold, sparsity_max=max_pruned)
    cfg = config_for(preset, method, parse_settings(settings or [], RESERVED_SETTINGS), **overrides)
    ref = resolve_model(model, revision, allow_pickle)
    check_output_file(output, input_paths(ref, bank))  # the card, plots and index go beside it: never into the model
    if bank is not None:  # a new bank is written: never inside the model; no bank under the mask's names
        if not bank.exists():  # .safetensors: never the index, a card or a figure this run writes
            check_output_file(bank, input_paths(ref), suffixes=(".safetensors",))
        if bank.resolve() in {p.resolve() for p in written_beside(output)}:
            raise EditguardError(f"--bank {bank} is a file this run writes for the mask; choose another name")
    hp = load_hparams(hparams_or_default(hparams, ref), method, {"layers": [layer]} if layer is not None else None)
    job = TrainJob(output=output, method=method, train_size=train_size, val_size=val_size, val_every=val_every,
                   test_size=test_size,
                   data=data, bank=bank, threshold=threshold, target_pruned=target_pruned, resume=resume,
                   text_tokens=text_tokens, baselines=not no_baselines, bank_only=bank_only, select=select,
                   memit_batch=memit_batch, whole_mlp=whole_mlp, mask_layers=tuple(mask_layer or ()))
    num_layers = num_layers_of(ref, allow_pickle)
    hp.check_layers(num_layers)  # these, and preflight's checks, before the slow load
    check_mask_layers(num_layers, hp, job.mask_layers)
    with mask_writer(output):  # held to the end: one run (or resume) of a mask at a time
        preflight(hp, job)
        keep = []  # a whole-MLP mask's input projections stay on a real device too (output projections always do)
        if whole_mlp:
            arch = arch_table.for_config(ref.checkpoint(allow_pickle=allow_pickle).config)
            keep = [path for layer in job.mask_layers or hp.layers for path in arch.mlp_in_modules(layer)]
        with state.out().progress("loading model"):
            loaded = load_model(ref, **load_options(device_map, dtype, max_memory, offload_folder, allow_pickle),
                                keep_on_device=keep)
        # said as training starts, once every input has passed (bad input answers with its one line alone)
        hint = bfloat16_hint() if dtype == "float32" and loaded.device.type == "cpu" else None
        with ExitStack() as stack:
            metrics = run(loaded, hp, cfg, job, progress=_Bars(stack, {"training": hint} if hint else None))
        if bank_only:
            state.out().emit(metrics, lambda console, m: console.print(f"edit bank {m['bank']}: {m['edits']} edits"))
            return
        state.out().emit({"mask": str(output), **metrics}, _render)


# the figures next to RSR, in the order a reader checks them; absent ones (e.g. --no-baselines) are left out
_RSR_DETAILS = (("original_prefers_true", "original prefers true"), ("rsr_known", "among known"),
                ("edited_prefers_true", "edited"), ("mask_on_unedited_prefers_true", "mask on unedited"),
                ("rsr_mask_on_weights_only", "mask on base weights only"),
                ("rsr_mask_on_edit_only", "mask on the edit only"), ("baseline_svd_rsr", "SVD baseline"),
                ("baseline_magnitude_rsr", "magnitude baseline"))


def _rsr_details(r: dict) -> str:
    return ", ".join(f"{label} {r[key]:.1%}" for key, label in _RSR_DETAILS if r.get(key) is not None)


def _render(console, m) -> None:
    test = m["rsr"].get("test", {})
    console.print(f"wrote {m['mask']} (+ .md card, .json metrics, figures; index.json updated)")
    console.print(f"pruned {m['pruned_fraction']:.1%} at γ={gamma_text(m['threshold'])}; test RSR {test.get('rsr', float('nan')):.1%}"
                  f"{interval_text(rsr_interval(test))} ({_rsr_details(test)}); perplexity original "
                  f"{m['text']['original']['perplexity']:.2f} → pruned {m['text']['pruned']['perplexity']:.2f}; "
                  f"{m['total_seconds']:.0f} s")


@app.command("evaluate-mask")
def evaluate_mask_command(
    mask: Annotated[Path, typer.Argument(help="Mask file to evaluate.")],
    bank: Annotated[Path, typer.Option("--bank", help="Edit bank holding edits of the records (as train writes it).")],
    model: Annotated[str, typer.Option("--model", help="Model the mask and bank belong to.")] = "demo:smollm2-135m",
    data: Annotated[Optional[str], typer.Option("--data", help="CounterFact file (default: the paper's splits).")] = None,
    train_size: Annotated[int, typer.Option("--train-size", min=1, help="As in training (splits a --data file).")] = 600,
    val_size: Annotated[int, typer.Option("--val-size", min=0)] = 100,
    test_size: Annotated[int, typer.Option("--test-size", min=1)] = 500,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Re-binarise the soft scores at γ.")] = None,
    target_pruned: Annotated[Optional[float], typer.Option(
        "--target-pruned", help="Instead of γ: re-binarise so this share is pruned.")] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Write the re-binarised mask with the figures measured here (card, index).")] = None,
    text_tokens: Annotated[int, typer.Option("--text-tokens", min=2)] = 70_000,
    no_baselines: Annotated[bool, typer.Option("--no-baselines")] = False,
    splits: Annotated[str, typer.Option("--splits", help="Which of the training run's splits to report "
                                        "(comma-separated; train is capped at 500 records, as in training).")
                      ] = "train,val,test",
    extra: Annotated[Optional[str], typer.Option("--extra", help="Also report another CounterFact split (e.g. "
                                                 "memit-test) or file; edits the bank lacks are made now, in a copy.")
                     ] = None,
    extra_size: Annotated[Optional[int], typer.Option("--extra-size", min=1, help="Records of --extra (default: "
                                                      "its first 100, or all if fewer).")] = None,
    memit_batch: Annotated[Optional[int], typer.Option(
        "--memit-batch", min=1, help="MEMIT: records per batch edit made for --extra (default: all in one).")] = None,
    average: Annotated[Optional[list[Path]], typer.Option(
        "--average", help="Average this mask's soft scores into MASK's before the cut (repeatable; masks of the "
        "same tensors, e.g. other --seed runs); needs --threshold or --target-pruned.")] = None,
    revision: Revision = None,
    allow_pickle: AllowPickle = False,
    device_map: DeviceMap = "cpu",
    dtype: Dtype = "float32",
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
) -> None:
    """RSR (with ceiling and controls), baselines and model cost of MASK against the edits in --bank;
    with -o, also write MASK re-binarised at --threshold / --target-pruned, carrying these figures."""
    from ..edit.bank import EditBank
    from ..mask.average import averaged
    from ..mask.file import MaskFile
    from ..mask.pipeline import (TrainJob, check_bank_for_mask, check_new_mask_path, evaluate_existing, extra_records,
                                 mask_writer, recover_publish, select_splits, write_rebinarised)

    _check_cut(threshold, target_pruned)
    chosen = tuple(dict.fromkeys(s.strip() for s in splits.split(",") if s.strip()))
    if not chosen or not set(chosen) <= {"train", "val", "test"}:
        raise EditguardError(f"--splits {splits!r}: a comma-separated choice of train, val, test")
    with ExitStack() as held:  # one writer of the -o name, from its first check to the write
        if output is not None:
            held.enter_context(mask_writer(Path(output)))
            recover_publish(Path(output))  # a killed earlier write of this name left part of its set
            check_new_mask_path(output)  # before the evaluation, not after minutes of it
        if average and threshold is None and target_pruned is None:
            raise EditguardError("--average needs --threshold or --target-pruned: averaged scores have no trained cut")
        mask_file = MaskFile.load(mask)
        if average:
            mask_file = averaged([mask_file, *map(MaskFile.load, average)], [mask, *average])
        if memit_batch is not None and (extra is None or mask_file.method != "memit"):
            raise EditguardError("--memit-batch shapes the MEMIT batch edits made for --extra; "
                                 + ("there is no --extra" if extra is None else "this mask is for ROME edits"))
        job = TrainJob(output=mask, method=mask_file.method, train_size=train_size, val_size=val_size,
                       test_size=test_size, data=data, text_tokens=text_tokens, baselines=not no_baselines,
                       target_pruned=target_pruned, splits=chosen, extra=extra, extra_size=extra_size,
                       memit_batch=memit_batch)
        if extra is not None:
            extra_records(job)  # a bad name, file or case id is found before the model loads
        select_splits(job)  # a bad --data file, too
        bank_file = EditBank.open(bank)
        check_bank_for_mask(mask_file, bank_file)  # before the model loads
        ref = resolve_model(model, revision, allow_pickle)
        if output is not None:
            check_output_file(output, input_paths(ref, mask, bank, *(average or [])))
        with state.out().progress("loading model"):
            loaded = load_model(ref, **load_options(device_map, dtype, max_memory, offload_folder, allow_pickle),
                                keep_on_device=mask_file.module_paths())
        with ExitStack() as stack:
            result, masks = evaluate_existing(loaded, mask_file, bank_file, job, threshold, progress=_Bars(stack))
        if average:
            result["averaged_with"] = [str(p) for p in average]
        if output is not None:
            write_rebinarised(output, mask_file, mask, result, masks, job.command)
            result["written"] = str(output)
        state.out().emit(result, _render_evaluation)


def _render_evaluation(console, m) -> None:
    averaged = "".join(f" + {p}" for p in m.get("averaged_with", []))
    console.print(f"{m['mask']}{averaged}: γ={gamma_text(m['threshold'])}, pruned {m['pruned_fraction']:.1%}")
    if "written" in m:
        console.print(f"wrote {m['written']} (+ .md card, .json metrics, figures; index.json updated)")
    for split, r in m["rsr"].items():
        console.print(f"  {split}: RSR {r['rsr']:.1%}{interval_text(rsr_interval(r))} ({_rsr_details(r)}; n={r['n']})")
    for split, why in m.get("not_reported", {}).items():
        console.print(f"  {split}: not reported ({escape(why)})")
    t = m["text"]
    console.print(f"  perplexity: original {t['original']['perplexity']:.2f}, edited {t['edited']['perplexity']:.2f}, "
                  f"pruned {t['pruned']['perplexity']:.2f}; Top-1 agreement (pruned) {t['pruned']['top1_agreement']:.1%}")
