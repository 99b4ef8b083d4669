"""Plain text corpora: the shipped WikiText-2 test split, or any UTF-8 text file."""

from __future__ import annotations

import lzma
from importlib import resources

from ..errors import EditguardError
from ..home import user_path

WIKITEXT = "wikitext2"


def load_text(source: str = WIKITEXT) -> str:
    if source == WIKITEXT:
        return lzma.decompress(resources.files("editguard.data").joinpath("wikitext2_test.txt.xz").read_bytes()).decode()
    path = user_path(source)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EditguardError(f"no such text file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EditguardError(f"{path}: not readable UTF-8 text ({exc.__class__.__name__})") from None
