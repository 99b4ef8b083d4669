"""Holding the whole model: frozen, eval mode, and the edited layers kept on a real device."""

from __future__ import annotations

import warnings

from editguard.loading import load_model
from editguard.resolve import resolve


def test_load_pico_frozen(pico_models):
    loaded = load_model(resolve(str(pico_models["gpt2"])))
    assert loaded.arch.model_type == "gpt2" and loaded.num_layers == 2
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert not loaded.model.training
    assert loaded.tokenizer.pad_token_id is not None
    assert loaded.module("mlp_out", 1).weight.shape == (64 * 2, 32)  # Conv1D stores [in, out]


def test_auto_device_map_keeps_edit_targets_real(pico_models, tmp_path):
    ref = resolve(str(pico_models["llama"]))
    keep = ["model.layers.1.mlp.down_proj"]
    loaded = load_model(ref, device_map="auto", max_memory={"cpu": "20KB"}, offload_folder=str(tmp_path / "off"),
                        keep_on_device=keep)
    assert loaded.model.get_submodule(keep[0]).weight.device.type == "cpu"
    offloaded = [n for n, p in loaded.model.named_parameters() if p.device.type == "meta"]
    assert offloaded, "the tiny memory cap should have offloaded something"
    assert not any(n.startswith(keep[0]) for n in offloaded)


def test_slow_half_precision_warns(pico_models, monkeypatch):
    import pytest

    from editguard import cpu_precision
    from editguard.errors import EditguardWarning

    ref = resolve(str(pico_models["llama"]))
    monkeypatch.setattr(cpu_precision, "half_precision_slowdown", lambda dtype: 40.0)
    with pytest.warns(EditguardWarning, match="bfloat16 matrix products run 40x slower than float32"):
        load_model(ref, dtype="bfloat16")
    monkeypatch.setattr(cpu_precision, "half_precision_slowdown", lambda dtype: 0.6)  # a CPU with bf16 units
    with warnings.catch_warnings():
        warnings.simplefilter("error", EditguardWarning)
        load_model(ref, dtype="bfloat16")

        def never(dtype):
            raise AssertionError("float32 needs no probe")

        monkeypatch.setattr(cpu_precision, "half_precision_slowdown", never)
        load_model(ref, dtype="float32")


def test_half_precision_probe_measures():
    import torch

    from editguard.cpu_precision import half_precision_slowdown

    ratio = half_precision_slowdown(torch.bfloat16)
    assert 0 < ratio < float("inf")


def test_warning_is_one_line_on_the_cli(cli, pico_models, monkeypatch, tmp_path):
    from editguard import cpu_precision

    monkeypatch.setattr(cpu_precision, "half_precision_slowdown", lambda dtype: 40.0)
    args = ["edit", pico_models["llama"], "--fact", "The official language of {}", "--subject", "France",
            "--target", "Japanese", "--hparams", "rome-smollm2-135m", "--layer", "1", "--dtype", "bfloat16"]
    result = cli("-f", "json", *args, "-o", tmp_path / "a")
    assert result.code == 0, result.err
    lines = [line for line in result.err.splitlines() if "slower than float32" in line]
    assert lines == ["warning: bfloat16 matrix products run 40x slower than float32 on this CPU (no native "
                     "bfloat16 support); --dtype float32 will be faster"], result.err
    assert result.json["tensors"]  # stdout is still one JSON document
    quiet = cli("-q", *args, "-o", tmp_path / "b")
    assert quiet.code == 0 and "slower than float32" not in quiet.err


def test_missing_weights_are_refused_and_extra_ones_reported(pico_models, tmp_path, cli):
    """transformers would fill a missing tensor with random values (and say so only in a silenced log)."""
    import shutil

    import pytest
    import torch
    from safetensors.torch import load_file, save_file

    from editguard.errors import EditguardError, EditguardWarning

    lacking = tmp_path / "lacking"
    shutil.copytree(pico_models["llama"], lacking)
    tensors = load_file(lacking / "model.safetensors")
    del tensors["model.layers.0.self_attn.q_proj.weight"]
    save_file(tensors, lacking / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EditguardError, match="lacks model.layers.0.self_attn.q_proj.weight"):
        load_model(resolve(str(lacking)))
    result = cli("scan", lacking, "--tests", "activations")
    assert result.code == 2 and "lacks model.layers.0.self_attn.q_proj.weight" in result.err, result.err
    extra = tmp_path / "extra"
    shutil.copytree(pico_models["llama"], extra)
    tensors = load_file(extra / "model.safetensors")
    tensors["model.layers.0.mlp.hidden_payload"] = torch.ones(4)
    save_file(tensors, extra / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(EditguardWarning, match="stores model.layers.0.mlp.hidden_payload, which the model does not"):
        load_model(resolve(str(extra)))
