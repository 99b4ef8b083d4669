"""`editguard-precommit FILES...`: scan each model folder that holds a changed file (pre-commit hook)."""

from __future__ import annotations

import sys
from pathlib import Path

from .app import main


def run() -> None:
    folders = sorted({str(Path(f).parent) for f in sys.argv[1:] if (Path(f).parent / "config.json").is_file()})
    worst = 0
    for folder in folders:
        code = main(["scan", "--fail-on", "edited", "--", folder])  # "--": a folder named like an option is a folder
        worst = max(worst, code)
    sys.exit(worst)
