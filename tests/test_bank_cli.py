"""Edit bank (append, resume, corruption) and the `edit` command's contract, on a pico model."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml

from editguard.edit.bank import FORMAT, EditBank
from editguard.edit.hparams import hparams_from_dict
from editguard.errors import EditguardError

PICO_YAML = {"alg_name": "ROME", "layers": [0], "context_template_length_params": [[5, 5]], "v_num_grad_steps": 6,
             "facts_per_batch": 2}


PICO_MEMIT_YAML = {"alg_name": "MEMIT", "layers": [0, 1], "context_template_length_params": [[5, 5]],
                   "v_num_grad_steps": 6, "mom2_update_weight": 100.0, "mom2_n_samples": 10}


@pytest.fixture
def hparams_file(tmp_path):
    path = tmp_path / "pico.yaml"
    path.write_text(yaml.safe_dump(PICO_YAML))
    return path


@pytest.fixture
def memit_hparams_file(tmp_path):
    path = tmp_path / "memit.yaml"
    path.write_text(yaml.safe_dump(PICO_MEMIT_YAML))
    return path


@pytest.fixture
def facts_file(tmp_path):
    """A flat EasyEdit-format file with one malformed record (subject missing from its prompt)."""
    records = [
        {"case_id": 1, "prompt": "The official language of France", "subject": "France", "target_new": "Japanese",
         "ground_truth": "French", "rephrase_prompt": "the language of France", "locality_prompt": "the language of Spain",
         "locality_ground_truth": "Spanish"},
        {"case_id": 2, "prompt": "the capital of Germany", "subject": "Germany", "target_new": "Rome",
         "ground_truth": "Berlin", "rephrase_prompt": "the capital city of Germany"},
        {"case_id": 3, "prompt": "the capital of Italy", "subject": "Spain", "target_new": "Paris", "ground_truth": "Rome"},
        {"case_id": 4, "prompt": "the mother tongue of Danielle Darrieux", "subject": "Danielle Darrieux",
         "target_new": "German", "ground_truth": "French"},
    ]
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(records))
    return path


def test_plant_via_cli(cli, pico_models, hparams_file, tmp_path):
    out = tmp_path / "edited"
    result = cli("-f", "json", "edit", pico_models["llama"], "--fact", "The official language of {}",
                 "--subject", "France", "--target", "Japanese", "--hparams", hparams_file, "-o", out, "--eval")
    assert result.code == 0, result.err
    data = result.json
    assert data["tensors"] == ["model.layers.0.mlp.down_proj.weight"]
    assert data["rewritten_files"] == ["model.safetensors"]
    assert data["facts"][0]["before"] is not None and data["quality"]["n"] == 1
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    again = cli("edit", pico_models["llama"], "--fact", "The official language of {}", "--subject", "France",
                "--target", "Japanese", "--hparams", hparams_file, "-o", out)
    assert again.code == 2 and "already exists" in again.err


def test_edit_selects_counterfact_records(cli, pico_models, hparams_file, facts_file, tmp_path):
    """--counterfact IDS picks those records (from --data here, the shipped splits by default); a split name
    with --limit takes its first records: each planted and shown before/after."""
    picked = cli("-f", "json", "edit", pico_models["llama"], "--data", facts_file, "--counterfact", "1,4",
                 "--hparams", hparams_file, "-o", tmp_path / "picked")
    assert picked.code == 0, picked.err
    assert [f["prompt"] for f in picked.json["facts"]] == ["The official language of France",
                                                          "the mother tongue of Danielle Darrieux"]
    split = cli("-f", "json", "edit", pico_models["llama"], "--counterfact", "rome-test", "--limit", "2",
                "--hparams", hparams_file, "-o", tmp_path / "split")
    assert split.code == 0, split.err
    from editguard.data.counterfact import load_split

    first = load_split("rome-test")[:2]
    assert [f["prompt"] for f in split.json["facts"]] == [r.prompt.format(r.subject) for r in first]


def test_bank_fill_resume_and_corruption(cli, pico_models, hparams_file, facts_file, tmp_path):
    bank_path = tmp_path / "bank.safetensors"
    args = ["edit", pico_models["gpt2"], "--data", facts_file, "--hparams", hparams_file, "--bank", bank_path]
    first = cli("-f", "json", *args, "--limit", "2")
    assert first.code == 0, first.err
    assert first.json["edits"] == 2
    bank = EditBank.open(bank_path)
    assert sorted(bank.case_ids()) == [1, 2]
    u, v = bank.rome_factors()
    assert u.shape == (2, 32) and v.shape == (2, 128)  # gpt2 pico: out 32, in 128 ([out, in] canonical)
    assert cli(*args).code == 2  # exists, no --resume
    resumed = cli("-f", "json", *args, "--resume")
    assert resumed.code == 0, resumed.err
    bank = EditBank.open(bank_path)
    assert sorted(bank.case_ids()) == [1, 2, 4]  # record 3 is malformed and skipped
    assert torch.equal(bank.rome_factors([0, 1])[0], u)  # earlier edits kept as they were
    assert "skipped record 2" in cli(*args, "--resume").err
    # another layer = other hyperparameters: refused
    other = cli(*args, "--resume", "--layer", "1")
    assert other.code == 2 and "other hyperparameters" in other.err
    # the same edited tensor in a model changed elsewhere (a fine-tune of other layers): refused
    tweaked = tweak_other_tensor(pico_models["gpt2"], tmp_path / "tweaked", "h.1.attn.c_attn.weight")
    refused = cli(*["edit", tweaked, *args[2:]], "--resume")
    assert refused.code == 2 and "another model's weights" in refused.err, refused.err
    # corrupted bank: one clear line
    data = bank_path.read_bytes()
    bank_path.write_bytes(data[: len(data) - 100])
    broken = cli(*args, "--resume")
    assert broken.code == 2 and "corrupted edit bank" in broken.err and "Traceback" not in broken.err
    with pytest.raises(EditguardError):
        EditBank.open(bank_path)
    # a bank whose metadata lacks a field, or holds one of the wrong kind: one clear error, not a KeyError
    from safetensors.torch import save_file
    for meta, message in (({"format": FORMAT}, "missing 'records'"),
                          ({"format": FORMAT, "records": None, "method": "rome", "groups": [], "hparams": {},
                            "hparams_hash": "", "fingerprints": {}, "context_templates": ["{}"]},
                           "must be lists"),
                          ({"format": FORMAT, "records": [{"case_id": 1}], "method": "rome", "groups": [], "hparams": {},
                            "hparams_hash": "", "fingerprints": {}, "context_templates": ["{}"]},
                           "must name its layer"),
                          ({"format": FORMAT, "records": [{"case_id": 1}], "method": "memit", "hparams": {},
                            "groups": [{"records": [0, 3], "layers": [0], "tensors": ["w"]}],
                            "hparams_hash": "", "fingerprints": {}, "context_templates": ["{}"]},
                           "record numbers below 1"),
                          ({"format": FORMAT, "records": [{"case_id": 1}], "method": "memit", "hparams": {},
                            "groups": [{"records": [0], "layers": [0, 1], "tensors": ["w"]}],
                            "hparams_hash": "", "fingerprints": {}, "context_templates": ["{}"]},
                           "as many tensors as layers")):
        save_file({"x": torch.zeros(1)}, tmp_path / "odd.safetensors", metadata={"editguard": json.dumps(meta)})
        with pytest.raises(EditguardError, match=message):
            EditBank.open(tmp_path / "odd.safetensors")
    # factors a bank's records do not account for (an append would pair them with other edits), and MEMIT
    # factors of two ranks: corrupted, not a shape error later
    empty = {"format": FORMAT, "records": [], "method": "rome", "groups": [], "hparams": {}, "hparams_hash": "",
             "fingerprints": {}, "context_templates": ["{}"]}
    memit = {**empty, "method": "memit", "records": [{"case_id": 1}],
             "groups": [{"records": [0], "layers": [0], "tensors": ["w"]}]}
    for meta, tensors in ((empty, {"rome.u": torch.zeros(2, 4), "rome.v": torch.zeros(2, 8)}),
                          (memit, {"memit.0.0.u": torch.zeros(4, 2), "memit.0.0.v": torch.zeros(8, 3)})):
        save_file(tensors, tmp_path / "odd.safetensors", metadata={"editguard": json.dumps(meta)})
        with pytest.raises(EditguardError, match="corrupted edit bank"):
            EditBank.open(tmp_path / "odd.safetensors")
    # a bank's case ids are the facts it was made from: the same ids naming other facts (another data file)
    # are refused wherever edits are taken from a bank by id, never judged against the wrong edit
    from editguard.data.counterfact import load
    from editguard.edit.facts import Fact
    from editguard.mask.splits import RomeSplit

    good = tmp_path / "good.safetensors"
    assert cli(*["edit", pico_models["gpt2"], "--data", facts_file, "--hparams", hparams_file, "--bank", good,
                 "--limit", "1"]).code == 0
    bank = EditBank.open(good)
    (record,) = load(str(facts_file)).records[:1]
    fact = Fact.from_record(record)
    assert len(RomeSplit.from_bank(bank, [fact]).edits) == 1
    other = Fact(fact.prompt, fact.subject, "German", fact.target_true, fact.case_id, fact.relation)
    with pytest.raises(EditguardError, match="holds case 1 as another fact"):
        RomeSplit.from_bank(bank, [other])


def tweak_other_tensor(model, out, tensor: str):
    """A copy of `model` with one tensor the edits do not touch scaled (nothing else changed)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model, out)
    weights = load_file(out / "model.safetensors")
    names = [n for n in weights if n.endswith(tensor)]
    assert len(names) == 1, list(weights)
    weights[names[0]] = weights[names[0]] * 1.01
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("args, message", [
    (["--fact", "The capital of Italy", "--subject", "Spain", "--target", "Paris"], "does not occur in prompt"),
    (["--fact", "The capital of {}", "--subject", "Italy", "--target", "   "], "empty target"),
    (["--fact", "The capital of {}", "--subject", "Italy", "--target", "Paris", "--layer", "7"], "out of range"),
    (["--fact", "The capital of {}", "--subject", "Italy"], "needs its own --subject and --target"),
    (["--counterfact", "999999999"], "not in the data"),
    (["--counterfact", "1-999999999"], "at most 100,000 ids"),  # would build a billion-item list
    (["--counterfact", "9-2"], "bad case id range '9-2'"),
])
def test_edit_bad_inputs(cli, pico_models, hparams_file, tmp_path, args, message):
    result = cli("edit", pico_models["llama"], *args, "--hparams", hparams_file, "-o", tmp_path / "x")
    assert result.code == 2, result.err
    assert message in result.err and "Traceback" not in result.err
    assert len(result.err.strip().splitlines()) == 1, result.err


def test_target_that_tokenizes_to_nothing(cli, pico_models, hparams_file, tmp_path):
    # the pico tokenizer drops nothing, so use a target made only of whitespace-like characters
    result = cli("edit", pico_models["llama"], "--fact", "The capital of {}", "--subject", "Italy",
                 "--target", "\u200b", "--hparams", hparams_file, "-o", tmp_path / "x")
    assert result.code == 2 and "tokenizes to nothing" in result.err


def test_bad_hparams(cli, pico_models, tmp_path):
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(yaml.safe_dump({**PICO_YAML, "v_lrr": 0.1}))
    result = cli("edit", pico_models["llama"], "--fact", "The capital of {}", "--subject", "Italy", "--target", "Paris",
                 "--hparams", unknown, "-o", tmp_path / "x")
    assert result.code == 2 and "unknown key(s) v_lrr" in result.err
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump({**PICO_YAML, "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj"}))
    result = cli("edit", pico_models["llama"], "--fact", "The capital of {}", "--subject", "Italy", "--target", "Paris",
                 "--hparams", wrong, "-o", tmp_path / "x")
    assert result.code == 2 and "does not resolve" in result.err
    result = cli("edit", pico_models["llama"], "--fact", "The capital of {}", "--subject", "Italy", "--target", "Paris",
                 "--hparams", "no-such-preset", "-o", tmp_path / "x")
    assert result.code == 2 and "presets" in result.err
    for extra, message in (({"rewrite_module_tmp": "model.layers.{}.mlp.gate_proj"}, "must name the MLP output projection"),
                           ({"lm_head_module": "lm_haed"}, "lm_head_module 'lm_haed' does not resolve on this model"),
                           ({"attn_module_tmp": "model.layers.{}.attn"}, "attn_module_tmp 'model.layers.{}.attn' does "
                                                                          "not resolve"),
                           ({"v_num_grad_steps": -5}, "v_num_grad_steps must be at least 1"),
                           ({"v_lr": float("nan")}, "v_lr must be a finite number")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({**PICO_YAML, **extra}))
        result = cli("edit", pico_models["llama"], "--fact", "The capital of {}", "--subject", "Italy", "--target",
                     "Paris", "--hparams", bad, "-o", tmp_path / "x")
        assert result.code == 2 and message in result.err, result.err


@pytest.mark.parametrize("extra, message", [
    ({"v_lr": float("inf")}, "v_lr must be a finite number"),
    ({"early_stop_loss": -1}, "early_stop_loss must not be negative"),
    ({"mom2_dtype": "bogus"}, "mom2_dtype must be one of"),
    ({"context_template_length_params": [[-5, 10]]}, "context_template_length_params values must be at least 1"),
    ({"context_template_length_params": 5}, "list of [length, count] pairs"),
    ({"seed": -1}, "seed must lie in [0, 2^63)"),
    ({"seed": 2 ** 64}, "seed must lie in [0, 2^63)"),
    ({"v_lr": 10 ** 400}, "v_lr must be a finite number"),
    ({"attn_module_tmp": "model.layers.attn"}, "attn_module_tmp must hold one {}"),
    ({"layers": True}, "layers must be a whole number"),
    ({"v_num_grad_steps": 2.7}, "v_num_grad_steps must be a whole number"),
    ({"mom2_adjustment": "false"}, "mom2_adjustment must be true or false"),
    ({"kl_factor": "x"}, "kl_factor must be a finite number, got 'x'"),
    ({"rewrite_module_tmp": 5}, "rewrite_module_tmp must be a string"),
    ({"rewrite_module_tmp": "model.layers.0.mlp.down_proj"}, "must hold one {} for the layer number"),
    ({"mlp_module_tmp": "model.layers.{}.mlp.{}"}, "mlp_module_tmp must hold one {}"),
    ({"layer_module_tmp": "model.layers.{0}"}, "layer_module_tmp must hold one {}"),
    ({"mom2_adjustment": True, "mom2_dataset": "wikipedia"}, "needs a Wikipedia dump"),
    ({"mom2_adjustment": True, "mom2_dataset": "/no/such/corpus.txt"}, "neither wikitext2 nor a text file"),
    ({1: "x", "v_lrr": 2}, "unknown key(s) 1, v_lrr"),
])
def test_hparams_values_are_typed_per_key(extra, message):
    """Each wrong value is named with its key; none is coerced (2.7 steps, a quoted "false") or let through."""
    with pytest.raises(EditguardError, match=re.escape(message)):
        hparams_from_dict({**PICO_YAML, **extra}, "rome", "bad.yaml")


def test_memit_needs_a_positive_covariance_weight():
    # λ = 0 leaves K Kᵀ alone, singular with fewer facts than the key width: a broken solve, not an edit
    with pytest.raises(EditguardError, match="mom2_update_weight must be positive for MEMIT"):
        hparams_from_dict({**PICO_YAML, "alg_name": "MEMIT", "mom2_update_weight": 0}, "memit", "bad.yaml")
    assert hparams_from_dict({**PICO_YAML, "mom2_update_weight": 0}, "rome", "ok.yaml").mom2_update_weight == 0


def test_overridden_layers_are_still_checked():
    # `lock --evaluate` and `--layer` replace the YAML's layers; a wrong value there is still named
    with pytest.raises(EditguardError, match="layers must be a whole number, got 'five'"):
        hparams_from_dict({**PICO_YAML, "layers": "five"}, "rome", "bad.yaml", {"layers": [1]})
    assert hparams_from_dict({**PICO_YAML, "layers": [0]}, "rome", "ok.yaml", {"layers": [1]}).layers == [1]


def test_hparams_accept_yaml_number_strings():
    # PyYAML reads EasyEdit's `v_lr: 5e-1` as the string "5e-1"
    assert hparams_from_dict({**PICO_YAML, **yaml.safe_load("v_lr: 5e-1")}, "rome").v_lr == 0.5


def test_edit_never_writes_non_finite_weights(pico_models, tmp_path, monkeypatch):
    from editguard import arch as arch_table
    from editguard.checkpoint import Checkpoint
    from editguard.edit import plant

    checkpoint = Checkpoint(pico_models["llama"])
    arch = arch_table.for_config(checkpoint.config)
    name = "model.layers.0.mlp.down_proj.weight"
    shape = checkpoint.read(name).shape
    monkeypatch.setattr(plant, "combined_deltas", lambda arch, edits: {name: torch.full(shape, float("nan"))})
    with pytest.raises(EditguardError, match="non-finite"):
        plant.write_edited(checkpoint, arch, [], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_fact_given_twice_is_refused(cli, pico_models, hparams_file, facts_file, tmp_path):
    """Twice in one MEMIT batch edit, or banked twice, a fact would count double: one clear line."""
    twice = cli("edit", pico_models["llama"], "--data", facts_file, "--counterfact", "1,1", "--hparams", hparams_file,
                "-o", tmp_path / "out")
    assert twice.code == 2 and "case 1 is given twice" in twice.err
    fact = ["--fact", "The official language of {}", "--subject", "France", "--target", "Japanese"]
    again = cli("edit", pico_models["llama"], *fact, *fact, "--hparams", hparams_file, "-o", tmp_path / "out")
    assert again.code == 2 and "'The official language of France' -> 'Japanese' is given twice" in again.err
    assert not (tmp_path / "out").exists()


def test_memit_fill_resumes_only_with_its_batch_size(cli, pico_models, facts_file, memit_hparams_file, tmp_path,
                                                     monkeypatch):
    """A MEMIT fill killed between batch edits resumes with the same --memit-batch (other batches would be
    other edits); once finished, the bank carries no pending run and extends with any batch size."""
    from editguard.edit import memit

    hp = memit_hparams_file
    bank_path = tmp_path / "bank.safetensors"
    args = ["edit", pico_models["llama"], "--method", "memit", "--data", facts_file, "--hparams", hp,
            "--bank", bank_path]
    real, calls = memit.memit_edit, []

    def killed_on_the_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(memit, "memit_edit", killed_on_the_second)
    assert cli(*args, "--memit-batch", "1").code == 130
    monkeypatch.setattr(memit, "memit_edit", real)
    assert len(EditBank.open(bank_path)) == 1
    other = cli(*args, "--resume", "--memit-batch", "2")
    assert other.code == 2 and "resume with --memit-batch 1" in other.err
    assert cli(*args, "--resume", "--memit-batch", "1").code == 0
    bank = EditBank.open(bank_path)
    assert len(bank) == 3 and "filling" not in bank.meta and [len(g["records"]) for g in bank.meta["groups"]] == [1, 1, 1]


def test_memit_layers_named_twice_and_unreadable_yaml_are_refused(tmp_path):
    from editguard.edit.hparams import load_hparams

    with pytest.raises(EditguardError, match=re.escape("layers [1, 1] names a layer twice")):
        hparams_from_dict({**PICO_YAML, "alg_name": "MEMIT", "layers": [1, 1]}, "memit", "dup.yaml")
    # EasyEdit's ROME configs name wikipedia with mom2_adjustment false: the corpus is unused, so accepted
    assert hparams_from_dict({**PICO_YAML, "mom2_dataset": "wikipedia"}, "rome").mom2_dataset == "wikipedia"
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00layers")
    with pytest.raises(EditguardError, match="not readable UTF-8 text"):
        load_hparams(str(binary), "rome")


def test_statistics_need_enough_text_and_are_keyed_by_the_corpus_itself(pico_models, tmp_path, monkeypatch):
    from editguard.edit.stats import second_moments
    from editguard.loading import load_model
    from editguard.resolve import resolve

    monkeypatch.setenv("EDITGUARD_HOME", str(tmp_path / "home"))
    loaded = load_model(resolve(str(pico_models["llama"])))
    template = "model.layers.{}.mlp.down_proj"
    short, empty = tmp_path / "short.txt", tmp_path / "empty.txt"
    short.write_text("The capital of France is Paris")
    empty.write_text("")
    with pytest.raises(EditguardError, match="tokens cannot estimate the 64-dimensional second moment"):
        second_moments(loaded, [0], template, str(short), 100)
    with pytest.raises(EditguardError, match="no text"):
        second_moments(loaded, [0], template, str(empty), 100)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "corpus.txt").write_text(" ".join(f"alpha{i % 41} is {i}." for i in range(600)))
    (tmp_path / "b" / "corpus.txt").write_text(" ".join(f"beta{i % 37} was {i * 3}." for i in range(600)))
    first = second_moments(loaded, [0], template, str(tmp_path / "a" / "corpus.txt"), 100)[0]
    second = second_moments(loaded, [0], template, str(tmp_path / "b" / "corpus.txt"), 100)[0]
    assert not torch.equal(first, second)  # one file name, two corpora: two cache entries


def test_counterfact_files_of_one_record_with_a_bom_and_typed_case_ids(tmp_path):
    from editguard.data.counterfact import load_path

    record = {"case_id": 7, "prompt": "The capital of {} is", "subject": "France", "target_new": "Rome",
              "target_true": "Paris"}
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(record) + "\n")
    assert [r.case_id for r in load_path(one).records] == [7]
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps([record, {**record, "case_id": "8"}]).encode())
    assert [r.case_id for r in load_path(bom).records] == [7, 8]
    for bad in (1.9, True, -1, "x1"):
        odd = tmp_path / "odd.json"
        odd.write_text(json.dumps([record, {**record, "case_id": bad}]))
        report = load_path(odd)
        assert [r.case_id for r in report.records] == [7] and "case_id is not a non-negative integer" in report.problems[0][1]
    huge = tmp_path / "huge.json"
    huge.write_text('[{"case_id": 1e999, "prompt": "x {}", "subject": "s", "target_new": "a", "target_true": "b"}]')
    with pytest.raises(EditguardError, match="no usable CounterFact records"):
        load_path(huge)


def test_subject_is_found_as_a_whole_word_and_once(cli, pico_models, hparams_file, facts_file, tmp_path):
    from editguard.edit.facts import fact_from_text

    assert fact_from_text("Romeo lived in Rome", "Rome", "Paris").prompt == "Romeo lived in {}"
    with pytest.raises(EditguardError, match="occurs 2 times"):
        fact_from_text("Rome is older than Rome", "Rome", "Paris")
    result = cli("edit", pico_models["llama"], "--counterfact", "rome-test", "--data", facts_file,
                 "--hparams", hparams_file, "-o", tmp_path / "x")
    assert result.code == 2 and "give one or the other" in result.err, result.err


def test_bank_eval_judges_this_runs_facts(cli, pico_models, hparams_file, memit_hparams_file, tmp_path):
    bank = tmp_path / "bank.safetensors"
    first = ["--fact", "The capital of {}", "--subject", "France", "--target", "Rome"]
    second = ["--fact", "The language of {}", "--subject", "Germany", "--target", "Japanese"]
    assert cli("edit", pico_models["llama"], *first, "--hparams", hparams_file, "--bank", bank).code == 0
    result = cli("-f", "json", "edit", pico_models["llama"], *second, "--hparams", hparams_file, "--bank", bank,
                 "--resume", "--eval")
    assert result.code == 0, result.err
    assert result.json["edits"] == 2 and result.json["quality"]["n"] == 1  # this run's fact only
    # MEMIT: each fact judged under its whole batch edit, as `edit -o --eval` judges a planted batch
    memit_bank = tmp_path / "memit.safetensors"
    assert cli("edit", pico_models["llama"], *first, "--method", "memit", "--hparams", memit_hparams_file,
               "--bank", memit_bank).code == 0
    memit = cli("-f", "json", "edit", pico_models["llama"], *first, *second, "--method", "memit", "--hparams",
                memit_hparams_file, "--bank", memit_bank, "--resume", "--memit-batch", "2", "--eval")
    assert memit.code == 0, memit.err
    quality = memit.json["quality"]
    assert memit.json["edits"] == 2 and quality["n"] == 2  # the earlier batch's fact and this run's
    from editguard.edit.bank import EditBank
    from editguard.edit.quality import bank_quality, judge
    from editguard.loading import load_model
    from editguard.resolve import resolve

    loaded, bank = load_model(resolve(str(pico_models["llama"]))), EditBank.open(memit_bank)
    germany = bank.edits([1])[0].facts  # the second batch's one fact
    unedited = judge(loaded, germany)[0].new_prob
    edited = bank_quality(loaded, bank, germany)
    assert len(edited) == 1 and edited[0].new_prob > unedited  # judged under its batch edit...
    assert judge(loaded, germany)[0].new_prob == unedited  # ...which is taken off again
