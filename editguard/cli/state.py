"""The process-wide output settings chosen by the global options."""

from __future__ import annotations

from .output import Output

_out = Output()


def configure(**settings) -> Output:
    global _out
    _out = Output(**settings)
    return _out


def out() -> Output:
    return _out
