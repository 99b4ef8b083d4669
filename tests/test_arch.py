"""Every row of the architecture table resolves on a real module tree and a real checkpoint file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import pico
from editguard import arch as arch_table
from editguard.arch import GLOBAL_ROLES, ROLES, module_names
from editguard.checkpoint import Checkpoint
from editguard.errors import UnsupportedError


def test_table_covers_required_architectures():
    required = {"gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"}
    assert required <= set(arch_table.supported())
    assert set(pico.ARCHS) == set(arch_table.supported()), "every table row needs a pico model"


@pytest.mark.parametrize("model_type", pico.ARCHS)
def test_templates_resolve_on_module_and_file(model_type, pico_models):
    from transformers import AutoModelForCausalLM

    folder = pico_models[model_type]
    checkpoint = Checkpoint(folder)
    arch = arch_table.for_config(checkpoint.config)
    assert arch.model_type == model_type
    num_layers = arch.num_layers(checkpoint.config)
    assert num_layers == 2
    model = AutoModelForCausalLM.from_pretrained(folder)
    for role, layer, path in module_names(arch, num_layers):
        module = model.get_submodule(path)  # raises if the template is wrong
        if role in ("mlp_out", "mlp_in", "attn_in", "attn_qkv", "attn_out", "embed", "unembed"):
            canonical = path + ".weight"
            stored = checkpoint.find(arch.tensor_candidates(canonical))
            tied_unembed = role == "unembed" and arch.tied(checkpoint.config)
            assert stored is not None or tied_unembed, f"{canonical} not in the file"
            if stored is not None:
                assert tuple(checkpoint.info(stored).shape) == tuple(module.weight.shape)
    # orientation: the MLP output projection maps intermediate -> hidden
    hidden = model.config.hidden_size
    weight = model.get_submodule(arch.module("mlp_out", 0)).weight
    out_dim, in_dim = (weight.shape[1], weight.shape[0]) if arch.mlp_out_transposed else tuple(weight.shape)
    assert out_dim == hidden and in_dim != hidden
    # the transposed flag matches what the module really computes: y = x @ W (Conv1D) or x @ W.T (Linear)
    module = model.get_submodule(arch.module("mlp_out", 0))
    x = torch.randn(3, in_dim)
    expected = x @ weight if arch.mlp_out_transposed else x @ weight.T
    bias = getattr(module, "bias", None)
    if bias is not None:
        expected = expected + bias
    assert torch.allclose(module(x), expected, atol=1e-5)
    # the MLP's input projections map hidden -> intermediate, stored like the output projection
    for path in arch.mlp_in_modules(0):
        w = model.get_submodule(path).weight
        assert ((w.shape[1], w.shape[0]) if arch.mlp_out_transposed else tuple(w.shape)) == (in_dim, hidden)
    assert arch.tied(checkpoint.config) == bool(model.config.tie_word_embeddings)
    # the head counts, and the query / key / value projections they split (rows: heads x head size)
    heads, kv_heads = arch.heads(checkpoint.config)
    text = model.config.get_text_config()
    assert heads == text.num_attention_heads
    assert kv_heads == (getattr(text, "num_key_value_heads", None) or heads)
    if arch.attn_in:
        rows = [model.get_submodule(path).weight.shape[0] for path in arch.attn_in_modules(0)]
        assert rows[0] % heads == 0 and rows[1] % kv_heads == 0 and rows[1] == rows[2]
        assert model.get_submodule(arch.module("attn_out", 0)).weight.shape[1] == rows[0]
    else:  # one fused matrix holds query, key and value
        assert arch.qkv_layout in ("sections", "per_head") and heads == kv_heads
        fused = model.get_submodule(arch.module("attn_qkv", 0)).weight
        assert fused.shape[0 if not arch.mlp_out_transposed else 1] == 3 * hidden


def test_gpt2_alias_names_without_transformer_prefix(pico_models, tmp_path):
    """Old GPT-2 files store `h.N...` instead of `transformer.h.N...`; lookups must find both."""
    import shutil

    src = pico_models["gpt2"]
    dest = tmp_path / "gpt2-old"
    shutil.copytree(src, dest)
    tensors = load_file(dest / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, dest / "model.safetensors")
    checkpoint = Checkpoint(dest)
    arch = arch_table.for_config(checkpoint.config)
    stored = checkpoint.find(arch.tensor_candidates(arch.weight_name("mlp_out", 1)))
    assert stored == "h.1.mlp.c_proj.weight"
    assert arch.canonical_tensor_name(stored) == "transformer.h.1.mlp.c_proj.weight"
    assert arch.mlp_out_layer_of(stored, 2) == 1


def test_unknown_architecture_names_supported_ones():
    with pytest.raises(UnsupportedError) as info:
        arch_table.for_model_type("mamba")
    assert "mamba" in str(info.value) and "llama" in str(info.value) and "gpt2" in str(info.value)
    assert info.value.exit_code == 3


def test_roles_are_complete():
    for model_type in arch_table.supported():
        arch = arch_table.for_model_type(model_type)
        for role in ROLES:
            assert "{layer}" in getattr(arch, role)
        for role in GLOBAL_ROLES:
            assert "{layer}" not in getattr(arch, role)
        assert arch.mlp_in and all("{layer}" in template for template in arch.mlp_in)
