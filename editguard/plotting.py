"""matplotlib for the report and the mask cards: the headless backend, and text shown as written."""

from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display; imported only when a figure is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plain(text: str) -> str:
    """`text` as matplotlib should print it: prompts, tensor names and model ids come from the checkpoint
    or the user, and matplotlib reads `$...$` as math (an unbalanced or unknown one fails the whole figure,
    after a scan or a training run) and drops legend labels that start with an underscore."""
    text = str(text).replace("$", r"\$")
    return " " + text if text.startswith("_") else text
