"""Command-line shell over the editguard library: one module per command."""

from .app import app, main, run

__all__ = ["app", "main", "run"]
