"""The cached-prefix, skipped-layer forward equals a full forward, for every architecture."""

from __future__ import annotations

import pytest
import torch

import pico
from editguard.edit import forward
from editguard.edit.forward import Tokenized, build_prefix_cache, injection_point, pad_batch, run_suffix
from editguard.loading import load_model
from editguard.resolve import resolve


@pytest.mark.parametrize("model_type", pico.ARCHS)
@pytest.mark.parametrize("site", ["mlp", "layer"])
def test_suffix_run_matches_full_forward(model_type, site, pico_models, monkeypatch):
    _check_suffix_run(load_model(resolve(str(pico_models[model_type]))), site)
    layout = forward._group_layout  # several rows (with their prefixes) per attention group, as no caller asks yet
    monkeypatch.setattr(forward, "_group_layout", lambda splits, lens, tokens, device: layout(splits, lens, 8, device))
    _check_suffix_run(load_model(resolve(str(pico_models[model_type]))), site)
    monkeypatch.setattr(forward, "GROUPED_ATTENTION_DEVICES", set())  # one masked call per pack, as on a GPU
    _check_suffix_run(load_model(resolve(str(pico_models[model_type]))), site)


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_packed_rows_may_exceed_the_sliding_window(model_type, tmp_path):
    """Each sequence fits the window, all of them packed together do not: the packed run must not
    let the window cut one row's prefix."""
    folder = pico.build(model_type, tmp_path / model_type, sliding_window=10)
    _check_suffix_run(load_model(resolve(str(folder))), "mlp")


def test_a_prefix_longer_than_the_sliding_window_is_one_clear_error(tmp_path):
    """The prefix cache of a sliding-window layer keeps only the window: a prompt whose part up to the
    subject is longer is refused with its length, not an internal error."""
    from editguard.errors import EditguardError

    loaded = load_model(resolve(str(pico.build("gemma3_text", tmp_path / "g", sliding_window=6))))
    seqs = [list(range(3, 15)), list(range(3, 8))]
    with pytest.raises(EditguardError, match="longer than this model's sliding attention window"):
        build_prefix_cache(loaded.model, loaded.arch, Tokenized(seqs, [11, 3]), start=1)


def _check_suffix_run(loaded, site):
    model, arch = loaded.model, loaded.arch
    gen = torch.Generator().manual_seed(0)
    lengths, splits = [7, 4, 9, 5], [3, 1, 6, 4]
    seqs = [torch.randint(3, 150, (n,), generator=gen).tolist() for n in lengths]
    start = 1
    delta = torch.randn(len(seqs), 32, generator=gen)
    path = arch.module(site, start)

    # reference: full forward, right padding, one batch
    ids, mask = pad_batch(seqs, 0)
    full = _full_forward(model, arch, ids, mask, path, patch_at(splits, lambda b, x: x + delta[b]))
    cache = build_prefix_cache(model, arch, Tokenized(seqs, splits), start=start, chunk=3)
    fast = run_suffix(model, arch, cache, add_at_split=(path, delta))
    one_row_per_pack = run_suffix(model, arch, cache, add_at_split=(path, delta), pack_tokens=1)
    torch.testing.assert_close(one_row_per_pack, fast, atol=2e-5, rtol=1e-4)
    for b, (n, s) in enumerate(zip(lengths, splits)):
        torch.testing.assert_close(fast[b, : n - s], full[b, s:n], atol=2e-5, rtol=1e-4)
    # zeroing a module's output at the split (an ablation) equals the same ablation in a full forward
    out_path = arch.module("mlp_out", start)
    ablated = _full_forward(model, arch, ids, mask, out_path, patch_at(splits, lambda b, x: x * 0))
    fast_ablated = run_suffix(model, arch, cache, zero_at_split=[out_path])
    assert not torch.allclose(ablated, full)
    for b, (n, s) in enumerate(zip(lengths, splits)):
        torch.testing.assert_close(fast_ablated[b, : n - s], ablated[b, s:n], atol=2e-5, rtol=1e-4)
    # a subset of rows gives the same rows
    rows = torch.tensor([2, 3])  # short suffixes: the run trims padding to their own width
    sub = run_suffix(model, arch, cache, rows=rows)
    whole = run_suffix(model, arch, cache)
    assert sub.shape[1] == 3 < whole.shape[1]  # padded only to their own longest suffix
    for j, b in enumerate(rows.tolist()):
        n = lengths[b] - splits[b]
        torch.testing.assert_close(sub[j, :n], whole[b, :n], atol=2e-5, rtol=1e-4)


def patch_at(positions, patch):
    """Forward hook: out[b, p] -> patch(b, out[b, p]) at one position per row."""
    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        out = out.clone()
        for b, p in enumerate(positions):
            out[b, p] = patch(b, out[b, p])
        return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out
    return hook


def _full_forward(model, arch, ids, mask, path, hook):
    handle = model.get_submodule(path).register_forward_hook(hook)
    try:
        return model.get_submodule(arch.base)(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        handle.remove()


@pytest.mark.parametrize("model_type", pico.ARCHS)
def test_a_vector_on_the_residual_stream_may_start_the_run_one_layer_higher(model_type, pico_models):
    """δ on layer 0's output, or on its MLP output where the table says that joins the residual stream as
    it is, equals δ added to layer 1's input: the fast path then skips layer 0. Where the table says it
    does not (Gemma's post-feedforward norm), the shortcut would be wrong, and is not taken."""
    loaded = load_model(resolve(str(pico_models[model_type])))
    model, arch = loaded.model, loaded.arch
    gen = torch.Generator().manual_seed(1)
    lengths, splits = [6, 4, 8], [2, 0, 5]
    seqs = [torch.randint(3, 150, (n,), generator=gen).tolist() for n in lengths]
    delta = torch.randn(len(seqs), 32, generator=gen)
    ids, mask = pad_batch(seqs, 0)
    higher = run_suffix(model, arch, build_prefix_cache(model, arch, Tokenized(seqs, splits), start=1),
                        add_to_input=delta)
    for site in ("layer", "mlp"):
        path = arch.module(site, 0)
        full = _full_forward(model, arch, ids, mask, path, patch_at(splits, lambda b, x: x + delta[b]))
        same = all(torch.allclose(higher[b, : n - s], full[b, s:n], atol=2e-5, rtol=1e-4)
                   for b, (n, s) in enumerate(zip(lengths, splits)))
        assert same == (injection_point(model, arch, path, 0) == 1), (site, arch.mlp_adds_to_residual)
