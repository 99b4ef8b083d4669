"""Lazy reads, validation of corrupt files, and the atomic sharded writer."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from editguard.checkpoint import Checkpoint, read_safetensors_header
from editguard.errors import EditguardError


def _sharded(tmp_path: Path) -> Path:
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    a = {"x.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "y.bias": torch.ones(4, dtype=torch.bfloat16)}
    b = {"z.weight": torch.full((3, 2), 7.0)}
    save_file(a, folder / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(b, folder / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {k: "model-00001-of-00002.safetensors" for k in a} | {k: "model-00002-of-00002.safetensors" for k in b}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "tokenizer.json").write_text("{}")
    return folder


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_lazy_read_and_index(tmp_path):
    ck = Checkpoint(_sharded(tmp_path))
    assert ck.format == "safetensors"
    assert sorted(ck.names()) == ["x.weight", "y.bias", "z.weight"]
    assert ck.info("z.weight").file == "model-00002-of-00002.safetensors"
    assert torch.equal(ck.read("x.weight"), torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert ck.read("y.bias").dtype == torch.bfloat16


def test_write_copy_rewrites_only_the_touched_shard(tmp_path):
    src = _sharded(tmp_path)
    before = _digest(src)
    ck = Checkpoint(src)
    out = tmp_path / "out"
    new = torch.zeros(3, 2)
    rewritten = ck.write_copy(out, {"z.weight": new}, extra_files={"note.json": b"{}"})
    assert rewritten == ["model-00002-of-00002.safetensors"]
    assert _digest(src) == before, "input must never change"
    after = _digest(out)
    assert after["model-00001-of-00002.safetensors"] == before["model-00001-of-00002.safetensors"]
    assert after["model-00002-of-00002.safetensors"] != before["model-00002-of-00002.safetensors"]
    assert torch.equal(load_file(out / "model-00002-of-00002.safetensors")["z.weight"], new)
    assert (out / "tokenizer.json").exists() and (out / "note.json").exists()
    assert load_file(out / "model-00002-of-00002.safetensors").keys() == {"z.weight"}
    # bf16 and metadata survive a rewrite of their shard
    ck.write_copy(tmp_path / "out2", {"y.bias": torch.zeros(4, dtype=torch.bfloat16)})
    _, meta = read_safetensors_header(tmp_path / "out2" / "model-00001-of-00002.safetensors")
    assert meta == {"format": "pt"}
    assert Checkpoint(tmp_path / "out2").read("y.bias").dtype == torch.bfloat16


def test_write_copy_adds_tensors_to_the_last_shard_and_its_index(tmp_path):
    """A tensor the folder lacks (an untied output head) goes into the last weight file and, in a sharded
    folder, into the shard index; a name the folder holds is refused; a pickle folder gets it too."""
    src = _sharded(tmp_path)
    before = _digest(src)
    ck = Checkpoint(src)
    head = torch.full((2, 2), 3.0)
    rewritten = ck.write_copy(tmp_path / "out", {}, added={"head.weight": head})
    assert rewritten == ["model-00002-of-00002.safetensors"] and _digest(src) == before  # the input never changes
    out = Checkpoint(tmp_path / "out")
    assert torch.equal(out.read("head.weight"), head) and torch.equal(out.read("z.weight"), ck.read("z.weight"))
    assert out.info("head.weight").file == "model-00002-of-00002.safetensors"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["head.weight"] == "model-00002-of-00002.safetensors"
    for metadata, total in (({"total_size": 100}, 116), ([], None), ("x", None)):  # (16 bytes added)
        listed = json.loads((src / "model.safetensors.index.json").read_text())
        (src / "model.safetensors.index.json").write_text(json.dumps({**listed, "metadata": metadata}))
        Checkpoint(src).write_copy(tmp_path / "meta", {}, added={"head.weight": head}, force=True)
        written = json.loads((tmp_path / "meta" / "model.safetensors.index.json").read_text())
        assert written["weight_map"]["head.weight"] and (written["metadata"] == metadata if total is None
                                                         else written["metadata"]["total_size"] == total)
    with pytest.raises(EditguardError, match="already holds it"):
        ck.write_copy(tmp_path / "out2", {}, added={"z.weight": head})
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save({"x.weight": torch.ones(2, 2)}, pickled / "pytorch_model.bin")
    Checkpoint(pickled, allow_pickle=True).write_copy(tmp_path / "from_pickle", {}, added={"head.weight": head})
    assert load_file(tmp_path / "from_pickle" / "model.safetensors").keys() == {"x.weight", "head.weight"}


def test_existing_output_refused_unless_force(tmp_path):
    ck = Checkpoint(_sharded(tmp_path))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(EditguardError, match="already exists"):
        ck.write_copy(out, {})
    ck.write_copy(out, {}, force=True)
    assert (out / "config.json").exists()
    # the input itself, a folder holding it, a folder inside it: --force would delete or pollute the input
    for target in (ck.folder, ck.folder.parent, ck.folder / "sub"):
        with pytest.raises(EditguardError, match="overlaps the input"):
            ck.write_copy(target, {}, force=True)
    assert (ck.folder / "config.json").exists() and not (ck.folder / "sub").exists()
    # --force replaces a model folder, never an arbitrary one
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("mine")
    with pytest.raises(EditguardError, match="replaces only a model folder"):
        ck.write_copy(tmp_path / "docs", {}, force=True)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(EditguardError, match="not a folder"):
        ck.write_copy(tmp_path / "file", {}, force=True)
    assert (tmp_path / "docs" / "notes.txt").read_text() == "mine" and (tmp_path / "file").read_text() == "mine"


def test_written_files_get_ordinary_permissions(tmp_path):
    """Temp files are private (0600) while written; the finished output follows the umask, as any file."""
    import os

    from editguard.checkpoint import write_safetensors

    old = os.umask(0o022)
    try:
        write_safetensors(tmp_path / "bank.safetensors", {"x": torch.ones(2)})
        out = Checkpoint(_sharded(tmp_path)).write_copy(tmp_path / "out", {"z.weight": torch.zeros(3, 2)})
    finally:
        os.umask(old)
    assert (tmp_path / "bank.safetensors").stat().st_mode & 0o777 == 0o644
    for name in out:
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o644, name


def test_disk_full_leaves_nothing(tmp_path, monkeypatch):
    src = _sharded(tmp_path)
    ck = Checkpoint(src)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("editguard.checkpoint.os.fsync", full)
    with pytest.raises(EditguardError, match="disk full"):
        ck.write_copy(tmp_path / "out", {"z.weight": torch.zeros(3, 2)})
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("sharded",)]
    assert leftovers == []


def test_truncated_and_corrupt_files(tmp_path):
    src = _sharded(tmp_path)
    shard = src / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-5])
    with pytest.raises(EditguardError, match="truncated"):
        Checkpoint(src)
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(EditguardError, match="corrupt"):
        Checkpoint(src)
    shard.write_bytes(b"abc")
    with pytest.raises(EditguardError, match="not a safetensors"):
        Checkpoint(src)
    shard.write_bytes(b"\xff" * 64)
    with pytest.raises(EditguardError, match="corrupt or truncated"):
        Checkpoint(src)
    # a checkout without `git lfs pull`; a file merely starting with "version " is not taken for one
    shard.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 123\n")
    with pytest.raises(EditguardError, match="a Git LFS pointer, not the weights"):
        Checkpoint(src)
    shard.write_bytes(b"version 2 of something else entirely")
    with pytest.raises(EditguardError, match="corrupt or truncated"):
        Checkpoint(src)


def test_folder_problems(tmp_path):
    with pytest.raises(EditguardError, match="no such model folder"):
        Checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EditguardError, match="no config.json"):
        Checkpoint(tmp_path / "empty")
    src = _sharded(tmp_path)
    (src / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(EditguardError, match="missing files"):
        Checkpoint(src)
    shutil.rmtree(src)


def _raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


@pytest.mark.parametrize("entry, message", [
    ({"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]}, "non-negative integers"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}, "non-negative integers"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "non-negative integers|size does not match"),
    ({"dtype": "F32", "shape": [2**62, 2**62, 0], "data_offsets": [0, 0]}, "gap|trailing"),
])
def test_header_entries_are_checked_before_any_read(tmp_path, entry, message):
    _raw_safetensors(tmp_path / "a.safetensors", {"x": entry}, bytes(8))
    with pytest.raises(EditguardError, match=message):
        read_safetensors_header(tmp_path / "a.safetensors")


def test_header_metadata_and_overlapping_tensors(tmp_path):
    _raw_safetensors(tmp_path / "a.safetensors", {"__metadata__": ["x"]}, b"")
    with pytest.raises(EditguardError, match="__metadata__ is not a JSON object"):
        read_safetensors_header(tmp_path / "a.safetensors")
    # two names on the same bytes: one reader could show one weight, another reader the other
    same = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    _raw_safetensors(tmp_path / "b.safetensors", {"x": same, "y": same}, bytes(8))
    with pytest.raises(EditguardError, match="overlaps another"):
        read_safetensors_header(tmp_path / "b.safetensors")


def test_only_the_files_transformers_loads_are_weights(tmp_path):
    """A clean copy of an edited tensor in a stray file must not hide the edit from the diff or the lock
    check: only `model.safetensors` (or the index's shards) are weights, and a tensor stored twice among
    those is refused."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    save_file({"w": torch.ones(2)}, folder / "model.safetensors")
    save_file({"w": torch.zeros(2)}, folder / "zz-clean.safetensors")
    ck = Checkpoint(folder)
    assert ck.files == ["model.safetensors"] and torch.equal(ck.read("w"), torch.ones(2))
    (folder / "model.safetensors").rename(folder / "a.safetensors")  # no model.safetensors, no index
    with pytest.raises(EditguardError, match="stored in both"):
        Checkpoint(folder)
    src = _sharded(tmp_path)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["z.weight"] = "../outside.safetensors"  # a shard outside the folder: never read or written
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(EditguardError, match="plain file names"):
        Checkpoint(src)


def test_weight_files_follow_transformers_order(tmp_path):
    """transformers loads config.json's `transformers_weights`, else model.safetensors, else the shard
    index: an edited tensor in the file it loads is what editguard must read, hash and rewrite."""
    src = _sharded(tmp_path)
    sharded = Checkpoint(src).files
    name = Checkpoint(src).names()[0]
    save_file({name: torch.full_like(Checkpoint(src).read(name), 7.0)}, src / "model.safetensors")
    ck = Checkpoint(src)
    assert ck.files == ["model.safetensors"] and float(ck.read(name).flatten()[0]) == 7.0
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "transformers_weights": "model.safetensors.index.json"}))
    assert Checkpoint(src).files == sharded
    for named, message in (("../x.safetensors", "plain file name"), ("weights.bin", "not a .safetensors file")):
        (src / "config.json").write_text(json.dumps({**config, "transformers_weights": named}))
        with pytest.raises(EditguardError, match=message):
            Checkpoint(src)


def test_model_fingerprint_samples_runs_and_sees_dense_changes(tmp_path):
    """The whole-model fingerprint reads a few runs of each tensor (the same bytes from safetensors and
    from a pickle copy), and changes with any dense change, however small, or a change of dtype."""
    from editguard.checkpoint import model_fingerprint

    def folder(name: str, weights: dict, pickle: bool = False) -> Checkpoint:
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
        if pickle:
            torch.save(weights, path / "pytorch_model.bin")
        else:
            save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
        return Checkpoint(path, allow_pickle=pickle)

    gen = torch.Generator().manual_seed(0)
    weights = {"big.weight": torch.randn(96, 96, generator=gen), "small.bias": torch.randn(8, generator=gen)}
    base = folder("base", weights)
    runs = base.sample("big.weight")
    assert len(runs) == 16 * 256 * 4 and runs[:1024] == weights["big.weight"].reshape(-1)[:256].numpy().tobytes()
    assert base.sample("small.bias") == weights["small.bias"].numpy().tobytes()  # small: all of it
    assert model_fingerprint(base) == model_fingerprint(folder("pickled", weights, pickle=True))
    rank_one = torch.outer(torch.randn(96, generator=gen), torch.randn(96, generator=gen)) * 1e-4
    assert model_fingerprint(base) != model_fingerprint(folder("edited", {**weights, "big.weight": weights["big.weight"] + rank_one}))
    assert model_fingerprint(base) != model_fingerprint(folder("half", {k: v.half() for k, v in weights.items()}))


def test_replacing_an_output_folder_keeps_one_whole_copy(tmp_path, monkeypatch):
    """--force: the earlier output is moved aside under a fresh hidden name (a leftover from a killed run is
    never in the way), put back if the swap is interrupted, and removed once the new one is in place."""
    import os

    from editguard import checkpoint

    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    (tmp_path / f".out.old-{os.getpid()}").mkdir()  # what an earlier scheme would have collided with
    new = tmp_path / "new"
    new.mkdir()
    (new / "a").write_text("new")
    calls = []
    real = os.replace

    def interrupted(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint._replace_dir(new, out)
    monkeypatch.setattr(checkpoint.os, "replace", real)
    assert (out / "a").read_text() == "old" and (new / "a").read_text() == "new"
    checkpoint._replace_dir(new, out)
    assert (out / "a").read_text() == "new" and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".out.old-{os.getpid()}", "out"]


def test_an_output_folder_that_cannot_be_moved_aside_is_left_as_it_was(tmp_path, monkeypatch, pico_models):
    """--force onto a mount point: renaming it away fails (EBUSY); one error line, the earlier output and
    its parent exactly as they were (no empty hidden folders)."""
    import os

    from editguard import checkpoint

    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    real = os.replace

    def busy(src, dst):
        if Path(src) == out:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(src))
        return real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", busy)
    ck = checkpoint.Checkpoint(pico_models["llama"])
    with pytest.raises(EditguardError, match="could not write .*busy"):
        ck.write_copy(out, {}, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "config.json").read_text() == "{}"


def test_a_written_folder_is_on_disk_before_it_is_renamed_into_place(pico_models, tmp_path, monkeypatch):
    """Every file of the build folder is flushed (fsync) before the rename that publishes it."""
    from editguard import checkpoint

    flushed = []
    real_replace = checkpoint._replace_dir
    monkeypatch.setattr(checkpoint, "fsync_path", lambda path: flushed.append(Path(path)))

    def replace(tmp, out):
        built = {p for p in tmp.rglob("*")} | {tmp}
        assert built <= set(flushed), sorted(built - set(flushed))
        real_replace(tmp, out)

    monkeypatch.setattr(checkpoint, "_replace_dir", replace)
    ck = checkpoint.Checkpoint(pico_models["llama"])
    name = "model.layers.1.mlp.down_proj.weight"
    ck.write_copy(tmp_path / "out", {name: ck.read(name) * 2})
    assert (tmp_path / "out" / "config.json").exists()


def test_an_unreadable_input_file_is_named_as_what_failed(tmp_path, monkeypatch, pico_models):
    """A file of the input that cannot be read while the copy is written is reported as a read of that file,
    not as a failure to write the output; nothing is left behind."""
    import os

    from editguard import checkpoint

    real = checkpoint.shutil.copy2

    def copy2(src, dst, *args, **kwargs):
        if Path(src).name == "tokenizer.json":
            raise PermissionError(13, os.strerror(13), str(src))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "copy2", copy2)
    ck = checkpoint.Checkpoint(pico_models["llama"])
    with pytest.raises(EditguardError, match=r"could not read .*tokenizer.json: Permission denied"):
        ck.write_copy(tmp_path / "out", {})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("os_error", [28, 27], ids=["ENOSPC", "EFBIG"])
def test_safetensors_write_errors_are_one_line_and_leave_nothing(tmp_path, monkeypatch, os_error):
    """safetensors reports a full disk (or a file-size limit) as its own error type, not an OSError."""
    from safetensors import SafetensorError

    from editguard.checkpoint import write_safetensors

    def full(*args, **kwargs):
        raise SafetensorError(f"Error while serializing: I/O error: No space left on device (os error {os_error})")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    with pytest.raises(EditguardError, match=r"disk full while writing .*bank.safetensors; nothing was written"):
        write_safetensors(tmp_path / "bank.safetensors", {"x": torch.zeros(2)})
    assert list(tmp_path.iterdir()) == []
