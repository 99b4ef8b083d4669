"""`scan` on pico models: base diff classifies planted ROME / MEMIT edits and fine-tunes; SARIF validates;
bad inputs give one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

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


def test_controls_not_flagged(cli, planted):
    tuned = cli("-f", "json", "scan", planted["tuned"], "--base", planted["base"], "--tests", "diff")
    assert tuned.code == 0, tuned.err
    assert tuned.json["tests"]["diff"]["classification"] == "fine-tune" and tuned.json["verdict"] == "clean"
    same = cli("-f", "json", "scan", planted["base"], "--base", planted["base"], "--tests", "diff")
    assert same.code == 0 and same.json["tests"]["diff"]["classification"] == "identical"


def test_sarif_validates(cli, planted):
    import jsonschema

    schema = json.loads((Path(__file__).parent / "data" / "sarif-schema-2.1.0.json").read_text())
    result = cli("-f", "sarif", "scan", planted["rome"], "--base", planted["base"], "--tests", "diff")
    assert result.code == 1
    document = json.loads(result.out)
    jsonschema.validate(document, schema)
    run = document["runs"][0]
    assert run["results"][0]["ruleId"] == "EG001"
    assert run["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "model.safetensors"
    assert run["results"][0]["locations"][0]["logicalLocations"][0]["name"] == "model.layers.1.mlp.down_proj.weight"
    assert {r["id"] for r in run["tool"]["driver"]["rules"]} >= {"EG001", "EG002", "EG010", "EG020", "EG030"}


def test_html_report(cli, planted, tmp_path):
    report = tmp_path / "r" / "report.html"
    result = cli("scan", planted["rome"], "--base", planted["base"], "--tests", "diff", "--report", report,
                 "--fail-on", "never")
    assert result.code == 0, result.err
    text = report.read_text()
    assert "EG001" in text and "data:image/png;base64," in text


def test_scan_bad_inputs(cli, planted, pico_models, tmp_path):
    other = cli("scan", planted["rome"], "--base", pico_models["gpt2"], "--tests", "diff")
    assert other.code == 2 and "not the same architecture" in other.err
    probes = tmp_path / "probes.jsonl"
    probes.write_text('{"prompt": "x"}\nnot json\n')
    bad = cli("scan", planted["rome"], "--probes", probes, "--tests", "activations")
    assert bad.code == 2 and "line 2: not JSON" in bad.err
    missing = cli("scan", planted["rome"], "--probes", tmp_path / "nope.jsonl", "--tests", "activations")
    assert missing.code == 2 and "no such probe file" in missing.err
    assert cli("scan", planted["rome"], "--tests", "magic").code == 2
    for result in (other, bad, missing):
        assert "Traceback" not in result.err and len(result.err.strip().splitlines()) == 1


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
