"""Command-line shell over the editguard library: one module per command."""

from __future__ import annotations

import importlib
import sys

__all__ = ["app", "main", "run"]


def run() -> None:
    """Console-script entry. The commands import torch and transformers (seconds), so that import runs
    inside the Ctrl-C guard too: an interrupt then is one line and exit 130, not a traceback."""
    try:
        from .app import main
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        sys.exit(130)
    sys.exit(main())


def __getattr__(name: str):
    # `from editguard.cli import app, main` imports the commands on first use only
    if name in ("app", "main"):
        module = importlib.import_module(".app", __name__)
        globals().update(app=module.app, main=module.main)  # the submodule import bound `app` to the module
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
