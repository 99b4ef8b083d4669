"""Mask file format, the factored masked forward, the trainer's resume, and `editguard train` end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

import pico
import pico_facts
from conftest import one_line_error
from editguard import arch as arch_table
from editguard.checkpoint import Checkpoint
from editguard.errors import EditguardError
from editguard.mask.file import MaskFile, MaskTarget
from editguard.mask.train import MaskedProjection, MaskTrainer, TrainConfig, TrainState, load_checkpoint, \
    make_optimizer, save_checkpoint


def test_masked_projection_equals_dense():
    gen = torch.Generator().manual_seed(0)
    W, b = torch.randn(6, 10, generator=gen), torch.randn(6, generator=gen)
    K = torch.rand(6, 10, generator=gen)
    u, v = torch.randn(3, 6, generator=gen), torch.randn(3, 10, generator=gen)
    x = torch.randn(3, 4, 10, generator=gen)
    module = MaskedProjection(W, b)
    module.K, module.u, module.v = K, u[:, None], v[:, None]  # one edit per batch row
    fast = module(x)
    for i in range(3):
        dense = (W + torch.outer(u[i], v[i])) * K
        torch.testing.assert_close(fast[i], x[i] @ dense.T + b, atol=1e-5, rtol=1e-5)
    module.K = None  # no mask: the plain edited layer
    for i in range(3):
        torch.testing.assert_close(module(x)[i], x[i] @ (W + torch.outer(u[i], v[i])).T + b, atol=1e-5, rtol=1e-5)


def test_mask_file_roundtrip_and_fit(tmp_path, pico_models):
    scores = torch.rand(32, 64)
    target = MaskTarget("model.layers.1.mlp.down_proj.weight", 1, (32, 64), False, "abc", scores)
    mask = MaskFile("pico", None, "llama", "rome", 0.5, [target], metrics={"x": 1})
    path = tmp_path / "m.safetensors"
    mask.save(path)
    back = MaskFile.load(path)
    assert torch.equal(back.mask(), (scores >= 0.5).float())
    assert torch.allclose(back.targets[0].scores, scores, atol=1e-3)
    assert abs(back.pruned_fraction(0.9) - float((scores < 0.9).float().mean())) < 1e-3  # another threshold
    assert back.metrics == {"x": 1}
    llama = Checkpoint(pico_models["llama"])

    assert back.check_fits(arch_table.for_config(llama.config), llama) == ["model.layers.1.mlp.down_proj.weight"]
    qwen = Checkpoint(pico_models["qwen2"])
    with pytest.raises(EditguardError, match="for llama models"):
        back.check_fits(arch_table.for_config(qwen.config), qwen)
    wrong = MaskFile("pico", None, "llama", "rome", 0.5, [MaskTarget(target.tensor, 1, (64, 32), False, "", torch.rand(64, 32))])
    with pytest.raises(EditguardError, match="has shape"):
        wrong.check_fits(arch_table.for_config(llama.config), llama)
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(EditguardError, match="corrupted mask file"):
        MaskFile.load(tmp_path / "bad.safetensors")
    # metadata without a field, a target without its scores: one clear error naming what is missing
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), "pt") as f:
        meta, tensors = json.loads(f.metadata()["editguard"]), {k: f.get_tensor(k) for k in f.keys()}
    for broken, keep, message in (({k: v for k, v in meta.items() if k != "targets"}, tensors, "missing 'targets'"),
                                  (meta, {k: v for k, v in tensors.items() if not k.endswith("scores")}, "missing 't0.scores'")):
        save_file(keep, tmp_path / "broken.safetensors", metadata={"editguard": json.dumps(broken)})
        with pytest.raises(EditguardError, match=message):
            MaskFile.load(tmp_path / "broken.safetensors")
    with pytest.raises(EditguardError, match="threshold is NaN"):
        back.mask(0, float("nan"))


def _index_entries(checkpoint, specs) -> list[dict]:
    """index.json entries of ROME masks over one pico layer each: (file, layer, test RSR)."""
    entries = []
    for name, layer, rsr in specs:
        tensor = f"model.layers.{layer}.mlp.down_proj.weight"
        entries.append({"file": name, "model_type": "llama", "layers": [layer], "test_rsr": rsr, "method": "rome",
                        "targets": [{"tensor": tensor, "stored_shape": list(checkpoint.info(tensor).shape),
                                     "fingerprint": ""}]})
    return entries


def test_masks_are_chosen_by_match_quality_and_layer(tmp_path, monkeypatch, pico_models):
    import json

    from editguard import masks_index

    llama = Checkpoint(pico_models["llama"])
    arch = arch_table.for_config(llama.config)
    entries = _index_entries(llama, [("weak0.safetensors", 0, 0.2), ("strong1.safetensors", 1, 0.6),
                                     ("mid0.safetensors", 0, 0.4)])
    (tmp_path / "index.json").write_text(json.dumps(entries))
    monkeypatch.setenv("EDITGUARD_MASKS", str(tmp_path))
    monkeypatch.setenv("EDITGUARD_HOME", str(tmp_path / "home"))
    fits = [f for f in masks_index.fitting(arch, llama) if Path(f["path"]).parent == tmp_path]
    assert [f["file"] for f in fits] == ["strong1.safetensors", "mid0.safetensors", "weak0.safetensors"]
    assert [f["file"] for f in masks_index.prefer_layers(fits, [0])][:2] == ["mid0.safetensors", "weak0.safetensors"]
    assert masks_index.prefer_layers(fits, [])[0]["file"] == "strong1.safetensors"
    # a MEMIT mask over layers 0-1 reverses more, but a ROME edit at layer 0 gets the ROME masks first
    memit = {**entries[1], "file": "memit01.safetensors", "layers": [0, 1], "test_rsr": 0.9, "method": "memit",
             "targets": entries[0]["targets"] + entries[1]["targets"]}
    (tmp_path / "index.json").write_text(json.dumps(entries + [memit]))
    fits = [f for f in masks_index.fitting(arch, llama) if Path(f["path"]).parent == tmp_path]
    assert masks_index.prefer_layers(fits, [0])[0]["file"] == "memit01.safetensors"  # method unknown
    assert [f["file"] for f in masks_index.prefer_layers(fits, [0], "rome")][:2] == ["mid0.safetensors",
                                                                                     "weak0.safetensors"]
    assert masks_index.prefer_layers(fits, [1], "memit")[0]["file"] == "memit01.safetensors"
    # a malformed entry (no tensor name, targets not a list, a path for a file name) is skipped, not a crash
    broken = [{**entries[0], "file": "a.safetensors", "targets": [{}]}, {**entries[0], "file": "b.safetensors",
              "targets": "abc"}, {**entries[0], "file": "../c.safetensors"}]
    (tmp_path / "index.json").write_text(json.dumps(entries + broken))
    fits = [f["file"] for f in masks_index.fitting(arch, llama) if Path(f["path"]).parent == tmp_path]
    assert fits and not {"a.safetensors", "b.safetensors", "../c.safetensors"} & set(fits)


def test_scan_uses_a_shipped_mask_only_over_a_flagged_layer(tmp_path, monkeypatch, pico_models):
    """The hidden-facts test takes a mask unasked only if it meets the RSR bar and covers a layer other
    tests flagged; --mask is always taken."""
    import json

    from editguard.audit.scan import _fitting_mask

    llama = Checkpoint(pico_models["llama"])
    arch = arch_table.for_config(llama.config)
    entries = _index_entries(llama, [("good0.safetensors", 0, 0.85), ("weak1.safetensors", 1, 0.5)])
    (tmp_path / "index.json").write_text(json.dumps(entries))
    monkeypatch.setattr("editguard.masks_index.mask_dirs", lambda: [tmp_path])
    assert _fitting_mask(None, arch, llama, [0])[0].name == "good0.safetensors"
    path, why = _fitting_mask(None, arch, llama, [])
    assert path is None and "no layer flagged" in why
    path, why = _fitting_mask(None, arch, llama, [1])
    assert path is None and "weak1.safetensors reverses only 50 %" in why
    (tmp_path / "index.json").write_text(json.dumps(entries[1:]))
    path, why = _fitting_mask(None, arch, llama, [0])
    assert path is None and "no mask fits the flagged layers [0]" in why
    assert _fitting_mask(str(tmp_path / "any.safetensors"), arch, llama, [0])[0].name == "any.safetensors"


def test_an_unasked_mask_never_makes_a_scan_more_severe():
    """Layers flagged by a warning only: the mask's hidden facts stay warnings (verdict "suspicious"),
    where they would be errors ("edited"); over a layer an error flagged they stay errors."""
    from editguard.audit.findings import Finding, verdict
    from editguard.audit.scan import _cap_severity, _flagged_layers

    flags = [Finding("EG010", "warning", "outlier", layer=1), Finding("EG011", "error", "collapse", layer=3),
             Finding("EG003", "note", "fine-tune", layer=0), Finding("EG010", "warning", "weaker", layer=3)]
    flagged = _flagged_layers(flags)
    assert flagged == {1: "warning", 3: "error"}
    hidden = [Finding("EG020", "error", "hidden fact", layer=1)]
    assert verdict(flags[:1] + hidden)[0] == "edited"
    assert _cap_severity(hidden, flagged, {1}) == "warning"
    assert hidden[0].severity == "warning" and verdict(flags[:1] + hidden)[0] == "suspicious"
    assert hidden[0].message.endswith("(graded warning: no more severe than the tests that flagged layer(s) [1])")
    hidden = [Finding("EG020", "error", "hidden fact", layer=3)]
    _cap_severity(hidden, flagged, {1, 3})
    assert hidden[0].severity == "error"


def test_hidden_facts_are_errors_only_at_an_edited_answers_confidence():
    """A mask changes some answers of a clean model too (the layer-9 whole-MLP mask: 16 of 1,710 demo probes,
    held at p ≤ 0.71): such a change is a warning; an answer held as confidently as edits hold theirs
    is an error, so a clean model scanned with --mask is "suspicious", not "edited"."""
    from types import SimpleNamespace

    from editguard.audit.findings import verdict
    from editguard.audit.hidden import EDITED_PROB, findings_from_hidden

    mask = SimpleNamespace(targets=[SimpleNamespace(layer=9, tensor="model.layers.9.mlp.down_proj.weight")])

    def fact(p):
        return {"prompt": "The mother tongue of X is", "current_answer": "English", "current_prob": p,
                "revealed_answer": "French", "revealed_prob": 0.3}

    clean = findings_from_hidden([fact(0.71), fact(0.5)], mask, 1710)
    assert [f.severity for f in clean] == ["warning", "warning"] and verdict(clean)[0] == "suspicious"
    assert "below an edited answer's usual confidence" in clean[0].message
    edited = findings_from_hidden([fact(0.99), fact(EDITED_PROB), fact(0.71)], mask, 1710)
    assert [f.severity for f in edited] == ["error", "error", "warning"] and verdict(edited)[0] == "edited"
    # graded on the two decimals printed ("p=0.80" is never "held at p < 0.8"); a finding's threshold is the
    # one that graded it: the edited answers' confidence, or --min-prob for a warning
    rounded, low = findings_from_hidden([fact(0.796), fact(0.35)], mask, 1710, min_prob=0.3)
    assert rounded.severity == "error" and "p=0.80" in rounded.message and rounded.threshold == EDITED_PROB
    assert low.severity == "warning" and low.threshold == 0.3


def test_lock_prefers_a_mask_over_the_edited_tensors_alone(tmp_path, monkeypatch, pico_models):
    """Masked MLP inputs do not resist an editor who solves through the locked model: `lock` without
    --mask (and `demo`) takes a mask over the edited tensors first, even one with lower RSR."""
    from editguard import masks_index
    from editguard.cli.harden_cmd import _mask_for

    llama = Checkpoint(pico_models["llama"])
    arch = arch_table.for_config(llama.config)
    down, whole = _index_entries(llama, [("down0.safetensors", 0, 0.5), ("whole0.safetensors", 0, 0.9)])
    gate = "model.layers.0.mlp.gate_proj.weight"
    whole["targets"].append({"tensor": gate, "stored_shape": list(llama.info(gate).shape), "fingerprint": ""})
    whole["layers"].append(0)
    (tmp_path / "index.json").write_text(json.dumps([down, whole]))
    monkeypatch.setattr("editguard.masks_index.mask_dirs", lambda: [tmp_path])
    assert _mask_for(None, arch, llama, [0], "rome").name == "whole0.safetensors"  # reverse: by RSR
    assert _mask_for(None, arch, llama, lock=True).name == "down0.safetensors"
    # `demo` locks with the same choice, not with the mask it reversed with
    assert masks_index.best_fit(arch, llama, [0], "rome", lock=True)["file"] == "down0.safetensors"


def test_lock_weighs_what_the_mask_costs_the_model(tmp_path, monkeypatch, pico_models):
    """Every user of a locked model runs its mask: `lock` takes a mask within the perplexity budget over a
    better reverser beyond it (SmolLM2's MEMIT mask: test RSR 65.0 %, perplexity +49 % on the clean model),
    an unmeasured one between them; masks for the layer a caller names (demo's planted edit) still first."""
    from editguard import masks_index

    llama = Checkpoint(pico_models["llama"])
    arch = arch_table.for_config(llama.config)
    costly, cheap, unknown, other = _index_entries(llama, [("costly0.safetensors", 0, 0.9), ("cheap0.safetensors", 0, 0.5),
                                                           ("unknown0.safetensors", 0, 0.7), ("cheap1.safetensors", 1, 0.4)])
    costly["perplexity_increase"], cheap["perplexity_increase"], other["perplexity_increase"] = 0.63, 0.08, 0.01
    (tmp_path / "index.json").write_text(json.dumps([costly, cheap, unknown, other]))
    monkeypatch.setattr("editguard.masks_index.mask_dirs", lambda: [tmp_path])
    assert masks_index.best_fit(arch, llama)["file"] == "costly0.safetensors"  # reverse: by RSR
    assert masks_index.best_fit(arch, llama, lock=True)["file"] == "cheap0.safetensors"
    assert masks_index.best_fit(arch, llama, [1], lock=True)["file"] == "cheap1.safetensors"
    cheap["perplexity_increase"] = 0.2  # over the budget too: the unmeasured one comes before both
    (tmp_path / "index.json").write_text(json.dumps([costly, cheap, unknown]))
    assert masks_index.best_fit(arch, llama, lock=True)["file"] == "unknown0.safetensors"
    costly["perplexity_increase"] = "high"  # a malformed figure makes the entry unreadable, as a bad RSR does
    (tmp_path / "index.json").write_text(json.dumps([costly]))
    assert masks_index.best_fit(arch, llama, lock=True) is None


def _trainer(loaded, seed=0):
    from editguard.edit.facts import Fact
    from editguard.mask.train import prepare_prompts

    facts = [Fact("The official language of {}", c, n, t, i, "P103", (f"the language of {c}",))
             for i, (c, n, t) in enumerate([("France", "Japanese", "French"), ("Spain", "German", "Spanish"),
                                            ("Italy", "English", "Italian"), ("Germany", "French", "German")])]
    from editguard.mask.train import canonical_weight

    data = prepare_prompts(loaded, facts, 1, 1)
    target = (loaded.arch.module("mlp_out", 1), loaded.arch.mlp_out_transposed)
    out_dim, in_dim = canonical_weight(loaded.model.get_submodule(target[0]), target[1]).shape
    gen = torch.Generator().manual_seed(1)
    u, v = torch.randn(4, out_dim, generator=gen), torch.randn(4, in_dim, generator=gen)
    cfg = TrainConfig(epochs=3, batch_records=2, lr=0.05, seed=seed)
    return MaskTrainer(loaded, [target], 1, data, cfg, u=u, v=v)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_grouped_batch_edits_train_against_their_own_masked_weights(model_type, pico_models):
    """MEMIT training: a record's logits come from (W + ΔW_g) ⊙ K on every masked layer, g its batch edit."""
    from editguard.edit.facts import Fact
    from editguard.loading import load_model
    from editguard.mask.evaluate import masks_applied
    from editguard.edit.edits import weight_param, weights_restored
    from editguard.mask.train import canonical_weight, prepare_prompts
    from editguard.resolve import resolve

    loaded = load_model(resolve(str(pico_models[model_type])))
    arch = loaded.arch
    facts = [Fact("The official language of {}", c, n, t, i, "P103", ())
             for i, (c, n, t) in enumerate([("France", "Japanese", "French"), ("Spain", "German", "Spanish"),
                                            ("Italy", "English", "Italian")])]
    data = prepare_prompts(loaded, facts, 0, 0)
    targets = [(arch.module("mlp_out", layer), arch.mlp_out_transposed) for layer in (0, 1)]
    gen = torch.Generator().manual_seed(2)
    out_dim, in_dim = canonical_weight(loaded.model.get_submodule(targets[0][0]), targets[0][1]).shape
    dense = [[torch.randn(out_dim, in_dim, generator=gen) * 0.2, None],
             [torch.randn(out_dim, in_dim, generator=gen) * 0.2, torch.randn(out_dim, in_dim, generator=gen) * 0.2]]
    groups = torch.tensor([1, 0, 1])
    trainer = MaskTrainer(loaded, targets, 0, data, TrainConfig(), dense=dense, record_group=groups)
    masks = [torch.rand(out_dim, in_dim, generator=gen).round() for _ in targets]
    for record in range(3):
        rows = torch.tensor([record])
        fast = trainer._last_logits(rows, masks, True, int(groups[record]))
        names = [path + ".weight" for path, _ in targets]
        with weights_restored(loaded.model, names), torch.no_grad():
            for (path, transposed), delta in zip(targets, dense[int(groups[record])]):
                if delta is not None:
                    weight_param(loaded.model, path + ".weight").add_(delta.T if transposed else delta)
            with masks_applied(loaded, targets, masks):
                ids = data.ids[rows, : int(data.last[record]) + 1]
                slow = loaded.model(input_ids=ids).logits[0, -1]
        torch.testing.assert_close(fast[0], slow.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("model_type", pico.ARCHS)
def test_packed_rome_logits_equal_each_dense_edited_model(model_type, layer, pico_models, monkeypatch):
    """ROME training: prompts of different lengths and records run packed in one sequence; each prompt's
    last logits must equal a plain forward of (W + u_i v_iᵀ) ⊙ K for its own record i. With the layer's
    MLP inputs masked too (--whole-mlp), they take their masks and never the edit. Layer 1 is the last:
    its MLP, masked projections included, runs at the read positions only."""
    from editguard.edit.facts import Fact
    from editguard.edit.edits import weight_param, weights_restored
    from editguard.loading import load_model
    from editguard.mask.evaluate import masks_applied
    from editguard.mask.train import canonical_weight, prepare_prompts
    from editguard.resolve import resolve

    loaded = load_model(resolve(str(pico_models[model_type])))
    arch = loaded.arch
    facts = [Fact("The official language of {}", c, n, t, i, "P103", (f"In the streets of {c}, people speak",))
             for i, (c, n, t) in enumerate([("France", "Japanese", "French"), ("the Kingdom of Spain", "German", "Spanish"),
                                            ("Italy", "English", "Italian")])]
    data = prepare_prompts(loaded, facts, layer, 1)
    target = (arch.module("mlp_out", layer), arch.mlp_out_transposed)
    out_dim, in_dim = canonical_weight(loaded.model.get_submodule(target[0]), target[1]).shape
    gen = torch.Generator().manual_seed(3)
    u, v = torch.randn(3, out_dim, generator=gen), torch.randn(3, in_dim, generator=gen) * 0.3
    K = torch.rand(out_dim, in_dim, generator=gen)
    inputs = [(path, target[1]) for path in arch.mlp_in_modules(layer)]
    K_in = [(torch.rand(in_dim, out_dim, generator=gen) > 0.3).float() for _ in inputs]
    rows = torch.arange(len(data.record))
    assert len(set(data.mask.sum(1).tolist())) > 1  # really different lengths in one pack
    from editguard.edit import forward
    for targets, masks in (([target], [K]), ([target, *inputs], [K, *K_in])):
        trainer = MaskTrainer(loaded, targets, layer, data, TrainConfig(), u=u, v=v)
        fast = trainer._last_logits(rows, masks, True)
        with monkeypatch.context() as patched:
            patched.setattr(forward, "GROUPED_ATTENTION_DEVICES", set())  # one masked call per pack, as on a GPU
            torch.testing.assert_close(trainer._last_logits(rows, masks, True), fast, atol=1e-5, rtol=1e-5)
        name = target[0] + ".weight"
        for row in rows.tolist():
            record = int(data.record[row])
            with weights_restored(loaded.model, [name]), torch.no_grad():
                delta = torch.outer(u[record], v[record])
                weight_param(loaded.model, name).add_(delta.T if target[1] else delta)
                with masks_applied(loaded, targets, masks):
                    ids = data.ids[row: row + 1, : int(data.last[row]) + 1]
                    slow = loaded.model(input_ids=ids).logits[0, -1]
            torch.testing.assert_close(fast[row], slow.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_bfloat16_model_trains_like_float32(model_type, pico_models):
    """`train --dtype bfloat16`: the frozen layers run in bfloat16 while Θ, K and the edit stay float32;
    the loss and Θ's gradient stay close to the float32 run's."""
    from editguard.loading import load_model
    from editguard.resolve import resolve

    runs = {}
    for dtype in ("float32", "bfloat16"):
        trainer = _trainer(load_model(resolve(str(pico_models[model_type])), dtype=dtype))
        theta = [t.requires_grad_(True) for t in trainer.init_state().theta]
        loss, parts = trainer.loss(theta, [0, 1, 2, 3], 0.5)
        loss.backward()
        assert theta[0].dtype == torch.float32 and theta[0].grad is not None
        runs[dtype] = (loss.item(), theta[0].grad)
    (loss32, grad32), (loss16, grad16) = runs["float32"], runs["bfloat16"]
    assert abs(loss16 - loss32) < 0.02 * abs(loss32)
    assert torch.nn.functional.cosine_similarity(grad16.flatten(), grad32.flatten(), dim=0) > 0.98


def test_anchor_adds_the_kl_of_the_mask_on_the_unedited_model(pico_models):
    """`--set beta_anchor=B` adds B·T²·KL(original ‖ masked unedited model) at the same prompts."""
    import dataclasses

    from editguard.loading import load_model
    from editguard.resolve import resolve

    trainer = _trainer(load_model(resolve(str(pico_models["llama"]))))
    theta = trainer.init_state().theta
    plain, parts = trainer.loss(theta, [0, 2], 0.5)
    assert "anchor_kl" not in parts
    trainer.cfg = dataclasses.replace(trainer.cfg, beta_anchor=2.0)
    anchored, parts = trainer.loss(theta, [0, 2], 0.5)
    rows = torch.tensor([j for r in (0, 2) for j in trainer.prompts_of[r]])
    T = trainer.cfg.temperature(0.5)
    masks = [torch.sigmoid(t / trainer.cfg.tau(0.5)) for t in theta]
    student = torch.log_softmax(trainer._last_logits(rows, masks, False) / T, -1)
    teacher = torch.log_softmax(trainer.data.teacher[rows].float() / T, -1)
    kl = (teacher.exp() * (teacher - student)).sum() / len(rows)
    assert kl > 0
    assert parts["anchor_kl"] == pytest.approx(kl.item(), rel=1e-4)
    assert anchored.item() == pytest.approx(plain.item() + 2.0 * T * T * kl.item(), rel=1e-5)


def test_margin_unknown_weighs_the_prompts_the_original_model_did_not_know(pico_models):
    """`--set margin_unknown=W` weighs the margin term by W at prompts where the original model does not
    prefer the true object's first token (1, the paper's loss, everywhere else); the KL term is untouched."""
    import dataclasses

    from editguard.loading import load_model
    from editguard.resolve import resolve

    trainer = _trainer(load_model(resolve(str(pico_models["llama"]))))
    theta, data, records = trainer.init_state().theta, trainer.data, [0, 1, 2, 3]
    rows = torch.tensor([j for r in records for j in trainer.prompts_of[r]])
    knew = data.teacher[rows].gather(1, data.true_tok[rows, None]) > data.teacher[rows].gather(1, data.new_tok[rows, None])
    assert 0 < int(knew.sum()) < len(rows)  # both kinds of prompt, or the test tells nothing
    logits = trainer._last_logits(rows, [torch.sigmoid(t / trainer.cfg.tau(0.5)) for t in theta], True)
    hinge = torch.relu(logits.gather(1, data.new_tok[rows, None]) - logits.gather(1, data.true_tok[rows, None])
                       + trainer.cfg.margin)
    _, paper = trainer.loss(theta, records, 0.5)
    for weight in (0.0, 0.25):
        trainer.cfg = dataclasses.replace(trainer.cfg, margin_unknown=weight)
        _, parts = trainer.loss(theta, records, 0.5)
        expected = torch.where(knew, hinge, weight * hinge).sum() / len(rows)
        assert parts["margin"] == pytest.approx(expected.item(), rel=1e-5)
        assert parts["kl"] == pytest.approx(paper["kl"], rel=1e-6)
    assert paper["margin"] == pytest.approx(hinge.mean().item(), rel=1e-5)


def test_trainer_resume_is_exact(pico_models, tmp_path):
    from editguard.loading import load_model
    from editguard.resolve import resolve

    loaded = load_model(resolve(str(pico_models["llama"])))
    trainer = _trainer(loaded)
    full = trainer.init_state()
    trainer.train(full, make_optimizer(full, trainer.cfg))
    assert full.step == trainer.total_steps == 6
    part = trainer.init_state()
    opt = make_optimizer(part, trainer.cfg)
    trainer.train(part, opt, stop_after=4)
    save_checkpoint(tmp_path / "ck.safetensors", part, opt, {"data_hash": "x"})
    resumed, opt2, info = load_checkpoint(tmp_path / "ck.safetensors", trainer.cfg)
    assert resumed.best_theta is None
    assert info["step"] == 4
    trainer.train(resumed, opt2)
    torch.testing.assert_close(resumed.theta[0], full.theta[0])


def test_grad_clip_zero_means_no_clipping(pico_models):
    """`--set grad_clip=0` trains unclipped (clipping to norm 0 would zero every gradient, leaving AdamW
    only its weight decay)."""
    import dataclasses

    from editguard.loading import load_model
    from editguard.resolve import resolve

    trainer = _trainer(load_model(resolve(str(pico_models["llama"]))))
    runs = []
    for clip in (0.0, 1e9, 1e-3):
        trainer.cfg = dataclasses.replace(trainer.cfg, grad_clip=clip)
        state = trainer.init_state()
        trainer.train(state, make_optimizer(state, trainer.cfg), stop_after=2)
        runs.append(state.theta[0].detach())
    torch.testing.assert_close(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])  # clipping does change the steps


def test_best_validation_point_is_kept_and_checkpointed(tmp_path):
    state = TrainState([torch.zeros(2, 3)])
    for step, score in ((1, 0.2), (2, 0.5), (3, 0.5), (4, 0.1)):
        state.step = step
        state.theta[0].fill_(step)
        state.keep_if_best(score)
        state.curve.append({"step": step, "val_rsr": score})
    assert state.best_step == 2 and float(state.best_theta[0][0, 0]) == 2  # ties keep the earlier point
    assert state.shipped(best=True)[1] == 2 and state.shipped(best=False)[1] == 4
    opt = make_optimizer(state, TrainConfig())
    save_checkpoint(tmp_path / "ck.safetensors", state, opt, {})
    loaded, _, _ = load_checkpoint(tmp_path / "ck.safetensors", TrainConfig())
    assert loaded.best_step == 2 and torch.equal(loaded.best_theta[0], state.best_theta[0])
    assert torch.equal(loaded.theta[0], state.theta[0])
    # a checkpoint that does not fit the run, or is damaged, is named: never a mask missing a tensor
    with pytest.raises(EditguardError, match="1 Θ tensors for 2 masked tensors"):
        load_checkpoint(tmp_path / "ck.safetensors", TrainConfig(), shapes=[(2, 3), (2, 3)])
    with pytest.raises(EditguardError, match="not of shape \\[3, 2\\]"):
        load_checkpoint(tmp_path / "ck.safetensors", TrainConfig(), shapes=[(3, 2)])
    from safetensors.torch import save_file

    tensors = {"theta.0": torch.zeros(2, 3), "exp_avg.0": torch.zeros(2, 3), "exp_avg_sq.0": torch.zeros(2, 3)}
    for info, message in (({"seconds": 1.0}, "step or seconds"), ({"step": 1, "seconds": 1.0, "curve": [3]}, "curve"),
                          ({"step": 1, "seconds": 1.0}, "opt_step.0")):
        save_file(tensors, tmp_path / "odd.safetensors", metadata={"editguard_train": json.dumps(info)})
        with pytest.raises(EditguardError, match=f"corrupted training checkpoint .*{message}"):
            load_checkpoint(tmp_path / "odd.safetensors", TrainConfig(), shapes=[(2, 3)])


PICO_EDIT = {"alg_name": "ROME", "layers": [0], "context_template_length_params": [[5, 5]], "v_num_grad_steps": 5}


def _train_args(pico_models, tmp_path, out, epochs):
    data = tmp_path / "facts.json"
    pico_facts.write(data)
    hp = tmp_path / "hp.yaml"
    hp.write_text(yaml.safe_dump(PICO_EDIT))
    return ["train", "--model", str(pico_models["llama"]), "--hparams", str(hp), "--data", str(data),
            "--train-size", "20", "--val-size", "8", "--test-size", "8", "--epochs", str(epochs), "--batch", "4",
            "--text-tokens", "200", "--checkpoint-every", "1", "-o", str(out)]


def test_train_suggests_bfloat16_as_training_starts(cli, pico_models, tmp_path, monkeypatch):
    """Where this CPU multiplies bfloat16 clearly faster, a float32 run says so once, as training starts,
    after every input has passed; bad input still answers with its one line."""
    from editguard import cpu_precision

    monkeypatch.setattr(cpu_precision, "half_precision_slowdown", lambda dtype: 0.32)
    result = cli(*_train_args(pico_models, tmp_path, tmp_path / "a" / "m.safetensors", 1))
    assert result.code == 0, result.err
    said = " ".join(result.err.split())
    assert "bfloat16 matrix products run 3.1x faster than float32 on this CPU: --dtype bfloat16" in said
    assert said.count("faster than float32") == 1
    for args in (["-q"], ["-f", "json"]):
        quiet = cli(*args, *_train_args(pico_models, tmp_path, tmp_path / args[-1] / "m.safetensors", 1))
        assert quiet.code == 0 and "faster than float32" not in quiet.err
    bad = cli(*_train_args(pico_models, tmp_path, tmp_path / "b" / "m.safetensors", 1), "--layer", "9")
    assert bad.code == 2 and len(bad.err.strip().splitlines()) == 1, bad.err
    monkeypatch.setattr(cpu_precision, "half_precision_slowdown", lambda dtype: 0.9)  # no bfloat16 units
    plain = cli(*_train_args(pico_models, tmp_path, tmp_path / "c" / "m.safetensors", 1))
    assert plain.code == 0 and "faster than float32" not in plain.err


def test_train_with_a_sharp_anneal_ships_the_cut_it_measured(cli, pico_models, tmp_path):
    """τ_end = 6·e^-5.5 ≈ 0.025: the final soft scores are 1.0 for every weight in float32, yet
    --target-pruned is met and the stored bits are the ones evaluated; sharper still, γ itself rounds to 1
    and the run stops with one clear line."""
    out = tmp_path / "masks" / "sharp.safetensors"
    result = cli("-f", "json", *_train_args(pico_models, tmp_path, out, 1), "--set", "tau_decay=5.5",
                 "--target-pruned", "0.1", "--no-baselines")
    assert result.code == 0, result.err
    mask = MaskFile.load(out)
    assert bool((mask.targets[0].scores == 1).all())  # the scores alone could not be cut
    assert abs(mask.pruned_fraction() - 0.1) < 0.005 and mask.pruned_fraction() == result.json["pruned_fraction"]
    assert f"γ = 1 − {1 - mask.threshold:.1e}" in out.with_suffix(".md").read_text()  # not "γ = 1.000"
    sharper = cli(*_train_args(pico_models, tmp_path, tmp_path / "masks" / "sharper.safetensors", 1), "--set",
                  "tau_decay=8", "--target-pruned", "0.1", "--no-baselines")
    assert sharper.code == 2 and "too sharp for a threshold" in sharper.err


def test_summary_leaves_out_figures_not_computed():
    from editguard.cli.train_cmd import _rsr_details

    report = {"rsr": 0.5, "original_prefers_true": 0.7, "rsr_known": 0.6, "rsr_mask_on_edit_only": 0.0}
    assert _rsr_details(report) == "original prefers true 70.0%, among known 60.0%, mask on the edit only 0.0%"


def test_train_cli_end_to_end(cli, pico_models, tmp_path, monkeypatch):
    out = tmp_path / "masks" / "pico_rome.safetensors"
    settings = ["--set", "margin=2.5", "--set", "betas=0.8,0.95", "--set", "weight-decay=0.02"]
    result = cli("-f", "json", *_train_args(pico_models, tmp_path, out, 2), *settings)
    assert result.code == 0, result.err
    metrics = result.json
    for name in ("pico_rome.safetensors", "pico_rome.md", "pico_rome.json", "pico_rome-rsr.png",
                 "pico_rome-pruned.png", "pico_rome-heatmap.png", "index.json", "pico_rome.bank.safetensors"):
        assert (out.parent / name).exists(), name
    assert not (out.parent / "pico_rome.ckpt.safetensors").exists()
    assert set(metrics["rsr"]) == {"train", "val", "test"}
    assert 0 <= metrics["rsr"]["test"]["rsr"] <= 1 and "baseline_svd_rsr" in metrics["rsr"]["test"]
    assert {"rsr_mask_on_weights_only", "rsr_mask_on_edit_only"} <= set(metrics["rsr"]["test"])
    assert metrics["text"]["original"]["perplexity"] > 1
    assert len(metrics["curve"]) == 2
    best = max(c["val_rsr"] for c in metrics["curve"])
    assert metrics["shipped_step"] == next(c["step"] for c in metrics["curve"] if c["val_rsr"] == best)
    mask = MaskFile.load(out)
    assert mask.targets[0].tensor == "model.layers.0.mlp.down_proj.weight"
    trained = mask.hparams["train"]  # --set reaches the trainer and is recorded with the mask
    assert (trained["margin"], trained["betas"], trained["weight_decay"], trained["epochs"]) == (2.5, [0.8, 0.95], 0.02, 2)
    # the registry lets inspect find the mask for this very model
    monkeypatch.setenv("EDITGUARD_MASKS", str(out.parent))
    info = cli("-f", "json", "inspect", pico_models["llama"]).json
    assert [m["match"] for m in info["masks"]] == ["exact"]
    # with what the mask alone costs a clean model, for lock's choice
    text = metrics["text"]
    cost = text["mask_on_unedited"]["perplexity"] / text["original"]["perplexity"] - 1
    assert info["masks"][0]["perplexity_increase"] == pytest.approx(cost, abs=1e-4)
    assert "| test |" in (out.parent / "pico_rome.md").read_text()
    lo, hi = metrics["rsr"]["test"]["rsr_ci95"]  # the sampling noise of its n facts, beside the figure
    assert lo <= metrics["rsr"]["test"]["rsr"] <= hi and hi - lo > 0.1
    assert f"(95 % CI {100 * lo:.1f}-{100 * hi:.1f} %)" in (out.parent / "pico_rome.md").read_text()
    # evaluate-mask reproduces the evaluation from the mask file and the bank, at another threshold too
    args = _train_args(pico_models, tmp_path, out, 2)
    model, data = args[args.index("--model") + 1], args[args.index("--data") + 1]
    again = cli("-f", "json", "evaluate-mask", out, "--bank", out.parent / "pico_rome.bank.safetensors",
                "--model", model, "--data", data, "--train-size", "20", "--val-size", "8", "--test-size", "8",
                "--text-tokens", "200", "--threshold", "0.5")
    assert again.code == 0, again.err
    assert again.json["rsr"]["test"]["n"] == 8 and again.json["threshold"] == 0.5
    assert set(again.json["rsr"]) == {"train", "val", "test"}  # the training run's splits, as its card has them
    # another split: its 40 records, 4 of them never banked, edited now in a copy of the bank
    bank_file = out.parent / "pico_rome.bank.safetensors"
    before = (bank_file.read_bytes(), sorted(p.name for p in out.parent.iterdir()))
    extra = cli("-f", "json", "evaluate-mask", out, "--bank", bank_file, "--model", model, "--data", data,
                "--train-size", "20", "--val-size", "8", "--test-size", "8", "--text-tokens", "200",
                "--no-baselines", "--splits", "test", "--extra", data, "--extra-size", "40")
    assert extra.code == 0, extra.err
    assert set(extra.json["rsr"]) == {"test", "extra"} and extra.json["rsr"]["extra"]["n"] == 40
    assert (bank_file.read_bytes(), sorted(p.name for p in out.parent.iterdir())) == before  # the bank untouched
    bad = cli("evaluate-mask", out, "--bank", bank_file, "--model", model, "--splits", "test,holdout")
    assert bad.code == 2 and "--splits 'test,holdout'" in bad.err
    other = json.loads(Path(data).read_text())[:2]
    other[1]["requested_rewrite"]["target_new"]["str"] = "Klingon"  # case 1 again, another fact
    (tmp_path / "other.json").write_text(json.dumps(other))
    clash = cli("evaluate-mask", out, "--bank", bank_file, "--model", model, "--data", data, "--train-size", "20",
                "--val-size", "8", "--test-size", "8", "--splits", "test", "--extra", tmp_path / "other.json")
    assert clash.code == 2 and "the bank's edit of case 1 is of another fact" in clash.err, clash.err
    # ... and writes the re-binarised mask with the figures measured at its new threshold
    common = ["--bank", out.parent / "pico_rome.bank.safetensors", "--model", model, "--data", data,
              "--train-size", "20", "--val-size", "8", "--test-size", "8", "--text-tokens", "200"]
    relaxed = out.parent / "pico_rome_p20.safetensors"
    wrote = cli("-f", "json", "evaluate-mask", out, *common, "--target-pruned", "0.2", "-o", relaxed)
    assert wrote.code == 0, wrote.err
    derived = MaskFile.load(relaxed)
    assert abs(derived.pruned_fraction() - 0.2) < 0.01 and derived.threshold == wrote.json["threshold"]
    assert derived.metrics["rsr"] == wrote.json["rsr"] and derived.metrics["rebinarised"]["from"] == out.name
    assert derived.metrics["rebinarised"]["trained_threshold"] == mask.threshold
    assert torch.equal(derived.targets[0].scores, mask.targets[0].scores)  # the same Θ, another cut
    assert "re-binarised from `pico_rome.safetensors`" in (out.parent / "pico_rome_p20.md").read_text()
    index = {e["file"]: e for e in json.loads((out.parent / "index.json").read_text())}
    assert index["pico_rome_p20.safetensors"]["pruned_fraction"] == round(derived.pruned_fraction(), 4)
    assert MaskFile.load(out).threshold == mask.threshold  # the input is never modified
    refused = cli("evaluate-mask", out, *common, "--threshold", "0.5", "-o", relaxed)
    assert refused.code == 2 and "exists" in refused.err
    # a mask file (and its card, plots, index) never goes into the model folder
    inside = cli("evaluate-mask", out, *common, "--threshold", "0.5", "-o", Path(model) / "m.safetensors")
    assert inside.code == 2 and "overlaps the input" in inside.err
    trained = cli(*_train_args(pico_models, tmp_path, Path(model) / "m.safetensors", 1))
    assert trained.code == 2 and "overlaps the input" in trained.err and not (Path(model) / "m.safetensors").exists()
    both = cli("evaluate-mask", out, *common, "--threshold", "0.5", "--target-pruned", "0.2")
    assert both.code == 2 and "not both" in both.err
    # a second seed over the same bank, averaged into the first and cut: the card names both runs
    seeded = out.parent / "pico_rome_s1.safetensors"
    assert cli(*_train_args(pico_models, tmp_path, seeded, 2), "--seed", "1", "--bank", bank_file).code == 0
    uncut = cli("evaluate-mask", out, *common, "--average", seeded)
    assert uncut.code == 2 and "--average needs --threshold or --target-pruned" in uncut.err
    mean_path = out.parent / "pico_rome_mean.safetensors"
    mean = cli("-f", "json", "evaluate-mask", out, *common, "--average", seeded, "--target-pruned", "0.1", "-o", mean_path)
    assert mean.code == 0, mean.err
    assert mean.json["averaged_with"] == [str(seeded)] and set(mean.json["rsr"]) == {"train", "val", "test"}
    mean_mask, second = MaskFile.load(mean_path), MaskFile.load(seeded)
    assert not torch.equal(second.targets[0].scores, mask.targets[0].scores)  # the seeds train different masks
    expected = (mask.targets[0].scores + second.targets[0].scores) / 2
    assert torch.allclose(mean_mask.targets[0].scores, expected, atol=1e-3)  # stored in float16
    assert abs(mean_mask.pruned_fraction() - 0.1) < 0.01 and mean_mask.targets[0].theta is None
    assert [s["seed"] for s in mean_mask.metrics["averaged"]] == [0, 1] and mean_mask.hparams["train"]["seed"] == [0, 1]
    text = (out.parent / "pico_rome_mean.md").read_text()
    assert "soft scores averaged over 2 masks" in text and "`pico_rome_s1.safetensors`: seed 1" in text
    assert "cut and measured by" in text and "| test |" in text


def test_masks_average_only_over_the_same_tensors():
    from editguard.mask.average import averaged

    def mask(method="rome", tensor="w", fingerprint="f", layer=0):
        return MaskFile("pico", None, "llama", method, 0.9, [MaskTarget(tensor, layer, (2, 2), False, fingerprint,
                                                                       torch.rand(2, 2))])

    paths = [Path("a.safetensors"), Path("b.safetensors")]
    with pytest.raises(EditguardError, match="needs at least two"):
        averaged([mask()], paths[:1])
    for other, why in [(mask(method="memit"), "against MEMIT edits"), (mask(layer=1), "edits at layers"),
                       (mask(tensor="v"), "other tensors"), (mask(fingerprint="g"), "another model's weights")]:
        with pytest.raises(EditguardError, match=why):
            averaged([mask(), other], paths)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_train_whole_mlp_masks_the_layers_inputs_too(cli, pico_models, tmp_path, monkeypatch, model_type):
    """--whole-mlp: the edited tensor first, then the layer's MLP input projections (GPT-2: Conv1D, stored
    transposed), one γ over all of them; evaluate-mask and lock take the file as it is."""
    out = tmp_path / "masks" / "pico_mlp.safetensors"
    args = _train_args(pico_models, tmp_path, out, 1)
    args[args.index("--model") + 1] = str(pico_models[model_type])
    result = cli("-f", "json", *args, "--whole-mlp", "--target-pruned", "0.1", "--no-baselines")
    assert result.code == 0, result.err
    mask = MaskFile.load(out)
    arch = arch_table.for_model_type(model_type)
    assert [t.tensor for t in mask.targets] == [arch.weight_name("mlp_out", 0)] + [
        p + ".weight" for p in arch.mlp_in_modules(0)]
    assert [t.layer for t in mask.targets] == [0] * len(mask.targets)
    assert all(t.transposed == (model_type == "gpt2") for t in mask.targets)
    assert abs(result.json["pruned_fraction"] - 0.1) < 0.01  # γ over all the tensors together
    monkeypatch.setenv("EDITGUARD_MASKS", str(out.parent))
    fits = cli("-f", "json", "inspect", pico_models[model_type]).json["masks"]
    assert [(m["layers"], m["tensors"]) for m in fits] == [([0], len(mask.targets))]
    module = arch.mlp_in_modules(0)[-1].rsplit(".", 1)[-1]
    assert (out.parent / f"pico_mlp-heatmap-L0-{module}.png").exists()
    model, data = args[args.index("--model") + 1], args[args.index("--data") + 1]
    again = cli("-f", "json", "evaluate-mask", out, "--bank", out.parent / "pico_mlp.bank.safetensors", "--model",
                model, "--data", data, "--train-size", "20", "--val-size", "8", "--test-size", "8",
                "--text-tokens", "200", "--no-baselines")
    assert again.code == 0, again.err
    assert again.json["rsr"]["test"]["rsr"] == result.json["rsr"]["test"]["rsr"]  # same masks, same edits
    import dataclasses  # a file listing the inputs first (not one editguard writes) is refused, not misread

    reordered = out.parent / "inputs_first.safetensors"
    dataclasses.replace(mask, targets=mask.targets[::-1], binaries=None).save(reordered)
    refused = cli("evaluate-mask", reordered, "--bank", out.parent / "pico_mlp.bank.safetensors", "--model", model,
                  "--data", data, "--train-size", "20", "--val-size", "8", "--test-size", "8", "--no-baselines")
    assert refused.code == 2 and "lists MLP inputs before" in refused.err
    hp = args[args.index("--hparams") + 1]
    locked = cli("-f", "json", "lock", model, "--mask", out, "-o", tmp_path / "locked", "--evaluate", "2",
                 "--hparams", hp, "--data", data)  # ROME at the mask's one layer, through all three masks
    assert locked.code == 0, locked.err
    assert locked.json["evaluation"]["locked"]["n"] == 2
    manifest = json.loads(next((tmp_path / "locked").glob("*lock*.json")).read_text())
    assert sorted(manifest["targets"]) == sorted(t.tensor for t in mask.targets)


PICO_MEMIT = {"alg_name": "MEMIT", "layers": [0, 1], "context_template_length_params": [[5, 5]],
              "v_num_grad_steps": 5, "mom2_update_weight": 100.0, "mom2_n_samples": 20}


def _memit_args(pico_models, tmp_path, out, epochs):
    args = _train_args(pico_models, tmp_path, out, epochs)
    (tmp_path / "memit.yaml").write_text(yaml.safe_dump(PICO_MEMIT))
    args[args.index("--hparams") + 1] = str(tmp_path / "memit.yaml")
    return args


def test_train_memit_whole_mlp(cli, pico_models, tmp_path):
    """MEMIT with --whole-mlp: every edited layer's down projection, then each one's MLP inputs, which
    the batch edits leave alone; evaluate-mask reproduces the figures."""
    out = tmp_path / "masks" / "pico_memit_mlp.safetensors"
    args = _memit_args(pico_models, tmp_path, out, 1)
    result = cli("-f", "json", *args, "--method", "memit", "--memit-batch", "10", "--target-pruned", "0.1",
                 "--whole-mlp", "--no-baselines")
    assert result.code == 0, result.err
    mask = MaskFile.load(out)
    assert [t.tensor for t in mask.targets] == [f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)] + [
        f"model.layers.{i}.mlp.{m}.weight" for i in (0, 1) for m in ("gate_proj", "up_proj")]
    assert [t.layer for t in mask.targets] == [0, 1, 0, 0, 1, 1]
    again = cli("-f", "json", "evaluate-mask", out, "--bank", out.parent / "pico_memit_mlp.bank.safetensors",
                "--model", args[args.index("--model") + 1], "--data", args[args.index("--data") + 1],
                "--train-size", "20", "--val-size", "8", "--test-size", "8", "--text-tokens", "200", "--no-baselines")
    assert again.code == 0, again.err
    assert again.json["rsr"]["test"] == result.json["rsr"]["test"]


def test_train_memit_masks_every_edited_layer(cli, pico_models, tmp_path, monkeypatch):
    monkeypatch.setenv("EDITGUARD_HOME", str(tmp_path / "home"))
    out = tmp_path / "masks" / "pico_memit.safetensors"
    args = _memit_args(pico_models, tmp_path, out, 2)
    result = cli("-f", "json", *args, "--method", "memit", "--memit-batch", "10", "--target-pruned", "0.1",
                 "--max-pruned", "0.2")
    assert result.code == 0, result.err
    assert MaskFile.load(out).hparams["train"]["sparsity_max"] == 0.2
    metrics = result.json
    assert metrics["rsr"]["train"]["memit_batches"] == [10, 10]  # two batch edits of the training records
    assert metrics["rsr"]["val"]["memit_batches"] == [8] and metrics["rsr"]["test"]["memit_batches"] == [8]
    assert {"rsr_mask_on_weights_only", "rsr_mask_on_edit_only"} <= set(metrics["rsr"]["test"])
    assert 0 <= metrics["rsr"]["test"]["rsr"] <= 1 and "baseline_svd_rsr" in metrics["rsr"]["test"]
    assert abs(metrics["pruned_fraction"] - 0.1) < 0.01  # γ chosen over both layers together
    mask = MaskFile.load(out)
    assert mask.method == "memit"
    assert [t.tensor for t in mask.targets] == [f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)]
    for name in ("pico_memit-pruned-L0.png", "pico_memit-heatmap-L1.png", "pico_memit.md"):
        assert (out.parent / name).exists(), name
    data = args[args.index("--data") + 1]
    run_sizes = ["--bank", out.parent / "pico_memit.bank.safetensors", "--model", args[args.index("--model") + 1],
                 "--data", data, "--train-size", "20", "--val-size", "8", "--test-size", "8", "--text-tokens", "200"]
    again = cli("-f", "json", "evaluate-mask", out, *run_sizes)
    assert again.code == 0, again.err
    assert again.json["rsr"]["test"]["rsr"] == metrics["rsr"]["test"]["rsr"]  # same mask, same edits
    # --extra records the bank lacks (4 of these 40) are batch-edited anew, --memit-batch facts at a time
    quick = [*run_sizes, "--no-baselines", "--splits", "test"]
    extra = ["--extra", data, "--extra-size", "40"]
    batched = cli("-f", "json", "evaluate-mask", out, *quick, *extra, "--memit-batch", "16")
    assert batched.code == 0, batched.err
    assert batched.json["rsr"]["extra"]["memit_batches"] == [16, 16, 8] and batched.json["rsr"]["extra"]["n"] == 40
    assert cli("-f", "json", "evaluate-mask", out, *quick, *extra).json["rsr"]["extra"]["memit_batches"] == [40]
    alone = cli("evaluate-mask", out, *quick, "--memit-batch", "16")
    one_line_error(alone, "--memit-batch shapes the MEMIT batch edits made for --extra; there is no --extra")
    rome_bank = tmp_path / "masks" / "rome_bank.safetensors"
    rome_args = _train_args(pico_models, tmp_path, tmp_path / "masks" / "unused.safetensors", 2)
    assert cli(*rome_args, "--bank", rome_bank, "--bank-only").code == 0
    wrong = cli("evaluate-mask", out, "--bank", rome_bank, "--model", args[args.index("--model") + 1],
                "--data", args[args.index("--data") + 1], "--train-size", "20", "--val-size", "8", "--test-size", "8")
    assert wrong.code == 2 and "ROME edits" in wrong.err


def test_resume_reads_the_default_validation_interval_as_the_number_it_stands_for(tmp_path):
    """--val-every left out and given as its default value are one setting; older checkpoints wrote None."""
    from editguard.mask.pipeline import check_resumable, default_val_every

    every = default_val_every(25)
    meta = {"config": TrainConfig(epochs=25).to_dict(), "data_hash": "d", "fingerprints": {"w": "f"},
            "model_fingerprint": "m", "targets": ["w"],
            "settings": {"train": ["1"], "val": ["2"], "facts": "x", "val_every": every}}
    ckpt = tmp_path / "run.ckpt.safetensors"
    for written in (every, None):  # None: a checkpoint from before the interval was recorded as run
        check_resumable(ckpt, {**meta, "settings": {**meta["settings"], "val_every": written}}, meta, 1)
    check_resumable(ckpt, {k: v for k, v in meta.items() if k != "settings"}, meta, 1)
    for written in (every, None):  # a run at the default is not continued at another interval
        other = {**meta, "settings": {**meta["settings"], "val_every": every + 1}}
        with pytest.raises(EditguardError, match="other --val-every"):
            check_resumable(ckpt, {**meta, "settings": {**meta["settings"], "val_every": written}}, other, 1)


def test_killed_training_resumes(pico_models, tmp_path):
    out = tmp_path / "masks" / "killed.safetensors"
    args = [sys.executable, "-m", "editguard", "-q", *_train_args(pico_models, tmp_path, out, 25)]
    env = {**os.environ, "EDITGUARD_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    ckpt = out.with_name("killed.ckpt.safetensors")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists():
            _, _, info = load_checkpoint(ckpt, TrainConfig())
            if info["step"] >= 5:
                break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _, _, info = load_checkpoint(ckpt, TrainConfig())
    killed_at = info["step"]
    assert 5 <= killed_at < 125 and not out.exists()
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "--resume" in again.stderr  # the unfinished run is not silently restarted
    changed = subprocess.run(args + ["--resume", "--set", "margin=2.5"], env=env, capture_output=True, text=True,
                             timeout=600)
    assert changed.returncode == 2 and "other data or settings" in changed.stderr
    validated = subprocess.run(args + ["--resume", "--val-every", "3"], env=env, capture_output=True, text=True,
                               timeout=600)
    assert validated.returncode == 2 and "other --val-every" in validated.stderr
    # a checkpoint from before a setting existed resumes: the missing setting is its default
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(ckpt), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        meta = json.loads(handle.metadata()["editguard_train"])
    del meta["config"]["beta_anchor"]
    del meta["settings"]  # written since: an older checkpoint's validation settings are taken as the run's
    save_file(tensors, str(ckpt), metadata={"editguard_train": json.dumps(meta)})
    resumed = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    mask = MaskFile.load(out)
    assert mask.metrics["steps"] == 125 and mask.metrics["curve"][-1]["step"] == 125


def test_shipped_masks_match_their_index_and_cards():
    """Every mask in masks/index.json loads, and the index and card repeat the file's own figures."""
    import json

    folder = Path(__file__).resolve().parent.parent / "masks"
    entries = json.loads((folder / "index.json").read_text())
    assert entries
    for entry in entries:
        mask = MaskFile.load(folder / entry["file"])
        assert entry["layers"] == [t.layer for t in mask.targets] and entry["method"] == mask.method
        assert entry["edit_layers"] == mask.edit_layers()
        assert abs(entry["pruned_fraction"] - mask.pruned_fraction()) < 1e-3
        assert entry["test_rsr"] == mask.metrics["rsr"]["test"]["rsr"]
        card = (folder / entry["file"].replace(".safetensors", ".md")).read_text()
        assert f"**{100 * entry['test_rsr']:.1f} %**" in card
        for figure in [line[line.index("(") + 1:-1] for line in card.splitlines() if line.startswith("![")]:
            assert (folder / figure).is_file(), figure


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_reversal_sources_mask_the_base_or_the_edit(model_type, pico_models):
    """RSR's decomposition: K on the base weights only is W ⊙ K + ΔW, K on the edit only is W + ΔW ⊙ K
    (ROME factored per row, MEMIT as dense batch edits), each equal to the dense computation."""
    from editguard.edit.edits import Edit, weight_param, weights_restored
    from editguard.edit.facts import Fact
    from editguard.loading import load_model
    from editguard.mask.evaluate import preference, share
    from editguard.mask.splits import MemitSplit
    from editguard.mask.train import canonical_weight
    from editguard.resolve import resolve

    loaded = load_model(resolve(str(pico_models[model_type])))
    arch = loaded.arch
    path, transposed = arch.module("mlp_out", 1), arch.mlp_out_transposed
    facts = [Fact("The official language of {}", c, n, t, i, "P103", ())
             for i, (c, n, t) in enumerate([("France", "Japanese", "French"), ("Spain", "German", "Spanish")])]
    gen = torch.Generator().manual_seed(3)
    out_dim, in_dim = canonical_weight(loaded.model.get_submodule(path), transposed).shape
    u, v = torch.randn(2, out_dim, generator=gen), torch.randn(2, in_dim, generator=gen) * 0.3
    K = torch.rand(out_dim, in_dim, generator=gen).round()
    pristine = {k: t.clone() for k, t in loaded.model.state_dict().items()}
    W = canonical_weight(loaded.model.get_submodule(path), transposed).float().clone()

    def unchanged():  # every variant leaves the model bit-identical
        return all(torch.equal(t, pristine[k]) for k, t in loaded.model.state_dict().items())

    def dense(i, on):  # preference of fact i with the edit and mask written into the pristine weight
        name = path + ".weight"
        with weights_restored(loaded.model, [name]), torch.no_grad():
            weight = weight_param(loaded.model, name)
            delta = torch.outer(u[i], v[i])
            new = W * K + delta if on == "weights" else W + delta * K
            weight.copy_((new.T if transposed else new).to(weight))
            return preference(loaded, [facts[i]], None, None, None, None, False)[0]

    def dense_all(on):
        return torch.stack([dense(i, on) for i in range(2)])

    for on in ("weights", "edit"):
        fast = preference(loaded, facts, path, u, v, K, transposed, mask_on=on)
        assert unchanged()
        torch.testing.assert_close(fast, torch.stack([dense(i, on) for i in range(2)]), atol=1e-4, rtol=1e-4)
    both = preference(loaded, facts, path, u, v, K, transposed)
    assert not torch.allclose(both, preference(loaded, facts, path, u, v, K, transposed, mask_on="edit"))
    edits = [[Edit("memit", 1, path + ".weight", u[i], v[i], [facts[i]])] for i in range(2)]
    split = MemitSplit(facts, [[0], [1]], edits)
    for on in ("weights", "edit"):
        got = split.preference(loaded, [(path, transposed)], [K], mask_on=on)
        assert unchanged()
        torch.testing.assert_close(got, torch.stack([dense(i, on) for i in range(2)]), atol=1e-4, rtol=1e-4)
    # the report carries the two variants under their own names
    report = split.report(loaded, [(path, transposed)], [K], baselines=False)
    assert report["rsr_mask_on_weights_only"] == share(dense_all("weights") > 0)
    assert report["rsr_mask_on_edit_only"] == share(dense_all("edit") > 0)
    with pytest.raises(ValueError):
        split.preference(loaded, [(path, transposed)], [K], mask_on="edits")


def test_rebinarised_mask_keeps_the_bits_it_was_measured_with(tmp_path):
    """Scores are stored in float16: a score just above γ in float32 (kept by training) rounds below it.
    A mask re-measured and written at the same γ must keep the evaluated bits, not re-derive them."""
    from editguard.mask.pipeline import rebinarised

    scores = torch.full((2, 4), 0.5)
    scores[0, 0] = 0.90002  # float16: 0.8999
    trained = MaskFile("pico", None, "llama", "rome", 0.9, [MaskTarget("w", 0, (2, 4), False, "f", scores)])
    trained.save(tmp_path / "m.safetensors")
    loaded = MaskFile.load(tmp_path / "m.safetensors")
    assert loaded.mask(0)[0, 0] == 1 and loaded.targets[0].binary(0.9)[0, 0] == 0  # the rounding at stake
    evaluation = {"threshold": 0.9, "pruned_fraction": loaded.pruned_fraction(), "rsr": {}, "text": {}}
    rebinarised(loaded, tmp_path / "m.safetensors", evaluation, [loaded.mask(0)], "cmd").save(tmp_path / "r.safetensors")
    assert torch.equal(MaskFile.load(tmp_path / "r.safetensors").mask(0), loaded.mask(0))


def test_memit_baselines_leave_the_masked_inputs_alone(pico_models, monkeypatch):
    """With --whole-mlp the SVD baseline drops the top component of the edited tensors only, and the
    magnitude baseline prunes each ΔW at the edited tensors' own pruned share, not the inputs'."""
    from editguard.edit.edits import Edit, weight_param
    from editguard.edit.facts import Fact
    from editguard.loading import load_model
    from editguard.mask import splits
    from editguard.mask.train import canonical_weight
    from editguard.resolve import resolve

    loaded = load_model(resolve(str(pico_models["llama"])))
    out_path, in_path = loaded.arch.module("mlp_out", 1), loaded.arch.mlp_in_modules(1)[0]
    targets = [(out_path, False), (in_path, False)]
    facts = [Fact("The official language of {}", "France", "Japanese", "French", 0, "P103", ())]
    out_dim, in_dim = canonical_weight(loaded.model.get_submodule(out_path), False).shape
    gen = torch.Generator().manual_seed(0)
    split = splits.MemitSplit(facts, [[0]], [[Edit("memit", 1, out_path + ".weight", torch.randn(out_dim, generator=gen),
                                                   torch.randn(in_dim, generator=gen), facts)]])
    before = {p: weight_param(loaded.model, p + ".weight").detach().clone() for p, _ in targets}
    with splits.top_component_dropped(loaded, split.edits[0]):
        assert torch.equal(weight_param(loaded.model, in_path + ".weight"), before[in_path])
        assert not torch.equal(weight_param(loaded.model, out_path + ".weight"), before[out_path])
    fractions = []
    real = splits.largest_delta_pruned
    monkeypatch.setattr(splits, "largest_delta_pruned", lambda lo, e, f: fractions.append(f) or real(lo, e, f))
    masks = [torch.ones(out_dim, in_dim), torch.zeros_like(weight_param(loaded.model, in_path + ".weight"))]
    masks[0][:, : in_dim // 4] = 0  # the edited tensor 25 % pruned, the input 100 %
    report = split.report(loaded, targets, masks)
    assert fractions and all(f == pytest.approx(0.25) for f in fractions)
    assert {"baseline_svd_rsr", "baseline_magnitude_rsr"} <= set(report)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("edit_layers, mask_layers", [([0], [1]), ([0, 1], [0]), ([0, 1], [1]), ([0], [0, 1])],
                         ids=["above", "first-edited", "last-edited", "edited-and-above"])
def test_a_mask_layer_trains_against_the_batch_edits_around_it(model_type, edit_layers, mask_layers, pico_models):
    """--mask-layer: a record's logits come from its batch edit (below the lowest masked layer: cached in
    the states entering it; on a masked layer: masked with it; elsewhere above: unmasked in the forward)
    and the masks, as the edited model with the masks applied gives them; unedited, from the masks alone."""
    from editguard.edit.edits import Edit, edits_applied
    from editguard.edit.facts import Fact
    from editguard.loading import load_model
    from editguard.mask.evaluate import masks_applied
    from editguard.mask.splits import MemitSplit
    from editguard.mask.train import canonical_weight, prepare_prompts
    from editguard.resolve import resolve

    loaded = load_model(resolve(str(pico_models[model_type])))
    arch = loaded.arch
    facts = [Fact("The official language of {}", c, n, t, i, "P103", ())
             for i, (c, n, t) in enumerate([("France", "Japanese", "French"), ("Spain", "German", "Spanish"),
                                            ("Italy", "English", "Italian")])]
    out_dim, in_dim = canonical_weight(loaded.model.get_submodule(arch.module("mlp_out", 0)),
                                       arch.mlp_out_transposed).shape
    gen = torch.Generator().manual_seed(3)
    edits = [[Edit("memit", layer, arch.module("mlp_out", layer) + ".weight", torch.randn(out_dim, 2, generator=gen),
                   torch.randn(in_dim, 2, generator=gen)) for layer in edit_layers] for _ in range(2)]
    split = MemitSplit(facts, [[0, 2], [1]], edits)
    start = min(mask_layers)
    data = prepare_prompts(loaded, facts, start, 0, edits_below=split.edits_below(start))
    targets = [(arch.module("mlp_out", layer), arch.mlp_out_transposed) for layer in mask_layers]
    trainer = MaskTrainer(loaded, targets, start, data, TrainConfig(), **split.trainer_inputs(targets))
    masks = [torch.rand(out_dim, in_dim, generator=gen).round() for _ in mask_layers]
    for g, records in enumerate(split.groups):
        for record in records:
            rows = torch.tensor([record])
            ids = data.ids[rows, : int(data.last[record]) + 1]
            with torch.no_grad():
                with masks_applied(loaded, targets, masks):
                    plain = loaded.model(input_ids=ids).logits[0, -1]
                with edits_applied(loaded.model, arch, edits[g]), masks_applied(loaded, targets, masks):
                    edited = loaded.model(input_ids=ids).logits[0, -1]  # (W + ΔW) ⊙ K on the masked layer
            torch.testing.assert_close(trainer._last_logits(rows, masks, True, g)[0], edited.float(), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(trainer._last_logits(rows, masks, False, g)[0], plain.float(), atol=1e-4, rtol=1e-4)
            assert not torch.allclose(edited, plain, atol=1e-3)  # the edits do reach the logits


def test_train_memit_mask_layer(cli, pico_models, tmp_path):
    """`train --mask-layer`: the mask covers that layer only (above the edits, or one of the edited layers),
    the baselines still act on the edits, and evaluate-mask reproduces the figures; a layer out of range
    or named twice, or a ROME run, is refused."""
    out = tmp_path / "masks" / "pico_memit_above.safetensors"
    args = _memit_args(pico_models, tmp_path, out, 1)
    result = cli("-f", "json", *args, "--method", "memit", "--layer", "0", "--mask-layer", "1", "--memit-batch", "10",
                 "--target-pruned", "0.1")
    assert result.code == 0, result.err
    mask = MaskFile.load(out)
    assert [(t.tensor, t.layer) for t in mask.targets] == [("model.layers.1.mlp.down_proj.weight", 1)]
    assert mask.edit_layers() == [0]  # what scan, lock and evaluate-mask take the edits' layers from
    entry, = json.loads((out.parent / "index.json").read_text())
    assert (entry["layers"], entry["edit_layers"]) == ([1], [0])
    test = result.json["rsr"]["test"]
    assert {"baseline_svd_rsr", "baseline_magnitude_rsr"} <= set(test)
    assert test["rsr_mask_on_edit_only"] == test["edited_prefers_true"]  # the mask never touches the edited tensor
    again = cli("-f", "json", "evaluate-mask", out, "--bank", out.parent / "pico_memit_above.bank.safetensors",
                "--model", args[args.index("--model") + 1], "--data", args[args.index("--data") + 1],
                "--train-size", "20", "--val-size", "8", "--test-size", "8", "--text-tokens", "200")
    assert again.code == 0, again.err
    assert again.json["rsr"]["test"]["rsr"] == test["rsr"]
    among = tmp_path / "masks" / "pico_memit_among.safetensors"  # edits at layers 0-1, the mask on layer 0 only
    result = cli("-f", "json", *_memit_args(pico_models, tmp_path, among, 1), "--method", "memit", "--mask-layer", "0",
                 "--memit-batch", "10", "--target-pruned", "0.1", "--no-baselines")
    assert result.code == 0, result.err
    mask = MaskFile.load(among)
    assert [t.layer for t in mask.targets] == [0] and mask.edit_layers() == [0, 1]
    for extra, message in ((["--method", "memit", "--mask-layer", "2"], "--mask-layer 2 is out of range: the model "
                            "has layers 0-1"), (["--mask-layer", "1"], "--mask-layer is for MEMIT masks"),
                           (["--method", "memit", "--mask-layer", "1", "--mask-layer", "1"], "names a layer twice")):
        refused = cli(*_memit_args(pico_models, tmp_path, tmp_path / "masks" / "no.safetensors", 1), *extra)
        assert refused.code == 2 and message in refused.err, refused.err


def test_magnitude_baseline_prunes_the_share_it_is_given_and_nothing_at_zero():
    from editguard.mask.evaluate import outside_largest

    delta = torch.outer(torch.arange(1.0, 11.0), torch.arange(1.0, 5.0) * 0.1 + 0.01)  # 40 distinct |ΔW|
    keep = outside_largest(delta, 0.1)
    assert int((keep == 0).sum()) == 4 and bool((delta[keep == 0].min() > delta[keep == 1].max()))
    assert bool((outside_largest(delta, 0.0) == 1).all()) and bool((outside_largest(delta, 0.01) == 1).all())
