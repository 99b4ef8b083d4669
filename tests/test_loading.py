"""Holding the whole model: frozen, eval mode, and the edited layers kept on a real device."""

from __future__ import annotations

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
