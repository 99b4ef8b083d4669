"""`editguard-precommit FILES...`: scan each model folder that holds a changed file (pre-commit hook)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .app import main


def _is_model_folder(folder: Path) -> bool:
    """A folder whose config.json is a transformers model's (it names a model_type). An application's
    config.json elsewhere in the repository is not scanned; one that is not JSON is (scan reports it)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError):
        return False
    except json.JSONDecodeError:
        return True
    return not isinstance(config, dict) or "model_type" in config


def run() -> None:
    folders = sorted({str(Path(f).parent) for f in sys.argv[1:] if _is_model_folder(Path(f).parent)})
    worst = 0
    for folder in folders:
        if len(folders) > 1:  # which folder each verdict or error line belongs to
            print(f"editguard-precommit: {folder}", file=sys.stderr, flush=True)
        code = main(["scan", "--fail-on", "edited", "--", folder])  # "--": a folder named like an option is a folder
        if code >= 128:  # Ctrl-C or SIGTERM: stop here, do not scan the next folder
            sys.exit(code)
        worst = max(worst, code)
    sys.exit(worst)
