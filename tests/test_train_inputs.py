"""`train` and `evaluate-mask` on bad or mismatched input: one clear line and exit 2, before the work
where possible, and never a mask built from the wrong edits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import pico
import pico_facts
from conftest import one_line_error
from editguard.edit.bank import EditBank
from editguard.errors import EditguardError
from editguard.mask import plots
from test_bank_cli import tweak_other_tensor
from test_mask_pico import PICO_EDIT, _train_args


def _interrupted(*a, **k):
    raise KeyboardInterrupt


@pytest.mark.parametrize("lr", ["nan", "-1", "inf", "0"])
def test_learning_rate_must_be_positive(cli, pico_models, tmp_path, lr):
    out = tmp_path / "m.safetensors"
    one_line_error(cli(*_train_args(pico_models, tmp_path, out, 1), "--lr", lr), "--lr must be a positive number")
    assert not any(tmp_path.glob("m.*"))  # refused before the edit bank was built


def test_only_demo_models_have_default_hparams(cli, pico_models, tmp_path):
    args = _train_args(pico_models, tmp_path, tmp_path / "m.safetensors", 1)
    i = args.index("--hparams")
    del args[i:i + 2]
    one_line_error(cli(*args), "only demo models have a default")
    one_line_error(cli("edit", pico_models["llama"], "--fact", "{} speaks", "--subject", "Ann", "--target", "French",
                       "-o", tmp_path / "edited"), "only demo models have a default")
    assert not (tmp_path / "edited").exists() and not any(tmp_path.glob("m.*"))


def test_data_records_are_unique_and_well_formed(cli, pico_models, tmp_path):
    args = _train_args(pico_models, tmp_path, tmp_path / "m.safetensors", 1)
    records = pico_facts.records()
    same_ids = tmp_path / "same_ids.json"
    same_ids.write_text(json.dumps([{**r, "case_id": 0} for r in records]))
    data = args.index("--data") + 1
    args[data] = str(same_ids)  # every record would be scored with one banked edit
    one_line_error(cli(*args), "case_id 0 appears twice")
    broken = tmp_path / "broken.json"
    del records[3]["requested_rewrite"]["target_new"]
    broken.write_text(json.dumps(records))
    args[data] = str(broken)  # skipping it would shift every split after it
    one_line_error(cli(*args), "record 3 is malformed")


def test_bank_is_never_written_over_the_mask_or_into_the_model(cli, pico_models, tmp_path):
    out = tmp_path / "m.safetensors"
    args = _train_args(pico_models, tmp_path, out, 1)
    one_line_error(cli(*args, "--bank", out), "a file this run writes for the mask")
    one_line_error(cli(*args, "--bank", tmp_path / "m.ckpt.safetensors"), "a file this run writes for the mask")
    model = tmp_path / "model"
    shutil.copytree(pico_models["llama"], model)
    args[args.index("--model") + 1] = str(model)
    one_line_error(cli(*args, "--bank", model / "bank.safetensors"), "overlaps the input")
    assert not (model / "bank.safetensors").exists()


def test_interrupted_publishing_leaves_nothing_and_resumes(cli, pico_models, tmp_path, monkeypatch):
    import editguard.mask.pipeline as pipeline

    out = tmp_path / "masks" / "m.safetensors"
    args = _train_args(pico_models, tmp_path, out, 1)
    with monkeypatch.context() as patch:
        patch.setattr(plots, "heatmap", _interrupted)  # after the metrics and the first figures are made
        assert cli(*args).code == 130
    left = sorted(p.name for p in out.parent.iterdir())
    assert left == ["m.bank.safetensors", "m.ckpt.safetensors"], left  # no half set, no staging folder
    real_replace, published = pipeline.os.replace, []

    def stopped_midway(src, dst):  # Ctrl-C after the first file of the set reached its place
        if Path(dst).parent == out.parent and Path(src).parent != out.parent:
            if published:
                raise KeyboardInterrupt
            published.append(dst)
        return real_replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(pipeline.os, "replace", stopped_midway)
        stopped = cli(*args, "--resume")
        assert stopped.code == 130, stopped.err
    assert published and sorted(p.name for p in out.parent.iterdir()) == left  # the moved file went back
    resumed = cli("-f", "json", *args, "--resume")
    assert resumed.code == 0, resumed.err
    for name in ("m.safetensors", "m.json", "m.md", "m-rsr.png", "m-heatmap.png", "index.json"):
        assert (out.parent / name).exists(), name


KILLED_PUBLISHING = """
import os, sys
from pathlib import Path
import editguard.mask.pipeline as pipeline
from editguard.cli import main

folder, when = Path(sys.argv[1]), sys.argv[2]
real_replace, moved = os.replace, []

def killed_midway(src, dst):  # SIGKILL after the first file of the set reached its place: no handler runs
    if Path(dst).parent == folder and Path(src).parent != folder:
        if moved:
            os._exit(137)
        moved.append(dst)
    return real_replace(src, dst)

if when == "midway":
    os.replace = killed_midway
else:  # every file in place, the index entry not yet written
    pipeline.update_index = lambda *a: os._exit(137)
sys.exit(main(sys.argv[3:]))
"""


def _kill_publishing(cli, pico_models, tmp_path, when: str):
    """A run whose training is done and whose publish is killed `when`; returns its arguments and -o."""
    out = tmp_path / "masks" / "m.safetensors"
    args = _train_args(pico_models, tmp_path, out, 1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plots, "heatmap", _interrupted)  # leaves the run's checkpoint
        assert cli(*args).code == 130
    killed = subprocess.run([sys.executable, "-c", KILLED_PUBLISHING, str(out.parent), when, *args, "--resume"],
                            capture_output=True, text=True)
    assert killed.returncode == 137, killed.stderr
    assert (out.parent / ".m.safetensors.publishing").is_file()
    return args, out


def test_killed_publishing_is_undone_by_resume(cli, pico_models, tmp_path):
    """A kill between the moves of the mask's set leaves part of it in place (no handler runs): --resume
    removes exactly what that publish moved (not a file changed since), and its staging folder, and
    finishes the set."""
    args, out = _kill_publishing(cli, pico_models, tmp_path, "midway")
    left = {p.name for p in out.parent.iterdir()} - {"m.bank.safetensors", "m.ckpt.safetensors",
                                                        ".m.safetensors.publishing"}
    moved = [n for n in left if not n.startswith(".")]
    assert len(moved) == 1 and len(left) == 2 and "m.safetensors" not in left, left  # one card file, staging
    (out.parent / moved[0]).write_bytes(b"someone's file now")
    one_line_error(cli(*args, "--resume"), f"{moved[0]} exists; choose another -o")
    assert (out.parent / moved[0]).read_bytes() == b"someone's file now"
    (out.parent / moved[0]).unlink()
    resumed = cli(*args, "--resume")
    assert resumed.code == 0, resumed.err
    left = sorted(p.name for p in out.parent.iterdir())
    assert not [n for n in left if n.startswith(".") or ".ckpt." in n], left
    for name in ("m.safetensors", "m.json", "m.md", "m-rsr.png", "m-heatmap.png", "index.json"):
        assert name in left, name


def test_killed_publishing_after_the_last_move_is_completed(cli, pico_models, tmp_path):
    """Killed with the whole set in place but before its index entry: the next run adds the entry and
    clears the record (and, the mask being there, refuses to write it again)."""
    args, out = _kill_publishing(cli, pico_models, tmp_path, "index")
    assert not (out.parent / "index.json").exists()
    one_line_error(cli(*args, "--resume"), "m.safetensors exists; choose another -o")
    assert [e["file"] for e in json.loads((out.parent / "index.json").read_text())] == ["m.safetensors"]
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]


def test_figures_and_index_are_checked_before_training(cli, pico_models, tmp_path):
    out = tmp_path / "m.safetensors"
    (tmp_path / "m-rsr.png").write_bytes(b"someone's figure")
    one_line_error(cli(*_train_args(pico_models, tmp_path, out, 1)), "m-rsr.png exists")
    (tmp_path / "m-rsr.png").unlink()
    (tmp_path / "index.json").write_text("[1, 2]")
    one_line_error(cli(*_train_args(pico_models, tmp_path, out, 1)), "is not a mask index")


@pytest.mark.parametrize("figure", ["m-heatmap-L0-up_proj.png", "m-pruned-L3.png", "m-heatmap.png"])
def test_every_figure_name_a_run_writes_is_checked(tmp_path, figure):
    """Per-layer (MEMIT) and per-module (--whole-mlp) figure names are someone's file too; others are not."""
    from editguard.mask.pipeline import check_new_mask_path

    (tmp_path / "m-notes.png").write_bytes(b"not ours")
    check_new_mask_path(tmp_path / "m.safetensors")
    (tmp_path / figure).write_bytes(b"someone's figure")
    with pytest.raises(EditguardError, match=f"{figure} exists"):
        check_new_mask_path(tmp_path / "m.safetensors")


def test_checkpoint_of_another_model_is_not_resumed(cli, pico_models, tmp_path, monkeypatch):
    import editguard.mask.pipeline as pipeline

    first = tmp_path / "a" / "m.safetensors"
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "publish", _interrupted)  # a run that stops with its checkpoint in place
        assert cli(*_train_args(pico_models, tmp_path, first, 1)).code == 130
    # the same data and settings on other weights of the same shapes
    other = pico.build("llama", tmp_path / "other", seed=1)
    second = tmp_path / "b" / "m.safetensors"
    args = _train_args(pico_models, tmp_path, second, 1)
    args[args.index("--model") + 1] = str(other)
    second.parent.mkdir()
    shutil.copy(pipeline.checkpoint_path(first), pipeline.checkpoint_path(second))
    # found before any edit is made for the other model
    one_line_error(cli("-q", *args, "--resume"), "was written by a run on another model's weights; remove it")
    assert pipeline.checkpoint_path(second).exists() and not second.exists()
    assert not (second.parent / "m.bank.safetensors").exists()
    # the same edited tensor, other weights elsewhere: the whole-model fingerprint tells them apart
    args[args.index("--model") + 1] = str(tweak_other_tensor(pico_models["llama"], tmp_path / "tweaked",
                                                              "layers.0.self_attn.q_proj.weight"))
    one_line_error(cli("-q", *args, "--resume"), "was written by a run on another model's weights; remove it")


def test_evaluate_mask_refuses_a_bank_of_other_tensors(cli, pico_models, tmp_path):
    layer1 = tmp_path / "hp1.yaml"
    layer1.write_text(yaml.safe_dump({**PICO_EDIT, "layers": [1]}))
    out = tmp_path / "l1" / "m.safetensors"
    args = _train_args(pico_models, tmp_path, out, 1)
    args[args.index("--hparams") + 1] = str(layer1)
    assert cli(*args).code == 0
    layer0_bank = tmp_path / "l0.bank.safetensors"
    assert cli(*_train_args(pico_models, tmp_path, tmp_path / "l0.safetensors", 1), "--bank", layer0_bank,
               "--bank-only").code == 0
    common = ["--model", str(pico_models["llama"]), "--data", args[args.index("--data") + 1], "--train-size", "20",
              "--val-size", "8", "--test-size", "8", "--text-tokens", "200", "--no-baselines"]
    one_line_error(cli("evaluate-mask", out, "--bank", layer0_bank, *common),
              "holds edits of model.layers.0.mlp.down_proj.weight; the mask is for edits of model.layers.1.mlp.down_proj.weight")
    # a bank whose factors were cut to another width is named as corrupted, not met as a shape error
    bank = EditBank.open(out.parent / "m.bank.safetensors")
    bank.tensors["rome.u"] = bank.tensors["rome.u"][:, :-1].contiguous()
    bank.path = tmp_path / "cut.bank.safetensors"
    bank.flush()
    one_line_error(cli("evaluate-mask", out, "--bank", bank.path, *common), "rome.u has width 31")
    # the mask's own bank on a model whose edited tensor matches but other weights differ
    common[1] = str(tweak_other_tensor(pico_models["llama"], tmp_path / "tweaked", "layers.0.self_attn.q_proj.weight"))
    one_line_error(cli("evaluate-mask", out, "--bank", out.parent / "m.bank.safetensors", *common),
                   "the edited tensors match, other weights differ")


@pytest.mark.parametrize("change, message", [
    (lambda meta: meta.pop("fingerprints"), "missing 'fingerprints'"),
    (lambda meta: meta.pop("context_templates"), "missing 'context_templates'"),
    (lambda meta: meta["records"][0].pop("case_id"), "every record must be an object with a case_id"),
    (lambda meta: meta["records"].__setitem__(0, 7), "every record must be an object with a case_id"),
    (lambda meta: meta.__setitem__("context_templates", "{}"), "context_templates must be a list of strings"),
    (lambda meta: meta.__setitem__("model_fingerprint", ""), "model_fingerprint must be a non-empty string"),
])
def test_bank_metadata_is_validated(cli, pico_models, tmp_path, change, message):
    args = _train_args(pico_models, tmp_path, tmp_path / "m.safetensors", 1)
    bank_path = tmp_path / "bank.safetensors"
    assert cli(*args, "--bank", bank_path, "--bank-only").code == 0
    bank = EditBank.open(bank_path)
    change(bank.meta)
    bank.flush()
    result = cli(*args, "--bank", bank_path)
    one_line_error(result, f"corrupted edit bank {bank_path}")
    assert message in result.err


def test_bank_only_writes_no_mask_so_its_name_may_exist(cli, pico_models, tmp_path):
    mask = tmp_path / "m.safetensors"
    mask.write_bytes(b"a shipped mask")  # banks/README regenerates each bank under its shipped mask's name
    args = _train_args(pico_models, tmp_path, mask, 1)
    bank_path = tmp_path / "bank.safetensors"
    assert cli(*args, "--bank", bank_path, "--bank-only").code == 0
    assert len(EditBank.open(bank_path)) > 0 and mask.read_bytes() == b"a shipped mask"
    one_line_error(cli(*args, "--bank", bank_path), "exists; choose another -o")  # training would write it


def test_malformed_factors_and_other_names_are_refused_as_banks(cli, pico_models, tmp_path):
    args = _train_args(pico_models, tmp_path, tmp_path / "m.safetensors", 1)
    bank_path = tmp_path / "bank.safetensors"
    assert cli(*args, "--bank", bank_path, "--bank-only").code == 0
    bank = EditBank.open(bank_path)
    bank.tensors["rome.u"] = bank.tensors["rome.u"][:, 0].contiguous()  # one number per edit
    bank.flush()
    one_line_error(cli(*args, "--bank", bank_path), "factors of another shape")
    # a new bank is a .safetensors file: never the index, card or figures the run writes beside the mask
    one_line_error(cli(*args, "--bank", tmp_path / "index.json"), "must end in .safetensors")
    assert not (tmp_path / "index.json").exists()


@pytest.mark.parametrize("setting, message", [
    ("nonsense=1", "expected KEY=VALUE, KEY one of epochs, batch_records"),
    ("margin", "expected KEY=VALUE"),
    ("lr=0.1", "--set lr: use --lr"),
    ("margin=big", "--set margin: 'big' is not a number"),
    ("paraphrases=1.5", "--set paraphrases: '1.5' is not an integer"),
    ("margin=nan", "margin must be a finite number"),
    ("temp_end=0", "temp_end must be positive"),
    ("betas=0.9", "betas must be two numbers in [0, 1)"),
    ("betas=0.9,1.5", "betas must be two numbers in [0, 1)"),
    ("betas=a,b", "--set betas: 'a,b' is not B1,B2"),
    ("margin_unknown=-1", "margin_unknown must not be negative"),
])
def test_training_settings_are_checked_before_the_model_loads(cli, pico_models, tmp_path, monkeypatch, setting,
                                                             message):
    import editguard.cli.train_cmd

    def never(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(editguard.cli.train_cmd, "load_model", never)
    args = _train_args(pico_models, tmp_path, tmp_path / "m.safetensors", 1)
    one_line_error(cli(*args, "--set", setting), message)
    one_line_error(cli(*args, "--set", "margin=1", "--set", "margin=2"), "--set margin is given twice")
    one_line_error(cli(*args, "--seed", str(2 ** 60)), "seed must lie in [0, 2^32)")


def test_same_seed_same_mask(cli, pico_models, tmp_path):
    """`train --seed` makes a run repeatable: the same seed gives the same soft scores, bit for bit (the
    edit bank is shared, so only the trainer's randomness is compared); another seed another Θ."""
    from editguard.mask.file import MaskFile

    bank = tmp_path / "bank.safetensors"
    scores = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        out = tmp_path / name / "m.safetensors"
        result = cli(*_train_args(pico_models, tmp_path, out, 1), "--seed", seed, "--bank", bank, "--no-baselines")
        assert result.code == 0, result.err
        scores[name] = MaskFile.load(out).targets[0].scores
    assert torch.equal(scores["a"], scores["b"]) and not torch.equal(scores["a"], scores["c"])


def test_bad_input_fails_before_the_model_loads(cli, pico_models, tmp_path):
    """A model whose weights would not load (config of 2 layers, one tensor): every error below must come from
    the input itself, found before the load, not from the load."""
    from safetensors.torch import save_file

    hollow = tmp_path / "hollow"
    shutil.copytree(pico_models["llama"], hollow)
    save_file({"model.norm.weight": torch.ones(32)}, hollow / "model.safetensors")
    args = _train_args(pico_models, tmp_path, tmp_path / "m.safetensors", 1)
    args[args.index("--model") + 1] = str(hollow)
    hp = args[args.index("--hparams") + 1]

    def train(*change):
        changed = list(args)
        for option, value in zip(change[::2], change[1::2]):
            changed[changed.index(option) + 1] = value
        return cli(*changed)

    one_line_error(train("-o", str(tmp_path / "m.txt")), "must end in .safetensors")
    one_line_error(train("--data", str(tmp_path / "none.json")), "no such CounterFact file")
    one_line_error(cli(*args, "--layer", "9"), "layer 9 is out of range: this model has layers 0-1")
    not_a_bank = tmp_path / "not_a_bank.safetensors"
    save_file({"x": torch.zeros(1)}, not_a_bank)
    one_line_error(cli(*args, "--bank", str(not_a_bank)), "is not an editguard edit bank")
    edit = ["edit", str(hollow), "--fact", "The capital of {}", "--subject", "Italy", "--target", "Paris"]
    one_line_error(cli(*edit, "--hparams", hp, "--layer", "9", "-o", str(tmp_path / "x")), "layer 9 is out of range")
    one_line_error(cli(*edit, "--hparams", "no-such-preset", "-o", str(tmp_path / "x")), "no hparams file or preset")
    one_line_error(cli(*edit, "--hparams", hp, "-o", str(tmp_path / "x"), "--resume"), "apply to --bank, not to -o")
    one_line_error(cli(*edit, "--hparams", hp, "--bank", str(not_a_bank)), "exists; pass --resume")
    one_line_error(cli(*edit, "--hparams", hp, "--bank", str(not_a_bank), "--resume"), "not an editguard edit bank")
    # and the model really would not load: the errors above were not the load's
    one_line_error(cli(*args), "lacks")
    assert not (tmp_path / "x").exists() and not any(tmp_path.glob("m.*"))


def test_evaluate_mask_checks_bank_and_data_before_the_model_loads(cli, tmp_path):
    repo = Path(__file__).resolve().parents[1]
    mask, ours = repo / "masks/smollm2-135m_rome_L9.safetensors", repo / "banks/smollm2-135m_rome_L9.safetensors"
    # the model does not exist: an error about it would mean the inputs were checked after it
    base = ["evaluate-mask", str(mask), "--model", str(tmp_path / "no-model")]
    one_line_error(cli(*base, "--bank", str(repo / "banks/gemma3-270m_rome_L6.safetensors")),
                   "holds edits of a gemma3_text model; the mask is for llama models")
    one_line_error(cli(*base, "--bank", str(repo / "banks/smollm2-135m_memit.safetensors")),
                   "the mask was trained against ROME edits, the bank holds MEMIT edits")
    one_line_error(cli(*base, "--bank", str(ours), "--data", str(tmp_path / "none.json")), "no such CounterFact file")


def test_malformed_metadata_is_named_as_corruption(tmp_path):
    """Fields of the wrong type in a mask file, a training checkpoint or a mask index: one clear error each,
    never an AttributeError later, and never a "false" string taken as true (a square mask applied transposed)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from editguard.mask.file import MaskFile, MaskTarget
    from editguard.masks_index import read_index
    from editguard.mask.train import checkpoint_info

    path = tmp_path / "m.safetensors"
    MaskFile("pico", None, "llama", "rome", 0.5, [MaskTarget("w", 1, (4, 4), False, "f", torch.rand(4, 4))]).save(path)
    with safe_open(str(path), "pt") as handle:
        meta = json.loads(handle.metadata()["editguard"])
    tensors = load_file(path)
    for change in ({"transposed": "false"}, {"tensor": None}, {"layer": "1"}, {"shape": [4]}):
        odd = {**meta, "targets": [{**meta["targets"][0], **change}]}
        save_file(tensors, tmp_path / "odd.safetensors", metadata={"editguard": json.dumps(odd)})
        with pytest.raises(EditguardError, match="corrupted mask file"):
            MaskFile.load(tmp_path / "odd.safetensors")
    for change in ({"hparams": {"edit": {"layers": "2"}}}, {"metrics": []}, {"method": "ft"}):
        save_file(tensors, tmp_path / "odd.safetensors", metadata={"editguard": json.dumps({**meta, **change})})
        with pytest.raises(EditguardError, match="corrupted mask file"):
            MaskFile.load(tmp_path / "odd.safetensors")

    for info in ({"config": None}, {"fingerprints": 5}, {"settings": []}):
        save_file({"theta.0": torch.zeros(1)}, tmp_path / "c.safetensors",
                  metadata={"editguard_train": json.dumps({"step": 1, "seconds": 1.0, **info})})
        with pytest.raises(EditguardError, match="corrupted training checkpoint .* is malformed"):
            checkpoint_info(tmp_path / "c.safetensors")

    index = tmp_path / "index.json"
    assert read_index(index) == []
    for text in ('{"file": "a"}', "not json", "[1, 2]", "[{}]", '[{"file": 1}, {"file": "b"}]'):
        index.write_text(text)
        with pytest.raises(EditguardError, match="is not a mask index"):
            read_index(index)
    index.write_bytes(b"\xff\xfe[")
    with pytest.raises(EditguardError, match="is not a mask index"):
        read_index(index)


def _stopped_run(cli, pico_models, tmp_path, out, monkeypatch) -> tuple[list, Path, list]:
    """A training run stopped with its checkpoint in place: its arguments, its --data file and records."""
    import editguard.mask.pipeline as pipeline

    args = _train_args(pico_models, tmp_path, out, 1)
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "publish", _interrupted)
        assert cli(*args).code == 130
    data = Path(args[args.index("--data") + 1])
    return args, data, json.loads(data.read_text())


def test_checkpoint_of_reordered_training_records_is_not_resumed(cli, pico_models, tmp_path, monkeypatch):
    """The data hash is of the set of records; their order sets the batches: a run over the same records in
    another order does not resume another order's checkpoint."""
    out = tmp_path / "m.safetensors"
    args, data, records = _stopped_run(cli, pico_models, tmp_path, out, monkeypatch)
    data.write_text(json.dumps(records[:20][::-1] + records[20:]))
    one_line_error(cli("-q", *args, "--resume"), "was written by a run with other training records or their order")


def test_resume_sees_other_facts_another_writer_and_what_kills_left(cli, pico_models, tmp_path, monkeypatch):
    """A checkpoint continues only the same facts (not other facts under the same case ids); a second run of
    the same -o while one holds it is refused at once; what a killed run left (half-written temporary
    files, a staging folder from before publish wrote its record) is removed by the next run; a bank
    resumed in another precision is refused."""
    from editguard.mask.pipeline import mask_writer

    out = tmp_path / "m.safetensors"
    args, data, records = _stopped_run(cli, pico_models, tmp_path, out, monkeypatch)
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{**r, "requested_rewrite": {**r["requested_rewrite"],
                                                             "target_new": {"str": "Antarctica"}}}
                                 for r in records]))
    other_args = list(args)
    other_args[other_args.index("--data") + 1] = str(other)
    one_line_error(cli(*other_args, "--bank", tmp_path / "other_bank.safetensors", "--resume"),
                   "facts behind the same case ids")
    with mask_writer(out):
        one_line_error(cli(*args, "--resume"), "is being trained or written by another editguard process")
    # a kill mid-write (a temporary copy of the checkpoint) and one inside publish before its record
    (tmp_path / ".m.ckpt.safetensors.ab12cd34").write_bytes(b"half")
    (tmp_path / ".m.zz99yy88").mkdir()
    (tmp_path / ".m.zz99yy88" / "m.safetensors").write_bytes(b"staged")
    resumed = cli(*args, "--resume", "--checkpoint-every", "3")  # (how often it checkpoints changes no result)
    assert resumed.code == 0, resumed.err
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.")], sorted(p.name for p in tmp_path.iterdir())
    bank = tmp_path / "m.bank.safetensors"
    extend = ["edit", pico_models["llama"], "--data", data, "--hparams", args[args.index("--hparams") + 1],
              "--bank", bank, "--resume"]
    refused = cli(*extend, "--dtype", "bfloat16")  # (stderr also warns that bfloat16 is slow on this CPU)
    assert refused.code == 2 and "error: edit bank" in refused.err and "holds edits computed in float32" in refused.err


def test_a_mask_named_index_is_refused_before_the_work(tmp_path):
    """Its metrics file would be index.json, the folder's mask index: the run failed only at the end."""
    from editguard.mask.pipeline import check_new_mask_path

    with pytest.raises(EditguardError, match="the folder's mask index"):
        check_new_mask_path(tmp_path / "index.safetensors")


def test_target_pruned_is_cut_exactly_or_refused_where_scores_tie():
    from editguard.mask.pipeline import TrainJob, choose_threshold
    from editguard.mask.train import TrainConfig

    distinct = [torch.linspace(0.01, 0.99, 1000).reshape(20, 50)]
    gamma = choose_threshold(distinct, TrainJob(Path("m.safetensors"), target_pruned=0.3), TrainConfig())
    assert int((distinct[0] < gamma).sum()) == 300  # k weights pruned, not k - 1
    tied = [torch.cat([torch.linspace(0.01, 0.5, 400), torch.ones(600)]).reshape(20, 50).half()]
    cut = choose_threshold(tied, TrainJob(Path("m.safetensors"), target_pruned=0.2), TrainConfig())
    assert int((tied[0].float() < cut).sum()) == 200
    with pytest.raises(EditguardError, match="they tie there"):
        choose_threshold(tied, TrainJob(Path("m.safetensors"), target_pruned=0.5), TrainConfig())


def test_a_sharp_anneal_is_cut_on_the_logits_where_its_scores_round_to_one():
    """τ_end small: sigmoid(Θ/τ_end) is 1.0 in float32 for nearly every weight, so the scores tie; their
    logits keep Θ's order and cut exactly."""
    from editguard.mask.pipeline import TrainJob, binarise, choose_threshold
    from editguard.mask.train import TrainConfig

    logits = [torch.linspace(17.0, 40.0, 1000).reshape(20, 50)]
    job = TrainJob(Path("m.safetensors"), target_pruned=0.1)
    with pytest.raises(EditguardError, match="they tie there"):
        choose_threshold([torch.sigmoid(x) for x in logits], job, TrainConfig())
    gamma, masks = binarise(logits, job, TrainConfig())
    assert int((masks[0] == 0).sum()) == 100 and 0 < gamma < 1
    fixed, masks = binarise(logits, TrainJob(Path("m.safetensors"), threshold=0.5), TrainConfig())
    assert fixed == 0.5 and bool(masks[0].all())  # every logit above 0: nothing pruned
    pruned_hard = [torch.linspace(-60.0, 5.0, 1000).reshape(20, 50)]  # the cut at −53.5: γ ≈ 6e-24, not 0
    gamma, masks = binarise(pruned_hard, job, TrainConfig())
    assert int((masks[0] == 0).sum()) == 100 and 0 < gamma < 1e-20
    with pytest.raises(EditguardError, match="too sharp for a threshold"):
        binarise([torch.linspace(-2000.0, 5.0, 1000).reshape(20, 50)], job, TrainConfig())


def test_metrics_files_hold_strict_json():
    import math

    from editguard.outputs import finite_json

    cleaned = finite_json({"rsr_known": math.nan, "per_relation": [{"rsr": math.inf}, {"rsr": 0.5}]})
    assert json.loads(json.dumps(cleaned, allow_nan=False)) == {"rsr_known": None,
                                                                 "per_relation": [{"rsr": None}, {"rsr": 0.5}]}


def test_options_a_mode_would_ignore_are_refused(cli, pico_models, tmp_path):
    out = tmp_path / "m.safetensors"
    one_line_error(cli(*_train_args(pico_models, tmp_path, out, 1), "--memit-batch", "7"),
                   "--memit-batch applies to --method memit")
    one_line_error(cli(*_train_args(pico_models, tmp_path, out, 1), "--val-size", "0", "--val-every", "2"),
                   "--val-every needs validation records")
    memit = tmp_path / "memit.yaml"
    memit.write_text(yaml.safe_dump({**PICO_EDIT, "alg_name": "MEMIT", "layers": [0, 1]}))
    args = _train_args(pico_models, tmp_path, out, 1)
    args[args.index("--hparams") + 1] = str(memit)
    one_line_error(cli(*args, "--method", "memit", "--mask-layer", "9"), "--mask-layer 9 is out of range")
    assert not out.exists()
