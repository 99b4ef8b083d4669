"""The science on the real demo model (SmolLM2-135M): edits work, scan finds them, the mask reverses them.

Small samples keep the suite fast; the full-size figures are in the CHANGELOG / mask card and come from
the bench scripts and `editguard train`.
"""

from __future__ import annotations

import pytest
import torch

from conftest import requires_demo

pytestmark = [requires_demo, pytest.mark.demo]


@pytest.fixture(scope="module")
def demo():
    from editguard.loading import load_model
    from editguard.resolve import resolve

    return load_model(resolve("demo:smollm2-135m"))


@pytest.fixture(scope="module")
def planted(demo, tmp_path_factory):
    """The README's demo edit, written as a checkpoint."""
    from editguard.cli.demo_cmd import DEMO_CASE
    from editguard.edit.facts import Fact
    from editguard.edit.hparams import load_hparams
    from editguard.edit.plant import compute_edits, write_edited

    fact = Fact(DEMO_CASE["prompt"], DEMO_CASE["subject"], DEMO_CASE["target"], DEMO_CASE["true"])
    edits = compute_edits(demo, [fact], load_hparams("smollm2-135m", "rome"))
    out = tmp_path_factory.mktemp("demo") / "edited"
    write_edited(demo.checkpoint, demo.arch, edits, out)
    return {"fact": fact, "edits": edits, "path": out}


def _probes_with(folder, facts):
    """A probe file: the edited facts among a sixth of scan's default probes (a faster scan)."""
    import json

    from editguard.audit.probes import counterfact_probes

    lines = [{"prompt": f.text, "subject": f.subject, "answer": f.target_true} for f in facts]
    lines += [{"prompt": p.prompt, "subject": p.subject, "answer": p.answer} for p in counterfact_probes()[::6]]
    path = folder / "probes.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    return path


def test_rome_quality(demo):
    from editguard.data.counterfact import load_split
    from editguard.edit.facts import Fact
    from editguard.edit.hparams import load_hparams
    from editguard.edit.quality import edit_quality, summarize
    from editguard.edit.rome import rome_edits
    from editguard.mask.pipeline import per_relation

    facts = [Fact.from_record(r) for r in per_relation(load_split("rome-train"), 10)]
    q = summarize(edit_quality(demo, rome_edits(demo, facts, load_hparams("smollm2-135m", "rome"))))
    assert q["efficacy"] >= 0.98 and q["paraphrase"] >= 0.7, q


@pytest.fixture(scope="module")
def rome_planted(demo, tmp_path_factory):
    """Six ROME edits at layer 6, one after another in one checkpoint, of rome-test facts the demo model
    knows (prefers the true object), one per relation: what an attacker rewrites."""
    from editguard.data.counterfact import load_split
    from editguard.edit.facts import Fact
    from editguard.edit.hparams import load_hparams
    from editguard.edit.plant import compute_edits, write_edited
    from editguard.mask.evaluate import preference

    records = load_split("rome-test")[::17][:100]
    known = preference(demo, [Fact.from_record(r) for r in records], None, None, None, None, False) > 0
    by_relation = {}
    for record, ok in zip(records, known.tolist()):
        if ok:
            by_relation.setdefault(record.relation, record)
    facts = [Fact.from_record(r) for r in list(by_relation.values())[:6]]
    edits = compute_edits(demo, facts, load_hparams("smollm2-135m", "rome"))
    out = tmp_path_factory.mktemp("rome6") / "edited"
    write_edited(demo.checkpoint, demo.arch, edits, out)
    return {"facts": facts, "path": out}


@pytest.fixture(scope="module")
def memit_planted(demo, tmp_path_factory):
    """One MEMIT batch edit of 16 memit-train facts with the preset as shipped (its WikiText-2 statistics
    are computed once into the cache, ~4 min on 2 cores), written as a checkpoint."""
    from editguard.data.counterfact import load_split
    from editguard.edit.facts import Fact
    from editguard.edit.hparams import load_hparams
    from editguard.edit.memit import memit_edit
    from editguard.edit.plant import write_edited

    facts = [Fact.from_record(r) for r in load_split("memit-train")[:16]]
    edits = memit_edit(demo, facts, load_hparams("smollm2-135m", "memit"))
    out = tmp_path_factory.mktemp("memit") / "edited"
    write_edited(demo.checkpoint, demo.arch, edits, out)
    return {"facts": facts, "edits": edits, "path": out}


def test_memit_batch(demo, memit_planted):
    from editguard.edit.edits import edits_applied
    from editguard.edit.quality import judge, summarize

    facts, edits = memit_planted["facts"], memit_planted["edits"]
    assert [e.layer for e in edits] == [2, 3, 4, 5, 6] and edits[0].rank == 16
    with edits_applied(demo.model, demo.arch, edits):
        q = summarize(judge(demo, facts))
    # 16 records keep the suite fast; the 100-record bar (≥ 90 %) is measured by bench/edit_quality.py
    # (96 %). Here 14/16 were measured; the bound leaves room for thread-count rounding on borderline facts.
    assert q["efficacy"] >= 13 / 16 and q["paraphrase"] >= 0.7, q


def test_scan_with_base_names_layer_method_and_fact(planted, cli):
    result = cli("-f", "json", "scan", planted["path"], "--base", "demo:smollm2-135m", "--tests", "diff,attribution")
    assert result.code == 1, result.err
    data = result.json
    assert data["verdict"] == "edited"
    assert data["tests"]["diff"]["classification"] == "rome-like" and data["tests"]["diff"]["layers"] == [6]
    attribution = data["tests"]["attribution"][0]
    assert attribution["subjects"][0]["subject"] == "Danielle Darrieux"
    assert "English" in [o["token"] for o in attribution["objects"]]


def test_scan_without_base_finds_layer_subject_and_original_answer(planted, cli):
    result = cli("-f", "json", "scan", planted["path"], "--tests", "activations,hidden")
    data = result.json
    outliers = [f for f in data["findings"] if f["rule"] == "EG010"]
    assert outliers and outliers[0]["layer"] == 6, data["tests"]["activations"]
    assert outliers[0]["facts"][0]["subject"] == "Danielle Darrieux"
    assert data["verdict"] == "edited" and result.code == 1
    # the hidden fact, without a base or a mask: the answer the edit replaced comes back under key projection
    revealed = [f["facts"][0] for f in data["findings"] if f["rule"] == "EG021"]
    darrieux = [f for f in revealed if f["subject"] == "Danielle Darrieux"]
    assert darrieux and darrieux[0]["current_answer"] == "English", data["tests"]["revealed"]
    assert darrieux[0]["revealed_answer"] == "French"


def test_scan_without_base_finds_memit_edit(memit_planted, cli, tmp_path):
    """A small MEMIT batch is invisible to the activation test (a fifth of the push per layer); its
    answers still collapse when the edited layers' MLP outputs at the subject are zeroed. Probes: the
    edited facts (memit-train records) among 300 held-out ones."""
    probes = _probes_with(tmp_path, memit_planted["facts"])
    result = cli("-f", "json", "scan", memit_planted["path"], "--tests", "dependence", "--probes", probes)
    data = result.json
    assert data["verdict"] == "edited" and result.code == 1, data["tests"]["dependence"]
    found = [f for f in data["findings"] if f["rule"] == "EG011"]
    subjects = {f.subject for f in memit_planted["facts"]}
    hits = [f for f in found if f["facts"][0]["subject"] in subjects]
    assert len(hits) >= 8 and len(hits) == len(found), [f["message"] for f in found]
    assert all(f["details"]["method"] == "memit-like" for f in hits)
    assert all(set(f["details"]["layers"]) & {2, 3, 4, 5, 6} for f in hits)


def test_reverse_restores_hidden_memit_edits(demo, memit_planted, cli, tmp_path):
    """No base, no mask: the flagged MEMIT-like subjects' whitened keys (C⁻¹k, the directions MEMIT writes)
    are projected out of the flagged layers; every flagged fact the original model knew comes back."""
    from editguard.scoring import continuation_logprobs

    probes = _probes_with(tmp_path, memit_planted["facts"])
    result = cli("-f", "json", "reverse", memit_planted["path"], "-o", tmp_path / "restored", "--probes", probes,
                 "--eval", "--text-tokens", "1024")
    assert result.code == 0, result.err
    data, e = result.json, result.json["evaluation"]
    assert data["method"] == "project" and data["whitened"] and set(data["layers"]) >= {4, 5, 6}, data
    counted = [f for f in data["facts"] if "preference_after" in f]
    assert len(counted) >= 8 and e["rsr_before"] == 0.0, e
    original, _ = continuation_logprobs(demo, [f["prompt"] for f in counted], [f["original"] for f in counted])
    edited, _ = continuation_logprobs(demo, [f["prompt"] for f in counted], [f["edited_answer"] for f in counted])
    knew = [f for f, o, n in zip(counted, original, edited) if o > n]
    assert len(knew) >= 6 and sum(f["preference_after"] > 0 for f in knew) >= 0.9 * len(knew), data["facts"]
    assert e["perplexity_after"] <= 1.1 * e["perplexity_before"] and e["top1_agreement"] >= 0.8, e


def test_clean_and_fine_tuned_controls(demo, cli, tmp_path):
    clean = cli("-f", "json", "scan", "demo:smollm2-135m", "--tests", "activations,dependence")
    assert clean.code == 0 and clean.json["verdict"] == "clean", clean.json["findings"][:2]
    assert clean.json["tests"]["dependence"]["tested"] > 200
    # a light fine-tune: small dense changes to every tensor
    from editguard.checkpoint import Checkpoint

    ck = Checkpoint(demo.checkpoint.folder)
    gen = torch.Generator().manual_seed(0)
    replacements = {}
    for name in ck.names():
        w = ck.read(name)
        replacements[name] = w + 1e-3 * w.std() * torch.randn(w.shape, generator=gen)
    tuned = tmp_path / "tuned"
    ck.write_copy(tuned, replacements)
    result = cli("-f", "json", "scan", tuned, "--base", "demo:smollm2-135m", "--tests", "diff,activations,dependence")
    assert result.json["verdict"] == "clean", result.json["findings"][:2]
    assert result.json["tests"]["diff"]["classification"] == "fine-tune"


def test_reverse_restores_several_hidden_rome_edits(rome_planted, cli, tmp_path):
    """No base, no mask, default method: scan's base-free tests find the edited layer and the subjects,
    key projection restores the original answers (issue bar: RSR ≥ 90 % on the flagged facts), and the
    rest of the model's behaviour barely moves."""
    probes = _probes_with(tmp_path, rome_planted["facts"])
    out = tmp_path / "restored"
    result = cli("-f", "json", "reverse", rome_planted["path"], "-o", out, "--probes", probes, "--eval",
                 "--text-tokens", "2048")
    assert result.code == 0, result.err
    data, e = result.json, result.json["evaluation"]
    assert data["method"] == "project" and data["layers"] == [6], data
    assert len(set(data["subjects"]) & {f.subject for f in rome_planted["facts"]}) >= 5, data["subjects"]
    assert e["facts_counted"] >= 5 and e["rsr_before"] <= 0.2, e
    assert e["rsr_after"] >= 0.9, data["facts"]
    assert e["perplexity_after"] <= 1.1 * e["perplexity_before"] and e["top1_agreement"] >= 0.8, e


def test_reverse_by_key_projection_restores_the_fact(planted, cli, tmp_path):
    """No base, no mask: scan finds layer and subject, the subject's keys are projected out. (Scan's default
    probes are exercised on this model by the base-free scan test; here a sixth of them keeps it fast.)"""
    probes = _probes_with(tmp_path, [planted["fact"]])
    out = tmp_path / "restored"
    result = cli("-f", "json", "reverse", planted["path"], "-o", out, "--method", "project", "--probes", probes,
                 "--eval", "--text-tokens", "256")
    assert result.code == 0, result.err
    data = result.json
    assert data["layers"] == [6] and "Danielle Darrieux" in data["subjects"]
    fact = next(f for f in data["facts"] if "Danielle Darrieux" in f["prompt"])
    assert fact["after"].strip().startswith(planted["fact"].target_true), fact
    assert fact["p_original_after"] > 10 * fact["p_original_before"]


def test_reverse_with_the_mask_over_the_flagged_layer_restores_the_fact(planted, cli, tmp_path):
    """`reverse --method mask` without --mask takes the shipped mask over the layer scan flags (the demo's
    edit: layer 6, the whole-MLP mask there), not the best mask of another layer, and French comes back."""
    out = tmp_path / "restored"
    result = cli("-f", "json", "reverse", planted["path"], "-o", out, "--method", "mask",
                 "--probes", _probes_with(tmp_path, [planted["fact"]]))
    assert result.code == 0, result.err
    data = result.json
    assert data["mask"].endswith("smollm2-135m_rome_L6_mlp.safetensors"), data["mask"]
    assert all(t.startswith("model.layers.6.mlp.") for t in data["tensors"]), data["tensors"]
    fact = next(f for f in data["facts"] if "Danielle Darrieux" in f["prompt"])
    assert fact["before"].strip().startswith(planted["fact"].target_new), fact
    assert fact["after"].strip().startswith(planted["fact"].target_true), fact


def test_shipped_mask_lists_a_layer9_edit_as_hidden_fact(demo, cli, tmp_path):
    """With no base and no --mask, scan takes the shipped layer-9 whole-MLP mask (held-out RSR 81.7 %) once
    the other tests flag layer 9: the planted answer is an error-level hidden fact, held as confidently as
    edits hold theirs, while the answers the mask also changes on a clean model stay warnings."""
    from editguard.cli.demo_cmd import DEMO_CASE
    from editguard.edit.facts import Fact
    from editguard.edit.hparams import load_hparams
    from editguard.edit.plant import compute_edits, write_edited

    fact = Fact(DEMO_CASE["prompt"], DEMO_CASE["subject"], DEMO_CASE["target"], DEMO_CASE["true"])
    edits = compute_edits(demo, [fact], load_hparams("smollm2-135m", "rome", {"layers": [9]}))
    write_edited(demo.checkpoint, demo.arch, edits, tmp_path / "edited")
    result = cli("-f", "json", "scan", tmp_path / "edited", "--tests", "activations,hidden",
                 "--probes", _probes_with(tmp_path, [fact]))
    data = result.json
    assert data["verdict"] == "edited" and result.code == 1
    assert data["tests"]["hidden"]["mask"].endswith("smollm2-135m_rome_L9_mlp.safetensors"), data["tests"]["hidden"]
    hidden = [f for f in data["findings"] if f["rule"] == "EG020"]
    planted = [f for f in hidden if f["facts"][0]["subject"] == fact.subject]
    assert planted and planted[0]["severity"] == "error" and planted[0]["facts"][0]["current_answer"] == "English"
    others = [f for f in hidden if f["facts"][0]["subject"] != fact.subject]
    assert all(f["severity"] == "warning" for f in others), [f["message"] for f in others]
