"""editguard inside CI pipelines and hooks: what an upload gate meets (hostile names and configs, an
unwritable workspace, Ctrl-C, the Action and pre-commit files, a non-editable install)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import one_line_error

REPO = Path(__file__).resolve().parent.parent


def _copy_with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_markup_in_a_message_is_printed_as_text(cli, monkeypatch, tmp_path, pico_models):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Rich markup in the model name, in either format: one error line that quotes it, never a crash
    human = cli("scan", "weird/x[/y]")
    one_line_error(human, "weird/x[/y]")
    as_json = cli("-f", "json", "scan", "weird/[red]x")
    assert as_json.code == 2 and "weird/[red]x" in as_json.json["error"]
    # ... or in the model's own config (an unsupported architecture named like a closing tag)
    odd = _copy_with_config(pico_models["llama"], tmp_path / "odd", model_type="[/x]")
    sarif = cli("-f", "sarif", "scan", odd, "--fail-on", "never")
    one_line_error(sarif, "[/x]", code=3)
    notice = sarif.json["runs"][0]["invocations"][0]  # the SARIF log on stdout records the failure
    assert notice["exitCode"] == 3 and "[/x]" in notice["toolExecutionNotifications"][0]["message"]["text"]


def test_config_layer_count_is_checked_against_the_weights(cli, tmp_path, pico_models):
    # transformers would build 10**12 layers before failing: editguard compares with the checkpoint first
    huge = _copy_with_config(pico_models["llama"], tmp_path / "huge", num_hidden_layers=10**12)
    one_line_error(cli("scan", huge, "--tests", "activations"), "config.json says 1000000000000 layers")
    none = _copy_with_config(pico_models["llama"], tmp_path / "none", num_hidden_layers=0)
    one_line_error(cli("inspect", none), "num_hidden_layers is 0")


def test_empty_or_mistyped_values_are_named_not_taken_for_defaults(cli, tmp_path, pico_models):
    """An empty --base or --revision (an unset CI variable) is refused, not read as "none" or the default
    branch; a layer count in config.json that is not a whole number is named as such; --memit-batch with
    ROME is refused as `train` refuses it."""
    one_line_error(cli("scan", pico_models["llama"], "--base", ""), "--base is empty")
    one_line_error(cli("inspect", "org/name", "--revision", ""), "the revision is empty")
    for value in ("2", 2.5):
        odd = _copy_with_config(pico_models["llama"], tmp_path / f"odd{value}", num_hidden_layers=value)
        one_line_error(cli("inspect", odd), f"num_hidden_layers is {value!r}, not a whole number")
    one_line_error(cli("edit", pico_models["llama"], "--fact", "The capital of {}", "--subject", "France", "--target",
                       "Rome", "--bank", tmp_path / "b.safetensors", "--memit-batch", "2"),
                   "--memit-batch applies to --method memit")


def test_unwritable_places_are_bad_input_not_internal_errors(cli, monkeypatch, tmp_path, pico_models):
    from editguard import outputs

    # checked before the scan (root passes any permission test, so the check itself is stubbed here)
    monkeypatch.setattr(outputs.os, "access", lambda path, mode: Path(path) != tmp_path)
    result = cli("scan", pico_models["llama"], "--report", tmp_path / "r.html")
    one_line_error(result, f"no permission to write in {tmp_path}")
    monkeypatch.undo()
    if Path("/proc/self").is_dir():  # permission bits say yes to root; the folder still takes no files
        one_line_error(cli("scan", pico_models["llama"], "--report", "/proc/r.html"), "/proc takes no new files")
    # a cache home that cannot be created
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("EDITGUARD_HOME", str(tmp_path / "file" / "home"))
    one_line_error(cli("inspect", "demo:smollm2-135m"), "set EDITGUARD_HOME to a writable folder")


def test_outputs_never_replace_a_probe_or_mask_file_and_link_loops_are_one_line(cli, tmp_path, pico_models):
    """`scan --report` onto its own --probes or --mask file is refused before the scan; an output path that
    is a symbolic link loop is one clear line for every kind of output."""
    probes = tmp_path / "probes.html"
    probes.write_text('{"prompt": "The official language of France", "subject": "France", "answer": "French"}\n')
    mask = tmp_path / "mask.html"
    mask.write_bytes(b"not really a mask")
    before = probes.read_bytes()
    one_line_error(cli("scan", pico_models["llama"], "--probes", probes, "--report", probes), "overlaps the input")
    one_line_error(cli("scan", pico_models["llama"], "--mask", mask, "--report", mask), "overlaps the input")
    assert probes.read_bytes() == before and mask.read_bytes() == b"not really a mask"
    one_line_error(cli("scan", pico_models["llama"], "--probes", "", "--tests", "hidden"), "--probes is empty")
    one_line_error(cli("inspect", tmp_path / "a\nb"), "a\\nb")  # a line break in what it quotes stays one line
    one_line_error(cli("scan", pico_models["llama"], "--tests", "x\ny"), "unknown test(s) x\\ny")
    (tmp_path / "a.html").symlink_to(tmp_path / "b.html")
    (tmp_path / "b.html").symlink_to(tmp_path / "a.html")
    one_line_error(cli("scan", pico_models["llama"], "--report", tmp_path / "a.html"), "symbolic link loop")
    one_line_error(cli("lock", pico_models["llama"], "--mask", mask, "-o", tmp_path / "a.html"), "symbolic link loop")


def test_os_errors_read_as_the_environment(cli, monkeypatch, pico_models):
    from editguard.cli import inspect_cmd

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/somewhere/r.html")

    monkeypatch.setattr(inspect_cmd, "inspect_model", denied)
    one_line_error(cli("inspect", pico_models["llama"]), "Permission denied: /somewhere/r.html")

    def bug(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(inspect_cmd, "inspect_model", bug)
    verbose = cli("-v", "inspect", pico_models["llama"])
    assert verbose.code == 2 and "Traceback" in verbose.err and "internal error: ValueError: a bug" in verbose.err
    assert "rerun with --verbose" not in verbose.err  # it was


def test_ctrl_c_inside_transformers_is_an_interrupt(cli, monkeypatch, pico_models):
    import transformers

    def interrupted_import(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as stop:  # what transformers' lazy import does with it
            raise RuntimeError("Could not import module 'LlamaForCausalLM'") from stop

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", interrupted_import)
    result = cli("-f", "json", "scan", pico_models["llama"], "--tests", "activations")
    assert result.code == 130 and result.json == {"error": "interrupted", "exit_code": 130}


def test_empty_model_argument_is_refused(cli, tmp_path, pico_models, monkeypatch):
    monkeypatch.chdir(pico_models["llama"])  # Path("") is "." : it would scan the working directory
    one_line_error(cli("inspect", ""), "the model argument is empty")


def test_missing_folder_beside_a_local_folder_is_not_a_hub_id(cli, tmp_path, monkeypatch):
    # a checkout that lacks models/upload must not fetch a hub repo of that name and gate on it instead
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    one_line_error(cli("scan", "models/upload"), "no such folder: models/upload (models/ is a local folder")


def test_model_card_base_must_be_a_hub_id(cli, tmp_path, pico_models, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    shutil.copytree(pico_models["llama"], tmp_path / "models" / "base")  # a hub-id-shaped name that is a folder here
    for declared, reason in ((str(pico_models["llama"]), "no base given"), ("models/base", "no base given"),
                             ("pico-org/base", "declared base 'pico-org/base' not usable")):
        upload = tmp_path / declared.replace("/", "_")
        shutil.copytree(pico_models["llama"], upload)
        (upload / "README.md").write_text(f"---\nbase_model: {declared}\n---\n# a model\n")
        result = cli("-f", "json", "scan", upload, "--tests", "diff")
        assert result.code == 2 and reason in result.json["error"], result.json
    # a resolvable card base is used, and marked as the upload's own claim
    from test_resolve_cli import _fake_hub_cache

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _fake_hub_cache(tmp_path / "hub", "pico-org/base", pico_models["llama"])
    declared = cli("-f", "json", "scan", upload, "--tests", "diff")
    assert declared.code == 0 and declared.json["tests"]["diff"]["declared_by_card"] is True
    assert declared.json["tests"]["diff"]["base_revision"] == "a" * 40  # which commit of the base was compared
    assert "named by the model card: unverified" in cli("scan", upload, "--tests", "diff").err
    given = cli("-f", "json", "scan", upload, "--tests", "diff", "--base", pico_models["llama"])
    assert given.json["tests"]["diff"]["declared_by_card"] is False
    # a card base of another architecture (or one too long to be a path) is the card's mistake: the diff is
    # skipped with the reason and the rest of the scan goes on; the same base given with --base is refused
    _fake_hub_cache(tmp_path / "hub", "pico-org/other", pico_models["qwen2"])
    for declared, reason in (("pico-org/other", "not usable (base is a qwen2 model"), ("a/" + "x" * 300, "not usable")):
        (upload / "README.md").write_text(f"---\nbase_model: {declared}\n---\n# a model\n")
        skipped = cli("-f", "json", "scan", upload, "--tests", "diff")
        assert skipped.code == 2 and "no test could run" in skipped.json["error"], skipped.json
        assert reason in skipped.json["error"], skipped.json
    one_line_error(cli("scan", upload, "--tests", "diff", "--base", "pico-org/other"), "architecture")
    # without a card: config.json's _name_or_path (transformers 4 wrote it), a hub id only
    plain = tmp_path / "plain"
    shutil.copytree(pico_models["llama"], plain)
    for name, found in ((str(pico_models["llama"]), None), ("pico-org/base", "config.json")):
        config = json.loads((plain / "config.json").read_text())
        (plain / "config.json").write_text(json.dumps({**config, "_name_or_path": name}))
        result = cli("-f", "json", "scan", plain, "--tests", "diff")
        if found is None:
            assert result.code == 2 and "no base given" in result.json["error"], result.json
        else:
            assert result.code == 0 and result.json["tests"]["diff"]["declared_by"] == "config.json"
            assert result.json["tests"]["diff"]["base"] == "pico-org/base"


def test_a_card_naming_the_model_itself_is_no_base_and_list_forms_are_read(cli, tmp_path, pico_models, monkeypatch):
    """A card whose `base_model` is the scanned repo itself (any case) would compare the model with itself and
    pass it as identical: it is ignored. The Hub editor's block list and an inline list name the base."""
    from test_resolve_cli import _fake_hub_cache

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _fake_hub_cache(tmp_path / "hub", "pico-org/base", pico_models["llama"])
    for repo, card, expected in (("pico-org/self", "base_model: Pico-Org/Self", None),
                                 ("pico-org/block", "base_model:\n- pico-org/base\n- pico-org/other", "pico-org/base"),
                                 ("pico-org/inline", "base_model: [pico-org/base, pico-org/other]", "pico-org/base")):
        snapshot = _fake_hub_cache(tmp_path / "hub", repo, pico_models["llama"])
        (snapshot / "README.md").write_text(f"---\n{card}\nlicense: mit\n---\n# a model\n")
        result = cli("-f", "json", "scan", repo, "--tests", "diff")
        if expected is None:
            assert result.code == 2 and "no base given" in result.json["error"], result.json
        else:
            assert result.code == 0 and result.json["tests"]["diff"]["base"] == expected, result.json


def test_hub_download_bars_follow_the_output_format(monkeypatch):
    from huggingface_hub.utils import are_progress_bars_disabled

    from editguard.cli import options, state

    seen = []
    monkeypatch.setattr(options, "resolve", lambda *a, **k: seen.append(are_progress_bars_disabled()))
    for fmt, quiet in (("json", False), ("human", True), ("human", False)):
        state.configure(format=fmt, quiet=quiet)
        options.resolve_model("org/name")
    state.configure()
    assert seen == [True, True, False] and not are_progress_bars_disabled()


def _precommit(monkeypatch, argv, codes):
    from editguard.cli import precommit

    calls = []
    monkeypatch.setattr(precommit, "main", lambda args: calls.append(args[-1]) or codes[len(calls) - 1])
    monkeypatch.setattr(precommit.sys, "argv", ["editguard-precommit", *argv])
    with pytest.raises(SystemExit) as stop:
        precommit.run()
    return stop.value.code, calls


def test_precommit_scans_model_folders_only_and_stops_on_ctrl_c(monkeypatch, tmp_path, pico_models, capsys):
    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):
        shutil.copytree(pico_models["llama"], tmp_path / name)
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "config.json").write_text('{"port": 8080}')  # an application's config, not a model
    code, calls = _precommit(monkeypatch, ["app/config.json", "a/config.json", "b/model.safetensors"], [0, 1])
    assert (code, calls) == (1, ["a", "b"])
    assert capsys.readouterr().err.splitlines() == ["editguard-precommit: a", "editguard-precommit: b"]
    code, calls = _precommit(monkeypatch, ["a/config.json", "b/config.json"], [130, 0])
    assert (code, calls) == (130, ["a"])  # interrupted: b is not scanned


def test_action_and_hooks_are_valid_and_name_real_commands():
    scripts = {line.split("=")[0].strip() for line in (REPO / "pyproject.toml").read_text().splitlines()
               if line.startswith("editguard")}
    hooks = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())
    assert {h["entry"] for h in hooks} <= scripts and {h["language"] for h in hooks} == {"python", "system"}
    action = yaml.safe_load((REPO / "action.yml").read_text())  # it was not valid YAML once
    steps = {s.get("id") or s.get("name") or s["uses"]: s for s in action["runs"]["steps"]}
    script = steps["scan"]["run"]
    assert 'if [ -z "$MODEL" ]' in script and "mkdir -p" in script and "-- \"$MODEL\"" in script
    for name in ("base", "lock-digest", "fail-on"):  # each scan input reaches the option of its name
        assert "${{ inputs.%s }}" % name in steps["scan"]["env"].values() and f"--{name} " in script, name
    upload = steps["Upload SARIF"]
    assert "steps.scan.outputs.code == '1'" in upload["if"] and upload["with"]["category"]


def test_installed_wheel_carries_the_shipped_masks(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 68:
        pytest.skip(f"setuptools {setuptools.__version__} is older than pyproject's build requirement")
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "logs", "runs", "build", "*.egg-info",
                                                                "banks", "*.png"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
    # pyproject lists the packages by hand (to map masks/ in): a new subpackage must not be left out
    for package in (REPO / "editguard").glob("*/__init__.py"):
        assert (tmp_path / "site" / package.relative_to(REPO)).is_file(), package.parent.name
    shipped = json.loads((REPO / "masks" / "index.json").read_text())
    for entry in shipped:
        assert (tmp_path / "site" / "editguard" / "masks" / entry["file"]).is_file(), entry["file"]
    probe = ("import json, editguard.masks_index as m; "
             "print(json.dumps([str(d) for d in m.mask_dirs()] + [e['file'] for e in m.entries()]))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin",
                                            "EDITGUARD_HOME": str(tmp_path / "home")})
    found = json.loads(out.stdout)
    assert found[0] == str(tmp_path / "site" / "editguard" / "masks")
    assert sorted(found[1:]) == sorted(e["file"] for e in shipped)


@pytest.mark.parametrize("command", ["scan", "reverse", "lock", "train", "evaluate-mask"])
def test_placement_options_reach_the_loader(cli, pico_models, monkeypatch, tmp_path, command):
    """--max-memory and --offload-folder on every command that loads a model: parsed once, passed to
    load_model as given (the loader stops the command there: what follows has each command's own tests)."""
    import torch

    import editguard.cli.train_cmd
    import editguard.loading
    from editguard.checkpoint import Checkpoint, fingerprint
    from editguard.mask.file import MaskFile, MaskTarget

    seen = []

    def stop(ref, **options):
        seen.append(options)
        raise KeyboardInterrupt

    monkeypatch.setattr(editguard.loading, "load_model", stop)
    monkeypatch.setattr(editguard.cli.train_cmd, "load_model", stop)
    model = str(pico_models["llama"])
    tensor = "model.layers.1.mlp.down_proj.weight"  # a mask that fits the pico model, for lock
    MaskFile("pico", None, "llama", "rome", 0.5, [MaskTarget(tensor, 1, (32, 64), False, fingerprint(
        Checkpoint(pico_models["llama"]).read(tensor)), torch.rand(32, 64))]).save(tmp_path / "mask.safetensors")
    args = {"scan": ["scan", model, "--tests", "activations"],
            "reverse": ["reverse", model, "-o", tmp_path / "out", "--method", "svd", "--layers", "1", "--eval"],
            "lock": ["lock", model, "--mask", tmp_path / "mask.safetensors", "--evaluate", "2", "--hparams", "smollm2-135m"],
            "train": ["train", "--model", model, "--hparams", "smollm2-135m", "--layer", "1",
                      "-o", tmp_path / "m.safetensors"],
            "evaluate-mask": ["evaluate-mask", REPO / "masks/smollm2-135m_rome_L9.safetensors", "--model", model,
                              "--bank", REPO / "banks/smollm2-135m_rome_L9.safetensors"]}[command]
    result = cli(*args, "--max-memory", "cpu=1GiB", "--offload-folder", tmp_path / "offload")
    assert result.code == 130, result.err
    assert seen[-1]["max_memory"] == {"cpu": "1GiB"} and seen[-1]["offload_folder"] == str(tmp_path / "offload")
    one_line_error(cli(*args, "--max-memory", "lots"), "--max-memory: expected DEVICE=SIZE pairs, got 'lots'")
    for value, why in (("cpu=abc", "'abc' for cpu is not a size"), ("cpu=-5GB", "is not a size"),
                       ("7=1GB", "no GPU 7 on this machine"), ("gpu=1GB", "unknown device 'gpu'")):
        one_line_error(cli(*args, "--max-memory", value), why)


def test_base_revision_reaches_the_base_only(cli, pico_models, tmp_path):
    """--base-revision (scan, reverse) resolves the base at that revision, not the model: a local base
    refuses one, as a local model refuses --revision."""
    model = pico_models["llama"]
    for args in (["scan", model, "--tests", "diff"], ["reverse", model, "-o", tmp_path / "out", "--method", "base"]):
        one_line_error(cli(*args, "--base", pico_models["llama"], "--base-revision", "v1"),
                       f"a revision applies to hub ids only; {pico_models['llama']} is a local model")
    one_line_error(cli("scan", model, "--revision", "v1"), "a revision applies to hub ids only")
    for args in (["scan", model], ["reverse", model, "-o", tmp_path / "out"]):  # never applied to a declared base
        one_line_error(cli(*args, "--base-revision", "v1"), "--base-revision needs --base")


def test_demo_removes_its_model_copies_unless_kept(cli, monkeypatch, tmp_path):
    """`editguard demo` writes four model copies (~2 GB for SmolLM2): in a temporary folder removed at the
    end, also when interrupted, unless --workdir keeps them. (The audit itself runs in the README's `make demo`.)"""
    import editguard.cli.demo_cmd as demo

    folders, layers = [], []

    def audit(model, ref, hp, folder, lock_check, stop=False):
        layers.append(hp.layers)
        (folder / "edited").mkdir(exist_ok=True)  # the real audit replaces its own folders
        folders.append(folder)
        if stop:
            raise KeyboardInterrupt
        return {"model": model, "workdir": str(folder), "scan_without_base": {"verdict": "edited", "tests": {}},
                "plant": {"fact": "F is", "new": "N", "true": "T", "layer": 6, "p_new": 0.9, "efficacy": True,
                          "model": "/gone/edited"},
                "scan_with_base": {"verdict": "edited", "diff": {"classification": "rome-like", "layers": [6]}},
                "reverse": {"edited": {"logp_true": -5.0, "logp_new": -1.0},
                            "project": {"logp_true": -1.0, "logp_new": -4.0, "restored": True, "model": "/gone/rp"},
                            "mask": {"logp_true": -1.5, "logp_new": -3.0, "restored": True, "model": "/gone/rm",
                                     "mask": "/x/shipped.safetensors"}},
                "lock": {"mask": "m.safetensors", "model": "/gone/locked"}}

    monkeypatch.setattr(demo, "_audit", audit)
    model_folder = tmp_path / "model"
    monkeypatch.setattr(demo, "resolve_model", lambda spec: SimpleNamespace(path=model_folder, spec=spec))
    monkeypatch.setattr(demo, "num_layers_of", lambda ref: 30)
    done = cli("-f", "json", "demo")
    assert done.code == 0 and done.json["models_kept"] is False and not folders[-1].exists()
    assert cli("-q", "demo", "--layer", "9").code == 0 and layers[-2:] == [[6], [9]]  # the preset's, then asked
    one_line_error(cli("demo", "--layer", "30", "--workdir", tmp_path / "never"), "layer 30 is out of range")
    assert not (tmp_path / "never").exists()  # checked before any folder is made
    kept = cli("-f", "json", "demo", "--workdir", tmp_path / "keep")
    assert kept.json["models_kept"] is True and (tmp_path / "keep" / "edited").is_dir()
    told = cli("demo").err  # people are not pointed at removed folders
    assert "true answer restored" in told and "/gone/" not in told and "were removed" in told
    assert "with the shipped mask shipped.safetensors" in told  # the demo names the mask it reversed with
    assert "/gone/rp" in cli("demo", "--workdir", tmp_path / "keep2").err
    again = cli("-f", "json", "demo", "--workdir", tmp_path / "keep")  # its own earlier workdir: fine
    assert again.code == 0, again.err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "edited").mkdir()  # someone's model folder, named like the demo's
    one_line_error(cli("demo", "--workdir", foreign), "was not made by editguard demo")
    one_line_error(cli("demo", "--workdir", model_folder / "sub"), "overlaps the model folder")
    monkeypatch.setattr(demo, "_audit", lambda *a: audit(*a, stop=True))
    assert cli("demo").code == 130 and not folders[-1].exists()
    one_line_error(cli("demo", "--model", "org/x"), "runs on a demo model")
