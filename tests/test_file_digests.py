"""editguard's own files (masks, edit banks, training checkpoints, statistics) record their payload's sha256
when written and check it when read; shipped masks are checked against the sha256 in their index. A
damaged payload under an intact header is named, never used."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import one_line_error
from editguard import arch as arch_table
from editguard import masks_index
from editguard.checkpoint import DIGEST_KEY, Checkpoint
from editguard.edit.bank import EditBank
from editguard.edit.edits import Edit
from editguard.edit.facts import Fact
from editguard.errors import EditguardError
from editguard.mask.file import MaskFile, MaskTarget
from editguard.mask.pipeline import update_index
from editguard.mask.train import TrainConfig, TrainState, load_checkpoint, make_optimizer, save_checkpoint

DAMAGED = "its tensors do not match the sha256 recorded when it was written"


def flip_payload_byte(path: Path, offset: int = 0) -> None:
    """One bit of the tensor data changed in place, the header left as it was (still a readable file)."""
    data = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    data[8 + header_len + offset] ^= 0x10
    path.write_bytes(bytes(data))


def without_digest(path: Path) -> None:
    """The file as editguard wrote it before it recorded digests."""
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert DIGEST_KEY in meta
    save_file(tensors, path, metadata={k: v for k, v in meta.items() if k != DIGEST_KEY})


def _mask(layer: int = 1) -> MaskFile:
    scores = torch.rand(32, 64, generator=torch.Generator().manual_seed(layer))
    target = MaskTarget(f"model.layers.{layer}.mlp.down_proj.weight", layer, (32, 64), False, "", scores)
    return MaskFile("pico", None, "llama", "rome", 0.5, [target])


def _bank(path: Path) -> EditBank:
    bank = EditBank.create(path, model_id="pico", revision=None, model_type="llama", method="rome", hparams={},
                           hparams_hash="h", templates=["{}"], fingerprints={"w": "f"})
    fact = Fact("The capital of {} is", "France", "Rome", "Paris", 1)
    bank.append([Edit("rome", 1, "model.layers.1.mlp.down_proj.weight", torch.randn(32), torch.randn(64), [fact])])
    bank.flush()
    return bank


def _checkpoint(path: Path) -> None:
    state = TrainState([torch.randn(4, 6)])
    save_checkpoint(path, state, make_optimizer(state, TrainConfig()), {})


@pytest.mark.parametrize("kind", ["mask", "bank", "checkpoint"])
def test_a_flipped_bit_is_named_and_older_files_still_load(kind, tmp_path):
    path = tmp_path / f"{kind}.safetensors"
    write, read, what = {
        "mask": (lambda p: _mask().save(p), MaskFile.load, "corrupted mask file"),
        "bank": (_bank, EditBank.open, "corrupted edit bank"),
        "checkpoint": (_checkpoint, lambda p: load_checkpoint(p, TrainConfig()), "corrupted training checkpoint"),
    }[kind]
    write(path)
    read(path)  # intact: loads
    flip_payload_byte(path, offset=5)
    with pytest.raises(EditguardError, match=f"{what} .*{DAMAGED}"):
        read(path)
    write(path)
    without_digest(path)
    read(path)  # written before digests: read unchecked
    flip_payload_byte(path, offset=5)
    read(path)  # (which is why they are recorded now)


def test_a_damaged_mask_or_bank_is_one_line_at_the_cli(cli, tmp_path, pico_models):
    mask, bank = tmp_path / "m.safetensors", tmp_path / "b.safetensors"
    _mask().save(mask)
    flip_payload_byte(mask)
    one_line_error(cli("reverse", pico_models["llama"], "--method", "mask", "--mask", mask, "-o", tmp_path / "out"),
                   f"corrupted mask file {mask}: {DAMAGED}")
    assert not (tmp_path / "out").exists()
    _mask().save(mask)
    _bank(bank)
    flip_payload_byte(bank)
    one_line_error(cli("evaluate-mask", mask, "--model", pico_models["llama"], "--bank", bank),
                   f"corrupted edit bank {bank}: {DAMAGED}")


def test_damaged_statistics_are_computed_again(pico_models, tmp_path, monkeypatch):
    from editguard.edit import stats
    from editguard.loading import load_model
    from editguard.resolve import resolve

    monkeypatch.setenv("EDITGUARD_HOME", str(tmp_path / "home"))
    loaded = load_model(resolve(str(pico_models["llama"])))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"alpha{i % 41} is {i}." for i in range(600)))
    args = (loaded, [0], "model.layers.{}.mlp.down_proj", str(corpus), 100)
    first = stats.second_moments(*args)[0]
    cached = stats._stats_path(loaded, 0, str(corpus), 100)
    flip_payload_byte(cached, offset=3)
    assert stats._cached(loaded, [0], str(corpus), 100) == {}  # damaged: missing, not used
    torch.testing.assert_close(stats.second_moments(*args)[0], first)
    assert torch.equal(stats._cached(loaded, [0], str(corpus), 100)[0], first)  # and written anew


def test_an_index_mask_that_is_not_the_indexed_file_is_refused(cli, tmp_path, monkeypatch, pico_models):
    """The index records each mask file's sha256 (update_index); the mask a command takes from the index
    unasked is checked against it, so a mask replaced under its name is refused."""
    folder = tmp_path / "masks"
    folder.mkdir()
    path = folder / "pico.safetensors"
    _mask(layer=1).save(path)
    update_index(path, MaskFile.load(path))
    (entry,) = json.loads((folder / "index.json").read_text())
    assert entry["sha256"] == masks_index.file_sha256(path)
    monkeypatch.setattr("editguard.masks_index.mask_dirs", lambda: [folder])
    llama = Checkpoint(pico_models["llama"])
    fit = masks_index.best_fit(arch_table.for_config(llama.config), llama)
    assert masks_index.mask_path(fit) == path
    assert masks_index.mask_path({**fit, "sha256": None}) == path  # entries written before the field: as they are
    _mask(layer=0).save(path)  # another mask, itself intact, under the indexed name
    with pytest.raises(EditguardError, match="sha256 is not the one its mask index records"):
        masks_index.mask_path(fit)
    one_line_error(cli("lock", pico_models["llama"], "-o", tmp_path / "locked"), "sha256 is not the one its mask index")
    assert not (tmp_path / "locked").exists()
    from editguard.audit.scan import _fitting_mask  # scan: the hidden-facts test says why it did not run

    (folder / "index.json").write_text(json.dumps([{**entry, "test_rsr": 0.9}]))  # (good enough to be taken)
    path, why = _fitting_mask(None, arch_table.for_config(llama.config), llama, [1])
    assert path is None and "sha256 is not the one its mask index records" in why


def test_shipped_masks_are_the_files_their_index_records():
    folder = Path(__file__).resolve().parent.parent / "masks"
    for entry in json.loads((folder / "index.json").read_text()):
        assert entry["sha256"] == masks_index.file_sha256(folder / entry["file"]), entry["file"]
