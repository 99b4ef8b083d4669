"""The compute commands on a CUDA device, on pico models: the same edits, masks and verdicts as on the CPU.

Skipped where torch sees no GPU (CI has none); on a GPU machine run `pytest tests/test_cuda_pico.py`.
"""

from __future__ import annotations

import pytest
import torch
import yaml

import pico_facts
from editguard.checkpoint import Checkpoint
from editguard.edit.edits import edits_applied
from editguard.edit.facts import Fact
from editguard.edit.hparams import hparams_from_dict
from editguard.edit.plant import compute_edits
from editguard.loading import load_model
from editguard.resolve import resolve

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FACTS = [Fact("The official language of {}", "France", "Japanese", "French"),
         Fact("the mother tongue of {}", "Danielle Darrieux", "Italian", "French")]
HP = {"layers": [1], "context_template_length_params": [[5, 5]], "v_num_grad_steps": 25, "v_lr": 0.5,
      "clamp_norm_factor": 8}
MEMIT = {**HP, "layers": [0, 1], "mom2_update_weight": 100.0, "mom2_n_samples": 20}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_rome_and_memit_on_cuda_equal_the_cpu(model_type, pico_models, tmp_path, monkeypatch):
    ref = resolve(str(pico_models[model_type]))
    cpu, gpu = load_model(ref), load_model(ref, device_map="cuda")
    assert gpu.device.type == "cuda" and gpu.module("mlp_out", 1).weight.device.type == "cuda"
    for method, hp in (("rome", HP), ("memit", MEMIT)):
        params = hparams_from_dict(hp, method)
        # separate statistics caches: MEMIT's second moments are computed on each device, not shared
        monkeypatch.setenv("EDITGUARD_HOME", str(tmp_path / f"home-{method}-cpu"))
        on_cpu = compute_edits(cpu, FACTS, params)
        monkeypatch.setenv("EDITGUARD_HOME", str(tmp_path / f"home-{method}-cuda"))
        on_gpu = compute_edits(gpu, FACTS, params)
        assert [e.tensor for e in on_gpu] == [e.tensor for e in on_cpu]
        for a, b in zip(on_gpu, on_cpu):
            assert a.u.device.type == "cpu"  # edits come back as CPU factors, ready for a bank
            assert _relative(a.delta(), b.delta()) < 1e-3, (method, _relative(a.delta(), b.delta()))
        with edits_applied(gpu.model, gpu.arch, on_gpu), torch.no_grad():
            for fact in FACTS:
                ids = gpu.tokenizer(fact.text, return_tensors="pt").input_ids.to("cuda")
                target = gpu.tokenizer(" " + fact.target_new, add_special_tokens=False).input_ids[0]
                assert int(gpu.model(input_ids=ids).logits[0, -1].argmax()) == target


def _write_inputs(tmp_path):
    data = tmp_path / "facts.json"
    pico_facts.write(data)
    hp = tmp_path / "rome.yaml"
    hp.write_text(yaml.safe_dump({"alg_name": "ROME", **HP, "v_num_grad_steps": 5}))
    return data, hp


def test_train_evaluate_lock_scan_reverse_on_cuda(cli, pico_models, tmp_path, monkeypatch):
    monkeypatch.setenv("EDITGUARD_HOME", str(tmp_path / "home"))
    model = str(pico_models["llama"])
    data, hp = _write_inputs(tmp_path)
    sizes = ["--train-size", "20", "--val-size", "8", "--test-size", "8"]
    out = tmp_path / "masks" / "pico_rome.safetensors"
    trained = cli("-f", "json", "train", "--model", model, "--hparams", hp, "--data", data, *sizes, "--epochs", "2",
                  "--batch", "4", "--text-tokens", "200", "-o", out, "--device-map", "cuda")
    assert trained.code == 0, trained.err
    assert trained.json["pruned_fraction"] > 0
    # the mask trained on the GPU scores the same on either device
    evaluate = ["-f", "json", "evaluate-mask", out, "--bank", out.parent / "pico_rome.bank.safetensors",
                "--model", model, "--data", data, *sizes, "--text-tokens", "200"]
    on_cpu, on_gpu = cli(*evaluate), cli(*evaluate, "--device-map", "cuda")
    assert on_cpu.code == 0 and on_gpu.code == 0, on_gpu.err
    for split in ("val", "test"):
        assert on_gpu.json["rsr"][split]["rsr"] == on_cpu.json["rsr"][split]["rsr"]
        assert on_gpu.json["rsr"][split]["rsr"] == trained.json["rsr"][split]["rsr"]
    assert on_gpu.json["text"]["pruned"]["perplexity"] == pytest.approx(on_cpu.json["text"]["pruned"]["perplexity"],
                                                                        rel=1e-3)
    # lock --evaluate: ROME through the locked forward on the GPU, as on the CPU
    lock = ["-f", "json", "lock", model, "--mask", out, "--evaluate", "4", "--hparams", hp, "--data", data]
    locked_cpu, locked_gpu = cli(*lock), cli(*lock, "--device-map", "cuda")
    assert locked_gpu.code == 0, locked_gpu.err
    assert locked_gpu.json["evaluation"] == locked_cpu.json["evaluation"]
    # plant on the GPU, then scan and reverse there
    edited = tmp_path / "edited"
    planted = cli("-q", "edit", model, "--fact", "The official language of {}", "--subject", "France", "--target",
                  "Japanese", "--hparams", hp, "-o", edited, "--device-map", "cuda")
    assert planted.code == 0, planted.err
    changed = [n for n in Checkpoint(edited).names()
               if not torch.equal(Checkpoint(edited).read(n), Checkpoint(model).read(n))]
    assert changed == ["model.layers.1.mlp.down_proj.weight"]
    probes = tmp_path / "probes.jsonl"
    probes.write_text('{"prompt": "The official language of France", "subject": "France", "answer": "French"}\n')
    scan = ["-f", "json", "scan", edited, "--base", model, "--probes", probes, "--mask", out]
    scan_cpu, scan_gpu = cli(*scan), cli(*scan, "--device-map", "cuda")
    assert scan_gpu.code == scan_cpu.code and scan_gpu.code in (0, 1), scan_gpu.err
    assert scan_gpu.json["verdict"] == scan_cpu.json["verdict"] == "edited"
    rules = lambda r: sorted((f["rule"], f.get("layer")) for f in r.json["findings"])  # noqa: E731
    assert rules(scan_gpu) == rules(scan_cpu)
    rev = cli("-f", "json", "reverse", edited, "-o", tmp_path / "restored", "--mask", out, "--probes", probes,
              "--device-map", "cuda")
    assert rev.code == 0, rev.err
    assert rev.json["tensors"] == ["model.layers.1.mlp.down_proj.weight"]
