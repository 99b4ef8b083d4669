"""ROME and MEMIT on pico models: the update lands on the right tensor, in the right orientation, and
flips the prediction; the fast path equals EasyEdit's reference loop."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from editguard.checkpoint import Checkpoint
from editguard.edit.edits import edits_applied
from editguard.edit.facts import Fact
from editguard.edit.hparams import hparams_from_dict
from editguard.edit.plant import compute_edits, write_edited
from editguard.errors import EditguardError
from editguard.edit.rome import rome_edit_reference, rome_edits
from editguard.loading import load_model
from editguard.resolve import resolve

# The subject ends each prompt: a 2-layer random model passes little through attention, so the edit is
# read where it is written (CounterFact-style prompts are exercised on the real demo model).
FACT = Fact("The official language of {}", "France", "Japanese", "French")
FACT2 = Fact("the mother tongue of {}", "Danielle Darrieux", "Italian", "French")
PICO_HP = {"layers": [0], "context_template_length_params": [[5, 5]], "v_num_grad_steps": 25, "v_lr": 0.5,
           "clamp_norm_factor": 8}


def _next_token(loaded, text: str) -> int:
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return int(loaded.model(input_ids=ids).logits[0, -1].argmax())


def _target_token(loaded, fact: Fact) -> int:
    return loaded.tokenizer(" " + fact.target_new, add_special_tokens=False).input_ids[0]


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "qwen2"])
def test_rome_lands_on_right_tensor_and_flips(model_type, pico_models, tmp_path):
    loaded = load_model(resolve(str(pico_models[model_type])))
    hp = hparams_from_dict(PICO_HP, "rome")
    target = _target_token(loaded, FACT)
    assert _next_token(loaded, FACT.text) != target
    (edit,) = compute_edits(loaded, [FACT], hp)
    expected_tensor = {"gpt2": "transformer.h.0.mlp.c_proj.weight"}.get(model_type, "model.layers.0.mlp.down_proj.weight")
    assert edit.tensor == expected_tensor
    # orientation: the MLP output at the subject's last token moves along u, and only there (rank one)
    module = loaded.model.get_submodule(edit.tensor.removesuffix(".weight"))
    seen = {}
    handle = module.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o.detach().clone()))
    ids = loaded.tokenizer(FACT.text, return_tensors="pt").input_ids
    with torch.no_grad():
        loaded.model(input_ids=ids)
        before = seen["out"]
        with edits_applied(loaded.model, loaded.arch, [edit]):
            loaded.model(input_ids=ids)
            after = seen["out"]
    handle.remove()
    change = (after - before)[0]
    subject_pos = ids.shape[1] - 1  # the subject's last token ends the prompt
    moved = change[subject_pos]
    assert torch.nn.functional.cosine_similarity(moved, edit.u, dim=0) > 0.999
    # write the checkpoint: only the target tensor changes, by exactly ΔW in the stored orientation
    out = tmp_path / "edited"
    write_edited(loaded.checkpoint, loaded.arch, [edit], out)
    src, dst = Checkpoint(pico_models[model_type]), Checkpoint(out)
    changed = [n for n in src.names() if not torch.equal(src.read(n), dst.read(n))]
    assert changed == [expected_tensor]
    diff = dst.read(expected_tensor) - src.read(expected_tensor)
    stored_shape = (edit.v.numel(), edit.u.numel()) if model_type == "gpt2" else (edit.u.numel(), edit.v.numel())
    assert tuple(diff.shape) == stored_shape
    torch.testing.assert_close(diff, edit.stored_delta(loaded.arch), atol=1e-5, rtol=1e-4)
    assert torch.linalg.matrix_rank(diff, atol=1e-4 * float(diff.abs().max())) == 1
    # the written model predicts the new object
    edited = load_model(resolve(str(out)))
    assert _next_token(edited, FACT.text) == target
    assert _next_token(loaded, FACT.text) != target  # the in-memory model was left unedited


def test_objects_are_tokenized_as_they_follow_the_prompt(pico_models, tmp_path):
    """Llama-2/Mistral-style tokenizers (a dummy "▁" before every text) read " Japanese" alone as
    ["▁", "▁Japanese"], a first token every object shares. Objects are taken as they follow a prompt, so the
    mask's first-token margin compares two different tokens and a planted edit makes the model say
    "Japanese" rather than "▁"."""
    import shutil

    import pico

    from editguard.edit.facts import target_ids

    folder = tmp_path / "llama-spm"
    shutil.copytree(pico_models["llama"], folder)
    pico.dummy_prefix_tokenizer().save_pretrained(folder)
    loaded = load_model(resolve(str(folder)))
    tok = loaded.tokenizer
    assert tok.convert_ids_to_tokens(tok(" Japanese", add_special_tokens=False).input_ids) == ["\u2581", "\u2581Japanese"]
    prompt_ids, full = tok(FACT.text).input_ids, tok(FACT.text + " Japanese").input_ids
    assert target_ids(tok, "Japanese") == full[len(prompt_ids):] == tok.convert_tokens_to_ids(["\u2581Japanese"])
    assert target_ids(tok, "French")[0] != target_ids(tok, "Japanese")[0]
    assert target_ids(pico.tokenizer(), "Japanese") == pico.tokenizer()(" Japanese").input_ids  # others: as before
    (edit,) = compute_edits(loaded, [FACT], hparams_from_dict(PICO_HP, "rome"))
    assert _next_token(loaded, FACT.text) != full[-1]
    with edits_applied(loaded.model, loaded.arch, [edit]):
        assert _next_token(loaded, FACT.text) == full[-1]


def test_fast_path_equals_reference_loop(pico_models):
    loaded = load_model(resolve(str(pico_models["llama"])))
    hp = hparams_from_dict({**PICO_HP, "v_num_grad_steps": 8}, "rome")
    fast = rome_edits(loaded, [FACT, FACT2], hp)
    for fact, edit in zip([FACT, FACT2], fast):
        ref = rome_edit_reference(loaded, fact, hp)
        assert edit.info["steps"] == ref.info["steps"]
        rel = float((edit.delta() - ref.delta()).norm() / ref.delta().norm())
        assert rel < 1e-4, rel


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma3_text"])
def test_memit_batch_flips_both(model_type, pico_models, tmp_path, monkeypatch):
    monkeypatch.setenv("EDITGUARD_HOME", str(tmp_path / "home"))
    loaded = load_model(resolve(str(pico_models[model_type])))
    hp = hparams_from_dict({**PICO_HP, "layers": [0, 1], "mom2_update_weight": 100.0, "mom2_n_samples": 20}, "memit")
    facts = [FACT, FACT2]
    edits = compute_edits(loaded, facts, hp)
    assert [e.layer for e in edits] == [0, 1] and all(e.rank == 2 for e in edits)
    with edits_applied(loaded.model, loaded.arch, edits):
        assert [_next_token(loaded, f.text) for f in facts] == [_target_token(loaded, f) for f in facts]
    out = tmp_path / "memit"
    write_edited(loaded.checkpoint, loaded.arch, edits, out)
    changed = [n for n in Checkpoint(out).names()
               if not torch.equal(Checkpoint(out).read(n), loaded.checkpoint.read(n))]
    assert sorted(changed) == sorted(e.tensor for e in edits)


@pytest.mark.parametrize("params", [[[10, 3]], [[5, 3], [10, 10]], [[5, 7], [4, 0]]])
def test_memit_key_groups_are_the_templates_drawn(params, pico_models, tmp_path, monkeypatch):
    """A count under 5 draws no templates (EasyEdit's count // 5 per starter): MEMIT's key groups follow
    what was drawn, so no key is the mean of an empty group (NaN) or of another group's templates."""
    from editguard.edit.memit import _template_groups
    from editguard.edit.rome import templates_for

    monkeypatch.setenv("EDITGUARD_HOME", str(tmp_path / "home"))
    loaded = load_model(resolve(str(pico_models["llama"])))
    hp = hparams_from_dict({**PICO_HP, "layers": [0, 1], "mom2_update_weight": 100.0, "mom2_n_samples": 20,
                            "context_template_length_params": params}, "memit")
    groups = _template_groups(hp)
    assert groups[0] == (0, 1) and groups[-1][1] == len(templates_for(loaded, hp))
    assert all(stop > start for start, stop in groups) and all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
    edits = compute_edits(loaded, [FACT, FACT2], hp)
    assert all(torch.isfinite(e.delta()).all() for e in edits)


def test_norm_preimage_reaches_what_the_norm_can_reach(pico_models):
    """Gemma normalises the MLP output before the residual: MEMIT asks for the projection output whose
    normalisation is the target. A reachable target (the norm of some other input) is met; the input
    itself comes back for its own output."""
    from editguard.edit.memit import norm_preimage

    loaded = load_model(resolve(str(pico_models["gemma3_text"])))
    norm = loaded.model.get_submodule(loaded.arch.module("mlp_out_norm", 1))
    assert loaded.arch.module("mlp_out_norm", 1) == "model.layers.1.post_feedforward_layernorm"
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(norm.weight.shape, generator=gen))  # a gain that is not all ones
        x, other = torch.randn(4, 32, generator=gen) * 0.1, torch.randn(4, 32, generator=gen) * 0.3
        target = norm(other)
        y = norm_preimage(norm, x, target)
        torch.testing.assert_close(norm(y), target, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(norm_preimage(norm, x, norm(x)), x)
    assert norm.weight.grad is None  # the model's own weights are left alone


def test_memit_reaches_its_target_through_a_normalised_mlp_output(pico_models, tmp_path, monkeypatch):
    """Gemma's MLP output passes a norm before the residual. With its gain at 11 (the demo gemma3's: up to
    ~800), the batch edit must still bring the last edited layer's residual near its target z: it ends
    about a quarter of the way from z where it started (adding the residual change before the norm, as
    MEMIT does where the output joins the residual as it is, left it 0.87 and 0.75 of the way)."""
    from editguard.edit.facts import encode_at_subject
    from editguard.edit.forward import Tokenized, capture_at
    from editguard.edit.memit import memit_spread, memit_targets

    monkeypatch.setenv("EDITGUARD_HOME", str(tmp_path / "home"))
    loaded = load_model(resolve(str(pico_models["gemma3_text"])))
    with torch.no_grad():
        for layer in (0, 1):
            loaded.model.get_submodule(loaded.arch.module("mlp_out_norm", layer)).weight.fill_(10.0)
    hp = hparams_from_dict({**PICO_HP, "layers": [0, 1], "mom2_update_weight": 100.0, "mom2_n_samples": 20}, "memit")
    facts = [FACT, FACT2]
    encoded = [encode_at_subject(loaded.tokenizer, f.prompt, f.subject) for f in facts]
    tokens = Tokenized([ids for ids, _ in encoded], [split for _, split in encoded])

    def residual():
        return capture_at(loaded.model, loaded.arch, tokens, {"z": (hp.layer_module_tmp.format(1), "out")},
                          pad_id=loaded.tokenizer.pad_token_id)["z"].double()

    z = memit_targets(loaded, facts, hp)
    before = residual()
    edits = memit_spread(loaded, facts, hp, z)
    with edits_applied(loaded.model, loaded.arch, edits):
        left = (residual() - z).norm(dim=-1) / (before - z).norm(dim=-1)
        assert [_next_token(loaded, f.text) for f in facts] == [_target_token(loaded, f) for f in facts]
    assert float(left.max()) < 0.5, left


def test_second_moments_match_a_float64_pass(pico_models, tmp_path, monkeypatch):
    # C is summed window by window; each window's product runs in float32 for speed: it must still agree
    # with one float64 pass over the same inputs, and come back from the cache unchanged
    from editguard.edit.stats import WINDOW, second_moments

    monkeypatch.setenv("EDITGUARD_HOME", str(tmp_path / "home"))
    loaded = load_model(resolve(str(pico_models["llama"])))
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97} is number {i}." for i in range(3000)))
    template = "model.layers.{}.mlp.down_proj"
    moments = second_moments(loaded, [0, 1], template, str(text), 1000)
    ids = loaded.tokenizer(text.read_text(), add_special_tokens=False).input_ids
    inputs = {0: [], 1: []}
    hooks = [loaded.model.get_submodule(template.format(layer)).register_forward_pre_hook(
        lambda module, args, layer=layer: inputs[layer].append(args[0].reshape(-1, args[0].shape[-1]).double()))
        for layer in (0, 1)]
    with torch.no_grad():
        for start in range(0, len(ids), WINDOW):
            loaded.model(input_ids=torch.tensor([ids[start: start + WINDOW]]))
    for hook in hooks:
        hook.remove()
    assert len(ids) > 2 * WINDOW  # several windows summed
    for layer in (0, 1):
        x = torch.cat(inputs[layer])
        reference = (x.T @ x / x.shape[0]).float()
        assert torch.allclose(moments[layer], reference, rtol=1e-5, atol=1e-7), layer
        assert torch.equal(second_moments(loaded, [layer], template, str(text), 1000)[layer], moments[layer])


def test_context_templates_match_generate_and_banks_keep_theirs(pico_models, tmp_path):
    """Templates are EasyEdit's sampling (generate, top-k 5) drawn on a CPU generator, so they are the
    same on every device; a bank keeps the templates it was started with when extended."""
    from editguard.edit.generate import bank_writer, fill_bank
    from editguard.edit.rome import templates_for, templates_key
    from editguard.edit.templates import STARTERS, context_templates

    loaded = load_model(resolve(str(pico_models["llama"])))
    ours = context_templates(loaded.model, loaded.tokenizer, [[6, 5]], seed=3)
    torch.manual_seed(3)
    expected = ["{}"]
    for starter in STARTERS:
        ids = loaded.tokenizer(starter, return_tensors="pt").input_ids
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=5, top_p=1.0,
                                    temperature=1.0, max_new_tokens=6 - ids.shape[1],
                                    min_new_tokens=6 - ids.shape[1], pad_token_id=loaded.tokenizer.pad_token_id,
                                    eos_token_id=None)
        expected.append(loaded.tokenizer.decode(out[0], skip_special_tokens=True).replace("{", " ").replace("}", " ")
                        + ". {}")
    assert ours == expected and len(set(ours)) > 2
    hp = hparams_from_dict({**PICO_HP, "v_num_grad_steps": 3}, "rome")
    bank_path = tmp_path / "bank.safetensors"
    fill_bank(loaded, [FACT], hp, bank_path)
    fresh = load_model(resolve(str(pico_models["llama"])))
    fresh.extras[templates_key(hp)] = ["{}", "Something else. {}"]  # what another machine might sample
    bank = fill_bank(fresh, [FACT, FACT2], hp, bank_path, resume=True)
    assert templates_for(fresh, hp) == bank.meta["context_templates"] == templates_for(loaded, hp)
    # a fact without a case id (--fact) is banked once, however often the run resumes; a case id already
    # banked as another fact (another data file reusing the ids) is refused, not mixed in
    assert len(bank) == 2 and len(fill_bank(fresh, [FACT, FACT2], hp, bank_path, resume=True)) == 2
    numbered = bank_path.with_name("numbered.safetensors")
    fill_bank(fresh, [replace(FACT, case_id=5)], hp, numbered)
    with pytest.raises(EditguardError, match="holds case 5 as another fact"):
        fill_bank(fresh, [replace(FACT2, case_id=5)], hp, numbered, resume=True)
    with bank_writer(numbered):  # another process extending the bank: a second writer stops, it does not wait
        with pytest.raises(EditguardError, match="being extended by another editguard process"):
            fill_bank(fresh, [FACT2], hp, numbered, resume=True)


# the demo models' architecture and depth (their GGUFs' configs)
DEMO_SHAPES = {"smollm2-135m": ("llama", 30), "gemma3-270m": ("gemma3_text", 18)}


@pytest.mark.parametrize("demo", sorted(DEMO_SHAPES))
def test_every_demo_model_has_presets_that_fit_it(demo):
    from editguard.arch import for_model_type
    from editguard.demo import DEMOS
    from editguard.edit.hparams import load_hparams

    assert set(DEMO_SHAPES) == set(DEMOS)
    model_type, depth = DEMO_SHAPES[demo]
    arch = for_model_type(model_type)
    for method in ("rome", "memit"):
        hp = load_hparams(demo, method)
        assert all(0 <= layer < depth for layer in hp.layers) and hp.v_loss_layer == depth - 1
        assert [hp.rewrite_module_tmp.format(l) for l in hp.layers] == [arch.module("mlp_out", l) for l in hp.layers]
    # MEMIT's window ends at the ROME layer, as EasyEdit's presets place them
    assert load_hparams(demo, "memit").layers[-1] == load_hparams(demo, "rome").layers[0]


def test_second_moments_reuse_what_another_process_wrote_and_redo_what_is_unreadable(pico_models, tmp_path,
                                                                                      monkeypatch):
    import contextlib

    from editguard.edit import stats

    monkeypatch.setenv("EDITGUARD_HOME", str(tmp_path / "home"))
    loaded = load_model(resolve(str(pico_models["llama"])))
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 89} counts {i}." for i in range(800)))
    template = "model.layers.{}.mlp.down_proj"
    collected, real_collect = [], stats._collect

    def counting_collect(loaded, layers, *args):
        collected.append(list(layers))
        return real_collect(loaded, layers, *args)

    monkeypatch.setattr(stats, "_collect", counting_collect)
    first = stats.second_moments(loaded, [0, 1], template, str(text), 100)
    assert collected == [[0, 1]]
    layer0 = stats._stats_path(loaded, 0, str(text), 100)
    layer1 = stats._stats_path(loaded, 1, str(text), 100)
    layer1.unlink()
    real_lock = stats.file_lock

    @contextlib.contextmanager
    def another_process_finished_first(path):
        # While this process waited for the lock, another one cached layer 1.
        with real_lock(path):
            stats.write_safetensors(layer1, {"mom2": first[1], "count": torch.tensor([1])})
            yield

    monkeypatch.setattr(stats, "file_lock", another_process_finished_first)
    layer0.write_bytes(b"\x00" * 7)  # a damaged cache file: recomputed, not a crash
    again = stats.second_moments(loaded, [0, 1], template, str(text), 100)
    assert collected == [[0, 1], [0]]
    assert all(torch.equal(again[layer], first[layer]) for layer in (0, 1))


def test_context_template_counts_follow_easyedit(pico_models):
    # EasyEdit samples n // 5 texts per starter word: a count under 5 samples none, 12 samples two each
    from editguard.edit.templates import context_templates

    loaded = load_model(resolve(str(pico_models["llama"])))
    assert context_templates(loaded.model, loaded.tokenizer, [[5, 3]]) == ["{}"]
    assert len(context_templates(loaded.model, loaded.tokenizer, [[5, 3], [4, 12]])) == 1 + 10
