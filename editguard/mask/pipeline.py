"""`editguard train` as a library call: data -> edit bank -> training -> threshold -> evaluation -> files.

Outputs next to the mask `NAME.safetensors`: `NAME.json` (metrics), `NAME.md` (the card), `NAME-*.png`
(figures), `NAME.ckpt.safetensors` while training (removed at the end) and an entry in the folder's
`index.json`, which `inspect` and `scan` consult.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from .. import __version__
from ..checkpoint import fingerprint, remove_stale_temps, temp_leftovers
from ..data import counterfact
from ..edit.bank import EditBank
from ..edit.edits import Edit
from ..edit.facts import Fact
from ..edit.generate import dtype_name, fill_bank, target_fingerprints
from ..edit.hparams import EditHparams
from ..errors import EditguardError
from ..home import folder_lock, path_lock
from ..intervals import interval_text
from ..loading import LoadedModel
from ..masks_index import INDEX, file_sha256, perplexity_increase, read_index
from ..outputs import finite_dumps, write_text_atomic
from . import plots
from .evaluate import masks_applied, rsr_interval, text_metrics
from .file import MaskFile, MaskTarget, gamma_text
from .splits import MemitSplit, RomeSplit
from .train import (MaskTrainer, TrainConfig, TrainState, checkpoint_info, data_hash, load_checkpoint, make_optimizer,
                    prepare_prompts, save_checkpoint)

Progress = Callable[[str, int, int, str], None]  # (stage, done, total, info)
VAL_POINTS = 20  # validation costs a pass over the val edits: ~20 points draw the curve without doubling a long run


@dataclass
class TrainJob:
    output: Path
    method: str = "rome"
    train_size: int = 600
    val_size: int = 100
    val_every: int | None = None  # epochs between validations; None: about VAL_POINTS over the run
    test_size: int = 500
    data: str | None = None  # None: the paper's splits
    bank: Path | None = None
    threshold: float | None = None
    target_pruned: float | None = None  # choose γ on validation so this share is pruned
    resume: bool = False
    text_tokens: int = 70_000
    baselines: bool = True
    bank_only: bool = False  # stop once the edit bank holds every record
    # MEMIT: training records per batch edit (None: all in one, as the paper); evaluate-mask: the --extra
    # records' batch edits
    memit_batch: int | None = None
    select: str = "best"  # ship the mask from the best validation point ("best") or the last step ("last")
    whole_mlp: bool = False  # mask the edited layers' MLP input projections beside the edited ones
    # MEMIT: mask these layers' output projections (below, among or above the edited ones) instead of
    # the edited tensors; empty: the edited tensors
    mask_layers: tuple[int, ...] = ()
    splits: tuple[str, ...] = ("train", "val", "test")  # evaluate-mask: which of the job's splits to report
    extra: str | None = None  # evaluate-mask: another CounterFact split or file, reported as "extra"
    extra_size: int | None = None  # records of `extra` (None: the first EXTRA_DEFAULT, or fewer)
    command: str = field(default_factory=lambda: " ".join(shlex.quote(a) for a in ["editguard"] + sys.argv[1:]))


def per_relation(records: list, n: int) -> list:
    """The first records of each relation, round-robin, n in all (splits are relation-ordered)."""
    by_rel: dict[str, list] = {}
    for r in records:
        by_rel.setdefault(r.relation, []).append(r)
    out, i = [], 0
    while len(out) < n and any(i < len(v) for v in by_rel.values()):
        for rel in by_rel:
            if i < len(by_rel[rel]) and len(out) < n:
                out.append(by_rel[rel][i])
        i += 1
    return out


# how far the pruned share may land from --target-pruned where scores tie (stored scores are float16)
TARGET_TOLERANCE = 0.005


def _sigmoid(x: float) -> float:
    """In float64, without overflow and with full precision on both sides of 0."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def cut_point(keys: list[torch.Tensor], job: TrainJob, cfg: TrainConfig, logits: bool = False) -> tuple[float, float]:
    """(γ, cut): masks keep the weights whose key is ≥ cut. `keys` are soft scores K (cut = γ) or their
    logits Θ/τ_end (`logits`), which rank alike but never round to 1 as float32 scores do past a logit
    of ~17 (a sharper τ anneal than the paper's made 95 % of them tie). γ is given, or the key that prunes
    `target_pruned` of the weights (of all targets together), the next one above the k smallest. Where
    many keys tie no cut prunes that share: one clear error with the shares that can be had, never a
    silently different cut."""
    if job.target_pruned is None:
        gamma = job.threshold if job.threshold is not None else cfg.threshold
        return gamma, (_logit(gamma) if logits else gamma)
    flat = torch.cat([s.reshape(-1).float() for s in keys])
    k = max(round(job.target_pruned * flat.numel()), 1)
    cut = float(flat.kthvalue(min(k + 1, flat.numel())).values)
    got = float((flat < cut).float().mean())
    gamma = _sigmoid(cut) if logits else cut
    if logits and not 0 < gamma < 1:
        raise EditguardError(f"the soft masks end too sharp for a threshold: the cut lies at Θ/τ_end = {cut:.0f}, "
                             f"where γ rounds to {gamma:g}; anneal less sharply (a smaller tau_decay)")
    if not 0 < gamma < 1 or abs(got - job.target_pruned) > TARGET_TOLERANCE:
        tied = float(flat.kthvalue(k).values)
        below, above = float((flat < tied).float().mean()), float((flat <= tied).float().mean())
        # scores of 1: a sharply annealed mask's, rounded; only shares up to `below` can be cut from them
        hint = "its own cut (no --threshold or --target-pruned)" if tied >= 1 and not logits else "--threshold"
        raise EditguardError(f"--target-pruned {job.target_pruned:g} cannot be cut from these scores: they tie "
                             f"there, so a threshold prunes {below:.2%} or {above:.2%}; choose a share outside "
                             f"that span, or {hint}")
    return gamma, cut


def choose_threshold(scores: list[torch.Tensor], job: TrainJob, cfg: TrainConfig) -> float:
    """γ for soft scores K (masks keep s ≥ γ): see cut_point."""
    return cut_point(scores, job, cfg)[0]


def binarise(logits: list[torch.Tensor], job: TrainJob, cfg: TrainConfig) -> tuple[float, list[torch.Tensor]]:
    """(γ, binary masks) from the logits Θ/τ_end of the final soft masks."""
    gamma, cut = cut_point(logits, job, cfg, logits=True)
    return gamma, [(s >= cut).float() for s in logits]


def pruned_share(masks: list[torch.Tensor]) -> float:
    return float(torch.cat([(1 - K).reshape(-1) for K in masks]).mean())


def select_splits(job: TrainJob) -> tuple[list, list, list]:
    if job.data:
        # strict: a skipped record would shift every split boundary after it without a word
        records = counterfact.load(job.data, strict=True).records
        train = records[: job.train_size]
        val = records[job.train_size: job.train_size + job.val_size]
        test = records[job.train_size + job.val_size: job.train_size + job.val_size + job.test_size]
    elif job.method == "memit":
        train = counterfact.load_split("memit-train")[: job.train_size]
        val = per_relation(counterfact.load_split("rome-val"), job.val_size)
        test = counterfact.load_split("memit-test")[: job.test_size]
    else:
        train = per_relation(counterfact.load_split("rome-train"), job.train_size)
        val = per_relation(counterfact.load_split("rome-val"), job.val_size)
        test = per_relation(counterfact.load_split("rome-test"), job.test_size)
    short = [f"--{name}-size {want} ({len(got)} available)" for name, want, got in
             (("train", job.train_size, train), ("val", job.val_size, val), ("test", job.test_size, test))
             if len(got) < want]
    if short:  # never a smaller split than asked for without a word: the card would report other figures
        raise EditguardError(f"not enough records for {', '.join(short)}")
    if not train or not test:
        raise EditguardError("not enough records for a train and a test split")
    seen: set[int] = set()
    for record in (*train, *val, *test):  # edits are banked by case id: a repeated id would reuse another's edit
        if record.case_id in seen:
            raise EditguardError(f"case_id {record.case_id} appears twice in the chosen records; case ids must be unique")
        seen.add(record.case_id)
    return train, val, test


def mask_targets(loaded: LoadedModel, hp: EditHparams, whole_mlp: bool = False, mask_layers: tuple[int, ...] = ()
                 ) -> tuple[list[tuple[str, bool]], list[int]]:
    """(module path, transposed) of every tensor the mask covers, and each one's layer: the tensors the
    method edits (ROME's one layer, MEMIT's several), or the output projections of `mask_layers` (edited
    or not), then with `whole_mlp` these layers' MLP input projections, which are masked and never
    edited."""
    edited = sorted(mask_layers or hp.layers)
    template = hp.rewrite_module_tmp or loaded.arch.mlp_out.replace("{layer}", "{}")  # as the editors fill it
    targets = [(template.format(layer), loaded.arch.mlp_out_transposed) for layer in edited]
    layers = list(edited)
    for layer in edited if whole_mlp else []:
        inputs = loaded.arch.mlp_in_modules(layer)
        targets += [(path, loaded.arch.mlp_out_transposed) for path in inputs]
        layers += [layer] * len(inputs)
    return targets, layers


MASK_LAYER_IS_FOR_MEMIT = "--mask-layer is for MEMIT masks; a ROME mask covers the edited layer (--layer)"


def check_mask_layers(n: int, hp: EditHparams, mask_layers: tuple[int, ...]) -> None:
    """`--mask-layer`s of a model with `n` layers: for MEMIT, in range, each once."""
    if not mask_layers:
        return
    if hp.method != "memit":
        raise EditguardError(MASK_LAYER_IS_FOR_MEMIT)
    for layer in mask_layers:
        if not 0 <= layer < n:
            raise EditguardError(f"--mask-layer {layer} is out of range: the model has layers 0-{n - 1}")
    if len(set(mask_layers)) < len(mask_layers):
        raise EditguardError(f"--mask-layer names a layer twice: {', '.join(map(str, mask_layers))}")


def edited_targets(arch, targets: list[MaskTarget]) -> list[MaskTarget]:
    """The targets that are MLP output projections: the tensors edits change (the rest are only masked)."""
    return [t for t in targets if arch.is_mlp_out(t.tensor, t.layer)]


def split_kind(method: str):
    return MemitSplit if method == "memit" else RomeSplit


def _figures_of(stem: Path) -> list[Path]:
    """Figure files already beside `stem` under the names write_outputs gives its own."""
    pattern = re.compile(re.escape(stem.name) + r"-(rsr|pruned|heatmap)(-L\d+(-\w+)?)?\.png")
    return [p for p in stem.parent.glob("*.png") if pattern.fullmatch(p.name)] if stem.parent.is_dir() else []


def checkpoint_path(output: Path) -> Path:
    return output.with_name(output.stem + ".ckpt.safetensors")


def card_files(output: Path) -> list[Path]:
    """The card and metrics written beside the mask (figures: `_figures_of`)."""
    stem = output.with_suffix("")
    return [stem.parent / (stem.name + ".md"), stem.parent / (stem.name + ".json")]


def written_beside(output: Path) -> list[Path]:
    """The files a training run writes under the mask's name, the mask included."""
    return [output, checkpoint_path(output), publishing_record(output), *card_files(output)]


def check_new_mask_path(path: Path) -> None:
    """A mask is written under a new .safetensors name: masks are never overwritten."""
    if path.suffix != ".safetensors":
        raise EditguardError("the mask file name must end in .safetensors")
    if path.exists():
        raise EditguardError(f"{path} exists; choose another -o (masks are never overwritten)")
    if INDEX in {p.name for p in written_beside(path)}:  # its metrics file would be the folder's mask index
        raise EditguardError(f"{path.name}: its metrics would be written as {INDEX}, the folder's mask index; "
                             "choose another -o")
    for beside in (*card_files(path), *_figures_of(path.with_suffix(""))):
        if beside.exists():  # the card, metrics and figures go there: someone else's file is never overwritten
            raise EditguardError(f"{beside} exists; choose another -o")
    read_index(path.parent / INDEX)  # a file that is no mask index is found now, not after hours of training


def preflight(hp: EditHparams, job: TrainJob) -> None:
    """What can be checked without the model, for the CLI to call before loading it: `run`'s own checks
    (which also clean up after a killed publish), plus the data and an existing bank, which `run` reads
    later anyway."""
    check_job(hp, job)
    select_splits(job)
    if job.bank is not None and Path(job.bank).exists():
        EditBank.open(job.bank)  # a damaged file or another kind of file is named now


def check_resumable(ckpt: Path, info: dict, meta: dict, edited_tensors: int) -> None:
    """A checkpoint continues only the run that wrote it: same tensors, model, data and settings. Fields
    added since a checkpoint was written count as the run's own (it trained with their defaults)."""
    def refuse(why: str) -> EditguardError:
        return EditguardError(f"{ckpt} was written by a run {why}; remove it to start over")

    theirs = info.get("fingerprints")
    if theirs is not None and set(theirs) != set(meta["fingerprints"]):
        raise refuse("that edited other tensors (--layer or --method differ)")
    if theirs is not None and theirs != meta["fingerprints"] or \
            info.get("model_fingerprint", meta["model_fingerprint"]) != meta["model_fingerprint"]:
        raise refuse("on another model's weights")
    # checkpoints from before --whole-mlp did not record their targets: they masked the edited tensors
    if info.get("targets", meta["targets"][:edited_tensors]) != meta["targets"]:
        raise refuse("that masked other tensors (--whole-mlp, --layer or --mask-layer differ)")
    def shaping(config: dict) -> dict:  # how often checkpoints are written changes no result
        return {k: v for k, v in config.items() if k != "checkpoint_every"}

    if info.get("data_hash") != meta["data_hash"] or \
            shaping({**TrainConfig().to_dict(), **info.get("config", {})}) != shaping(meta["config"]):
        raise refuse("with other data or settings")
    settings = info.get("settings", meta["settings"])
    if isinstance(settings, dict) and "val_every" in settings and settings["val_every"] is None:
        # written before the interval was recorded as run: None meant the default, for the same epochs
        settings = {**settings, "val_every": default_val_every(meta["config"]["epochs"])}
    # (a setting added since the checkpoint was written is the run's own, as above)
    differ = [k for k in meta["settings"]
              if not isinstance(settings, dict) or k in settings and settings[k] != meta["settings"][k]]
    if differ:
        names = {"train": "training records or their order (--data)", "val": "validation records (--val-size, --data)",
                 "facts": "facts behind the same case ids (--data)",
                 "val_every": "--val-every",
                 "target_pruned": "--target-pruned", "memit_batch": "--memit-batch", "dtype": "--dtype"}
        raise EditguardError(f"{ckpt} was written by a run with other {', '.join(names[k] for k in differ)}; "
                             f"resume with the same, or remove it to start over")


def default_val_every(epochs: int) -> int:
    """Epochs between validations when --val-every is not given: about VAL_POINTS over the run."""
    return max(1, -(-epochs // VAL_POINTS))


def facts_digest(facts: list[Fact]) -> str:
    """What the records say (a case id may name another fact in another --data file)."""
    rows = [[f.case_id, f.prompt, f.subject, f.target_new, f.target_true] for f in facts]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()


def check_job(hp: EditHparams, job: TrainJob) -> None:
    """The output name (after cleaning up a killed publish of it), an unfinished run and the method:
    checked first by `run`."""
    job.output = Path(job.output)
    ckpt = checkpoint_path(job.output)
    remove_stale_temps(ckpt)  # killed mid-write (the CLI holds the mask's lock: no other run writes these)
    if not job.bank_only:  # a bank-only run writes no mask: -o may name the (shipped) mask the bank is for
        remove_stale_temps(job.output)
        recover_publish(job.output)  # a killed publish's card files would block the resume that finishes it
        check_new_mask_path(job.output)
    if ckpt.exists() and not job.resume and not job.bank_only:
        raise EditguardError(f"an unfinished run left {ckpt}; pass --resume to continue it, or delete it to start over")
    if hp.method != job.method:
        raise EditguardError(f"the edit hyperparameters are for {hp.method.upper()}, the mask is to be trained "
                             f"against {job.method.upper()}")


def run(loaded: LoadedModel, hp: EditHparams, cfg: TrainConfig, job: TrainJob,
        progress: Progress | None = None) -> dict:
    progress = progress or (lambda *a: None)
    check_job(hp, job)
    ckpt = checkpoint_path(job.output)
    check_mask_layers(loaded.num_layers, hp, job.mask_layers)
    train, val, test = select_splits(job)
    facts = {split: [Fact.from_record(r) for r in recs] for split, recs in
             (("train", train), ("val", val), ("test", test))}
    targets, target_layers = mask_targets(loaded, hp, job.whole_mlp, job.mask_layers)
    # what the run's checkpoints record, and a resumed run must match: checked now, not after the bank
    # grows by hours of edits (a bank reused or extended holds this model's, method's and hparams' edits)
    meta = {"config": cfg.to_dict(), "data_hash": data_hash([f.case_id for f in facts["train"]], hp.digest()),
            "fingerprints": target_fingerprints(loaded, hp), "model_fingerprint": loaded.fingerprint,
            "targets": [path for path, _ in targets],
            # what else shapes the run's validation curve and its Θ (checkpoints from before this lack it)
            # the training records in their order (the data hash is of the set; the order sets the batches)
            "settings": {"train": [f.case_id for f in facts["train"]], "val": [f.case_id for f in facts["val"]],
                         "facts": facts_digest(facts["train"] + facts["val"]),
                         "val_every": job.val_every or default_val_every(cfg.epochs),
                         "target_pruned": job.target_pruned, "memit_batch": job.memit_batch,
                         "dtype": dtype_name(loaded)}}
    if job.resume and ckpt.exists() and not job.bank_only:
        check_resumable(ckpt, checkpoint_info(ckpt), meta, len(hp.layers))
    started = time.time()
    # 1. the edit bank, on the unedited model: ROME edits every record alone, MEMIT edits each split in
    #    batch edits (train: `memit_batch` records each, default all). Validation and training edits
    #    first; the test edits are made after training (only the evaluation needs them).
    bank_path = job.bank or job.output.with_name(job.output.stem + ".bank.safetensors")

    def fill(splits: list[str], stage: str) -> EditBank:
        done, bank = [], None
        total = sum(len(facts[split]) for split in splits)  # `done` grows to it: one bar over all splits
        for split in splits:
            done += facts[split]
            batch = (job.memit_batch if split == "train" else None) or len(facts[split]) or 1
            bank = fill_bank(loaded, done, hp, bank_path, resume=bank_path.exists(), memit_batch=batch,
                             progress=lambda d, _: progress(stage, d, total, ""))
        return bank

    bank = fill(["val", "train"] + (["test"] if job.bank_only else []), "edit bank")
    bank_seconds = time.time() - started
    if job.bank_only:
        return {"bank": str(bank_path), "edits": len(bank), "bank_seconds": round(bank_seconds, 1)}
    kind = split_kind(job.method)
    edited = {split: kind.from_bank(bank, facts[split]) for split in ("train", "val") if facts[split]}
    start_layer = min(target_layers)
    # 2. prompts, cached states below the (lowest) masked layer, the teacher's logits; a `--mask-layer`
    #    mask trains on the states the batch edits below it leave there (the edits above it run in the
    #    trainer's forward)
    train_split = edited["train"]
    below = train_split.edits_below(start_layer) if job.mask_layers else None
    data = prepare_prompts(loaded, train_split.facts, start_layer, cfg.paraphrases,
                           progress=lambda d, t: progress("caching prompts", d, t, ""), edits_below=below)
    trainer = MaskTrainer(loaded, targets, start_layer, data, cfg, **train_split.trainer_inputs(targets))
    if job.resume and ckpt.exists():
        state, optimizer, _ = load_checkpoint(ckpt, cfg, trainer.device, [m.weight.shape for m in trainer.modules])
        if state.step > trainer.total_steps:
            raise EditguardError(f"corrupted training checkpoint {ckpt}: step {state.step} of "
                                 f"{trainer.total_steps}; remove it to start over")
    else:
        state = trainer.init_state()
        optimizer = make_optimizer(state, cfg)

    def on_step(st: TrainState, info: dict) -> None:
        progress("training", st.step, trainer.total_steps,
                 f"loss {info['loss']:.3f} flip {info['flip']:.2f} pruned {info['pruned_soft']:.3f}")

    every = meta["settings"]["val_every"]

    def on_epoch(st: TrainState) -> None:
        epoch = st.step // trainer.steps_per_epoch
        if "val" not in edited or (epoch % every and st.step < trainer.total_steps):
            return
        # the masks as they would ship if training stopped here (annealed to the final τ, binarised)
        masks = binarise(trainer.score_logits(st.theta), job, cfg)[1]
        score = float((edited["val"].preference(loaded, targets, masks) > 0).float().mean())
        st.keep_if_best(score)
        st.curve.append({"step": st.step, "epoch": epoch, "seconds": round(st.seconds, 1),
                         "val_rsr": score, "pruned": pruned_share(masks)})
        progress("validation", st.step, trainer.total_steps, f"val RSR {score:.2f}")

    trainer.train(state, optimizer, on_step=on_step, on_epoch_end=on_epoch,
                  checkpoint=lambda st, opt: save_checkpoint(ckpt, st, opt, meta))
    # 3. threshold: fixed, or chosen for a target pruned share
    theta, shipped_step = state.shipped(best=job.select == "best")
    logits = trainer.score_logits(theta)
    threshold, masks = binarise(logits, job, cfg)
    scores = [torch.sigmoid(x) for x in logits]  # K at the final τ, as the mask file stores it
    test_started = time.time()
    bank = fill(["val", "train", "test"], "edit bank (test edits)")
    bank_seconds += time.time() - test_started
    edited["test"] = kind.from_bank(bank, facts["test"])
    # 4. evaluation
    reports, text = evaluate_splits(loaded, targets, masks, edited, job.text_tokens, job.baselines, progress)
    total_seconds = time.time() - started
    metrics = {
        "threshold": threshold, "pruned_fraction": pruned_share(masks), "rsr": reports, "text": text,
        "curve": state.curve, "shipped_step": shipped_step, "train_seconds": round(state.seconds, 1),
        "bank_seconds": round(bank_seconds, 1),
        "total_seconds": round(total_seconds, 1), "steps": state.step,
        "machine": machine_description(loaded.device),
        "command": job.command, "dtype": dtype_name(loaded),
    }
    saved = []
    for (path, transposed), layer, score, th in zip(targets, target_layers, scores, theta):
        stored = loaded.checkpoint.find(loaded.arch.tensor_candidates(path + ".weight"))
        saved.append(MaskTarget(path + ".weight", layer, tuple(score.shape), transposed,
                                        fingerprint(loaded.checkpoint.read(stored)), score, th.detach().cpu()))
    mask = MaskFile(loaded.ref.model_id, loaded.ref.revision, loaded.arch.model_type, hp.method, threshold,
                    saved, hparams={"train": cfg.to_dict(), "edit": hp.to_dict()},
                    data={"train": len(facts["train"]), "val": len(facts["val"]), "test": len(facts["test"]),
                          "source": job.data or "paper splits", "hash": meta["data_hash"],
                          "bank": str(bank_path), "bank_hparams_hash": bank.meta["hparams_hash"]},
                    metrics=metrics, binaries=masks)  # the bits measured: the scores may round to a tie
    publish(job.output, mask, masks, reports)
    ckpt.unlink(missing_ok=True)
    return metrics


def machine_description(device: torch.device) -> str:
    """Where a run computed, for its card: the CPU model and threads, and the GPU when one was used."""
    cpu = platform.processor() or platform.machine()
    try:  # Linux names the CPU model here; platform.processor() often says only "x86_64"
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return text


def evaluate_splits(loaded, targets: list[tuple[str, bool]], masks: list[torch.Tensor], edited: dict,
                    text_tokens: int, baselines: bool, progress: Progress) -> tuple[dict, dict]:
    """RSR reports per split (train capped at 500 records) and the WikiText-2 model-cost metrics."""
    reports = {}
    for split in ("train", "val", "test", "extra"):
        if split not in edited:
            continue
        progress("evaluating", 0, 1, split)
        es = edited[split].head(500) if split == "train" else edited[split]
        reports[split] = es.report(loaded, targets, masks, baselines=baselines)
    sample = next(edited[s] for s in ("test", "val", "train") if s in edited).sample_edits()
    text = text_metrics(loaded, _variants(loaded, targets, sample, masks), tokens=text_tokens,
                        progress=lambda d, t: progress("perplexity", d, t, ""))
    return reports, text


def check_bank_for_mask(mask: MaskFile, bank: EditBank) -> None:
    """What a bank must share with a mask to be judged under it, read from the two files alone."""
    if bank.method != mask.method:
        raise EditguardError(f"the mask was trained against {mask.method.upper()} edits, the bank holds "
                             f"{bank.method.upper()} edits")
    if bank.meta.get("model_type") != mask.model_type:
        raise EditguardError(f"edit bank {bank.path} holds edits of a {bank.meta.get('model_type')} model; the mask is "
                             f"for {mask.model_type} models")


def evaluate_existing(loaded: LoadedModel, mask: MaskFile, bank: EditBank, job: TrainJob,
                      threshold: float | None = None, progress: Progress | None = None
                      ) -> tuple[dict, list[torch.Tensor]]:
    """`evaluate-mask`: the same evaluation for a mask file against the edits of a bank, at the stored
    threshold, at `threshold`, or at the one that prunes `job.target_pruned`. Returns the figures and the
    binary masks they were measured with."""
    progress = progress or (lambda *a: None)
    mask.check_fits(loaded.arch, loaded.checkpoint)
    check_bank_for_mask(mask, bank)
    changed = edited_targets(loaded.arch, mask.targets)
    if [t.tensor for t in mask.targets[:len(changed)]] != [t.tensor for t in changed]:
        raise EditguardError("the mask lists MLP inputs before the tensors edits change; editguard writes the "
                             "edited tensors first (was the file written by another tool?)")
    edited_tensors = {loaded.arch.module("mlp_out", layer) + ".weight" for layer in mask.edit_layers()}
    if set(bank.meta["fingerprints"]) != edited_tensors:
        raise EditguardError(f"edit bank {bank.path} holds edits of {', '.join(sorted(bank.meta['fingerprints']))}; "
                             f"the mask is for edits of {', '.join(sorted(edited_tensors))}")
    bank.check_widths({t.layer: t.shape for t in changed if t.tensor in edited_tensors})
    for canonical, expected in bank.meta["fingerprints"].items():
        stored = loaded.checkpoint.find(loaded.arch.tensor_candidates(canonical))
        if expected != "unknown" and (stored is None or fingerprint(loaded.checkpoint.read(stored)) != expected):
            raise EditguardError(f"edit bank {bank.path} holds edits of another model ({bank.meta.get('model_id')}): "
                                 f"its {canonical} differs from this model's")
    if bank.meta.get("model_fingerprint") is not None and not bank.same_model(loaded.fingerprint):  # older banks: none
        raise EditguardError(f"edit bank {bank.path} holds edits of another model ({bank.meta.get('model_id')}): "
                             "the edited tensors match, other weights differ")
    chosen = dict(zip(("train", "val", "test"), select_splits(job)))
    present = bank.case_ids()
    kind = split_kind(mask.method)
    edited, skipped = {}, {}
    for split in job.splits:
        facts = [Fact.from_record(r) for r in chosen[split] if r.case_id in present]
        if not facts:
            continue
        try:
            edited[split] = kind.from_bank(bank, facts)
        except EditguardError as exc:
            if split != "train":
                raise
            # MEMIT batch edits of another --train-size than the run's: the held-out figures still stand
            skipped[split] = exc.message
    if job.extra:
        edited["extra"] = extra_split(loaded, bank, job, progress)
    if not edited:
        raise EditguardError(f"the bank {bank.path} holds no edits of the chosen {'/'.join(job.splits)} records")
    targets = mask.modules()
    if job.target_pruned is not None:
        threshold = choose_threshold([t.scores for t in mask.targets], job, TrainConfig())
    masks = mask.masks(threshold)
    reports, text = evaluate_splits(loaded, targets, masks, edited, job.text_tokens, job.baselines, progress)
    result = {"mask": str(job.output), "threshold": mask.threshold if threshold is None else threshold,
              "pruned_fraction": pruned_share(masks), "rsr": reports, "text": text}
    return ({**result, "not_reported": skipped} if skipped else result), masks


def extra_split(loaded: LoadedModel, bank: EditBank, job: TrainJob, progress: Progress):
    """The first `job.extra_size` records of `job.extra` with their edits: the bank's where it has them, the
    rest made now with the bank's own hyperparameters and context templates, in a copy of the bank (the
    user's file is never written). MEMIT: the bank's batch edits when they cover these records alone, else
    new ones of `job.memit_batch` records each."""
    from ..edit.hparams import hparams_from_dict
    from ..edit.rome import templates_key

    facts = [Fact.from_record(r) for r in extra_records(job)]
    banked = {r["case_id"]: r for r in bank.meta["records"]}
    for f in facts:  # a bank built from another file may use the same ids for other facts
        r = banked.get(f.case_id)
        if r is not None and (r.get("subject"), r.get("target_new")) != (f.subject, f.target_new):
            raise EditguardError(f"--extra {job.extra}: the bank's edit of case {f.case_id} is of another fact "
                                 f"({r.get('subject')!r} → {r.get('target_new')!r})")
    kind = split_kind(bank.method)
    if {f.case_id for f in facts} <= set(banked):
        try:
            return kind.from_bank(bank, facts)
        except EditguardError:  # MEMIT: banked only inside batches with other records
            pass
    hp = hparams_from_dict(bank.meta["hparams"], bank.method, where=f"edit bank {bank.path}")
    loaded.extras[templates_key(hp)] = list(bank.meta["context_templates"])  # the bank's own templates
    with tempfile.TemporaryDirectory() as tmp:
        if bank.method == "rome":  # the bank's edits reused, the missing ones added to a copy
            path = Path(tmp) / bank.path.name
            shutil.copyfile(bank.path, path)
        else:  # MEMIT: batch edits of exactly these records (`--memit-batch` each, default all in one)
            path = Path(tmp) / "extra.safetensors"
        extended = fill_bank(loaded, facts, hp, path, resume=path.exists(), memit_batch=job.memit_batch or len(facts),
                             progress=lambda d, t: progress("extra edits", d, t, ""))
        return kind.from_bank(extended, facts)


EXTRA_DEFAULT = 100


def extra_records(job: TrainJob) -> list:
    """The first `job.extra_size` records of `job.extra`, each with its own case id (edits are found by it)."""
    records = counterfact.load(job.extra, strict=True).records[: job.extra_size or EXTRA_DEFAULT]
    if not records:
        raise EditguardError(f"--extra {job.extra}: no records")
    if job.extra_size is not None and len(records) < job.extra_size:
        raise EditguardError(f"--extra-size {job.extra_size}: {job.extra} holds only {len(records)} records")
    ids = [r.case_id for r in records]
    if None in ids or len(set(ids)) < len(ids):
        raise EditguardError(f"--extra {job.extra}: every record needs its own case_id (edits are found by it)")
    return records


def rebinarised(mask: MaskFile, source: Path, evaluation: dict, masks: list[torch.Tensor], command: str) -> MaskFile:
    """A copy of `mask` holding the binary `masks` the evaluation measured and its figures (the training
    history stays: it belongs to the same Θ). The masks are stored as they are, not re-derived: the soft
    scores are kept in float16, so a γ met exactly by training's float32 scores can fall on either side."""
    metrics = {**mask.metrics, "threshold": evaluation["threshold"],
               "pruned_fraction": evaluation["pruned_fraction"], "rsr": evaluation["rsr"],
               "text": evaluation["text"]}
    if "averaged" in mask.metrics:  # no trained cut to refer back to: each source's card holds its own
        metrics["measured_by"] = command
    else:
        trained = mask.metrics.get("rebinarised") or {"trained_threshold": mask.threshold,
                                                       "trained_pruned_fraction": mask.pruned_fraction()}
        metrics["rebinarised"] = {"from": source.name, "trained_threshold": trained["trained_threshold"],
                                  "trained_pruned_fraction": trained["trained_pruned_fraction"], "command": command}
    return replace(mask, threshold=evaluation["threshold"], metrics=metrics, binaries=[m.clone() for m in masks])


def write_rebinarised(output: Path, mask: MaskFile, source: Path, evaluation: dict, masks: list[torch.Tensor],
                      command: str) -> MaskFile:
    """`evaluate-mask -o`: write the re-binarised mask with its card, figures and index entry (publish
    checks the names are still free)."""
    new = rebinarised(mask, source, evaluation, masks, command)
    publish(output, new, masks, evaluation["rsr"])
    return new


def _variants(loaded, targets: list[tuple[str, bool]], sample: list[Edit], masks: list[torch.Tensor]):
    from contextlib import ExitStack, contextmanager

    from ..edit.edits import edits_applied

    @contextmanager
    def original():
        yield

    @contextmanager
    def edited():
        with edits_applied(loaded.model, loaded.arch, sample):
            yield

    @contextmanager
    def pruned():
        with ExitStack() as stack:
            stack.enter_context(edits_applied(loaded.model, loaded.arch, sample))
            stack.enter_context(masks_applied(loaded, targets, masks))
            yield

    @contextmanager
    def mask_only():
        with masks_applied(loaded, targets, masks):
            yield

    return {"original": original, "edited": edited, "pruned": pruned, "mask_on_unedited": mask_only}


def publish(path: Path, mask: MaskFile, masks: list[torch.Tensor], reports: dict) -> None:
    """Write the mask with its metrics, figures and card as one set: all of them are made in a staging
    folder beside `path` and moved into place, the mask last, then the index entry is added. An
    interrupted write leaves none of them (and a training checkpoint can be resumed); a killed one (no
    handler runs) leaves a record of what it was moving, which `recover_publish` acts on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.stem}.", dir=path.parent))
    record, moved, recorded = publishing_record(path), [], False
    try:
        mask.save(staging / path.name)
        write_outputs(staging / path.name, mask, masks, reports)
        check_new_mask_path(path)  # again: hours may have passed since the run checked it
        made = sorted(staging.iterdir(), key=lambda f: f.name == path.name)
        write_text_atomic(record, json.dumps({"staging": staging.name, "files": {f.name: file_sha256(f) for f in made}}))
        recorded = True
        for file in made:
            moved.append(path.parent / file.name)  # before the move: an interruption between them is covered
            os.replace(file, path.parent / file.name)
        update_index(path, mask)
    except BaseException:
        for done in moved:  # a part of the set would block the --resume that finishes it
            done.unlink(missing_ok=True)
        raise
    finally:
        if recorded:
            record.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)


def publishing_record(path: Path) -> Path:
    """Beside the mask while `publish` moves its set into place (hidden: no card or figure takes its name)."""
    return path.with_name(f".{path.name}.publishing")


def mask_writer(path: Path):
    """One process at a time trains, resumes or writes a mask under one name: a second would train from the
    same checkpoint and publish over the first's set (the CLI holds it from its first check to the end)."""
    return path_lock("mask", path, busy=f"mask {path} is being trained or written by another editguard process; "
                                        "wait for it to finish, or choose another -o")


def recover_publish(path: Path) -> None:
    """After a killed `publish` of `path`: with the mask not yet in place, remove the files it had moved
    (only those whose content is the one recorded: a file someone put there since is left for the name
    check) and its staging folder; with the mask in place, the set is complete: add its index entry."""
    record = publishing_record(path)
    if not record.is_file():
        _remove_orphan_staging(path)
        return
    try:
        made = json.loads(record.read_text())
        staging, files = Path(str(made["staging"])).name, {str(k): str(v) for k, v in made["files"].items()}
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError):
        raise EditguardError(f"{record} is damaged: remove it and the card files beside the mask, then run again") from None
    if path.is_file() and files.get(path.name) == file_sha256(path):
        update_index(path, MaskFile.load(path))
    elif not path.exists():
        for name, digest in files.items():
            file = path.parent / Path(name).name
            if file.is_file() and file_sha256(file) == digest:
                file.unlink()
    if staging.startswith(f".{path.stem}."):
        shutil.rmtree(path.parent / staging, ignore_errors=True)
    record.unlink()


def _remove_orphan_staging(path: Path) -> None:
    """Staging folders of `publish` runs killed before they wrote their record (under mask_writer's lock no
    other publish of `path` is running): each holds only a copy of a set that was never moved into place."""
    for folder in temp_leftovers(path.parent, path.stem):
        if folder.is_dir() and all(f.is_file() and f.name.startswith(path.stem) for f in folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)


def write_outputs(path: Path, mask: MaskFile, masks: list[torch.Tensor], reports: dict) -> None:
    """The metrics JSON, figures and card beside `path`."""
    stem = path.with_suffix("")
    card_path, metrics_path = card_files(path)
    write_text_atomic(metrics_path, finite_dumps(mask.metrics))
    figures = []
    if "test" in reports:
        figures.append(plots.rsr_per_relation(reports["test"], stem.parent / f"{stem.name}-rsr.png",
                                              f"{mask.model_id}: RSR per relation (test)"))
    one_per_layer = len({t.layer for t in mask.targets}) == len(mask.targets)
    for target, K in zip(mask.targets, masks):
        # one figure pair per masked tensor; a single target keeps the plain names, several at one layer
        # (--whole-mlp) add the module's own name
        module = target.tensor.removesuffix(".weight").rsplit(".", 1)[-1]
        tag = "" if len(masks) == 1 else f"-L{target.layer}" if one_per_layer else f"-L{target.layer}-{module}"
        what = f"layer {target.layer}" + ("" if one_per_layer else f" {module}")
        figures.append(plots.pruned_per_output(K, stem.parent / f"{stem.name}-pruned{tag}.png",
                                               f"pruned fraction per output dimension ({what})"))
        figures.append(plots.heatmap(K, stem.parent / f"{stem.name}-heatmap{tag}.png",
                                     f"mask, {what} (pruned share, pooled)"))
    write_text_atomic(card_path, card(path, mask, reports, [f.name for f in figures]))


def update_index(path: Path, mask: MaskFile) -> None:
    index_path = path.parent / INDEX
    # two runs publishing into one folder read, change and rewrite the index in turn, never both at once
    with folder_lock(path.parent):
        entries = [e for e in read_index(index_path) if e.get("file") != path.name]
        entries.append({
            "file": path.name, "sha256": file_sha256(path), "model_id": mask.model_id, "model_type": mask.model_type, "method": mask.method,
            "layers": [t.layer for t in mask.targets], "edit_layers": mask.edit_layers(), "threshold": mask.threshold,
            "pruned_fraction": round(mask.pruned_fraction(), 4),
            "test_rsr": (mask.metrics.get("rsr", {}).get("test") or {}).get("rsr"),
            "perplexity_increase": perplexity_increase(mask.metrics),
            "targets": [{"tensor": t.tensor, "stored_shape": list(t.shape[::-1] if t.transposed else t.shape),
                         "fingerprint": t.fingerprint} for t in mask.targets],
        })
        write_text_atomic(index_path, finite_dumps(sorted(entries, key=lambda e: e["file"])) + "\n")


def _pct(x) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.1f} %"


def _trained_lines(m: dict) -> list[str]:
    return [
        f"- command: `{m['command']}`",
        *([f"- re-binarised from `{m['rebinarised']['from']}` (trained at γ = {gamma_text(m['rebinarised']['trained_threshold'])}, "
           f"{_pct(m['rebinarised']['trained_pruned_fraction'])} pruned) and re-measured by: "
           f"`{m['rebinarised']['command']}`"] if "rebinarised" in m else []),
        f"- shipped Θ: step {m.get('shipped_step', m['steps'])} of {m['steps']}"
        + (" (the best validation point)" if m.get("shipped_step", m["steps"]) != m["steps"] else ""),
        f"- wall time: edit bank {m['bank_seconds']:.0f} s (last session), training {m['train_seconds']:.0f} s "
        f"({m['steps']} steps, summed over every session of a resumed run), last session {m['total_seconds']:.0f} s "
        f"on {m['machine']}, model in {m.get('dtype', 'float32')}; editguard {__version__}",
    ]


def _averaged_lines(m: dict) -> list[str]:
    lines = [f"- soft scores averaged over {len(m['averaged'])} masks (each has its own card), cut and measured by: "
             f"`{m['measured_by']}`; editguard {__version__}"]
    for s in m["averaged"]:
        trained = f"trained by `{s['command']}`" if s.get("command") else "see its card"
        step = f", Θ of step {s.get('shipped_step') or s['steps']} of {s['steps']}" if s.get("steps") else ""
        lines.append(f"  - `{s['file']}`: seed {s['seed']}, γ = {gamma_text(s['threshold'])}; {trained}{step}")
    return lines


def card(path: Path, mask: MaskFile, reports: dict, figures: list[str]) -> str:
    m = mask.metrics
    lines = [
        f"# Mask card: `{path.name}`", "",
        f"- model: `{mask.model_id}` ({mask.model_type}), "
        + ", ".join(f"tensor `{t.tensor}` (layer {t.layer}, [out, in] = {list(t.shape)})" for t in mask.targets),
        f"- trained against: {mask.method.upper()} edits; threshold γ = {gamma_text(mask.threshold)}; "
        f"pruned {_pct(m['pruned_fraction'])} of the weights",
        f"- data: {mask.data.get('train')} train / {mask.data.get('val')} val / {mask.data.get('test')} test records "
        f"({mask.data.get('source')}; hash {mask.data.get('hash')})",
        *(_averaged_lines(m) if "averaged" in m else _trained_lines(m)), "",
        "## Reversal (RSR: masked edited model prefers the true object, full multi-token log-prob)", "",
        "| split | n | original prefers true | edited, no mask | **RSR** | RSR among known | mask on unedited | "
        "mask on base weights only | mask on the edit only | SVD baseline | magnitude baseline |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for split, r in reports.items():
        lines.append(f"| {split} | {r['n']} | {_pct(r['original_prefers_true'])} | {_pct(r['edited_prefers_true'])} | "
                     f"**{_pct(r['rsr'])}**{interval_text(rsr_interval(r))} | {_pct(r['rsr_known'])} ({r['known']}) | "
                     f"{_pct(r['mask_on_unedited_prefers_true'])} | {_pct(r.get('rsr_mask_on_weights_only'))} | "
                     f"{_pct(r.get('rsr_mask_on_edit_only'))} | {_pct(r.get('baseline_svd_rsr'))} | "
                     f"{_pct(r.get('baseline_magnitude_rsr'))} |")
    lines += ["", "The interval after RSR is its 95 % (Wilson) interval: the sampling noise of n facts. "
              "RSR with the mask on the base weights only (W ⊙ K + ΔW) and on the edit only (W + ΔW ⊙ K) "
              "says where the reversal comes from; only the part that comes from cutting ΔW can hold against an "
              "editor who computes the edit through the masked model (`editguard lock --evaluate` measures that)."]
    t = m["text"]
    lines += ["", f"## Model cost (WikiText-2, {t['tokens']} tokens in {t['windows']} windows)", "",
              "| model | perplexity | Top-1 agreement with original | mean KL to original |", "|---|---|---|---|"]
    for name in ("original", "edited", "pruned", "mask_on_unedited"):
        row = t[name]
        lines.append(f"| {name} | {row['perplexity']:.2f} | {_pct(row.get('top1_agreement'))} | "
                     f"{row.get('mean_kl', 0):.4f} |")
    if "test" in reports:
        lines += ["", "## RSR per relation (test)", "", "| relation | n | original | RSR |", "|---|---|---|---|"]
        for rel, r in reports["test"]["per_relation"].items():
            lines.append(f"| {rel} | {r['n']} | {_pct(r['original'])} | {_pct(r['rsr'])} |")
    if m.get("curve"):  # an averaged mask has no training curve of its own (its sources' cards do)
        lines += ["", "## Time to RSR (validation, binarised at γ each epoch)", "",
                  "| epoch | step | training seconds | val RSR | pruned |", "|---|---|---|---|---|"]
        for c in m["curve"]:
            lines.append(f"| {c['epoch']} | {c['step']} | {c['seconds']:.0f} | {_pct(c['val_rsr'])} | {_pct(c['pruned'])} |")
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    return "\n".join(lines)
