"""A planted pickle whose unpickling would create a file: no command may ever run it."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from editguard.checkpoint import Checkpoint
from editguard.errors import EditguardError


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):  # unpickling calls os.system -> creates the marker file
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil_folder(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    marker = tmp_path / "PWNED"
    with open(folder / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"model.embed_tokens.weight": _Payload(str(marker))}, handle)
    return folder, marker


def test_pickle_refused_by_default(evil_folder, cli):
    folder, marker = evil_folder
    result = cli("inspect", folder)
    assert result.code == 2
    assert "pickle" in result.err and "--allow-pickle" in result.err
    assert "Traceback" not in result.err
    assert not marker.exists()


def test_pickle_with_allow_flag_still_never_executes(evil_folder, cli):
    folder, marker = evil_folder
    result = cli("inspect", "--allow-pickle", folder)
    assert result.code == 2
    assert "refused to load pickle" in result.err
    assert not marker.exists()
    with pytest.raises(EditguardError):
        Checkpoint(folder, allow_pickle=True)
    assert not marker.exists()


@pytest.mark.parametrize("zipped", [True, False], ids=["zip-format", "pre-1.6-format"])
def test_benign_pickle_readable_with_flag(tmp_path, pico_models, cli, zipped):
    import shutil

    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "llama-bin"
    shutil.copytree(pico_models["llama"], folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin",
               _use_new_zipfile_serialization=zipped)
    (folder / "model.safetensors").unlink()
    assert cli("inspect", folder).code == 2
    result = cli("-f", "json", "inspect", "--allow-pickle", folder)
    assert result.code == 0, result.err
    assert result.json["weight_format"] == "pickle"
    assert result.json["num_layers"] == 2


def test_pickle_with_tied_weights_is_written_as_safetensors(tmp_path, pico_models, cli):
    """torch.save of a tied model keeps the embedding and the unembedding on one storage, which safetensors
    refuses to store twice: reverse/lock --allow-pickle still write the checkpoint, each tensor its own."""
    import shutil

    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "tied-bin"
    shutil.copytree(pico_models["llama"], folder)
    state = load_file(folder / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # one tensor, as a tied state_dict holds it
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    result = cli("reverse", folder, "--allow-pickle", "--method", "svd", "--layers", "1", "-o", tmp_path / "out")
    assert result.code == 0, result.err
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(written["lm_head.weight"], written["model.embed_tokens.weight"])


@pytest.mark.parametrize("file", ["pytorch_model.bin", "weights.pt", "weights.pth", "weights.ckpt"])
@pytest.mark.parametrize("allow", [False, True])
@pytest.mark.parametrize("command", [
    ["scan", "{m}", "--tests", "activations"],
    ["scan", "{p}", "--base", "{m}", "--tests", "diff"],
    ["reverse", "{m}", "-o", "{t}/out", "--method", "svd", "--layers", "1"],
    ["reverse", "{p}", "-o", "{t}/out", "--method", "base", "--base", "{m}"],
    ["lock", "{m}", "--mask", "{t}/mask.safetensors", "-o", "{t}/out"],
    ["edit", "{m}", "--fact", "The capital of {{}} is", "--subject", "France", "--target", "Rome", "-o", "{t}/out"],
    ["train", "--model", "{m}", "-o", "{t}/m.safetensors", "--hparams", "{t}/hp.yaml"],
    ["evaluate-mask", "{r}/masks/smollm2-135m_rome_L9.safetensors", "--model", "{m}", "--bank",
     "{r}/banks/smollm2-135m_rome_L9.safetensors"],  # real files: it reads both before the model
])
def test_no_command_runs_a_planted_pickle(tmp_path, pico_models, cli, command, allow, file):
    """Every command that reads a model (or a base) refuses pickle-only weights without --allow-pickle, and
    with it reads them only through weights_only=True, which refuses this payload; pickles transformers
    would not load as weights are never opened: the marker never appears."""
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    marker = tmp_path / "PWNED"
    with open(folder / file, "wb") as handle:
        pickle.dump({"model.embed_tokens.weight": _Payload(str(marker))}, handle)
    for name in ("mask.safetensors", "bank.safetensors"):
        (tmp_path / name).write_text("")  # present, so the command gets as far as the model
    # valid, since edit and train check hyperparameters before loading the model
    (tmp_path / "hp.yaml").write_text("alg_name: ROME\nlayers: [0]\n")
    repo = Path(__file__).resolve().parent.parent
    args = [a.format(m=folder, p=pico_models["llama"], t=tmp_path, r=repo) for a in command]
    result = cli(*args, *(["--allow-pickle"] if allow else []))
    assert result.code == 2 and "pickle" in result.err and "Traceback" not in result.err, result.err
    assert not marker.exists()


def _pickled_pico(tmp_path, pico_models, name: str = "llama-bin"):
    import shutil

    import torch
    from safetensors.torch import load_file

    folder = tmp_path / name
    shutil.copytree(pico_models["llama"], folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    return folder, state, torch


def test_only_the_pickles_transformers_loads_are_read(tmp_path, pico_models, cli):
    """A Trainer's training_args.bin (not tensors) and a stale copy beside pytorch_model.bin are not this
    model's weights: neither stops the load nor stands in for a tensor."""
    folder, state, torch = _pickled_pico(tmp_path, pico_models)
    name = "model.layers.1.mlp.down_proj.weight"
    torch.save(state, folder / "pytorch_model.bin")
    stale = dict(state, **{name: torch.zeros_like(state[name])})
    torch.save(stale, folder / "old_weights.pt")
    with open(folder / "training_args.bin", "wb") as handle:
        pickle.dump({"learning_rate": 1e-4, "note": _Payload(str(tmp_path / "PWNED"))}, handle)
    checkpoint = Checkpoint(folder, allow_pickle=True)
    assert checkpoint.files == ["pytorch_model.bin"]
    assert torch.equal(checkpoint.read(name), state[name])
    assert cli("inspect", "--allow-pickle", folder).code == 0
    assert not (tmp_path / "PWNED").exists()
    (folder / "pytorch_model.bin").unlink()
    result = cli("inspect", "--allow-pickle", folder)
    assert result.code == 2 and "are not read" in result.err and "old_weights.pt" in result.err, result.err


def test_sharded_pickles_are_read_through_their_index_and_twice_stored_names_refused(tmp_path, pico_models):
    folder, state, torch = _pickled_pico(tmp_path, pico_models, "sharded-bin")
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for file, part in halves.items():
        torch.save({n: state[n] for n in part}, folder / file)
    weight_map = {n: file for file, part in halves.items() for n in part}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    checkpoint = Checkpoint(folder, allow_pickle=True)
    assert checkpoint.files == sorted(halves) and all(torch.equal(checkpoint.read(n), state[n]) for n in names)
    torch.save({n: state[n] for n in names[: len(names) // 2 + 1]}, folder / "pytorch_model-00001-of-00002.bin")
    with pytest.raises(EditguardError, match="is stored in both"):
        Checkpoint(folder, allow_pickle=True)


def test_refused_pickle_message_has_no_terminal_codes(evil_folder, cli):
    folder, _ = evil_folder
    result = cli("inspect", "--allow-pickle", folder)
    assert result.code == 2 and "\x1b[" not in result.err, result.err
