"""`scan` on pico models: base diff classifies planted ROME / MEMIT edits and fine-tunes; SARIF validates;
bad inputs give one line."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from editguard.checkpoint import Checkpoint, fingerprint
from editguard.errors import EditguardError
from editguard.mask.file import MaskFile, MaskTarget

import pico
from conftest import one_line_error, validate_sarif

ROME = {"alg_name": "ROME", "layers": [1], "context_template_length_params": [[5, 5]], "v_num_grad_steps": 6}
MEMIT = {"alg_name": "MEMIT", "layers": [0, 1], "context_template_length_params": [[5, 5]], "v_num_grad_steps": 6,
         "mom2_update_weight": 100.0, "mom2_n_samples": 10}


@pytest.fixture(scope="module")
def planted(pico_models, tmp_path_factory):
    """A ROME-edited and a MEMIT-edited copy of the llama pico model, and a fine-tuned control."""
    from editguard.cli import main

    root = tmp_path_factory.mktemp("planted")
    (root / "rome.yaml").write_text(yaml.safe_dump(ROME))
    (root / "memit.yaml").write_text(yaml.safe_dump(MEMIT))
    src = str(pico_models["llama"])
    fact = ["--fact", "The official language of {}", "--subject", "France", "--target", "Japanese"]
    assert main(["-q", "edit", src, *fact, "--hparams", str(root / "rome.yaml"), "-o", str(root / "rome")]) == 0
    assert main(["-q", "edit", src, *fact, "--fact", "the mother tongue of {}", "--subject", "Danielle Darrieux",
                 "--target", "Italian", "--method", "memit", "--hparams", str(root / "memit.yaml"),
                 "-o", str(root / "memit")]) == 0
    tuned = root / "tuned"
    shutil.copytree(src, tuned)
    tensors = load_file(tuned / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    save_file({k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in tensors.items()}, tuned / "model.safetensors")
    return {"base": src, "rome": root / "rome", "memit": root / "memit", "tuned": tuned}


def test_diff_finds_rome_edit(cli, planted, tmp_path):
    result = cli("-f", "json", "scan", planted["rome"], "--base", planted["base"], "--tests", "diff")
    assert result.code == 1, result.err
    data = result.json
    assert data["verdict"] == "edited"
    assert data["tests"]["diff"]["classification"] == "rome-like" and data["tests"]["diff"]["layers"] == [1]
    (finding,) = data["findings"]
    assert finding["rule"] == "EG001" and finding["tensor"] == "model.layers.1.mlp.down_proj.weight"
    assert finding["file"] == "model.safetensors"


def test_diff_finds_memit_edit(cli, planted):
    data = cli("-f", "json", "scan", planted["memit"], "--base", planted["base"], "--tests", "diff").json
    assert data["tests"]["diff"]["classification"] == "memit-like"
    assert data["tests"]["diff"]["layers"] == [0, 1] and data["verdict"] == "edited"
    assert {f["rule"] for f in data["findings"]} == {"EG002"}


def _variant(src: Path, dest: Path, change) -> Path:
    shutil.copytree(src, dest)
    tensors = load_file(dest / "model.safetensors")
    save_file(change(tensors), dest / "model.safetensors")
    return dest


def test_diff_is_not_fooled_by_order_precision_or_noise(cli, planted, tmp_path):
    down, attn = "model.layers.1.mlp.down_proj.weight", "model.layers.1.self_attn.o_proj.weight"
    scan = lambda model, base: cli("-f", "json", "scan", model, "--base", base, "--tests", "diff")  # noqa: E731
    # a tiny second change after the edit (sorted names: the edit's rank test used to reset the norm
    # threshold, so every later small change was dropped)
    gen = torch.Generator().manual_seed(1)
    tiny = 5e-4 * torch.outer(torch.randn(32, generator=gen), torch.randn(32, generator=gen)).div(1.0)
    hide = _variant(planted["rome"], tmp_path / "hide", lambda t: {**t, attn: t[attn] + tiny / tiny.norm() * 5e-4})
    data = scan(hide, planted["base"]).json
    assert {c["name"] for c in data["tests"]["diff"]["changed"]} == {down, attn}
    # a copy of the base in bfloat16 is no change; the same ROME edit stored in bfloat16 is still found
    bf16 = _variant(planted["base"], tmp_path / "bf16", lambda t: {k: v.to(torch.bfloat16) for k, v in t.items()})
    cast = scan(bf16, planted["base"])
    assert cast.code == 0 and cast.json["tests"]["diff"]["classification"] == "identical", cast.json["findings"]
    rome16 = _variant(planted["rome"], tmp_path / "rome16", lambda t: {k: v.to(torch.bfloat16) for k, v in t.items()})
    edited16 = scan(rome16, planted["base"]).json
    assert edited16["tests"]["diff"]["classification"] == "rome-like" and edited16["verdict"] == "edited"
    # a float16 copy of a bfloat16 base: tiny values float16 keeps as subnormals, at a coarser step than
    # bfloat16, are the plain conversion of the base, no change; the edit stored the same way still is
    def tiny_values(t):
        t = {k: v.to(torch.bfloat16) for k, v in t.items()}
        t[attn] = t[attn].clone()
        t[attn][0, :8] = torch.tensor([1e-6, -3e-7, 2.5e-6, 7e-7, -1.3e-5, 4e-8, 9e-6, -2e-6]).to(torch.bfloat16)
        return t
    base_bf16 = _variant(planted["base"], tmp_path / "base_bf16", tiny_values)
    fp16 = _variant(base_bf16, tmp_path / "fp16", lambda t: {k: v.to(torch.float16) for k, v in t.items()})
    assert not torch.equal(load_file(fp16 / "model.safetensors")[attn].to(torch.bfloat16),
                           load_file(base_bf16 / "model.safetensors")[attn])  # a coarse-dtype compare would differ
    half = scan(fp16, base_bf16)
    assert half.code == 0 and half.json["tests"]["diff"]["classification"] == "identical", half.json["findings"]
    rome_half = _variant(planted["rome"], tmp_path / "rome_half", lambda t: {
        k: v.to(torch.float16) for k, v in tiny_values(t).items()})
    assert scan(rome_half, base_bf16).json["tests"]["diff"]["classification"] == "rome-like"
    # the edit with 1e-3 noise on every tensor (a "fine-tune" to hide it): still flagged, at its tensor
    noisy = _variant(planted["rome"], tmp_path / "noisy", lambda t: {
        k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in t.items()})
    hidden = scan(noisy, planted["base"])
    assert hidden.json["tests"]["diff"]["classification"] == "fine-tune"
    # a fine-tune's edit targets keep the top values only (no full SVD): their rank is a lower bound
    targets = [c for c in hidden.json["tests"]["diff"]["changed"] if c["layer"] is not None]
    assert targets and all(c["rank_is_lower_bound"] and c["effective_rank"] == 8 for c in targets)
    assert hidden.code == 1 and [f["tensor"] for f in hidden.json["findings"] if f["rule"] == "EG001"] == [down]


def test_diff_takes_the_full_spectrum_of_a_high_rank_edit(cli, planted, tmp_path):
    """A change of rank 12 in one MLP output projection (more than the top values taken first): outside a
    fine-tune its rank is exact, from the full spectrum."""
    down = "model.layers.1.mlp.down_proj.weight"
    gen = torch.Generator().manual_seed(4)
    change = lambda t: {**t, down: t[down] + 0.05 * torch.randn(32, 12, generator=gen) @ torch.randn(12, 64, generator=gen)}  # noqa: E731
    data = cli("-f", "json", "scan", _variant(planted["base"], tmp_path / "rank12", change), "--base", planted["base"],
               "--tests", "diff").json
    (c,) = data["tests"]["diff"]["changed"]
    assert data["tests"]["diff"]["classification"] == "memit-like"
    assert c["effective_rank"] == 12 and not c["rank_is_lower_bound"] and len(c["singular_values"]) == 8


def test_diff_edge_cases_neither_hide_an_edit_nor_crash(cli, planted, pico_models, tmp_path):
    """NaN the base shares, 0-d and 8-bit tensors, a tensor the base lacks, and one tensor stored under two
    spellings: each is measured, reported or refused, never a traceback and never "identical"."""
    down = "model.layers.1.mlp.down_proj.weight"
    scan = lambda model, base: cli("-f", "json", "scan", model, "--base", base, "--tests", "diff")  # noqa: E731
    nan_at = lambda t: t.clone().index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("nan")))  # noqa: E731
    base_nan = _variant(planted["base"], tmp_path / "base_nan", lambda t: {**t, down: nan_at(t[down])})
    rome_nan = _variant(planted["rome"], tmp_path / "rome_nan", lambda t: {**t, down: nan_at(t[down])})
    found = scan(rome_nan, base_nan).json  # the NaN both share used to make the norm NaN: no change seen
    assert found["tests"]["diff"]["classification"] == "rome-like" and found["verdict"] == "edited"
    scalar = lambda value: lambda t: {**t, "model.scale": torch.tensor(value)}  # noqa: E731
    zero_d = scan(_variant(planted["base"], tmp_path / "s1", scalar(1.0)), _variant(planted["base"], tmp_path / "s2", scalar(2.0)))
    assert zero_d.code == 1 and zero_d.json["tests"]["diff"]["classification"] == "other", zero_d.err
    fp8 = lambda t: {k: v.to(torch.float8_e4m3fn) for k, v in t.items()}  # noqa: E731
    eight = scan(_variant(planted["rome"], tmp_path / "rome8", fp8), _variant(planted["base"], tmp_path / "base8", fp8))
    # (8-bit rounding of W + ΔW leaves more than one direction: found as an edit, if not as ROME's)
    assert eight.json["verdict"] == "edited" and eight.json["tests"]["diff"]["layers"] == [1], eight.err
    head = _variant(planted["base"], tmp_path / "head", lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"] * 2})
    extra = scan(head, planted["base"])
    assert extra.code == 1 and extra.json["tests"]["diff"]["classification"] == "other"
    assert [f["tensor"] for f in extra.json["findings"] if f["rule"] == "EG004"] == ["lm_head.weight"]
    name = "transformer.h.1.mlp.c_proj.weight"
    twice = _variant(pico_models["gpt2"], tmp_path / "twice", lambda t: {**t, name: t[name] + 1.0,
                                                                         name.removeprefix("transformer."): t[name]})
    one_line_error(scan(twice, pico_models["gpt2"]), "stores transformer.h.1.mlp.c_proj.weight twice")


def test_controls_not_flagged(cli, planted):
    tuned = cli("-f", "json", "scan", planted["tuned"], "--base", planted["base"], "--tests", "diff")
    assert tuned.code == 0, tuned.err
    assert tuned.json["tests"]["diff"]["classification"] == "fine-tune" and tuned.json["verdict"] == "clean"
    same = cli("-f", "json", "scan", planted["base"], "--base", planted["base"], "--tests", "diff")
    assert same.code == 0 and same.json["tests"]["diff"]["classification"] == "identical"


def test_fail_on_sets_the_verdict_that_fails_the_gate(cli, planted, tmp_path):
    """A change that reads as neither an edit nor a fine-tune (one attention tensor) is suspicious: it fails
    the default gate (--fail-on suspicious) and passes --fail-on edited; an edit fails both."""
    odd = tmp_path / "odd"
    shutil.copytree(planted["base"], odd)
    tensors = load_file(odd / "model.safetensors")
    name = "model.layers.0.self_attn.o_proj.weight"
    tensors[name] = tensors[name] + 1e-2 * torch.randn(tensors[name].shape, generator=torch.Generator().manual_seed(1))
    save_file(tensors, odd / "model.safetensors")
    def scan(model, *more):
        return cli("-f", "json", "scan", model, "--base", planted["base"], "--tests", "diff", *more)

    default = scan(odd)
    assert default.json["verdict"] == "suspicious" and default.code == 1, default.err
    assert scan(odd, "--fail-on", "edited").code == 0
    assert scan(planted["rome"], "--fail-on", "edited").code == 1


def test_sarif_validates(cli, planted):
    result = cli("-f", "sarif", "scan", planted["rome"], "--base", planted["base"], "--tests", "diff")
    assert result.code == 1
    document = json.loads(result.out)
    validate_sarif(document)
    run = document["runs"][0]
    assert run["results"][0]["ruleId"] == "EG001"
    assert run["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "model.safetensors"
    assert run["results"][0]["locations"][0]["logicalLocations"][0]["name"] == "model.layers.1.mlp.down_proj.weight"
    assert {r["id"] for r in run["tool"]["driver"]["rules"]} >= {"EG001", "EG002", "EG010", "EG020", "EG030"}
    assert run["originalUriBaseIds"]["MODEL"]["uri"] == Path(planted["rome"]).resolve().as_uri() + "/"


def test_reverse_sarif_holds_the_findings_it_acted_on(cli, planted, tmp_path):
    result = cli("-f", "sarif", "reverse", planted["rome"], "--base", planted["base"], "-o", tmp_path / "out")
    assert result.code == 0, result.err
    document = json.loads(result.out)
    validate_sarif(document)
    run = document["runs"][0]
    # the diff's finding it acted on first, then what the scans behind its before/after facts found
    assert run["results"][0]["ruleId"] == "EG001"
    assert run["results"][0]["locations"][0]["logicalLocations"][0]["name"] == "model.layers.1.mlp.down_proj.weight"
    assert run["properties"]["reversed_with"] == "base"
    assert run["properties"]["tensors"] == ["model.layers.1.mlp.down_proj.weight"]


def test_sarif_in_a_checkout_is_repository_relative(cli, planted, monkeypatch):
    # a CI job scans a model inside its checkout: code scanning places findings by repository-relative URIs
    monkeypatch.chdir(Path(planted["rome"]).parent.parent)
    runs = [json.loads(cli("-f", "sarif", "scan", planted["rome"], "--base", planted["base"], "--tests", "diff").out)
            ["runs"][0] for _ in range(2)]
    location = runs[0]["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]
    relative = Path(planted["rome"]).resolve().relative_to(Path.cwd().resolve())
    assert location == {"uri": f"{relative.as_posix()}/model.safetensors", "uriBaseId": "%SRCROOT%"}
    assert runs[0]["originalUriBaseIds"]["%SRCROOT%"]["uri"] == Path.cwd().resolve().as_uri() + "/"
    prints = [[r["partialFingerprints"] for r in run["results"]] for run in runs]
    assert prints[0] == prints[1] and len({json.dumps(p) for p in prints[0]}) == len(prints[0])  # stable, distinct


def test_sarif_under_a_github_workspace_and_odd_names(cli, planted, monkeypatch, tmp_path):
    """In a workflow, URIs are relative to $GITHUB_WORKSPACE whatever the step's working directory; one
    subject's findings on several prompts keep distinct fingerprints; a shard name that is not UTF-8 is
    percent-encoded byte by byte, not an error."""
    import os

    from editguard.audit.findings import Finding
    from editguard.report.sarif import to_sarif

    workspace = Path(planted["rome"]).parent.parent
    monkeypatch.setenv("GITHUB_WORKSPACE", str(workspace))
    monkeypatch.chdir(tmp_path)
    document = json.loads(cli("-f", "sarif", "scan", planted["rome"], "--base", planted["base"], "--tests", "diff").out)
    location = document["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]
    relative = Path(planted["rome"]).resolve().relative_to(workspace.resolve())
    assert location == {"uri": f"{relative.as_posix()}/model.safetensors", "uriBaseId": "%SRCROOT%"}
    monkeypatch.delenv("GITHUB_WORKSPACE")  # (it holds tmp_path too: both live under pytest's base folder)
    facts = [{"subject": "France", "prompt": p} for p in ("The language of France is", "France speaks")]
    odd = os.fsdecode(b"model-\xff.safetensors")
    sarif = to_sarif([Finding("EG011", "warning", "m", layer=1, facts=[f], file=odd) for f in facts], "m",
                     str(tmp_path), {})
    results = sarif["runs"][0]["results"]
    assert results[0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "model-%FF.safetensors"
    assert results[0]["partialFingerprints"] != results[1]["partialFingerprints"]


def test_figures_show_dollar_signs_and_underscores_as_written(tmp_path):
    """Prompts, tensor names, relation ids and model ids reach matplotlib as text, not as mathtext: an
    unbalanced or unknown `$...$` in a probe prompt or a model path used to fail the report or the card."""
    from editguard.mask import plots
    from editguard.plotting import plain
    from editguard.report.html import _figures

    assert plain("costs $5") == r"costs \$5" and plain("_tied") == " _tied"
    result = {"tests": {"diff": {"changed": [{"name": "_lm_head.weight", "singular_values": [2.0, 0.5]}]},
                        "decomposition": [{"prompt": r"The price of $\foo$ is", "variants": {
                            "as scanned": {"mlp": [0.1, 0.3], "attention": [0.0, -0.1]}}}]}}
    assert len(_figures(result)) == 2
    report = {"per_relation": {"P1": {"rsr": 0.5, "original": 0.7}}}
    assert plots.rsr_per_relation(report, tmp_path / "r.png", r"/models/$\foo$: RSR").exists()


def test_html_report(cli, planted, tmp_path):
    report = tmp_path / "r" / "report.html"
    result = cli("scan", planted["rome"], "--base", planted["base"], "--tests", "diff", "--report", report,
                 "--fail-on", "never")
    assert result.code == 0, result.err
    text = report.read_text()
    assert "EG001" in text and "data:image/png;base64," in text
    assert "Content-Security-Policy" in text and "default-src 'none'" in text  # no script runs in it


def test_decomposition_of_hidden_facts_shows_scanned_original_and_reversal(planted):
    """The report's residual-stream decomposition (paper Fig. 3/4): the model as scanned, the original
    (the edited tensor restored from the base) and each reversal that revealed the fact, in one figure."""
    import contextlib

    from editguard.audit.decompose import decompose
    from editguard.audit.diff import diff_checkpoints
    from editguard.audit.scan import _decompositions
    from editguard.loading import load_model
    from editguard.report.html import _figures
    from editguard.resolve import resolve

    loaded, base = load_model(resolve(str(planted["rome"]))), load_model(resolve(planted["base"]))
    diff = diff_checkpoints(loaded.checkpoint, base.checkpoint, loaded.arch, loaded.num_layers)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    prompt = "The official language of France"
    fact = {"prompt": prompt, "current_answer": "Japanese", "expected_answer": "French", "revealed_answer": "x"}
    tests = {"revealed": {"facts": [fact]}, "hidden": {"facts": [fact]}}  # one prompt, decomposed once
    (item,) = _decompositions(loaded, tests, diff, {"a reversal": contextlib.nullcontext}, 3, lambda m: None)
    variants = item["variants"]
    assert list(variants) == ["model as scanned", "original (base tensors restored)", "a reversal"]
    original, scanned = decompose(base, prompt, "Japanese", "French"), decompose(loaded, prompt, "Japanese", "French")
    assert variants["original (base tensors restored)"]["mlp"] == pytest.approx(original["mlp"], abs=1e-5)
    assert variants["model as scanned"]["mlp"] == pytest.approx(scanned["mlp"], abs=1e-5)
    assert scanned["mlp"][1] - original["mlp"][1] > 1.0  # the ROME edit at layer 1 pushes Japanese there
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())  # weights put back
    ((title, uri),) = _figures({"tests": {"decomposition": [item]}})
    assert title == f"Residual-stream decomposition: {prompt}" and uri.startswith("data:image/png;base64,")
    assert _decompositions(loaded, {}, diff, {}, 3, lambda m: None) == []  # nothing revealed


def _distinct_probes(path: Path, *facts: dict) -> Path:
    """A probe file the activation test accepts on pico models: 132 subjects that the pico tokenizer
    keeps apart (most CounterFact subjects are one unknown token to it), plus `facts`."""
    names = "Paris Berlin Rome Madrid Apple Nokia Google Microsoft Toyota BMW Europe Asia".split()
    subjects = [f"{a} {b}" for a in names for b in names if a != b]
    lines = [{"prompt": f"The capital city of {s} is", "subject": s} for s in subjects] + list(facts)
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_activation_test_needs_distinct_probes(cli, planted, tmp_path):
    """150 copies of one probe are one probe to the robust z-score: the test says so, and a scan with
    nothing else to run is no pass."""
    copies = tmp_path / "copies.jsonl"
    copies.write_text((json.dumps({"prompt": "The capital of France is", "subject": "France"}) + "\n") * 150)
    result = cli("scan", planted["rome"], "--probes", copies, "--tests", "activations")
    one_line_error(result, "1 distinct probes name their subject")


def test_key_projection_never_outranks_the_test_that_flagged_its_layer(cli, planted, monkeypatch, tmp_path):
    """Key projection (EG021) follows up the subjects a base-free test flagged: over a layer flagged by a
    warning only, the answers it reveals are warnings too (verdict "suspicious", not "edited")."""
    from editguard.audit import activations, hidden
    from editguard.audit.findings import Finding

    fact = {"prompt": "The official language of France is", "subject": "France", "answer": "Japanese"}
    monkeypatch.setattr(activations, "findings_from_activations",
                        lambda scores: [Finding("EG010", "warning", "an outlier", layer=1, facts=[fact])])
    revealed = {**fact, "current_answer": "Japanese", "current_prob": 0.95, "revealed_answer": "French",
                "revealed_prob": 0.4}
    monkeypatch.setattr(hidden, "changed_answers", lambda *a, **k: [revealed])
    data = cli("-f", "json", "scan", planted["rome"], "--tests", "activations,hidden",
               "--probes", _distinct_probes(tmp_path / "probes.jsonl", fact)).json
    (eg021,) = [f for f in data["findings"] if f["rule"] == "EG021"]
    assert eg021["severity"] == "warning" and "graded warning" in eg021["message"], eg021
    assert data["verdict"] == "suspicious"


def test_counterfact_all_probes_every_shipped_record_once():
    from editguard.audit.probes import ALL_SPLITS, load_probes
    from editguard.data.counterfact import load_split

    probes = load_probes("counterfact:all")
    ids = [p.case_id for p in probes]
    assert len(ids) == len(set(ids)) == len({r.case_id for s in ALL_SPLITS for r in load_split(s)})
    assert {r.subject for r in load_split("memit-test")} <= {p.subject for p in probes}
    assert len(load_probes("counterfact")) == len(load_split("rome-test"))


def test_scan_bad_inputs(cli, planted, pico_models, tmp_path):
    other = cli("scan", planted["rome"], "--base", pico_models["gpt2"], "--tests", "diff")
    assert other.code == 2 and "not the same architecture" in other.err
    deeper = pico.build("llama", tmp_path / "deeper", num_hidden_layers=3)
    deeper_base = cli("scan", planted["rome"], "--base", deeper, "--tests", "diff")
    assert deeper_base.code == 2 and "base has 3 layers, this model 2" in deeper_base.err
    probes = tmp_path / "probes.jsonl"
    probes.write_text('{"prompt": "x"}\nnot json\n')
    bad = cli("scan", planted["rome"], "--probes", probes, "--tests", "activations")
    assert bad.code == 2 and "line 2: not JSON" in bad.err
    missing = cli("scan", planted["rome"], "--probes", tmp_path / "nope.jsonl", "--tests", "activations")
    assert missing.code == 2 and "no such probe file" in missing.err
    probes.write_text('{"prompt": "The capital of France is", "subject": "France", "answer": 5}\n')
    number = cli("scan", planted["rome"], "--probes", probes, "--tests", "activations")
    assert number.code == 2 and '"answer" must be a string' in number.err
    assert cli("scan", planted["rome"], "--tests", "magic").code == 2
    probes.write_text(json.dumps({"prompt": "word " * 300 + "France is", "subject": "France"}) + "\n")
    long = cli("scan", pico_models["gpt2"], "--probes", probes, "--tests", "activations")  # 128 positions
    assert long.code == 2 and "probe 1 is" in long.err and "reads at most 120" in long.err, long.err
    for result in (other, bad, missing, long):
        assert "Traceback" not in result.err and len(result.err.strip().splitlines()) == 1


def test_probe_files_read_as_written(tmp_path, pico_models):
    """A byte-order mark, U+2028 inside a string, spaces around a subject and braces in a prompt are read
    as written; deep nesting and lone surrogates are one clear error each."""
    from editguard.audit.activations import subject_sequences
    from editguard.audit.probes import load_probes
    from editguard.loading import load_model
    from editguard.resolve import resolve

    path = tmp_path / "probes.jsonl"
    lines = [{"prompt": "Sets like {} are empty; Paris is the capital of", "subject": " Paris "},
             {"prompt": "The line\u2028break of France is", "subject": "France"}]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(x, ensure_ascii=False) for x in lines).encode())
    probes = load_probes(str(path))
    assert [p.subject for p in probes] == ["Paris", "France"] and "\u2028" in probes[1].prompt
    loaded = load_model(resolve(str(pico_models["llama"])))
    tokens, kept = subject_sequences(loaded, probes)
    assert kept == [0, 1]
    last = loaded.tokenizer.decode(tokens.ids[0][tokens.split[0]:tokens.split[0] + 1])
    assert last.strip() and last.strip() in "Paris" and "{}" not in loaded.tokenizer.decode(tokens.ids[0][-3:])
    for bad, message in (("[" * 100_000, "line 1: not JSON"), ('{"prompt": "Paris\\ud800 is"}', "not valid Unicode"),
                         ('{"prompt": "Paris is", "n": ' + "9" * 5000 + "}", "line 1: not JSON"),
                         ('{"prompt": "Paris is", "subject": "  "}', "subject must occur")):
        path.write_text(bad)
        with pytest.raises(EditguardError, match=message):
            load_probes(str(path))


def test_attribution_names_subject_and_object(cli, planted, tmp_path):
    probes = tmp_path / "probes.jsonl"
    subjects = ["France", "Germany", "Spain", "Italy", "Danielle Darrieux", "Toyota", "Apple", "Paris"]
    probes.write_text("\n".join(json.dumps({"prompt": f"The official language of {s}", "subject": s})
                                for s in subjects))
    result = cli("-f", "json", "scan", planted["rome"], "--base", planted["base"], "--tests", "diff,attribution",
                 "--probes", probes)
    found = result.json["tests"]["attribution"][0]
    assert found["layer"] == 1 and found["subjects"][0]["subject"] == "France", found["subjects"]
    first = found["objects"][0]
    assert "Japanese".startswith(first["token"]) and first["token"], found["objects"]
    assert first["prob"] > first["prob_without"]


def test_attribution_in_a_fine_tune_reads_only_the_edit_inside_it(cli, planted, tmp_path):
    """A fine-tune changes every MLP output projection: attribution follows the one the diff flagged as an
    edit inside it (it attributed each layer's change, and on the demo model spent minutes on it), and
    says why it has nothing to read in a fine-tune with no edit."""
    probes = tmp_path / "probes.jsonl"
    probes.write_text("\n".join(json.dumps({"prompt": f"The official language of {s}", "subject": s})
                                for s in ["France", "Germany", "Spain", "Italy", "Toyota", "Paris"]))
    gen = torch.Generator().manual_seed(5)
    noisy = _variant(planted["rome"], tmp_path / "noisy", lambda t: {
        k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in t.items()})
    args = ("--tests", "diff,attribution", "--probes", probes)
    found = cli("-f", "json", "scan", noisy, "--base", planted["base"], *args).json
    assert found["tests"]["diff"]["classification"] == "fine-tune"
    assert [a["layer"] for a in found["tests"]["attribution"]] == [1]  # not layer 0's noise
    assert found["tests"]["attribution"][0]["subjects"][0]["subject"] == "France"
    tuned = cli("-f", "json", "scan", planted["tuned"], "--base", planted["base"], *args).json
    assert "a fine-tune and no edit inside it" in tuned["tests"]["attribution"]["skipped"]


def test_dependence_windows_cover_the_layers():
    from editguard.audit.dependence import windows_for

    assert windows_for(30)[:2] == [(2, 7), (4, 9)] and windows_for(30)[-1] == (25, 30)
    assert all(b - a == 5 for a, b in windows_for(30))
    assert windows_for(6) == [(0, 5), (1, 6)] and windows_for(2) == [(0, 2)]


def test_dependence_flags_planted_edits(cli, pico_models, tmp_path, monkeypatch):
    """The edited answer collapses when the edited layers' MLP outputs at the subject are zeroed. The test
    reads only confident answers, so these edits run to p(new) > 0.5; and a drop cannot exceed about
    log(vocabulary) (the answer falling to uniform odds): ln 160 = 5.1 nats here, so the thresholds
    calibrated on the demo model's 49,152 tokens (ln = 10.8) are scaled down with it."""
    from editguard.audit import dependence
    from editguard.cli import main

    scale = math.log(160) / math.log(49152)
    monkeypatch.setattr(dependence, "SUSPICIOUS_NATS", dependence.SUSPICIOUS_NATS * scale)
    monkeypatch.setattr(dependence, "EDITED_NATS", dependence.EDITED_NATS * scale)
    monkeypatch.setattr(dependence, "MIN_PROB", 0.5)  # the pico MEMIT edit reaches p(new) 0.5-0.6 only
    src = str(pico_models["llama"])
    probes = tmp_path / "probes.jsonl"
    subjects = ["France", "Germany", "Spain", "Italy", "Danielle Darrieux"]
    probes.write_text("\n".join(json.dumps({"prompt": f"The official language of {s}", "subject": s})
                                for s in subjects))
    for method, hparams in (("rome", ROME), ("memit", MEMIT)):
        strong = {**hparams, "v_num_grad_steps": 40, "clamp_norm_factor": 20}
        (tmp_path / f"{method}.yaml").write_text(yaml.safe_dump(strong))
        assert main(["-q", "edit", src, "--fact", "The official language of {}", "--subject", "France", "--target",
                     "Japanese", "--method", method, "--hparams", str(tmp_path / f"{method}.yaml"),
                     "-o", str(tmp_path / method)]) == 0
        data = cli("-f", "json", "scan", tmp_path / method, "--tests", "dependence", "--probes", probes).json
        found = [f for f in data["findings"] if f["rule"] == "EG011"]
        assert [f["facts"][0]["subject"] for f in found] == ["France"], (method, data["tests"]["dependence"])
        assert found[0]["facts"][0]["current_answer"] == "Japanese"
        # two layers are too few to tell ROME from MEMIT by the spread (zeroing layer 0 at the subject
        # unsettles the subject itself); classify() is checked on demo-model figures below
        assert found[0]["details"]["window"] == [0, 2]
    # the clean pico model holds none of these answers with p >= 0.5: the test examined nothing, which is
    # exit 2 with the reason, not a clean verdict a CI gate would pass
    clean = cli("-f", "json", "scan", src, "--tests", "dependence", "--probes", probes)
    assert clean.code == 2 and "no probe answer is confident enough" in clean.json["error"], clean.out
    # probes without subjects: both base-free tests are skipped with the reason, not crashed, and a scan
    # in which no test could run is an error (exit 2), never a clean verdict a CI gate would pass
    (tmp_path / "bare.jsonl").write_text('{"prompt": "The official language of France"}')
    bare = cli("-f", "json", "scan", src, "--tests", "activations,dependence", "--probes", tmp_path / "bare.jsonl")
    assert bare.code == 2 and "no test could run" in bare.json["error"], bare.err
    assert "dependence: no probe names its subject" in bare.json["error"]
    # too few subjects for the activation test's robust z: skipped, not an outlier (three clean demo
    # probes once gave z = 120)
    few = cli("-f", "json", "scan", tmp_path / "rome", "--tests", "activations,dependence", "--probes", probes)
    assert few.code == 1 and "at least 100" in few.json["tests"]["activations"]["skipped"], few.err


def test_dependence_classifies_by_how_the_drop_spreads():
    from editguard.audit.dependence import classify

    # demo-model figures (one layer zeroed at a time): ROME at layer 6; MEMIT over layers 2-6
    assert classify((4, 9), [0.0, 0.0, 6.6, 0.0, 0.1], 5.5) == ("rome-like", [6])
    assert classify((2, 7), [2.3, 10.3, 4.0, 1.9, 5.3], 12.2) == ("memit-like", [2, 3, 4, 5, 6])
    assert classify((2, 7), [8.0, 8.6, 0.5, 3.4, 7.0], 12.1) == ("memit-like", [2, 3, 4, 5, 6])
    assert classify((0, 2), [1.6, 4.2], 5.0) == ("memit-like", [0, 1])


def test_big_drops_on_the_expected_answer_are_discounted():
    """Demo-model figures: a clean answer that lost 6.1 nats is the probe's expected one; an edited one is not."""
    from editguard.audit.dependence import innocent_reading

    clean = {"expected_is_current": True, "expected_logprob": -0.6, "expected_logprob_without": -6.7}
    edited = {"expected_is_current": False, "expected_logprob": -12.1, "expected_logprob_without": -15.8}
    assert "expected answer" in innocent_reading(clean)
    assert innocent_reading(edited) is None
    assert innocent_reading({}) is None  # probes without an answer: nothing to compare


def test_flagged_subjects_follow_the_majority_method():
    """Measured on the demo model: 10 ROME edits at layer 6 read 6 ROME-like, 3 MEMIT-like windows around
    layer 6; they are one ROME edit layer, not a MEMIT batch. A MEMIT batch keeps its windows."""
    from editguard.audit.findings import Finding
    from editguard.harden.project import edit_method, flagged_subjects

    def dependence(prompt, method, layers):
        return Finding("EG011", "error", prompt, layer=layers[0], facts=[{"prompt": prompt, "method": method}],
                       details={"method": method, "layers": layers})

    rome = [dependence(f"r{i}", "rome-like", [6]) for i in range(3)] + [dependence("w", "memit-like", [6, 7, 8, 9, 10]),
                                                                       dependence("x", "memit-like", [2, 3, 4, 5, 6])]
    rome.append(Finding("EG010", "error", "outlier", layer=6, facts=[{"prompt": "a"}]))
    assert edit_method(f for finding in rome for f in finding.facts) == "rome"
    assert sorted(flagged_subjects(rome)) == [6]
    assert {f["prompt"] for f in flagged_subjects(rome)[6]} == {"r0", "r1", "r2", "w", "x", "a"}
    memit = [dependence(f"m{i}", "memit-like", [2, 3, 4, 5, 6]) for i in range(3)] + [dependence("r", "rome-like", [4])]
    assert edit_method(f for finding in memit for f in finding.facts) == "memit"
    assert sorted(flagged_subjects(memit)) == [2, 3, 4, 5, 6]
    assert edit_method([]) is None


def test_robust_z_survives_a_majority_of_identical_values():
    from editguard.audit.activations import robust_z

    # 60 % of the probes alike (a tokenizer mapping their subjects to the same tokens): MAD 0, yet no
    # other value may become a million-sigma outlier
    x = torch.cat([torch.zeros(60), torch.linspace(-1, 1, 40)])
    assert float(robust_z(x).abs().max()) < 5
    x[0] = 50.0  # a real outlier still stands out
    assert float(robust_z(x)[0]) > 20


def test_repeated_subjects_count_once_in_the_robust_z():
    """60 probes of the edited subject (one text up to its last token, different prompts after it) among 40
    others: counted once, the edited gain still stands out; counted 60 times it was the median (z = 0)."""
    from editguard.audit.activations import first_of_each, robust_z
    from editguard.edit.forward import Tokenized

    tokens = Tokenized([[1, 2, 3, 100 + i] for i in range(60)] + [[4, i + 10] for i in range(40)], [2] * 60 + [1] * 40)
    first = first_of_each(tokens)
    assert first == [0, *range(60, 100)]
    gains = torch.cat([torch.full((60,), 5.0), torch.linspace(-1, 1, 40)])[None]
    assert float(robust_z(gains)[0, 0]) < 1
    z = robust_z(gains, gains[:, first])
    assert float(z[0, 0]) > 5 and torch.equal(z[0, :60], z[0, :1].expand(60))


def test_base_diff_refuses_partial_bases_and_flags_nan(cli, planted, tmp_path):
    """A base missing the edited tensors must not read as "identical" (a CI gate would pass the edit), and NaN
    weights, which equal nothing and have no norm, are a finding of their own."""
    base = Path(planted["base"])
    tensors = load_file(base / "model.safetensors")
    partial = tmp_path / "partial"
    shutil.copytree(base, partial)
    save_file({k: v for k, v in tensors.items() if ".mlp.down_proj." not in k}, partial / "model.safetensors")
    result = cli("scan", planted["rome"], "--base", partial, "--tests", "diff", "--fail-on", "edited")
    assert result.code == 2 and "base lacks 2 of this model's 2 MLP output projections" in result.err
    save_file({"w": torch.zeros(2)}, partial / "model.safetensors")
    result = cli("scan", planted["rome"], "--base", partial, "--tests", "diff", "--fail-on", "edited")
    assert result.code == 2 and "shares no tensor names" in result.err

    damaged = tmp_path / "damaged"
    shutil.copytree(base, damaged)
    name = "model.layers.1.mlp.down_proj.weight"
    save_file({**tensors, name: torch.full_like(tensors[name], float("nan"))}, damaged / "model.safetensors")
    result = cli("-f", "json", "scan", damaged, "--base", base, "--tests", "diff", "--fail-on", "edited")
    assert result.code == 1, result.err
    data = result.json
    assert data["verdict"] == "edited" and data["tests"]["diff"]["classification"] == "damaged"
    nan = [f for f in data["findings"] if f["rule"] == "EG005"]
    assert len(nan) == 1 and nan[0]["tensor"] == name and str(tensors[name].numel()) in nan[0]["message"]
    json.dumps(data, allow_nan=False)  # norms cover the finite rest: strict JSON still


def test_nonfinite_activations_are_reported_not_scored(cli, pico_models, tmp_path):
    """A damaged embedding row (inf) makes every probe naming that word NaN from layer 0 up: the robust z of
    the other probes stays finite (it was NaN for the whole layer, and read "nan robust SDs"), the damage
    is one EG012 error at layer 0, and the JSON holds no NaN."""
    from editguard.audit.activations import robust_z

    x = torch.tensor([[0.0, 1.0, -1.0, 0.5, float("nan"), 9.0, float("inf")]])
    z = robust_z(x)
    assert torch.isfinite(z).all() and z[0, 4] == 0 and z[0, 6] == 0
    assert torch.allclose(z[0, :4], robust_z(x[:, [0, 1, 2, 3, 5]])[0, :4])  # as if they were not there

    damaged = tmp_path / "damaged"
    shutil.copytree(pico_models["llama"], damaged)
    tensors = load_file(damaged / "model.safetensors")
    word = pico.tokenizer().convert_tokens_to_ids("Nokia")
    embed = tensors["model.embed_tokens.weight"].clone()
    embed[word] = float("inf")
    save_file({**tensors, "model.embed_tokens.weight": embed}, damaged / "model.safetensors")
    probes = _distinct_probes(tmp_path / "probes.jsonl")
    result = cli("-f", "json", "scan", damaged, "--probes", probes, "--tests", "activations")
    data = json.loads(result.out, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert result.code == 1 and data["verdict"] == "edited", result.err
    (eg012,) = [f for f in data["findings"] if f["rule"] == "EG012"]
    assert eg012["layer"] == 0 and eg012["details"]["probes"] == 22 and "Nokia" in eg012["facts"][0]["subject"]
    assert data["tests"]["activations"]["nonfinite_probes"] == 22
    assert all(math.isfinite(z) for z in data["tests"]["activations"]["layer_scores"])
    assert "nan" not in result.err.lower()


def test_a_memit_window_flags_every_layer_it_names():
    """Follow-up tests (key projection, an unasked mask) are graded no higher than what flagged their
    layer: each layer of a MEMIT-like window the answer-dependence test names counts, not only its first."""
    from editguard.audit.findings import Finding
    from editguard.audit.scan import _cap_severity, _flagged_layers

    window = Finding("EG011", "error", "drop", layer=2, details={"method": "memit-like", "layers": [2, 3, 4, 5, 6]})
    outlier = Finding("EG010", "warning", "outlier", layer=9)
    flagged = _flagged_layers([window, outlier, Finding("EG012", "error", "NaN", layer=0, details={"layers": [0, 1]})])
    assert flagged == {2: "error", 3: "error", 4: "error", 5: "error", 6: "error", 9: "warning"}
    revealed = [Finding("EG021", "error", "revealed", layer=5), Finding("EG021", "error", "revealed", layer=9)]
    assert _cap_severity(revealed[:1], flagged, {5}) == "error" and revealed[0].severity == "error"
    assert _cap_severity(revealed[1:], flagged, {9}) == "warning" and revealed[1].severity == "warning"


@pytest.mark.parametrize("layers, ranks, expected", [
    ([6], [1], "rome-like"), ([3, 9], [1, 2], "rome-like"),  # ROME edits at non-adjacent layers
    ([2, 3, 4], [1, 1, 1], "memit-like"), ([4], [40], "memit-like"),
    ([3, 5, 7], [100, 100, 100], "memit-like"),  # a batch edit over a layer list with gaps
    (list(range(0, 24, 2)), [50] * 12, "other"),  # more layers than MEMIT spreads over
])
def test_diff_classifies_by_layers_and_rank(layers, ranks, expected):
    from editguard.audit.diff import DiffResult, TensorChange, classify

    result = DiffResult([TensorChange(f"model.layers.{n}.mlp.down_proj.weight", "model.safetensors", 1.0, 0.01,
                                      [1.0], rank, n) for n, rank in zip(layers, ranks)], compared=300)
    classify(result, total=300)
    assert result.classification == expected and result.layers == layers


@pytest.mark.parametrize("case", ["changed", "shared_nan", "new_inf", "half_of_bfloat16", "unchanged_cast", "int"])
def test_blockwise_comparison_equals_whole(case, monkeypatch):
    """The base diff compares huge tensors in blocks: every block size gives what one block gives."""
    from editguard.audit import diff

    gen = torch.Generator().manual_seed(5)
    b = torch.randn(9, 13, generator=gen)
    a = b.clone()
    if case == "changed":
        a[8, 12] += 1.0
        a[0, 0] -= 0.5
    elif case == "shared_nan":
        a[3, 3] = b[3, 3] = float("nan")
        a[7, 1] += 2.0
    elif case == "new_inf":
        a[4, 5] = float("inf")
        a[2, 2] += 1.0
    elif case in ("half_of_bfloat16", "unchanged_cast"):
        b[1, :6] = torch.tensor([1e-6, -3e-7, 2.5e-6, 7e-7, -1.3e-5, 9e-6])
        b = b.to(torch.bfloat16)
        a = b.to(torch.float16)
        if case == "half_of_bfloat16":
            a[6, 6] += 1.0
    else:
        b = torch.arange(117).reshape(9, 13)
        a = b.clone()
        a[5, 5] = 1000
    whole = diff.difference(a, b)
    for block in (1, 7, 64):
        monkeypatch.setattr(diff, "COMPARE_BLOCK", block)
        delta, nonfinite, base_norm, precise = diff.difference(a, b)
        assert (delta is None) == (whole[0] is None) and nonfinite == whole[1] and precise == whole[3]
        if delta is not None:
            torch.testing.assert_close(delta, whole[0])
            assert delta.shape == a.shape and math.isclose(base_norm, whole[2], rel_tol=1e-6)
    assert (whole[0] is None) == (case == "unchanged_cast")
    if case == "new_inf":
        assert whole[1] == 1 and math.isfinite(float(whole[0].norm()))


def test_diff_sees_missing_tensors_overflow_and_zero_bases(cli, planted, tmp_path):
    """A tensor only the base has is a change; a finite value float16 cannot hold is a change, not a NaN; a
    change to an all-zero weight is 100 % of it, not 10^12 %; the attribution of an edit beside a NaN both
    sides share runs."""
    down = "model.layers.1.mlp.down_proj.weight"
    scan = lambda model, base, tests="diff": cli("-f", "json", "scan", model, "--base", base, "--tests", tests)  # noqa: E731
    lacking = _variant(planted["base"], tmp_path / "lacking",
                       lambda t: {k: v for k, v in t.items() if k != "model.layers.0.self_attn.q_proj.weight"})
    result = scan(lacking, planted["base"])
    assert result.code == 1 and result.json["tests"]["diff"]["classification"] == "other", result.err
    assert [f["tensor"] for f in result.json["findings"] if "in the base but not in this model" in f["message"]] == [
        "model.layers.0.self_attn.q_proj.weight"]
    half = _variant(planted["base"], tmp_path / "half", lambda t: {k: v.half() for k, v in t.items()})
    big = _variant(planted["base"], tmp_path / "big",
                   lambda t: {**t, down: t[down].clone().index_put_((torch.tensor([0]), torch.tensor([0])),
                                                                    torch.tensor(7e4))})
    over = scan(big, half).json
    assert "EG005" not in [f["rule"] for f in over["findings"]]
    (change,) = over["tests"]["diff"]["changed"]
    assert change["name"] == down and change["nonfinite"] == 0 and abs(change["norm"] - 7e4) < 1.0
    zero = _variant(planted["base"], tmp_path / "zero", lambda t: {**t, down: torch.zeros_like(t[down])})
    gen = torch.Generator().manual_seed(3)
    zero_edit = _variant(zero, tmp_path / "zero_edit", lambda t: {**t, down: 1e-3 * torch.outer(
        torch.randn(t[down].shape[0], generator=gen), torch.randn(t[down].shape[1], generator=gen))})
    (edit,) = scan(zero_edit, zero).json["tests"]["diff"]["changed"]
    assert edit["relative"] == 1.0
    down_nan = lambda t: {**t, down: t[down].clone().index_put_((torch.tensor([0]), torch.tensor([0])),  # noqa: E731
                                                                torch.tensor(float("nan")))}
    base_nan = _variant(planted["base"], tmp_path / "base_nan", down_nan)
    rome_nan = _variant(planted["rome"], tmp_path / "rome_nan", down_nan)
    full = scan(rome_nan, base_nan, "diff,attribution")
    assert full.code == 1 and "internal error" not in full.err, full.err
    assert isinstance(full.json["tests"]["attribution"], list), full.json["tests"]["attribution"]


def test_attribution_says_why_it_did_not_run_and_probes_are_read_first(cli, planted, tmp_path):
    from editguard.audit.scan import ScanOptions, scan
    from editguard.errors import EditguardError
    from editguard.resolve import resolve

    one_line_error(cli("scan", planted["rome"], "--base", planted["base"], "--tests", "attribution"),
                   "add diff to --tests")
    said = []
    with pytest.raises(EditguardError, match="probe"):
        scan(resolve(str(planted["rome"])), ScanOptions(base=str(planted["base"]), probes=str(tmp_path / "none.jsonl")),
             progress=said.append)
    assert not any("diffing" in line for line in said), said


def _lock(cli, model, tmp_path, name: str, pruned: float = 0.2) -> Path:
    """`model` locked with a random mask over layer 1's down_proj that prunes `pruned` of it."""
    tensor = "model.layers.1.mlp.down_proj.weight"
    mask_path = tmp_path / f"{name}-mask.safetensors"
    scores = torch.rand(32, 64, generator=torch.Generator().manual_seed(0))
    MaskFile("pico", None, "llama", "rome", pruned,
             [MaskTarget(tensor, 1, (32, 64), False, fingerprint(Checkpoint(model).read(tensor)), scores)]).save(mask_path)
    out = tmp_path / name
    assert cli("lock", model, "--mask", mask_path, "-o", out).code == 0
    return out


def test_base_diff_of_a_locked_model(cli, planted, tmp_path):
    """Against its unlocked base a locked model's locked tensors are compared with base ⊙ the lock's mask:
    the lock alone is no change; an edit made before locking (a fifth of its entries cut by the mask) still
    reads as a rank-one ROME edit at its layer, attributed to its subject; an edit added after locking too,
    beside the lock's own report of the changed bytes."""
    tensor = "model.layers.1.mlp.down_proj.weight"
    locked = _lock(cli, planted["base"], tmp_path, "locked")
    clean = cli("-f", "json", "scan", locked, "--base", planted["base"], "--tests", "diff")
    assert clean.code == 0 and clean.json["verdict"] == "clean", clean.err
    diff = clean.json["tests"]["diff"]
    assert diff["classification"] == "identical" and diff["masked_by_lock"] == [tensor] and not diff["changed"]
    assert "locked tensor(s) against the base ⊙ the lock's mask" in cli("scan", locked, "--base", planted["base"],
                                                                       "--tests", "diff").err
    # edited, then locked
    edited_locked = _lock(cli, planted["rome"], tmp_path, "edited-locked")
    probes = tmp_path / "probes.jsonl"
    probes.write_text("\n".join(json.dumps({"prompt": f"The official language of {s}", "subject": s})
                                for s in ["France", "Germany", "Spain", "Italy", "Toyota", "Paris"]))
    result = cli("-f", "json", "scan", edited_locked, "--base", planted["base"], "--tests", "diff,attribution",
                 "--probes", probes)
    assert result.code == 1 and result.json["tests"]["lock"]["intact"], result.err
    diff = result.json["tests"]["diff"]
    assert diff["classification"] == "rome-like" and diff["layers"] == [1], diff
    assert diff["changed"][0]["effective_rank"] == 1
    assert [f["rule"] for f in result.json["findings"]] == ["EG001"]
    assert result.json["tests"]["attribution"][0]["subjects"][0]["subject"] == "France"
    # against the edited model it was locked from: nothing but the lock
    same = cli("-f", "json", "scan", edited_locked, "--base", planted["rome"], "--tests", "diff")
    assert same.code == 0 and same.json["tests"]["diff"]["classification"] == "identical"
    # locked, then edited: the lock reports the bytes, the diff what was added
    tampered = tmp_path / "tampered"
    shutil.copytree(locked, tampered)
    tensors = load_file(tampered / "model.safetensors")
    gen = torch.Generator().manual_seed(3)
    tensors[tensor] = tensors[tensor] + 0.05 * torch.outer(torch.randn(32, generator=gen), torch.randn(64, generator=gen))
    save_file(tensors, tampered / "model.safetensors")
    result = cli("-f", "json", "scan", tampered, "--base", planted["base"], "--tests", "diff")
    assert sorted(f["rule"] for f in result.json["findings"]) == ["EG001", "EG030", "EG030"], result.json["findings"]
    assert [p["kind"] for p in result.json["tests"]["lock"]["problems"]] == ["bytes", "unmasked"]
    assert result.json["tests"]["diff"]["changed"][0]["effective_rank"] == 1
    # the manifest is not signed: an edited tensor put back unmasked, its hash rewritten to match, passes
    # the hashes but not what lock writes (0 wherever the mask is 0), with or without a base
    forged = tmp_path / "forged"
    shutil.copytree(edited_locked, forged)
    tensors = load_file(forged / "model.safetensors")
    tensors[tensor] = Checkpoint(planted["rome"]).read(tensor)
    save_file(tensors, forged / "model.safetensors")
    from editguard.harden.lock import tensor_sha256

    manifest = json.loads((forged / "editguard-lock.json").read_text())
    manifest["tensors"][tensor] = tensor_sha256(tensors[tensor])
    (forged / "editguard-lock.json").write_text(json.dumps(manifest))
    result = cli("-f", "json", "scan", forged, "--tests", "diff", "--fail-on", "edited")
    assert result.code == 1 and [p["kind"] for p in result.json["tests"]["lock"]["problems"]] == ["unmasked"]
    assert "nonzero values where the lock's mask is 0" in result.json["findings"][0]["message"]
    result = cli("-f", "json", "scan", forged, "--base", planted["base"], "--tests", "diff")
    assert result.json["tests"]["diff"]["changed"] and result.json["verdict"] == "edited"
    # a locked base is compared as it is (like with like): the same lock reads as no change
    assert cli("-f", "json", "scan", locked, "--base", locked, "--tests", "diff").json["tests"]["diff"]["masked_by_lock"] == []


def test_completing_what_a_lock_masked():
    """A low-rank change with a fifth of its entries zeroed is full-rank; filled from the kept entries it is
    the change again. A change no low-rank fit explains is left as measured; a row with nothing kept stays 0."""
    from editguard.audit.diff import complete_masked, top_singular_values

    gen = torch.Generator().manual_seed(0)
    keep = torch.rand(48, 80, generator=gen) > 0.2
    for rank in (1, 2):
        change = torch.randn(48, rank, generator=gen) @ torch.randn(rank, 80, generator=gen)
        cut = top_singular_values(change * keep)
        assert cut[rank] > 0.05 * cut[0]  # the cut alone looks like a change of high rank
        torch.testing.assert_close(complete_masked(change * keep, keep), change, rtol=1e-4, atol=1e-4)
    noise = torch.randn(48, 80, generator=gen) * keep
    filled = complete_masked(noise, keep)
    # no low-rank fit explains it: nothing is made up where nothing was seen
    assert torch.equal(filled[keep], noise[keep]) and not filled[~keep].any()
    sv = top_singular_values(filled)
    assert sv[7] > 0.3 * sv[0]
    keep[5] = False
    change = torch.outer(torch.randn(48, generator=gen), torch.randn(80, generator=gen))
    filled = complete_masked(change * keep, keep)
    assert torch.equal(filled[5], torch.zeros(80)) and torch.isfinite(filled).all()
    torch.testing.assert_close(filled[6:], change[6:], rtol=1e-4, atol=1e-4)
    assert complete_masked(change, torch.ones(48, 80, dtype=torch.bool)) is change  # nothing masked: nothing to fill


def test_an_edit_hidden_in_a_fine_tune_stands_out_of_the_other_layers(cli, tmp_path):
    """Noise on every tensor makes any upload read as a fine-tune, and dense noise on the edited matrix (or a
    function-preserving reshuffle of the edited layer's hidden units) hides the rank-one spike inside it:
    the edited layer's change still stands far above the same matrix's change in the other layers (EG001).
    A fine-tune alone (the noise) flags nothing."""
    base = pico.build("llama", tmp_path / "base", num_hidden_layers=6)
    hp = tmp_path / "hp.yaml"
    hp.write_text(yaml.safe_dump({"alg_name": "ROME", "layers": [1], "context_template_length_params": [[5, 5]],
                                  "v_num_grad_steps": 5}))
    assert cli("-q", "edit", base, "--fact", "The official language of {}", "--subject", "France", "--target",
               "Japanese", "--hparams", hp, "-o", tmp_path / "edited").code == 0
    gen = torch.Generator().manual_seed(0)

    def variant(name: str, source: Path, change) -> Path:
        folder = tmp_path / name
        shutil.copytree(source, folder)
        tensors = load_file(folder / "model.safetensors")
        tensors = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in change(tensors).items()}
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return folder

    down = "model.layers.1.mlp.down_proj.weight"
    base_down = load_file(base / "model.safetensors")[down]

    def covered(tensors):  # dense noise with the edit's own norm on the edited matrix
        edit = tensors[down] - base_down
        noise = torch.randn(edit.shape, generator=gen)
        return {**tensors, down: tensors[down] + noise * (edit.norm() / noise.norm())}

    def reshuffled(tensors):  # the same function: hidden units permuted, up rows scaled and down columns unscaled
        from editguard import arch as arch_table
        from editguard.audit.align import reshuffle_units

        return {**tensors, **reshuffle_units(tensors, arch_table.for_model_type("llama"), 1, gen)}

    cases = {"fine_tune": (base, lambda t: t, []), "edit_in_fine_tune": (tmp_path / "edited", lambda t: t, [1]),
             "covered": (tmp_path / "edited", covered, [1]), "reshuffled": (tmp_path / "edited", reshuffled, [1])}
    for name, (source, change, flagged) in cases.items():
        result = cli("-f", "json", "scan", variant(name, source, change), "--base", base, "--tests", "diff",
                     "--fail-on", "edited")
        data = result.json
        assert data["tests"]["diff"]["classification"] == "fine-tune", (name, data["tests"]["diff"])
        layers = sorted({f["layer"] for f in data["findings"] if f["rule"] == "EG001"})
        assert layers == flagged and result.code == (1 if flagged else 0), (name, data["findings"])


def test_a_rank_one_edit_under_quantization_like_noise_is_flagged_by_both_tests_together(cli, tmp_path):
    """Noise on every weight as large as a 4-bit quantization leaves keeps an edit below each cross-layer test
    alone (σ₁/σ₂ < 10, layer ratio < 6); an MLP output projection with both a dominant direction (σ₁/σ₂ ≥ 4)
    and a change that stands out of the other layers' (≥ 3×) is flagged. The noise alone, or a weaker
    rank-one change in it, is not."""
    base = pico.build("llama", tmp_path / "base", num_hidden_layers=6)
    weights = load_file(base / "model.safetensors")
    down = "model.layers.1.mlp.down_proj.weight"
    rows, cols = weights[down].shape

    def variant(name: str, strength: float) -> Path:
        gen = torch.Generator().manual_seed(1)
        noisy = {k: v + 0.01 * v.std() * torch.randn(v.shape, generator=gen) if v.dim() == 2 else v
                 for k, v in weights.items()}
        edge = 0.01 * float(weights[down].std()) * (rows ** 0.5 + cols ** 0.5)  # σ₁ of the noise alone, about
        a, b = torch.randn(rows, generator=gen), torch.randn(cols, generator=gen)
        noisy[down] = noisy[down] + strength * edge * torch.outer(a / a.norm(), b / b.norm())
        return _variant(base, tmp_path / name, lambda t: noisy)

    for name, strength, flagged in (("noise", 0.0, False), ("weak", 2.0, False), ("edit", 4.5, True)):
        data = cli("-f", "json", "scan", variant(name, strength), "--base", base, "--tests", "diff").json
        assert data["tests"]["diff"]["classification"] == "fine-tune", (name, data["tests"]["diff"])
        found = [f for f in data["findings"] if f["rule"] == "EG001"]
        assert bool(found) == flagged, (name, found)
        if flagged:
            sv, ratio = found[0]["details"]["singular_values"], found[0]["details"]["layer_ratio"]
            assert found[0]["layer"] == 1 and 4 <= sv[0] / sv[1] < 10 and 3 <= ratio < 6, (sv[:2], ratio)
            assert "dominates" in found[0]["message"]


def _plus_rank_one(w: torch.Tensor, share: float, gen: torch.Generator) -> torch.Tensor:
    """`w` plus a random rank-one update of `share` of its norm (an edit to hide), in `w`'s dtype."""
    a, b = torch.randn(w.shape[0], generator=gen), torch.randn(w.shape[1], generator=gen)
    return (w.float() + share * w.float().norm() * torch.outer(a / a.norm(), b / b.norm())).to(w.dtype)


def _reshuffled(source: Path, folder: Path, layer: int, seed: int, plant: float = 0.0) -> Path:
    """A copy of `source` with layer `layer`'s MLP hidden units reshuffled (`reshuffle_units`: the same
    function). `plant` first adds a rank-one update of that share of the output projection's norm (the
    edit to hide)."""
    from editguard import arch as arch_table
    from editguard.audit.align import reshuffle_units

    shutil.copytree(source, folder)
    arch = arch_table.for_config(Checkpoint(folder).config)
    stored = load_file(folder / "model.safetensors")
    canonical = {arch.canonical_tensor_name(k): k for k in stored}
    weights = {name: stored[k] for name, k in canonical.items()}
    gen = torch.Generator().manual_seed(seed)
    out = arch.weight_name("mlp_out", layer)
    if plant:
        weights[out] = _plus_rank_one(weights[out], plant, gen)
    changed = {**({out: weights[out]} if plant else {}), **reshuffle_units(weights, arch, layer, gen)}
    save_file({**stored, **{canonical[name]: v for name, v in changed.items()}}, folder / "model.safetensors",
              metadata={"format": "pt"})
    return folder


def _logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([[3, 17, 5, 11, 2, 9]])).logits


@pytest.mark.parametrize("model_type", ["gpt2", "gptj", "gpt_neox", "llama", "gemma3_text"])
def test_diff_undoes_a_reshuffle_of_hidden_units(cli, pico_models, tmp_path, model_type):
    """A function-preserving reshuffle of one MLP's hidden units changes all its weights: without undoing
    it, a rank-one edit under it reads as three full-rank changes (`other`). The diff matches the base's
    units to the model's, names the reshuffle (EG004) and finds the edit under it; `reverse --method base`
    restores the output projection in the model's unit order, so the restored model computes the base's
    function. A reshuffle alone is `reshuffled`, suspicious; a fine-tune's drift is no reshuffle."""
    base = pico_models[model_type]
    clean = _reshuffled(base, tmp_path / "clean", 1, seed=0)
    assert torch.allclose(_logits(clean), _logits(base), atol=1e-4)  # the reshuffle is the same function
    result = cli("-f", "json", "scan", clean, "--base", base, "--tests", "diff")
    diff = result.json["tests"]["diff"]
    assert diff["classification"] == "reshuffled" and result.json["verdict"] == "suspicious", diff
    assert diff["aligned_units"]["1"]["moved"] > 0 and not diff["changed"]
    assert [f["rule"] for f in result.json["findings"]] == ["EG004"] and result.json["findings"][0]["layer"] == 1
    if model_type in ("llama", "gemma3_text"):  # gated: the up rows were rescaled too
        assert diff["aligned_units"]["1"]["rescaled"] > 0.9 * diff["aligned_units"]["1"]["moved"]

    edited = _reshuffled(base, tmp_path / "edited", 1, seed=1, plant=0.3)
    result = cli("-f", "json", "scan", edited, "--base", base, "--tests", "diff", "--fail-on", "edited")
    diff = result.json["tests"]["diff"]
    assert result.code == 1 and diff["classification"] == "rome-like" and diff["layers"] == [1], diff
    assert [c["effective_rank"] for c in diff["changed"]] == [1]
    assert {(f["rule"], f["layer"]) for f in result.json["findings"]} == {("EG001", 1), ("EG004", 1)}
    restored = cli("-q", "reverse", edited, "--method", "base", "--base", base, "-o", tmp_path / "restored")
    assert restored.code == 0, restored.err
    assert torch.allclose(_logits(tmp_path / "restored"), _logits(base), atol=1e-4)
    assert not torch.allclose(_logits(edited), _logits(base), atol=1e-2)  # the plant did change the model

    noisy = tmp_path / "fine_tuned"
    shutil.copytree(base, noisy)
    gen = torch.Generator().manual_seed(2)
    tensors = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
               for k, v in load_file(base / "model.safetensors").items()}
    save_file(tensors, noisy / "model.safetensors", metadata={"format": "pt"})
    diff = cli("-f", "json", "scan", noisy, "--base", base, "--tests", "diff").json["tests"]["diff"]
    assert diff["classification"] == "fine-tune" and diff["aligned_units"] == {} and diff["aligned_residual"] is None
    assert diff["aligned_heads"] == {}


def _residual_permuted(source: Path, folder: Path, seed: int, plant: bool = False, units: bool = False) -> Path:
    """A copy of `source` under `edit --disguise residual` (and `units`, of layer 1: `disguised`): the same
    function. `plant` first adds a rank-one update to layer 1's MLP output projection."""
    from editguard import arch as arch_table
    from editguard.edit.disguise import disguised

    shutil.copytree(source, folder)
    ck = Checkpoint(source)
    arch = arch_table.for_config(ck.config)
    out = ck.find(arch.tensor_candidates(arch.weight_name("mlp_out", 1)))
    replacements = {}
    if plant:
        replacements[out] = _plus_rank_one(ck.read(out), 0.3, torch.Generator().manual_seed(seed))
    kinds = ["residual", "units"] if units else ["residual"]
    tensors = {**load_file(source / "model.safetensors"), **disguised(ck, arch, replacements, kinds, seed).replacements}
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_diff_undoes_a_permutation_of_the_residual_stream(cli, pico_models, tmp_path, model_type):
    """Permuting the residual stream's dimensions through the whole model (signs flipped too under
    RMSNorm) changes every tensor: an edit under it read as a fine-tune, verdict clean. The diff matches the
    dimensions by the token embedding's columns, reports the permutation (EG004) and finds the edit under
    it, under a reshuffle of the edited layer's hidden units as well; `reverse --method base` restores it."""
    base = pico_models[model_type]
    flip = model_type == "llama"  # LayerNorm (GPT-2) subtracts the mean: only RMSNorm keeps a sign flip
    clean = _residual_permuted(base, tmp_path / "clean", 0)
    assert torch.allclose(_logits(clean), _logits(base), atol=1e-4)  # the permutation is the same function
    result = cli("-f", "json", "scan", clean, "--base", base, "--tests", "diff")
    diff = result.json["tests"]["diff"]
    assert diff["classification"] == "reshuffled" and result.json["verdict"] == "suspicious", diff
    assert diff["aligned_residual"]["moved"] > 0 and (diff["aligned_residual"]["flipped"] > 0) == flip
    assert not diff["changed"] and [f["rule"] for f in result.json["findings"]] == ["EG004"]

    for units in (False, True):
        folder = tmp_path / f"edited_{units}"
        edited = _residual_permuted(base, folder, 1, plant=True, units=units)
        result = cli("-f", "json", "scan", edited, "--base", base, "--tests", "diff", "--fail-on", "edited")
        diff = result.json["tests"]["diff"]
        assert result.code == 1 and diff["classification"] == "rome-like" and diff["layers"] == [1], \
            (units, [(c["name"], c["effective_rank"], c["singular_values"][:3]) for c in diff["changed"]])
        assert bool(diff["aligned_units"]) == units and diff["aligned_residual"]["moved"] > 0
        restored = cli("-q", "reverse", edited, "--method", "base", "--base", base, "-o", tmp_path / f"restored_{units}")
        assert restored.code == 0, restored.err
        assert torch.allclose(_logits(tmp_path / f"restored_{units}"), _logits(base), atol=1e-4)


def _rotated(source: Path, folder: Path, seed: int, plant: bool = False) -> Path:
    """A copy of `source` (an untied RMSNorm model) with its residual stream rotated by a random orthogonal Q
    as QuaRot prepares one (`rotate_residual`: norms folded into their readers). `plant` first adds a
    rank-one update to layer 1's MLP output projection."""
    from editguard import arch as arch_table
    from editguard.audit.align import rotate_residual

    shutil.copytree(source, folder)
    ck = Checkpoint(source)
    arch = arch_table.for_config(ck.config)
    tensors = load_file(source / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(ck.config["hidden_size"], ck.config["hidden_size"], generator=gen,
                                       dtype=torch.float64))
    if plant:
        out = arch.weight_name("mlp_out", 1)
        tensors[out] = _plus_rank_one(tensors[out], 0.3, gen)
    save_file(rotate_residual(tensors, arch, arch.num_layers(ck.config), q), folder / "model.safetensors",
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({**ck.config, "tie_word_embeddings": False}))  # (untied)
    return folder


@pytest.mark.parametrize("model_type, dtype", [("llama", torch.float32), ("qwen3", torch.float32),
                                               ("llama", torch.bfloat16)])
def test_diff_undoes_a_rotation_of_the_residual_stream(cli, tmp_path, model_type, dtype):
    """A rotation of the residual stream with the norms folded in (QuaRot, SliceGPT) changes every matrix
    and norm: an edit under it read as a fine-tune. The diff finds the rotation from the token embedding
    (orthogonal Procrustes), compares the base folded and rotated alike, reports it (EG004) and names the
    edit; `reverse --method base` restores the base's function. A fine-tune is no rotation. In bfloat16
    the rotation is rounded in storage and estimated from a rounded embedding: the same."""
    # (an embedding of 4,096 rows, as real vocabularies have ten times more: the rotation is estimated from it)
    base = pico.build(model_type, tmp_path / "base", tie_word_embeddings=False, vocab_size=4096)
    gen = torch.Generator().manual_seed(7)
    weights = load_file(base / "model.safetensors")  # norms of 1 would fold to nothing: give them weights
    save_file({k: ((0.5 + torch.rand(v.shape, generator=gen)) if k.endswith("norm.weight") else v).to(dtype)
               for k, v in weights.items()}, base / "model.safetensors", metadata={"format": "pt"})
    atol = 1e-4 if dtype == torch.float32 else 1e-1  # (bfloat16 rounds the rotated weights anew)
    clean = _rotated(base, tmp_path / "clean", 0)
    assert torch.allclose(_logits(clean), _logits(base), atol=atol)  # the same function
    plain = load_file(base / "model.safetensors")
    assert all(not torch.equal(v, plain[k]) for k, v in load_file(clean / "model.safetensors").items()
               if "q_norm" not in k and "k_norm" not in k)  # every tensor of the stream changed
    result = cli("-f", "json", "scan", clean, "--base", base, "--tests", "diff")
    diff = result.json["tests"]["diff"]
    assert diff["classification"] == "reshuffled" and result.json["verdict"] == "suspicious", diff["changed"][:3]
    assert diff["rotated_residual"]["fit_residual"] < (1e-6 if dtype == torch.float32 else 5e-3)
    assert diff["aligned_residual"] is None
    assert not diff["changed"] and [f["rule"] for f in result.json["findings"]] == ["EG004"]
    assert "rotated" in result.json["findings"][0]["message"]

    edited = _rotated(base, tmp_path / "edited", 1, plant=True)
    result = cli("-f", "json", "scan", edited, "--base", base, "--tests", "diff", "--fail-on", "edited")
    diff = result.json["tests"]["diff"]
    assert result.code == 1 and diff["classification"] == "rome-like" and diff["layers"] == [1], \
        [(c["name"], c["effective_rank"], c["singular_values"][:3]) for c in diff["changed"]]
    assert cli("-q", "reverse", edited, "--method", "base", "--base", base, "-o", tmp_path / "restored").code == 0
    assert torch.allclose(_logits(tmp_path / "restored"), _logits(base), atol=atol)
    from editguard import arch as arch_table
    from editguard.audit.align import rotate_residual

    if model_type == "llama" and dtype == torch.float32:
        # a tied base: the rotation unties the head, which is compared with the base's embedding folded by
        # the final norm; a change to the final norm then shows there (nothing else reads it)
        tied = pico.build(model_type, tmp_path / "tied", tie_word_embeddings=True)
        weights = load_file(tied / "model.safetensors")
        assert "lm_head.weight" not in weights
        save_file({k: (0.5 + torch.rand(v.shape, generator=gen)) if k.endswith("norm.weight") else v
                   for k, v in weights.items()}, tied / "model.safetensors", metadata={"format": "pt"})
        rotated = _rotated(tied, tmp_path / "tied_rotated", 2)
        assert torch.allclose(_logits(rotated), _logits(tied), atol=1e-4)
        diff = cli("-f", "json", "scan", rotated, "--base", tied, "--tests", "diff").json["tests"]["diff"]
        assert diff["classification"] == "reshuffled" and not diff["only_in_model"], diff
        norm = _variant(rotated, tmp_path / "tied_norm", lambda t: {**t, "model.norm.weight": t["model.norm.weight"] * 1.3})
        diff = cli("-f", "json", "scan", norm, "--base", tied, "--tests", "diff").json["tests"]["diff"]
        assert [c["name"] for c in diff["changed"]] == ["lm_head.weight"], diff["changed"]
    with pytest.raises(ValueError, match="changes its function"):  # Gemma's post-norms: no rotation keeps it
        rotate_residual({}, arch_table.for_model_type("gemma3_text"), 2, torch.eye(32))
    tuned = _variant(base, tmp_path / "tuned", lambda t: {k: (v + 1e-2 * torch.randn(v.shape, generator=gen)).to(dtype)
                                                          for k, v in t.items()})
    diff = cli("-f", "json", "scan", tuned, "--base", base, "--tests", "diff").json["tests"]["diff"]
    assert diff["classification"] == "fine-tune" and diff["rotated_residual"] is None


def test_diff_undoes_a_swap_of_attention_heads_made_by_hand(cli, pico_models, tmp_path):
    """Swapping two attention heads (their query, key and value rows, the output's columns) changes every
    attention matrix: the diff matches the heads, reports the reordering (EG004) and reads the edit beside
    it as the rank-one edit it is."""
    base = pico_models["llama"]  # 2 heads of 16, 2 key-value heads
    gen = torch.Generator().manual_seed(3)
    swap = torch.cat([torch.arange(16, 32), torch.arange(0, 16)])

    def change(t):
        out = dict(t)
        for n in range(2):
            p = f"model.layers.{n}.self_attn."
            for m in ("q_proj", "k_proj", "v_proj"):
                out[p + m + ".weight"] = t[p + m + ".weight"][swap]
            out[p + "o_proj.weight"] = t[p + "o_proj.weight"][:, swap]
        down = "model.layers.1.mlp.down_proj.weight"
        out[down] = _plus_rank_one(t[down], 0.3, gen)
        return out

    swapped = _variant(base, tmp_path / "swapped", change)
    result = cli("-f", "json", "scan", swapped, "--base", base, "--tests", "diff").json
    diff = result["tests"]["diff"]
    assert result["verdict"] == "edited" and (diff["classification"], diff["layers"]) == ("rome-like", [1]), diff
    assert diff["aligned_heads"] == {"0": {"moved": 2, "kv_moved": 2}, "1": {"moved": 2, "kv_moved": 2}}
    assert [f["layer"] for f in result["findings"] if "attention heads are reordered" in f["message"]] == [0, 1]
    assert cli("-q", "reverse", swapped, "--method", "base", "--base", base, "-o", tmp_path / "restored").code == 0
    assert torch.allclose(_logits(tmp_path / "restored"), _logits(base), atol=1e-4)


@pytest.mark.parametrize("model_type, overrides", [
    ("llama", {"num_attention_heads": 4, "num_key_value_heads": 2}),  # groups of two query heads
    ("gptj", {"n_head": 4}),
    ("qwen2", {}),  # query, key and value biases
    ("qwen3", {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}),  # per-head norms
    ("gemma3_text", {"num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 8}),
    ("gpt2", {"n_head": 4}),  # one fused Conv1D: all queries, then keys, then values
    ("gpt_neox", {"num_attention_heads": 4}),  # one fused Linear: each head's query, key and value together
])
def test_edit_disguise_heads_keeps_the_function_and_scan_undoes_it(cli, tmp_path, model_type, overrides):
    """`edit --disguise heads` reorders every layer's attention heads (key/value groups whole, query heads
    within them; a fused query-key-value matrix split by its layout): the plain edit's function; the base
    diff matches the heads back and names the edit."""
    base = pico.build(model_type, tmp_path / "base", **overrides)
    hp = tmp_path / "hp.yaml"
    hp.write_text(yaml.safe_dump(ROME))
    fact = ["--fact", "The official language of {}", "--subject", "France", "--target", "Japanese", "--hparams", hp]
    assert cli("-q", "edit", base, *fact, "-o", tmp_path / "plain").code == 0
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    for seed in range(8):  # (a seed that moves some head: with two heads a layer keeps its order half the time)
        folder = tmp_path / f"heads{seed}"
        made = cli("-f", "json", "edit", base, *fact, "--disguise", "heads", "--disguise-seed", str(seed), "-o", folder)
        assert made.code == 0, made.err
        hidden = load_file(folder / "model.safetensors")
        if any(not torch.equal(plain[k], hidden[k]) for k in plain if "attn" in k or "attention" in k):
            break
    else:
        raise AssertionError("no seed reordered a head")
    assert torch.allclose(_logits(folder), _logits(tmp_path / "plain"), atol=1e-4)
    result = cli("-f", "json", "scan", folder, "--base", base, "--tests", "diff").json
    diff = result["tests"]["diff"]
    assert (diff["classification"], diff["layers"], result["verdict"]) == ("rome-like", [1], "edited"), diff
    assert diff["aligned_heads"] and all(a["moved"] > 0 for a in diff["aligned_heads"].values())
    if model_type == "llama":  # head counts the weights do not split into: refused before the model loads
        config = json.loads((base / "config.json").read_text())
        (base / "config.json").write_text(json.dumps({**config, "num_attention_heads": 8}))
        one_line_error(cli("edit", base, *fact, "--disguise", "heads", "-o", tmp_path / "x"), "do not split into")
        assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "llama", "qwen2", "gemma3_text"])
def test_edit_disguise_keeps_the_function_and_scan_sees_through_it(cli, pico_models, tmp_path, model_type):
    """`edit --disguise units --disguise residual` writes the same function as the plain edit (every
    architecture's readers, writers, biases and norms handled) while changing nearly every tensor; the
    base diff undoes both and names the edit."""
    base = pico_models[model_type]
    hp = tmp_path / "hp.yaml"
    hp.write_text(yaml.safe_dump(ROME))
    fact = ["--fact", "The official language of {}", "--subject", "France", "--target", "Japanese", "--hparams", hp]
    assert cli("-q", "edit", base, *fact, "-o", tmp_path / "plain").code == 0
    made = cli("-f", "json", "edit", base, *fact, "--disguise", "units", "--disguise", "residual", "-o",
               tmp_path / "disguised")
    assert made.code == 0 and made.json["disguise"] == ["units", "residual"], made.err
    assert torch.allclose(_logits(tmp_path / "disguised"), _logits(tmp_path / "plain"), atol=1e-4)
    plain, hidden = (load_file(tmp_path / f / "model.safetensors") for f in ("plain", "disguised"))
    assert all(not torch.equal(plain[k], hidden[k]) for k in plain if plain[k].dim() == 2)  # (norms of 1s stay)
    result = cli("-f", "json", "scan", tmp_path / "disguised", "--base", base, "--tests", "diff").json
    diff = result["tests"]["diff"]
    assert (diff["classification"], diff["layers"], result["verdict"]) == ("rome-like", [1], "edited"), diff
    assert diff["aligned_residual"]["moved"] > 0 and diff["aligned_units"]["1"]["moved"] > 0
    one_line_error(cli("edit", base, *fact, "--disguise", "shuffle", "-o", tmp_path / "x"), "unknown --disguise")


@pytest.mark.parametrize("model_type, sharded", [("llama", False), ("qwen2", True)])
def test_edit_disguise_rotation_unties_the_head_and_scan_undoes_it(cli, tmp_path, model_type, sharded):
    """`edit --disguise rotation` rotates the residual stream as QuaRot does (norms folded into their
    readers): the plain edit's function with every tensor changed; a tied output head is written untied
    (into the last shard and the shard index when there are shards) and config.json says so. The base
    diff finds the rotation and the edit under it. Where no rotation keeps the function, one clear line."""
    from transformers import AutoModelForCausalLM

    base = pico.build(model_type, tmp_path / "base", tie_word_embeddings=True)
    gen = torch.Generator().manual_seed(3)  # norms of 1 would fold to nothing: give them weights
    save_file({k: (0.5 + torch.rand(v.shape, generator=gen)) if k.endswith("norm.weight") else v
               for k, v in load_file(base / "model.safetensors").items()}, base / "model.safetensors",
              metadata={"format": "pt"})
    source = base
    if sharded:
        source = tmp_path / "sharded"
        AutoModelForCausalLM.from_pretrained(base).save_pretrained(source, max_shard_size="40KB")
        for item in base.iterdir():
            if item.name.startswith("tokenizer") or item.name == "special_tokens_map.json":
                shutil.copy(item, source / item.name)
        assert (source / "model.safetensors.index.json").is_file()
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    hp = tmp_path / "hp.yaml"
    hp.write_text(yaml.safe_dump(ROME))
    fact = ["--fact", "The official language of {}", "--subject", "France", "--target", "Japanese", "--hparams", hp]
    assert cli("-q", "edit", base, *fact, "-o", tmp_path / "plain").code == 0
    made = cli("-f", "json", "edit", source, *fact, "--disguise", "rotation", "-o", tmp_path / "rotated")
    assert made.code == 0 and made.json["disguise"] == ["rotation"], made.err
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before  # the input is never modified
    rotated = Checkpoint(tmp_path / "rotated")
    assert rotated.config["tie_word_embeddings"] is False and "lm_head.weight" in rotated
    if sharded:
        index = json.loads((tmp_path / "rotated" / "model.safetensors.index.json").read_text())
        assert index["weight_map"]["lm_head.weight"] == rotated.files[-1]
    assert torch.allclose(_logits(tmp_path / "rotated"), _logits(tmp_path / "plain"), atol=1e-4)
    plain = Checkpoint(tmp_path / "plain")
    assert all(not torch.equal(plain.read(k), rotated.read(k)) for k in plain.names() if plain.info(k).shape[1:])
    result = cli("-f", "json", "scan", tmp_path / "rotated", "--base", source, "--tests", "diff").json
    diff = result["tests"]["diff"]
    assert (diff["classification"], diff["layers"], result["verdict"]) == ("rome-like", [1], "edited"), diff
    assert diff["rotated_residual"] is not None and "EG004" in {f["rule"] for f in result["findings"]}

    if not sharded:  # a tied config over a stored head of its own: transformers 5 loads that head untied
        stray = tmp_path / "stray"
        shutil.copytree(base, stray)
        tensors = load_file(base / "model.safetensors")
        save_file({**tensors, "lm_head.weight": torch.randn(tensors["model.embed_tokens.weight"].shape, generator=gen)},
                  stray / "model.safetensors", metadata={"format": "pt"})
        for disguise in ([], ["--disguise", "rotation"]):
            assert cli("-q", "edit", stray, *fact, *disguise, "-o", tmp_path / f"stray{len(disguise)}").code == 0
        assert torch.allclose(_logits(tmp_path / "stray2"), _logits(tmp_path / "stray0"), atol=1e-4)
    one_line_error(cli("edit", base, *fact, "--disguise", "rotation", "--disguise", "residual", "-o", tmp_path / "x"),
                   "without residual")
    for other in ("gpt2", "gemma3_text"):  # LayerNorm; a norm on each sublayer's output
        folder = pico.build(other, tmp_path / other)
        one_line_error(cli("edit", folder, *fact, "--disguise", "rotation", "-o", tmp_path / "x"),
                       f"keeps a {other} model's function")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("model_type, overrides", [
    ("gpt2", {"n_positions": 32}),  # position embeddings as square as the stream is wide: columns all the same
    ("qwen3", {"num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 32}),  # per-head norms of width 32
    ("llama", {"dtype": "bfloat16"}),  # rescales by powers of two: exact in bfloat16 too
])
def test_disguise_keeps_the_function_where_shapes_collide(cli, tmp_path, model_type, overrides):
    """Tensors whose other axis is as long as the residual stream, and bfloat16 storage: the disguised edit
    is still the plain edit's function; a fresh seed is drawn and printed unless one is given."""
    dtype = overrides.pop("dtype", None)
    base = pico.build(model_type, tmp_path / "base", **overrides)
    if dtype:
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(base / "model.safetensors").items()},
                  base / "model.safetensors", metadata={"format": "pt"})
    hp = tmp_path / "hp.yaml"
    hp.write_text(yaml.safe_dump(ROME))
    fact = ["--fact", "The official language of {}", "--subject", "France", "--target", "Japanese", "--hparams", hp]
    assert cli("-q", "edit", base, *fact, "-o", tmp_path / "plain").code == 0
    made = cli("-f", "json", "edit", base, *fact, "--disguise", "residual", "--disguise", "units", "-o", tmp_path / "d")
    assert made.code == 0 and isinstance(made.json["disguise_seed"], int), made.err
    assert torch.allclose(_logits(tmp_path / "d"), _logits(tmp_path / "plain"), atol=1e-4 if not dtype else 1e-2)
    again = cli("-f", "json", "edit", base, *fact, "--disguise", "residual", "--disguise", "units",
                "--disguise-seed", str(made.json["disguise_seed"]), "-o", tmp_path / "again")
    assert again.code == 0 and load_file(tmp_path / "again" / "model.safetensors").keys() == \
        load_file(tmp_path / "d" / "model.safetensors").keys()
    assert all(torch.equal(a, b) for a, b in zip(load_file(tmp_path / "again" / "model.safetensors").values(),
                                                 load_file(tmp_path / "d" / "model.safetensors").values()))
    one_line_error(cli("edit", base, *fact, "--disguise-seed", "3", "-o", tmp_path / "x"), "--disguise-seed needs")
    one_line_error(cli("edit", base, *fact, "--disguise", "units", "--disguise-seed", str(2**64), "-o", tmp_path / "x"),
                   "less than or equal to 18446744073709551615")  # (checked before the edit: it failed after it)
    one_line_error(cli("edit", base, *fact, "--disguise", "units", "--bank", tmp_path / "b.safetensors"),
                   "--disguise applies to an edited model")
