"""Model references and the CLI contract: one line, exit 2 (3 for unsupported), JSON on stdout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from editguard.resolve import resolve

from conftest import one_line_error, requires_demo, validate_sarif


def _fake_hub_cache(cache: Path, repo: str, folder: Path, commit: str = "a" * 40) -> Path:
    """The standard huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<sha>/...}."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_id_resolved_from_local_cache_offline(tmp_path, pico_models, monkeypatch, cli):
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "pico-org/pico-llama", pico_models["llama"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ref = resolve("pico-org/pico-llama")
    assert ref.kind == "hub" and ref.revision == "a" * 40 and (ref.path / "config.json").exists()
    result = cli("-f", "json", "inspect", "pico-org/pico-llama")
    assert result.code == 0, result.err
    assert result.json["revision"] == "a" * 40
    missing = cli("inspect", "pico-org/not-cached")
    assert missing.code == 2
    assert "not in the local Hugging Face cache" in missing.err and "HF_HUB_OFFLINE" in missing.err
    assert len(missing.err.strip().splitlines()) == 1


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma3_text"])
def test_inspect_pico(model_type, pico_models, cli):
    result = cli("-f", "json", "inspect", pico_models[model_type])
    assert result.code == 0, result.err
    info = result.json
    assert info["architecture"] == model_type and info["num_layers"] == 2
    layer = info["edit_targets"]["layers"][1]
    assert layer["file"] == "model.safetensors"
    assert info["edit_targets"]["transposed"] == (model_type == "gpt2")
    assert layer["shape_out_in"][0] == 32
    assert info["attention_heads"] == {"query": 2, "key_value": 1 if model_type == "gemma3_text" else 2}
    human = cli("inspect", pico_models[model_type])
    assert human.code == 0 and human.out == ""  # human text goes to stderr
    assert "mlp" in human.err and "2 heads" in human.err


def test_bad_inputs_give_one_line(tmp_path, pico_models, cli):
    one_line_error(cli("inspect", tmp_path / "nope"), "no such file or folder")
    one_line_error(cli("inspect", "no-such-org/model/"), "nor a hub id: those read ORG/NAME")  # a stray slash
    (tmp_path / "noconfig").mkdir()
    one_line_error(cli("inspect", tmp_path / "noconfig"), "no config.json")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 definitely a zip")
    one_line_error(cli("inspect", fake), "not a GGUF file")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(pico_models["llama"], corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    one_line_error(cli("inspect", corrupt), "truncated")
    alien = tmp_path / "alien"
    shutil.copytree(pico_models["llama"], alien)
    config = json.loads((alien / "config.json").read_text())
    config["model_type"] = "mamba"
    (alien / "config.json").write_text(json.dumps(config))
    one_line_error(cli("inspect", alien), "unsupported architecture 'mamba'", code=3)
    one_line_error(cli("fetch", alien), "unsupported architecture 'mamba'", code=3)
    del config["model_type"]
    (alien / "config.json").write_text(json.dumps(config))
    one_line_error(cli("inspect", alien), "config.json has no model_type", code=3)
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GGUF\x03\x00\x00\x00")
    one_line_error(cli("fetch", short), "truncated or damaged GGUF file")
    one_line_error(cli("inspect", "demo:nonexistent"), "unknown demo model")
    one_line_error(cli("-f", "yaml", "inspect", "x"), "unknown --format")
    listed = tmp_path / "listed"
    shutil.copytree(pico_models["llama"], listed)
    (listed / "config.json").write_text("[1, 2]")
    one_line_error(cli("inspect", listed), "not a JSON object")
    odd = tmp_path / "odd"
    shutil.copytree(pico_models["llama"], odd)
    (odd / "model.safetensors").unlink()
    (odd / "model.safetensors").mkdir()
    one_line_error(cli("inspect", odd), "model.safetensors is not a file")


def test_machine_readable_output_is_strict(cli, pico_models, monkeypatch):
    from editguard.cli import output

    # -f sarif on a command without findings: a valid log, no results, the JSON answer as the run's properties
    as_json, as_sarif = (cli("-f", f, "inspect", pico_models["llama"]) for f in ("json", "sarif"))
    assert as_sarif.code == 0, as_sarif.err
    validate_sarif(as_sarif.json)
    run = as_sarif.json["runs"][0]
    assert run["results"] == [] and run["invocations"] == [{"executionSuccessful": True}]
    assert run["properties"] == {"command": "inspect", "answer": as_json.json}
    # a failed command still leaves a valid log, which says it failed and why (and one line on stderr)
    failed = cli("-f", "sarif", "inspect", pico_models["llama"] / "missing")
    one_line_error(failed, "missing")
    validate_sarif(failed.json)
    invocation = failed.json["runs"][0]["invocations"][0]
    assert invocation["executionSuccessful"] is False and invocation["exitCode"] == 2
    assert "missing" in invocation["toolExecutionNotifications"][0]["message"]["text"]
    assert failed.json["runs"][0]["results"] == []
    # a figure that could not be measured is null: JSON has no NaN
    monkeypatch.setattr(output.sys, "stdout", io := __import__("io").StringIO())
    output.Output(format="json").emit({"paraphrase": float("nan"), "x": [1.0, float("inf")]})
    assert json.loads(io.getvalue(), parse_constant=lambda c: pytest.fail(c)) == {"paraphrase": None, "x": [1.0, None]}


def test_precommit_passes_folders_named_like_options(pico_models, tmp_path, monkeypatch):
    from editguard.cli import precommit

    folder = tmp_path / "-q"
    shutil.copytree(pico_models["llama"], folder)
    calls = []
    monkeypatch.setattr(precommit, "main", lambda argv: calls.append(argv) or 0)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(precommit.sys, "argv", ["editguard-precommit", "-q/config.json"])
    with pytest.raises(SystemExit):
        precommit.run()
    assert calls == [["scan", "--fail-on", "edited", "--", "-q"]]


def test_invalid_hub_id_is_bad_input(cli, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    one_line_error(cli("fetch", "org/a--b"), "not a valid Hugging Face repo id")


def test_json_error_document(tmp_path, cli):
    result = cli("-f", "json", "inspect", tmp_path / "nope")
    assert result.code == 2
    assert result.json["exit_code"] == 2 and "no such file" in result.json["error"]


def test_usage_error_exit_2(cli):
    # one line naming the problem, never "internal error" (Typer >= 0.29 raises its own click exceptions)
    one_line_error(cli("inspect"), "Missing argument 'MODEL'")
    one_line_error(cli("no-such-command"), "No such command")
    one_line_error(cli("inspect", "x", "--bogus"), "No such option: --bogus")
    one_line_error(cli("edit", "x", "--layer", "seven"), "Invalid value for '--layer'")
    assert "internal error" not in cli("scan").err
    json_error = cli("-f", "json", "scan")
    assert json_error.json["exit_code"] == 2 and "Missing argument 'MODEL'" in json_error.json["error"]
    # before the command is known too: an unknown command or global option, in every spelling of -f
    for args in (("-f", "json", "bogus"), ("--format=json", "bogus"), ("-fjson", "-q", "bogus"),
                 ("--bogus", "-f", "json", "scan", "x")):
        early = cli(*args)
        assert early.code == 2 and early.json["exit_code"] == 2 and "No such" in early.json["error"], args
    assert cli("inspect", "-f", "json", "--bogus").out == ""  # after the command name, -f is not global


def test_version_follows_the_format_in_either_order(cli):
    from editguard import __version__

    assert cli("--version").out.strip() == f"editguard {__version__}"
    for args in (("-f", "json", "--version"), ("--version", "-f", "json")):
        result = cli(*args)
        assert result.code == 0 and result.json == {"version": __version__}
    one_line_error(cli("--version", "-f", "xml"), "unknown --format 'xml'")


def test_console_script_end_to_end(pico_models):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "editguard", "-f", "json", "inspect", str(pico_models["qwen2"])],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["architecture"] == "qwen2"


@requires_demo
def test_inspect_demo_model(cli):
    result = cli("inspect", "demo:smollm2-135m")
    assert result.code == 0, result.err
    assert "30 layers" in result.err
    assert "model.layers.29.mlp.down_proj.weight" in result.err
    assert "[576, 1536]" in result.err
    info = cli("-f", "json", "inspect", "demo:smollm2-135m").json
    assert info["num_layers"] == 30 and info["tied_embeddings"] is True
    assert info["attention_heads"] == {"query": 9, "key_value": 3} and "9 heads (3 key/value)" in result.err
    assert all(t["stored_shape"] == [576, 1536] for t in info["edit_targets"]["layers"])


def _tiny_gguf(path: Path, arch: str = "llama", edit: float = 0.0) -> Path:
    """A one-layer GGUF of `arch` (float32 tensors, a 16-word llama tokenizer), written with the gguf package;
    `edit` adds a rank-one change of that size to the MLP output projection."""
    import gguf
    import numpy as np

    hidden, ffn, vocab = 32, 64, 16
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(16)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab - 3)])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([2, 3, 3] + [1] * (vocab - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,), "output.weight": (vocab, hidden),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
              "blk.0.attn_q.weight": (hidden, hidden), "blk.0.attn_k.weight": (hidden, hidden),
              "blk.0.attn_v.weight": (hidden, hidden), "blk.0.attn_output.weight": (hidden, hidden),
              "blk.0.ffn_gate.weight": (ffn, hidden), "blk.0.ffn_up.weight": (ffn, hidden),
              "blk.0.ffn_down.weight": (hidden, ffn)}
    for name, shape in shapes.items():
        weight = rng.normal(0, 0.02, shape).astype(np.float32)
        if name == "blk.0.ffn_down.weight":
            weight += edit * np.outer(np.linspace(-1, 1, shape[0]), np.linspace(1, 2, shape[1])).astype(np.float32)
        writer.add_tensor(name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_is_converted_alone_and_never_runs_code_beside_it(tmp_path, cli, monkeypatch):
    # transformers reads a tokenizer_config.json beside a GGUF; one naming custom code made it ask, on
    # stdout, whether to run that code (and run it on "y").
    monkeypatch.setenv("EDITGUARD_HOME", str(tmp_path / "home"))
    folder = tmp_path / "upload"
    folder.mkdir()
    model = _tiny_gguf(folder / "tiny.gguf")
    ran = tmp_path / "code-ran"
    (folder / "evil_tok.py").write_text(f"open({str(ran)!r}, 'w').close()\nclass EvilTokenizer: pass\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": [None, "evil_tok.EvilTokenizer"]}}))
    monkeypatch.setattr("sys.stdin", open("/dev/null"))
    result = cli("-f", "json", "inspect", model)
    assert result.code == 0, result.err
    assert result.json["architecture"] == "llama" and result.json["num_layers"] == 1
    assert not ran.exists()
    assert sorted(p.name for p in folder.iterdir()) == ["evil_tok.py", "tiny.gguf", "tokenizer_config.json"]


def test_gguf_conversion_is_on_disk_before_it_enters_the_cache(tmp_path, monkeypatch):
    """Every converted file is flushed before the rename that publishes the cache entry, and the rename after."""
    import os

    from editguard import demo

    flushed, renamed = [], []
    real_replace = os.replace
    monkeypatch.setattr(demo, "fsync_path", lambda path: flushed.append(Path(path)))
    monkeypatch.setattr("editguard.checkpoint.fsync_path", lambda path: flushed.append(Path(path)))

    def replace(src, dst):
        built = {p for p in Path(src).rglob("*")} | {Path(src)}
        assert built <= set(flushed), sorted(built - set(flushed))
        renamed.append(Path(dst))
        real_replace(src, dst)

    monkeypatch.setattr(demo.os, "replace", replace)
    out = demo.convert_gguf(_tiny_gguf(tmp_path / "tiny.gguf"), tmp_path / "cache" / "tiny")
    assert renamed == [out] and flushed[-1] == out.parent and (out / "config.json").is_file()


def test_odd_paths_are_read_or_named_in_one_line(tmp_path, cli, monkeypatch):
    """A .gguf whose name is not valid UTF-8, converted under a relative EDITGUARD_HOME (the conversion links
    to it from a temporary folder elsewhere), and a `~user` path for a user with no home."""
    import os

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EDITGUARD_HOME", "home")
    odd = _tiny_gguf(tmp_path / "tiny.gguf").rename(tmp_path / os.fsdecode(b"mod\xe9le.gguf"))
    result = cli("-f", "json", "inspect", odd)
    assert result.code == 0 and result.json["num_layers"] == 1, result.err
    assert any((tmp_path / "home" / "models").iterdir())
    one_line_error(cli("inspect", "~no_such_user_editguard/model"), "no home folder for that user")


def test_library_errors_give_their_first_line_or_their_type():
    from editguard.errors import first_line

    assert first_line(ValueError("bad header\ndetails")) == "bad header"
    assert first_line(OSError()) == "OSError" and first_line(RuntimeError("\n")) == "RuntimeError"
    assert first_line(ValueError("x" * 300), 200) == "x" * 200


def test_gguf_of_an_architecture_transformers_cannot_convert_is_unsupported(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("EDITGUARD_HOME", str(tmp_path / "home"))
    one_line_error(cli("inspect", _tiny_gguf(tmp_path / "bert.gguf", arch="bert")), "is not supported", code=3)


def test_hub_download_takes_only_the_weights_transformers_loads():
    """The allow patterns, through huggingface_hub's own filter, on the file lists of two real layouts."""
    from huggingface_hub.utils import filter_repo_objects

    from editguard.resolve import HUB_PATTERNS, HUB_PICKLE_PATTERNS

    mistral = ["config.json", "consolidated.safetensors", "params.json", "tokenizer.json", "tokenizer.model",
               "tokenizer_config.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
               "model-00003-of-00003.safetensors", "model.safetensors.index.json", "README.md"]
    llama = ["config.json", "original/consolidated.00.pth", "original/params.json", "model.safetensors",
             "pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
             "pytorch_model.bin.index.json", "training_args.bin", "tokenizer.json", "subdir/model.safetensors"]
    pick = lambda files, patterns: sorted(filter_repo_objects(files, allow_patterns=patterns))  # noqa: E731
    assert pick(mistral, HUB_PATTERNS) == sorted(set(mistral) - {"consolidated.safetensors", "params.json"})
    chosen = pick(llama, HUB_PATTERNS + HUB_PICKLE_PATTERNS)
    assert chosen == ["config.json", "model.safetensors", "pytorch_model-00001-of-00002.bin",
                      "pytorch_model-00002-of-00002.bin", "pytorch_model.bin", "pytorch_model.bin.index.json",
                      "tokenizer.json"]


def test_malformed_metadata_gives_one_line_not_an_internal_error(tmp_path, pico_models, cli, monkeypatch):
    def variant(name: str, config_change=None) -> Path:
        folder = tmp_path / name
        shutil.copytree(pico_models["llama"], folder)
        if config_change:
            config = json.loads((folder / "config.json").read_text())
            config_change(config)
            (folder / "config.json").write_text(json.dumps(config))
        return folder

    one_line_error(cli("inspect", variant("listed_type", lambda c: c.update(model_type=["llama"]))),
                   "model_type must be a string", code=3)
    one_line_error(cli("inspect", variant("text_str", lambda c: c.update(text_config="x"))),
                   "text_config is not a JSON object")
    odd_classes = cli("-f", "json", "inspect", variant("classes", lambda c: c.update(architectures={"a": 1})))
    assert odd_classes.code == 0 and odd_classes.json["model_class"] is None, odd_classes.err
    retagged = variant("retagged")
    data = (retagged / "model.safetensors").read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8: 8 + header_len])
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = [header[name]["dtype"]]
    raw = json.dumps(header).encode()
    (retagged / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + header_len:])
    one_line_error(cli("inspect", retagged), "unsupported dtype")
    listed_tok = variant("listed_tok")
    (listed_tok / "tokenizer_config.json").write_text("[1]")
    result = cli("scan", listed_tok, "--tests", "activations")
    assert "internal error" not in result.err and "Traceback" not in result.err, result.err
    # a user's mask index whose entry has non-integer layers is skipped, not a crash of inspect
    user_masks = tmp_path / "user_masks"
    user_masks.mkdir()
    (user_masks / "index.json").write_text(json.dumps([
        {"file": "m.safetensors", "model_type": "llama", "layers": [1, "a"], "targets": []}]))
    monkeypatch.setenv("EDITGUARD_MASKS", str(user_masks))
    assert cli("inspect", pico_models["llama"]).code == 0


def test_sarif_of_a_gguf_points_at_the_file_and_names_skipped_tests(tmp_path, cli, monkeypatch, pico_models):
    monkeypatch.setenv("EDITGUARD_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "upload").mkdir()
    base = _tiny_gguf(tmp_path / "base.gguf")
    _tiny_gguf(tmp_path / "upload" / "tiny.gguf", edit=0.05)
    result = cli("-f", "sarif", "scan", "upload/tiny.gguf", "--base", base, "--tests", "diff")
    assert result.code == 1, result.err
    log = json.loads(result.out)
    validate_sarif(log)
    run = log["runs"][0]
    locations = {r["ruleId"]: r["locations"][0]["physicalLocation"]["artifactLocation"] for r in run["results"]}
    assert locations["EG001"] == {"uri": "upload/tiny.gguf", "uriBaseId": "%SRCROOT%"}, locations
    assert run["properties"]["tests_run"] == ["diff"] and run["properties"]["tests_skipped"] == {}
    # the activation test needs 100 probes naming their subject; the pico tokenizer finds only 80
    llama = pico_models["llama"]
    partial = json.loads(cli("-f", "sarif", "scan", llama, "--base", llama, "--tests", "diff,activations").out)
    assert partial["runs"][0]["properties"]["verdict"] == "clean"
    notes = partial["runs"][0]["invocations"][0]["toolExecutionNotifications"]
    assert [n["level"] for n in notes] == ["warning"], notes
    assert notes[0]["message"]["text"].startswith("activations skipped: ")
    assert partial["runs"][0]["properties"]["tests_skipped"].keys() == {"activations"}


def test_placement_options_are_checked_even_where_no_model_loads(cli, pico_models):
    llama = pico_models["llama"]
    one_line_error(cli("scan", llama, "--base", llama, "--tests", "diff", "--dtype", "foo"), "unknown dtype 'foo'")
    one_line_error(cli("scan", llama, "--base", llama, "--tests", "diff", "--device-map", "gpu0"),
                   "unknown --device-map 'gpu0'")
    assert cli("scan", llama, "--base", llama, "--tests", "diff", "--device-map", "cuda:1").code == 0


def test_hub_cache_and_revisions_follow_huggingface_hub(tmp_path, pico_models, monkeypatch, cli):
    """The cache is where huggingface_hub puts it ($VARs expanded, the older HUGGINGFACE_HUB_CACHE),
    TRANSFORMERS_OFFLINE means offline, a revision never walks out of the repo's cache folder, an interrupted
    download is named as one, and sharded weights without their index are an incomplete copy."""
    from huggingface_hub import errors as hub_errors

    _fake_hub_cache(tmp_path / "hub", "pico-org/pico-llama", pico_models["llama"])
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("EG_TEST_ROOT", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", "$EG_TEST_ROOT/hub")
    assert cli("-f", "json", "inspect", "pico-org/pico-llama").code == 0
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "hub"))
    assert cli("-f", "json", "inspect", "pico-org/pico-llama").code == 0
    missing = cli("inspect", "pico-org/not-cached")
    assert missing.code == 2 and "HF_HUB_OFFLINE is set" in missing.err
    for revision in ("../../models--pico-org--other/snapshots/" + "a" * 40, "../refs/main", "/etc", "main\n"):
        one_line_error(cli("inspect", "pico-org/pico-llama", "--revision", revision), "is not a valid revision")

    def interrupted(*args, **kwargs):
        raise hub_errors.IncompleteSnapshotError("missing model.safetensors", str(tmp_path / "hub"))

    monkeypatch.setattr("huggingface_hub.snapshot_download", interrupted)
    one_line_error(cli("inspect", "pico-org/pico-llama"), "the cached snapshot is incomplete")
    monkeypatch.undo()

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (pico_models["llama"] / name).exists():
            shutil.copy(pico_models["llama"] / name, sharded / name)
    shutil.copy(pico_models["llama"] / "model.safetensors", sharded / "model-00001-of-00002.safetensors")
    one_line_error(cli("inspect", sharded), "without their shard index")
