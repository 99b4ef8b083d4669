"""`reverse` and `lock` on pico models: outputs are right, inputs untouched, tampering is reported."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from editguard.checkpoint import Checkpoint, fingerprint
from editguard.errors import EditguardError
from editguard.mask.file import MaskFile, MaskTarget
from conftest import one_line_error

TENSOR = "model.layers.1.mlp.down_proj.weight"


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def pico_mask(pico_models, tmp_path):
    weight = Checkpoint(pico_models["llama"]).read(TENSOR)
    scores = torch.rand(32, 64, generator=torch.Generator().manual_seed(0))
    mask = MaskFile("pico", None, "llama", "rome", 0.2, [MaskTarget(TENSOR, 1, (32, 64), False, fingerprint(weight), scores)])
    path = tmp_path / "pico_mask.safetensors"
    mask.save(path)
    return path


@pytest.fixture
def edited(pico_models, tmp_path, cli):
    hp = tmp_path / "hp.yaml"
    hp.write_text(yaml.safe_dump({"alg_name": "ROME", "layers": [1], "context_template_length_params": [[5, 5]],
                                  "v_num_grad_steps": 5}))
    out = tmp_path / "edited"
    assert cli("-q", "edit", pico_models["llama"], "--fact", "The official language of {}", "--subject", "France",
               "--target", "Japanese", "--hparams", hp, "-o", out).code == 0
    return out


def test_reverse_methods(cli, edited, pico_models, pico_mask, tmp_path):
    before = _digest(edited)
    probes = tmp_path / "probes.jsonl"
    probes.write_text('{"prompt": "The official language of France", "subject": "France", "answer": "French"}\n')
    # mask: W ⊙ K
    out = tmp_path / "rev-mask"
    r = cli("-f", "json", "reverse", edited, "-o", out, "--mask", pico_mask, "--probes", probes)
    assert r.code == 0, r.err
    K = MaskFile.load(pico_mask).mask()
    torch.testing.assert_close(Checkpoint(out).read(TENSOR), Checkpoint(edited).read(TENSOR) * K)
    # base: the flagged tensor restored bit for bit
    out = tmp_path / "rev-base"
    r = cli("-f", "json", "reverse", edited, "-o", out, "--method", "base", "--base", pico_models["llama"],
            "--mask", pico_mask, "--probes", probes)
    assert r.code == 0, r.err
    assert r.json["restored"] == [TENSOR]
    assert torch.equal(Checkpoint(out).read(TENSOR), Checkpoint(pico_models["llama"]).read(TENSOR))
    # svd: the top singular component is gone
    out = tmp_path / "rev-svd"
    r = cli("-f", "json", "reverse", edited, "-o", out, "--method", "svd", "--layers", "1", "--mask", pico_mask,
            "--probes", probes)
    assert r.code == 0, r.err
    w = Checkpoint(edited).read(TENSOR)
    sv = torch.linalg.svdvals(w)
    torch.testing.assert_close(torch.linalg.svdvals(Checkpoint(out).read(TENSOR))[:3], sv[1:4], atol=1e-4, rtol=1e-4)
    assert _digest(edited) == before  # the input is never modified
    again = cli("reverse", edited, "-o", out, "--method", "svd", "--layers", "1")
    assert again.code == 2 and "already exists" in again.err
    wrong = cli("reverse", edited, "-o", tmp_path / "rev-w", "--method", "svd", "--layers", "1", "--whiten")
    assert wrong.code == 2 and "apply to --method project" in wrong.err and "Traceback" not in wrong.err
    # svd with --layers needs no scan: a probe file too small for any test still gets its checkpoint
    out = tmp_path / "rev-svd-noscan"
    r = cli("-f", "json", "reverse", edited, "-o", out, "--method", "svd", "--layers", "1", "--probes", probes)
    assert r.code == 0 and r.json["facts"] == [], r.out
    # base: the edit restored; another changed tensor that is no edit stays, and the output says so
    attn = "model.layers.1.self_attn.o_proj.weight"
    mixed = tmp_path / "mixed"
    shutil.copytree(edited, mixed)
    tensors = load_file(mixed / "model.safetensors")
    tensors[attn] = tensors[attn] + torch.randn(tensors[attn].shape, generator=torch.Generator().manual_seed(0))
    save_file(tensors, mixed / "model.safetensors")
    r = cli("-f", "json", "reverse", mixed, "-o", tmp_path / "rev-mixed", "--method", "base", "--base",
            pico_models["llama"], "--probes", probes)
    assert r.code == 0, r.err
    assert r.json["restored"] == [TENSOR] and r.json["left_as_they_are"] == [attn]


def test_reverse_loads_the_input_once_and_scans_once(cli, edited, pico_models, pico_mask, tmp_path, monkeypatch):
    """The scan that finds the flagged facts, the projection and the "before" answers share one load of
    the input model; a second request for the same scan is answered from the first."""
    from editguard import loading
    from editguard.audit import scan as scan_module

    loads, scans = [], []
    real_load, real_scan = loading.load_model, scan_module.scan
    monkeypatch.setattr(loading, "load_model", lambda ref, **kw: loads.append(ref.path.name) or real_load(ref, **kw))
    monkeypatch.setattr(scan_module, "scan", lambda ref, options, *a, **kw: scans.append(options.tests)
                        or real_scan(ref, options, *a, **kw))
    probes = tmp_path / "probes.jsonl"
    probes.write_text('{"prompt": "The official language of France", "subject": "France", "answer": "French"}\n')
    r = cli("-f", "json", "reverse", edited, "-o", tmp_path / "rev", "--method", "svd", "--layers", "1",
            "--mask", pico_mask, "--probes", probes, "--eval", "--text-tokens", "64")
    assert r.code == 0, r.err
    assert loads == [edited.name, "rev"] and len(scans) == 1, (loads, scans)
    assert "perplexity_before" in r.json["evaluation"]  # read from the shared load of the input


def test_reversal_evaluation_reads_each_model(edited, pico_models):
    """reverse --eval: fact scores and text figures are those of each model, read one at a time."""
    import math

    from editguard.harden.evaluate import answer_head, evaluate_reversal
    from editguard.loading import load_model
    from editguard.resolve import resolve
    from editguard.scoring import continuation_logprobs

    assert answer_head(" Los Angeles, California") == "Los" and answer_head("English. The") == "English"
    prompt = "The official language of France"
    before, after = resolve(str(edited)), resolve(str(pico_models["llama"]))
    rows, summary = evaluate_reversal(load_model, before, after, [{"prompt": prompt, "original": "French"}],
                                      text_tokens=96, window=32)
    row = rows[0]
    assert row["edited_answer"] == answer_head(row["before"]) == "Japanese"  # the planted answer, counted
    assert summary["facts_counted"] == 1 and summary["rsr_before"] == 0.0
    for label, ref in (("before", before), ("after", after)):
        loaded = load_model(ref)
        (original,), _ = continuation_logprobs(loaded, [prompt], ["French"])
        assert row[f"p_original_{label}"] == pytest.approx(math.exp(float(original)), rel=1e-4)
        (edited_lp,), _ = continuation_logprobs(loaded, [prompt], ["Japanese"])
        assert row[f"preference_{label}"] == pytest.approx(float(original - edited_lp), abs=1e-4)
    assert summary["text_tokens"] == 93 and 0 <= summary["top1_agreement"] <= 1
    _, same = evaluate_reversal(load_model, after, after, [], text_tokens=96, window=32)
    assert same["top1_agreement"] == 1.0 and same["perplexity_before"] == same["perplexity_after"]
    assert same["perplexity_after"] != pytest.approx(summary["perplexity_before"])  # the edit changed the text figures


def test_locked_model_loads_with_the_bits_that_masked_it(cli, pico_models, tmp_path):
    """Scores are stored in float16: a weight the mask keeps (score 0.20001 ≥ γ = 0.2 in float32) scores
    0.19995 when re-cut. The lock writes the stored bits; the loader must re-apply those, not a new cut."""
    from editguard import load_locked

    weight = Checkpoint(pico_models["llama"]).read(TENSOR)
    scores = torch.rand(32, 64, generator=torch.Generator().manual_seed(0))
    scores[0, 0] = 0.20001
    mask = MaskFile("pico", None, "llama", "rome", 0.2, [MaskTarget(TENSOR, 1, (32, 64), False, fingerprint(weight), scores)])
    mask.save(tmp_path / "m.safetensors")
    stored = MaskFile.load(tmp_path / "m.safetensors")
    assert stored.mask()[0, 0] == 1 and stored.targets[0].binary(0.2)[0, 0] == 0  # the rounding at stake
    assert cli("lock", pico_models["llama"], "--mask", tmp_path / "m.safetensors", "-o", tmp_path / "locked").code == 0
    assert json.loads((tmp_path / "locked" / "editguard-lock.json").read_text())["threshold"] is None
    loaded = load_locked(str(tmp_path / "locked"))
    effective = loaded.model.get_submodule(TENSOR.removesuffix(".weight")).weight.detach()
    torch.testing.assert_close(effective, weight * stored.mask())


def test_commands_run_on_a_model_offloaded_to_disk(cli, edited, pico_models, pico_mask, tmp_path, caplog):
    """--device-map auto under a memory cap that sends most of the model to disk: the modules editguard
    reads and writes in place (embedding, head, MLP output projections, a given mask's and a lock's
    tensors) stay real, so each command gives what it gives on the CPU; a weight left offloaded that a
    command must touch is one clear line."""
    from editguard import load_locked
    from editguard.edit.edits import weight_param
    from editguard.loading import load_model
    from editguard.resolve import resolve

    def offloaded(name):
        return ["--device-map", "auto", "--max-memory", "cpu=20KB", "--offload-folder", tmp_path / name]

    model = pico_models["llama"]
    again = cli("-q", "edit", model, "--fact", "The official language of {}", "--subject", "France", "--target",
                "Japanese", "--hparams", tmp_path / "hp.yaml", "-o", tmp_path / "edited_off", *offloaded("o1"))
    assert again.code == 0, again.err
    assert (tmp_path / "edited_off" / "model.safetensors").read_bytes() == (edited / "model.safetensors").read_bytes()
    scan = cli("-f", "json", "scan", edited, "--base", model, *offloaded("o2"))
    assert scan.code == 1 and scan.json["tests"]["diff"]["classification"] == "rome-like", scan.err
    probes = tmp_path / "probes.jsonl"
    probes.write_text('{"prompt": "The official language of France", "subject": "France", "answer": "French"}\n')
    reverse = cli("reverse", edited, "-o", tmp_path / "rev", "--mask", pico_mask, "--probes", probes, *offloaded("o3"))
    assert reverse.code == 0, reverse.err
    # accelerate's own log line ("Some parameters are on the meta device ...") stays out of the output
    assert not [r for r in caplog.records if r.name.startswith("accelerate") and "meta device" in r.getMessage()]
    torch.testing.assert_close(Checkpoint(tmp_path / "rev").read(TENSOR),
                               Checkpoint(edited).read(TENSOR) * MaskFile.load(pico_mask).mask())
    assert cli("lock", model, "--mask", pico_mask, "-o", tmp_path / "locked").code == 0
    placement = dict(device_map="auto", max_memory={"cpu": "20KB"}, offload_folder=str(tmp_path / "o4"))
    locked = load_locked(str(tmp_path / "locked"), **placement)
    effective = locked.model.get_submodule(TENSOR.removesuffix(".weight")).weight.detach()
    torch.testing.assert_close(effective, Checkpoint(model).read(TENSOR) * MaskFile.load(pico_mask).mask())
    assert any(p.device.type == "meta" for p in locked.model.parameters())  # the cap did offload the rest
    loaded = load_model(resolve(str(model)), **{**placement, "offload_folder": str(tmp_path / "o5")})
    with pytest.raises(EditguardError, match="up_proj.weight was offloaded by --device-map auto"):
        weight_param(loaded.model, "model.layers.1.mlp.up_proj.weight")


def test_a_hidden_facts_test_that_compared_nothing_is_no_clean_result(cli, edited, pico_mask, tmp_path):
    """The hidden-facts test examines the answers held at ≥ --min-prob: with none, it looked at nothing, so
    it is skipped (here the only test: exit 2), never a clean verdict."""
    probes = tmp_path / "probes.jsonl"
    probes.write_text('{"prompt": "The official language of France", "subject": "France", "answer": "French"}\n')
    args = ["-f", "json", "scan", edited, "--tests", "hidden", "--mask", pico_mask, "--probes", probes, "--min-prob"]
    seen = cli(*args, "0")
    assert seen.code in (0, 1) and "skipped" not in seen.json["tests"]["hidden"], seen.err
    none = cli(*args, "1")
    assert none.code == 2 and "hidden: no probe answer is confident enough to test (p ≥ 1.0)" in none.json["error"]


def test_lock_manifest_loader_and_tamper(cli, pico_models, pico_mask, tmp_path):
    from editguard import load_locked
    from editguard.edit.edits import Edit, apply_to_model

    locked_dir = tmp_path / "locked"
    r = cli("-f", "json", "lock", pico_models["llama"], "--mask", pico_mask, "-o", locked_dir)
    assert r.code == 0, r.err
    assert (locked_dir / "editguard-lock.json").exists() and (locked_dir / "editguard-mask.safetensors").exists()
    K = MaskFile.load(pico_mask).mask()
    base = Checkpoint(pico_models["llama"]).read(TENSOR)
    torch.testing.assert_close(Checkpoint(locked_dir).read(TENSOR), base * K)
    # the lock's own mask file beside the weights is not read as a weight shard
    assert set(Checkpoint(locked_dir).names()) == set(Checkpoint(pico_models["llama"]).names())
    # the loader keeps the mask in the forward pass: a later edit is masked too
    loaded = load_locked(str(locked_dir))
    gen = torch.Generator().manual_seed(1)
    edit = Edit("rome", 1, TENSOR, torch.randn(32, generator=gen), torch.randn(64, generator=gen))
    apply_to_model(loaded.model, loaded.arch, [edit])
    module = loaded.model.get_submodule(TENSOR.removesuffix(".weight"))
    x = torch.randn(3, 64, generator=gen)
    expected = x @ ((base * K + edit.delta()) * K).T
    torch.testing.assert_close(module(x), expected, atol=1e-5, rtol=1e-4)
    # scan: an intact lock, proven by the digest lock printed, is clean; a changed locked tensor is reported
    clean = cli("-f", "json", "scan", locked_dir, "--tests", "diff", "--lock-digest", r.json["manifest_sha256"])
    assert clean.code == 0 and clean.json["tests"]["lock"]["intact"] is True
    # an intact lock without its digest vouches for nothing the manifest does not: alone, no test ran
    unproven = cli("-f", "json", "scan", locked_dir, "--tests", "diff")
    assert unproven.code == 2 and "no test could run (diff: no base given" in unproven.json["error"]
    # the manifest's digest, printed at lock time, is what scan reports: a rewritten manifest shows
    assert clean.json["tests"]["lock"]["manifest_sha256"] == r.json["manifest_sha256"]
    tampered = tmp_path / "tampered"
    shutil.copytree(locked_dir, tampered)
    tensors = load_file(tampered / "model.safetensors")
    tensors[TENSOR] = tensors[TENSOR] + 0.01
    save_file(tensors, tampered / "model.safetensors")
    result = cli("-f", "json", "scan", tampered, "--tests", "diff")
    assert result.code == 1 and result.json["verdict"] == "edited"
    # the changed bytes, and values where the mask is 0 (lock writes 0 there)
    assert [f["rule"] for f in result.json["findings"]] == ["EG030", "EG030"]
    assert [p["kind"] for p in result.json["tests"]["lock"]["problems"]] == ["bytes", "unmasked"]
    assert {f["tensor"] for f in result.json["findings"]} == {TENSOR}
    with pytest.raises(Exception, match="lock broken"):
        load_locked(str(tampered))
    # a manifest that points its mask elsewhere, or re-applies it at a threshold that zeroes the weight,
    # is corrupt: refused, not obeyed
    import json as json_module
    for i, (field, value, message) in enumerate((("mask_file", "../elsewhere.safetensors", "mask_file must be"),
                                                 ("threshold", 5.0, "nor a number in"),
                                                 ("threshold", "abc", "nor a number in"), ("tensors", {}, "inconsistent"),
                                                 ("layouts", {TENSOR: "F32"}, "layouts must give"))):
        odd = tmp_path / f"odd{i}"
        shutil.copytree(locked_dir, odd)
        manifest = json_module.loads((odd / "editguard-lock.json").read_text())
        (odd / "editguard-lock.json").write_text(json_module.dumps({**manifest, field: value}))
        with pytest.raises(Exception, match=message):
            load_locked(str(odd))
        result = cli("scan", odd, "--tests", "diff")
        assert result.code == 2 and "corrupt lock manifest" in result.err
    garbled = tmp_path / "garbled"  # not even text
    shutil.copytree(locked_dir, garbled)
    (garbled / "editguard-lock.json").write_bytes(b"\xff\xfe{" + bytes(range(128, 256)))
    one_line_error(cli("scan", garbled, "--tests", "diff"), "corrupt lock manifest")


def test_scan_checks_the_lock_digest_it_is_given(cli, pico_models, pico_mask, tmp_path):
    """The one check an unsigned lock allows: the manifest digest `lock` printed. A forger who rewrites the
    mask file, the threshold and every hash passes every other check; `scan --lock-digest` (and
    `load_locked(manifest_sha256=...)`) still refuse them, as they refuse a model with no lock at all."""
    from editguard import load_locked

    locked = tmp_path / "locked"
    digest = cli("-f", "json", "lock", pico_models["llama"], "--mask", pico_mask, "-o", locked).json["manifest_sha256"]
    ok = cli("-f", "json", "scan", locked, "--tests", "diff", "--lock-digest", digest.upper())
    assert ok.code == 0 and ok.json["tests"]["lock"]["intact"] and ok.json["tests"]["lock"]["expected_sha256"] == digest
    load_locked(str(locked), manifest_sha256=digest)
    # the threshold rewritten: a valid manifest that re-applies the mask at another γ
    manifest = json.loads((locked / "editguard-lock.json").read_text())
    (locked / "editguard-lock.json").write_text(json.dumps({**manifest, "threshold": 0.01}))
    unseen = cli("-f", "json", "scan", locked, "--tests", "diff", "--base", pico_models["llama"])
    assert unseen.json["tests"]["lock"]["intact"]  # unseen without the digest
    forged = cli("-f", "json", "scan", locked, "--tests", "diff", "--lock-digest", digest)
    assert forged.code == 1 and [p["kind"] for p in forged.json["tests"]["lock"]["problems"]] == ["digest"]
    assert forged.json["findings"][0]["rule"] == "EG030" and digest in forged.json["findings"][0]["message"]
    with pytest.raises(EditguardError, match="not the expected"):
        load_locked(str(locked), manifest_sha256=digest)
    load_locked(str(locked))  # without the digest the rewrite is invisible, as the README says
    unlocked = cli("-f", "json", "scan", pico_models["llama"], "--tests", "diff", "--lock-digest", digest)
    assert unlocked.code == 1 and unlocked.json["tests"]["lock"]["locked"] is False
    assert [p["kind"] for p in unlocked.json["tests"]["lock"]["problems"]] == ["unlocked"]
    sarif = cli("-f", "sarif", "scan", pico_models["llama"], "--tests", "diff", "--lock-digest", digest).out
    result = json.loads(sarif)["runs"][0]["results"][0]
    assert result["ruleId"] == "EG030" and "editguard-lock.json" not in json.dumps(result.get("locations", []))
    assert "MISSING" in cli("scan", pico_models["llama"], "--tests", "diff", "--lock-digest", digest).err
    one_line_error(cli("scan", locked, "--tests", "diff", "--lock-digest", "abc"), "64 hex digits")


def test_lock_whose_manifest_does_not_match_its_mask(cli, pico_models, pico_mask, tmp_path):
    """A manifest rewritten to say another tensor is the locked one (its hash and layout rewritten to
    match) is not what lock wrote: EG030, not an error that stops the scan. An 8-bit float lock is
    checked like any other."""
    from editguard.harden.lock import tensor_sha256

    locked = tmp_path / "locked"
    assert cli("lock", pico_models["llama"], "--mask", pico_mask, "-o", locked).code == 0
    other = TENSOR.replace("layers.1", "layers.0")
    manifest = json.loads((locked / "editguard-lock.json").read_text())
    manifest["tensors"] = {other: tensor_sha256(Checkpoint(locked).read(other))}
    manifest["layouts"] = {other: manifest["layouts"][TENSOR]}
    (locked / "editguard-lock.json").write_text(json.dumps(manifest))
    result = cli("-f", "json", "scan", locked, "--tests", "diff")
    assert result.code == 1 and [p["kind"] for p in result.json["tests"]["lock"]["problems"]] == ["mask"], result.err
    assert "not its mask file's targets" in result.json["findings"][0]["message"]
    eight = tmp_path / "eight"
    shutil.copytree(pico_models["llama"], eight)
    tensors = load_file(eight / "model.safetensors")
    tensors[TENSOR] = tensors[TENSOR].to(torch.float8_e4m3fn)
    save_file(tensors, eight / "model.safetensors")
    assert cli("lock", eight, "--mask", pico_mask, "-o", tmp_path / "eight-locked").code == 0
    clean = cli("-f", "json", "scan", tmp_path / "eight-locked", "--tests", "diff", "--base", eight)
    assert clean.code == 0 and clean.json["tests"]["lock"]["intact"], clean.err
    assert clean.json["tests"]["diff"]["classification"] == "identical"


def test_mask_for_other_architecture(cli, pico_models, pico_mask, tmp_path):
    r = cli("lock", pico_models["qwen2"], "--mask", pico_mask, "-o", tmp_path / "x")
    assert r.code == 2 and "for llama models" in r.err
    r = cli("reverse", pico_models["gpt2"], "--mask", pico_mask, "-o", tmp_path / "y")
    assert r.code == 2 and "for llama models" in r.err
    # the probe file is read first: the other architecture would have been the error otherwise
    r = cli("reverse", pico_models["gpt2"], "--mask", pico_mask, "-o", tmp_path / "y", "--probes", tmp_path / "no.jsonl")
    assert r.code == 2 and "no such probe file" in r.err
    r = cli("reverse", pico_models["llama"], "--method", "svd", "--layers", "1", "--base", tmp_path / "nope",
            "-o", tmp_path / "z")
    assert r.code == 2 and "--base applies to --method base, not svd" in r.err, r.err


def test_lock_reads_evaluation_inputs_before_writing(cli, pico_models, pico_mask, tmp_path):
    for extra, message in ((("--hparams", "no-such-preset"), "no hparams file or preset"),
                           (("--data", tmp_path / "none.json", "--hparams", "smollm2-135m"), "none.json"),
                           ((), "--evaluate needs --hparams")):  # a pico model has no preset of its own
        out = tmp_path / "locked"
        r = cli("lock", pico_models["llama"], "--mask", pico_mask, "-o", out, "--evaluate", "1", *extra)
        assert r.code == 2 and message in r.err and not out.exists(), r.err


def test_key_projection_deletes_a_rome_edit(edited, pico_models):
    """ROME with C = I writes u k̂ᵀ: projecting the subject's keys out leaves what it leaves of the base."""
    from editguard.edit.templates import context_templates
    from editguard.harden.project import project_out, projection_replacements, subject_keys
    from editguard.loading import load_model
    from editguard.resolve import resolve

    loaded = load_model(resolve(str(edited)))
    flagged = {1: [{"prompt": "The official language of France", "subject": "France"}]}
    base, now = Checkpoint(pico_models["llama"]).read(TENSOR), Checkpoint(edited).read(TENSOR)
    assert (now - base).norm() > 1e-3  # there is an edit to delete
    # With the editor's own context templates (written by the unedited model) the span holds k* exactly,
    # and the edit disappears: what is left is what the projection leaves of the base weight.
    unedited = load_model(resolve(str(pico_models["llama"])))
    editor_templates = context_templates(unedited.model, unedited.tokenizer, [[5, 5]], 0)
    keys = subject_keys(loaded, 1, flagged[1], editor_templates)
    projected = project_out(now, keys, False)
    torch.testing.assert_close(projected, project_out(base, keys, False), atol=1e-5, rtol=1e-4)
    # the command's path (its own templates): the edit is mostly gone
    ours = projection_replacements(loaded, Checkpoint(edited), flagged)[TENSOR]
    assert (ours - project_out(base, subject_keys(loaded, 1, flagged[1]), False)).norm() < 0.5 * (now - base).norm()
    # stored transposed (GPT-2 Conv1D [in, out]) gives the same weight, transposed
    torch.testing.assert_close(project_out(now.T.contiguous(), keys, True), projected.T, atol=1e-6, rtol=1e-5)
    with pytest.raises(Exception, match="names its subject"):
        projection_replacements(loaded, Checkpoint(edited), {1: [{"prompt": "no subject here", "subject": "Spain"}]})


def test_lock_evaluate_uses_the_masks_method(cli, pico_models, tmp_path, monkeypatch):
    """A MEMIT mask is judged against MEMIT batch edits at its layers; a mask that zeroes both edited
    projections leaves the locked model exactly as often on the new object as it was before any edit."""
    import pico_facts

    from rich.console import Console

    from editguard.cli.harden_cmd import _render_lock
    from editguard.data.counterfact import load
    from editguard.edit.facts import Fact
    from editguard.edit.quality import judge
    from editguard.harden.lock import install_mask
    from editguard.loading import load_model
    from editguard.resolve import resolve
    from editguard.scoring import continuation_logprobs

    monkeypatch.setenv("EDITGUARD_HOME", str(tmp_path / "home"))
    ck = Checkpoint(pico_models["llama"])
    targets = [MaskTarget(f"model.layers.{i}.mlp.down_proj.weight", i, (32, 64), False,
                          fingerprint(ck.read(f"model.layers.{i}.mlp.down_proj.weight")), torch.zeros(32, 64))
               for i in (0, 1)]
    mask_path = tmp_path / "zero_memit.safetensors"
    MaskFile("pico", None, "llama", "memit", 0.5, targets).save(mask_path)
    hp = tmp_path / "memit.yaml"
    hp.write_text(yaml.safe_dump({"alg_name": "MEMIT", "layers": [1], "context_template_length_params": [[5, 5]],
                                  "v_num_grad_steps": 25, "v_lr": 0.5, "clamp_norm_factor": 8,
                                  "mom2_update_weight": 100.0, "mom2_n_samples": 20}))
    data = tmp_path / "facts.json"
    pico_facts.write(data)
    r = cli("-f", "json", "lock", pico_models["llama"], "--mask", mask_path, "--evaluate", "4", "--hparams", hp,
            "--data", data)
    assert r.code == 0, r.err
    e = r.json["evaluation"]
    assert e["method"] == "memit" and e["unlocked"]["n"] == 4
    assert e["unlocked"]["edit_success"] >= 0.75  # the batch edit (at the mask's layers 0 and 1) works unlocked
    locked = load_model(resolve(str(pico_models["llama"])))
    install_mask(locked.model, locked.arch, MaskFile.load(mask_path))
    facts = [Fact.from_record(rec) for rec in load(str(data)).records[:4]]
    qualities = judge(locked, facts)
    assert e["locked"]["edit_success"] == sum(q.efficacy for q in qualities) / 4
    assert e["locked"]["paraphrase_success"] == pytest.approx(sum(q.paraphrase for q in qualities) / 4)
    assert e["locked"]["median_p_new"] == pytest.approx(statistics.median(q.new_prob for q in qualities))
    console = Console(record=True, width=400)  # the human rendering of this same answer, not a second evaluation
    _render_lock(console, r.json)
    text = console.export_text()
    assert f"median P(new) {e['locked']['median_p_new']:.3f})" in text
    lo, hi = e["locked"]["edit_success_ci95"]  # 4 facts: an interval wide enough to say so
    assert lo <= e["locked"]["edit_success"] <= hi and hi - lo > 0.4
    assert f"95 % CI {lo:.0%}-{hi:.0%}, " in text
    for q, fact in zip(qualities, facts):  # the rewrite prompt's P(new) and P(true), as `demo` reports them
        (new, true), _ = continuation_logprobs(locked, [fact.text] * 2, [fact.target_new, fact.target_true])
        assert q.new_prob == pytest.approx(math.exp(float(new)), rel=1e-4)
        assert q.true_prob == pytest.approx(math.exp(float(true)), rel=1e-4)


def test_whitened_projection_removes_a_memit_update_and_keeps_the_rest():
    """MEMIT writes ΔW = R Kᵀ (λC + K Kᵀ)⁻¹, whose input side spans C⁻¹K (Woodbury): projecting that span
    out removes the update exactly while moving the base weight's response to the keys far less than
    projecting the keys' own span out (which removes it entirely)."""
    from editguard.harden.project import key_basis, project_out

    gen = torch.Generator().manual_seed(0)
    d_in, d_out, n = 48, 24, 4
    scales = torch.logspace(0, -3, d_in)  # an anisotropic input distribution, as MLP inputs are
    samples = torch.randn(4000, d_in, generator=gen) * scales
    C = samples.T @ samples / len(samples)
    K = (torch.randn(n, d_in, generator=gen) * scales).T  # [in, n]
    R = torch.randn(d_out, n, generator=gen)
    delta = R @ K.T @ torch.linalg.inv(1e3 * C + K @ K.T)
    W = torch.randn(d_out, d_in, generator=gen)
    whitened = project_out(W + delta, K.T, False, C)
    assert torch.allclose(whitened - project_out(W, K.T, False, C), torch.zeros_like(W), atol=1e-4)
    kept = (whitened @ K - W @ K).norm() / (W @ K).norm()
    assert kept < 0.05 and (project_out(W, K.T, False) @ K).norm() < 1e-4 * (W @ K).norm()  # measured 0.017
    Q = key_basis(K.T, C)
    assert torch.allclose(Q.T @ Q, torch.eye(n), atol=1e-5)


def test_repeated_keys_project_out_nothing_else():
    """A fact flagged by two tests yields its keys twice: the basis spans the distinct keys only, and a
    weight direction orthogonal to them is left exactly as it was (QR would cut arbitrary ones)."""
    from editguard.harden.project import key_basis, project_out

    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 64, generator=gen)
    repeated = torch.cat([keys, keys, keys[:1]])
    assert key_basis(repeated).shape == (64, 3)
    W = torch.randn(32, 64, generator=gen)
    assert torch.allclose(project_out(W, repeated, False), project_out(W, keys, False), atol=1e-5)
    other = torch.randn(64, generator=gen)
    other -= keys.T @ torch.linalg.lstsq(keys.T, other).solution  # orthogonal to every key
    assert torch.allclose(project_out(W, repeated, False) @ other, W @ other, atol=1e-4)


def test_changed_answers_reads_each_probability_where_it_says(edited, pico_models):
    """Hidden-fact rows (scan's EG020/EG021): the planted answer, the answer an intervention reveals,
    and the cross probabilities, each from the model it names. The intervention here restores the
    edited tensor from the base."""
    import contextlib
    import functools

    from editguard.audit.hidden import changed_answers, next_token_answers
    from editguard.audit.probes import Probe
    from editguard.edit.edits import weight_param, weights_restored
    from editguard.loading import load_model
    from editguard.resolve import resolve

    loaded = load_model(resolve(str(edited)))
    base = Checkpoint(pico_models["llama"]).read(TENSOR)

    @contextlib.contextmanager
    def restored():
        with weights_restored(loaded.model, [TENSOR]), torch.no_grad():
            weight_param(loaded.model, TENSOR).copy_(base)
            yield

    prompt = "The official language of France"
    probes = [Probe(prompt, "France", "French"), Probe("The capital of Spain is", "Spain")]
    (row,) = [r for r in changed_answers(loaded, probes, restored, "the base", 0.0) if r["prompt"] == prompt]
    assert row["current_answer"] == "Japanese" and row["revealed_answer"] != "Japanese"
    (now,), _ = next_token_answers(loaded, [prompt])
    with restored():
        (then,), _ = next_token_answers(loaded, [prompt])
        _, (p_current_then,) = next_token_answers(loaded, [prompt], also=[now.token])
    _, (p_revealed_now,) = next_token_answers(loaded, [prompt], also=[then.token])
    # Rows come from a batched forward, the references from one prompt at a time: float32 rounding
    # differs by ~1e-7, so compare probabilities to an absolute 1e-5.
    close = functools.partial(pytest.approx, abs=1e-5)
    assert row["current_prob"] == close(now.prob) and row["revealed_prob"] == close(then.prob)
    assert row["current_prob_under_mask"] == close(float(p_current_then))
    assert row["revealed_prob_now"] == close(float(p_revealed_now))
    assert row["margin"] == close(now.prob - float(p_revealed_now))
    assert float(p_revealed_now) < now.prob and float(p_current_then) < then.prob
    assert changed_answers(loaded, probes, restored, "the base", 1.01) == []  # nothing that confident
    # the planted answer is not the probe's expected one: kept; a changed answer that is the expected one
    # (the intervention broke a known fact) is discounted
    assert row["expected_is_current"] is False
    from editguard.audit.dependence import split_innocent

    innocent = {**row, "expected_is_current": True}
    kept, discounted = split_innocent([row, innocent])
    assert kept == [row] and discounted[0]["reason"] == "the model gives the probe's expected answer"


def test_outputs_never_touch_the_input(cli, pico_models, pico_mask, tmp_path):
    """-o may not equal, hold or sit inside the input (with --force it would delete it), --force replaces
    only a model folder or an empty one, and out-of-range thresholds are refused before anything runs."""
    home = tmp_path / "home"
    shutil.copytree(pico_models["llama"], home / "model")
    (home / "notes.txt").write_text("mine")
    before = _digest(home / "model")
    for output in (home, home / "model" / "locked"):
        result = cli("lock", home / "model", "--mask", pico_mask, "-o", output, "--force")
        assert result.code == 2 and "overlaps the input" in result.err, result.err
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    result = cli("lock", home / "model", "--mask", pico_mask, "-o", other, "--force")
    assert result.code == 2 and "replaces only a model folder" in result.err
    assert (other / "keep.txt").read_text() == "mine" and (home / "notes.txt").read_text() == "mine"
    assert _digest(home / "model") == before
    for option, value in (("--threshold", "nan"), ("--threshold", "1.5"), ("--threshold", "0")):
        result = cli("lock", home / "model", "--mask", pico_mask, "-o", tmp_path / "x", option, value)
        assert result.code == 2 and "must be a number in (0, 1)" in result.err, result.err
    assert not (tmp_path / "x").exists()
    # a report is an .html file outside the input: it can never overwrite weights
    weights = home / "model" / "model.safetensors"
    for report, message in ((weights, "must end in .html"), (home / "model" / "r.html", "overlaps the input")):
        result = cli("scan", home / "model", "--tests", "diff", "--base", pico_models["llama"], "--report", report)
        assert result.code == 2 and message in result.err, result.err
    assert _digest(home / "model") == before
    result = cli("scan", home / "model", "--min-prob", "2")
    assert result.code == 2 and "--min-prob must be a number in [0, 1]" in result.err


def test_force_never_deletes_what_the_run_reads(cli, pico_models, pico_mask, tmp_path, monkeypatch):
    """Every file a run reads or offloads to counts as an input for -o: a probe file, an edit's
    hyperparameters or an offload folder (even one the load has yet to create) inside an earlier output are
    not deleted by --force; nor is the input reached by
    another spelling of its path (a case-insensitive file system, a bind mount: same file identity)."""
    earlier = tmp_path / "earlier"
    shutil.copytree(pico_models["llama"], earlier)
    probes = earlier / "probes.jsonl"
    probes.write_text(json.dumps({"prompt": "The official language of France is", "subject": "France"}) + "\n")
    one_line_error(cli("reverse", pico_models["llama"], "--method", "svd", "--layers", "1", "--probes", probes,
                       "-o", earlier, "--force"), "overlaps the input")
    (earlier / "hp.yaml").write_text(yaml.safe_dump({"alg_name": "ROME", "layers": [1]}))
    one_line_error(cli("edit", pico_models["llama"], "--fact", "The official language of {}", "--subject", "France",
                       "--target", "Japanese", "--hparams", earlier / "hp.yaml", "-o", earlier, "--force"),
                   "overlaps the input")
    (earlier / "offload").mkdir()
    one_line_error(cli("lock", pico_models["llama"], "--mask", pico_mask, "--offload-folder", earlier / "offload",
                       "-o", earlier, "--force"), "overlaps the input")
    for command in (("lock", pico_models["llama"], "--mask", pico_mask),  # one the load would create inside -o
                    ("edit", pico_models["llama"], "--fact", "The official language of {}", "--subject", "France",
                     "--target", "Japanese", "--hparams", shutil.copy(earlier / "hp.yaml", tmp_path))):
        one_line_error(cli(*command, "--offload-folder", earlier / "not-yet", "-o", earlier, "--force"),
                       "overlaps the input")
    assert not (earlier / "not-yet").exists()
    assert probes.exists() and (earlier / "hp.yaml").exists()
    model, alias = tmp_path / "model", tmp_path / "MODEL"
    shutil.copytree(pico_models["llama"], model)
    alias.mkdir()
    real_samefile = os.path.samefile
    monkeypatch.setattr(os.path, "samefile", lambda a, b: {Path(a).name, Path(b).name} == {"model", "MODEL"}
                        or real_samefile(a, b))
    one_line_error(cli("lock", model, "--mask", pico_mask, "-o", alias, "--force"), "overlaps the input")
    assert (model / "model.safetensors").exists()


def test_reversing_a_locked_model_leaves_its_lock_behind(cli, pico_models, pico_mask, tmp_path):
    """The reversal rewrites a tensor the lock protects: the copied manifest would report the output as
    tampered with, so the output carries no lock and says so. A damaged tensor is named, not decomposed."""
    locked = tmp_path / "locked"
    assert cli("lock", pico_models["llama"], "--mask", pico_mask, "-o", locked).code == 0
    result = cli("-f", "json", "reverse", locked, "--layers", "1", "-o", tmp_path / "out")
    assert result.code == 0 and result.json["lock_removed"] is True, result.err
    assert not (tmp_path / "out" / "editguard-lock.json").exists() and (locked / "editguard-lock.json").exists()
    assert "lock" not in cli("-f", "json", "scan", tmp_path / "out", "--tests", "diff", "--base", locked).json["tests"]
    damaged = tmp_path / "damaged"
    shutil.copytree(pico_models["llama"], damaged)
    tensors = load_file(damaged / "model.safetensors")
    tensors[TENSOR][0, 0] = float("nan")
    save_file(tensors, damaged / "model.safetensors")
    one_line_error(cli("reverse", damaged, "--layers", "1", "-o", tmp_path / "d"), "NaN or infinite values")


def test_reverse_options_belong_to_their_method(cli, edited, pico_mask, tmp_path):
    """--threshold is the mask's and --layers svd's: given alone each picks its method; with another
    method they are refused, not ignored."""
    one_line_error(cli("reverse", edited, "--method", "svd", "--layers", "1", "--threshold", "0.5", "-o",
                       tmp_path / "a"), "--threshold applies to --method mask, not svd")
    one_line_error(cli("reverse", edited, "--method", "project", "--layers", "1", "-o", tmp_path / "b"),
                   "--layers applies to --method svd, not project")
    picked = cli("-f", "json", "reverse", edited, "--layers", "1", "-o", tmp_path / "c")
    assert picked.code == 0 and picked.json["method"] == "svd", picked.err
    picked = cli("-f", "json", "reverse", edited, "--mask", pico_mask, "--threshold", "0.5", "-o", tmp_path / "d")
    assert picked.code == 0 and picked.json["method"] == "mask", picked.err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_lock_sees_retagged_twin_and_missing_parts(cli, pico_models, pico_mask, tmp_path):
    """Tamper evidence beyond the bytes: a locked tensor retagged to another dtype (same bytes, other weights),
    a second copy under another spelling (GPT-2's `h.N.` beside `transformer.h.N.`: transformers may load
    that one), and a deleted mask, which scan reports (EG030) instead of failing to load. A locked model is
    not locked again (the second manifest would drop the first)."""
    from editguard import load_locked

    locked = tmp_path / "locked"
    assert cli("lock", pico_models["llama"], "--mask", pico_mask, "-o", locked).code == 0
    again = cli("lock", locked, "--mask", pico_mask, "-o", tmp_path / "twice")
    assert again.code == 2 and "already locked" in again.err and not (tmp_path / "twice").exists()

    retagged = tmp_path / "retagged"
    shutil.copytree(locked, retagged)
    tensors = load_file(retagged / "model.safetensors")
    save_file({**tensors, TENSOR: tensors[TENSOR].view(torch.int32)}, retagged / "model.safetensors")
    data = cli("-f", "json", "scan", retagged, "--tests", "diff").json
    assert [p["reason"] for p in data["tests"]["lock"]["problems"]] == ["stored as I32 [32, 64], locked as F32 [32, 64]"]

    no_mask = tmp_path / "no_mask"
    shutil.copytree(locked, no_mask)
    (no_mask / "editguard-mask.safetensors").unlink()
    probes = tmp_path / "probes.jsonl"
    probes.write_text('{"prompt": "The official language of France", "subject": "France", "answer": "French"}\n')
    result = cli("-f", "json", "scan", no_mask, "--tests", "hidden", "--mask", pico_mask, "--probes", probes)
    assert result.code == 1 and [f["rule"] for f in result.json["findings"]][:1] == ["EG030"], result.err
    assert "lock broken, its mask is not applied" in result.err
    with pytest.raises(Exception, match="lock broken"):
        load_locked(str(no_mask))

    # GPT-2: the locked c_proj stored a second time under the other spelling
    name = "transformer.h.1.mlp.c_proj.weight"
    stored_names = Checkpoint(pico_models["gpt2"]).names()
    stored = name if name in stored_names else name.removeprefix("transformer.")
    weight = Checkpoint(pico_models["gpt2"]).read(stored)
    scores = torch.rand(weight.shape[::-1], generator=torch.Generator().manual_seed(2))
    mask = MaskFile("pico", None, "gpt2", "rome", 0.2,
                    [MaskTarget(name, 1, tuple(weight.shape[::-1]), True, fingerprint(weight), scores)])
    mask.save(tmp_path / "gpt2_mask.safetensors")
    gpt2_locked = tmp_path / "gpt2_locked"
    assert cli("lock", pico_models["gpt2"], "--mask", tmp_path / "gpt2_mask.safetensors", "-o", gpt2_locked).code == 0
    tensors = load_file(gpt2_locked / "model.safetensors")
    twin = name.removeprefix("transformer.") if stored == name else name
    save_file({**tensors, twin: weight + 1.0}, gpt2_locked / "model.safetensors")
    data = cli("-f", "json", "scan", gpt2_locked, "--tests", "diff").json
    assert [p["reason"] for p in data["tests"]["lock"]["problems"]] == [f"also stored as {twin}, which the lock does not cover"]


def test_lock_sees_what_would_route_the_load_around_it(cli, pico_models, pico_mask, tmp_path, monkeypatch):
    """Ways to keep the lock's bytes and manifest intact (its digest too) while the model transformers builds
    no longer uses them under the mask: an edited copy under the base model's own spelling (`layers.N...`,
    which transformers loads into `model.layers.N...`), a config.json naming another model type or fewer
    layers. Each is EG030 under --lock-digest, load_locked refuses it, and no command fails mid-load."""
    from editguard import load_locked
    from editguard.arch import Arch

    locked = tmp_path / "locked"
    digest = cli("-f", "json", "lock", pico_models["llama"], "--mask", pico_mask, "-o", locked).json["manifest_sha256"]

    def variant(name: str, change) -> Path:
        folder = tmp_path / name
        shutil.copytree(locked, folder)
        change(folder)
        return folder

    def twin(folder):
        tensors = load_file(folder / "model.safetensors")
        save_file({**tensors, TENSOR.removeprefix("model."): tensors[TENSOR] + 0.5}, folder / "model.safetensors")

    def config(**fields):
        def change(folder):
            data = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**data, **fields}))
        return change

    cases = {"twin": (twin, "also stored as layers.1.mlp.down_proj.weight"),
             "mistral": (config(model_type="mistral", architectures=["MistralForCausalLM"]),
                         "mask is for llama models, this model is mistral"),
             "one_layer": (config(num_hidden_layers=1), "which this model does not build")}
    probes = tmp_path / "probes.jsonl"
    probes.write_text('{"prompt": "The official language of France", "subject": "France", "answer": "French"}\n')
    for name, (change, why) in cases.items():
        folder = variant(name, change)
        result = cli("-f", "json", "scan", folder, "--lock-digest", digest, "--tests", "diff", "--fail-on", "edited")
        assert result.code == 1 and result.json["tests"]["lock"]["intact"] is False, (name, result.out)
        assert any(why in p["reason"] for p in result.json["tests"]["lock"]["problems"]), (name, result.out)
        with pytest.raises(EditguardError, match="lock broken"):
            load_locked(str(folder), manifest_sha256=digest)
        loaded = cli("-f", "json", "scan", folder, "--tests", "hidden", "--probes", probes, "--fail-on", "edited")
        if name == "twin":  # which copy transformers loads is its choice: refused, as for any tensor stored twice
            one_line_error(loaded, "one tensor is stored under two names")
        else:
            assert loaded.code == 1 and loaded.json["tests"]["lock"]["intact"] is False, (name, loaded.out, loaded.err)

    # a spelling the table does not know (here: the base model's, with that rule switched off) is caught when
    # the model is loaded: the weights transformers put under the mask are not the locked bytes
    monkeypatch.setattr(Arch, "canonical_tensor_name", lambda self, stored: stored)
    monkeypatch.setattr(Arch, "tensor_candidates", lambda self, canonical: [canonical])
    folder = variant("unknown_spelling", twin)
    with pytest.raises(EditguardError, match="does not hold the locked"):
        load_locked(str(folder), manifest_sha256=digest)
    result = cli("-f", "json", "scan", folder, "--lock-digest", digest, "--tests", "hidden", "--mask", pico_mask,
                 "--probes", probes, "--fail-on", "edited")
    assert result.code == 1 and [p["kind"] for p in result.json["tests"]["lock"]["problems"]] == ["loaded"], result.out


def test_projection_refuses_nonfinite_keys_and_solves_a_zero_moment():
    from editguard.harden.project import key_basis

    keys = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    assert key_basis(keys, torch.zeros(8, 8)).shape == (8, 3)  # a zero C: the ridge's floor keeps it solvable
    keys[1, 2] = float("nan")
    with pytest.raises(EditguardError, match="NaN or inf"):
        key_basis(keys)


def test_reverse_never_replaces_a_base_named_by_id(cli, edited, pico_models, tmp_path, monkeypatch):
    """--force replaces an earlier output, never the --base, even when the base is named by a hub id or a
    demo: name rather than a path (its folder is known only once resolved)."""
    from editguard.cli import harden_cmd
    from editguard.resolve import resolve

    base_copy = tmp_path / "base_copy"
    shutil.copytree(pico_models["llama"], base_copy)
    real_resolve = harden_cmd.resolve_model
    monkeypatch.setattr(harden_cmd, "resolve_model", lambda spec, *a, **k: resolve(str(base_copy)) if spec == "org/base"
                        else real_resolve(spec, *a, **k))
    before = _digest(base_copy)
    r = cli("reverse", edited, "--method", "base", "--base", "org/base", "-o", base_copy, "--force")
    assert r.code == 2 and "overlaps the input" in r.err and _digest(base_copy) == before
    wrong = cli("reverse", edited, "--method", "project", "--mask", tmp_path / "m.safetensors", "-o", tmp_path / "o")
    assert wrong.code == 2 and "--mask applies to --method mask" in wrong.err


def test_reverse_refuses_a_tensor_stored_under_both_spellings(cli, pico_models, tmp_path):
    """transformers loads GPT-2's `h.N.` copy when a file also holds `transformer.h.N.`: reversing the other
    copy would leave the loaded weights as they were, so a tensor stored twice is refused."""
    import shutil

    name = "transformer.h.1.mlp.c_proj.weight"
    twice = tmp_path / "twice"
    shutil.copytree(pico_models["gpt2"], twice)
    tensors = load_file(twice / "model.safetensors")
    stored = name if name in tensors else name.removeprefix("transformer.")
    twin = name.removeprefix("transformer.") if stored == name else name
    save_file({**tensors, twin: tensors[stored] + 1.0}, twice / "model.safetensors")
    for command in (["reverse", twice, "--method", "svd", "--layers", "1", "-o", tmp_path / "out"],
                    ["inspect", twice]):
        one_line_error(cli(*command), "one tensor is stored under two names")
    assert not (tmp_path / "out").exists()


def test_lock_and_reverse_refuse_options_they_would_ignore(cli, pico_models, pico_mask, tmp_path):
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{"case_id": i, "prompt": "The capital of {} is", "subject": s, "target_new": "Rome",
                                  "target_true": "Paris"} for i, s in enumerate(["France", "Spain"])]))
    lock = ["lock", pico_models["llama"], "--mask", pico_mask]
    one_line_error(cli(*lock, "-o", tmp_path / "locked", "--data", facts), "--hparams and --data apply to --evaluate")
    assert not (tmp_path / "locked").exists()
    hp = tmp_path / "hp.yaml"
    hp.write_text(yaml.safe_dump({"alg_name": "ROME", "layers": [1], "context_template_length_params": [[5, 5]],
                                  "v_num_grad_steps": 5}))
    one_line_error(cli(*lock, "--evaluate", "5", "--data", facts, "--hparams", hp), "holds only 2 records")
    one_line_error(cli("reverse", pico_models["llama"], "--method", "svd", "--layers", "1", "-o", tmp_path / "r",
                       "--text-tokens", "100"), "--text-tokens applies to --eval")
