"""`editguard fetch MODEL`: resolve a model once (download what is needed, or convert a GGUF/demo)."""

from __future__ import annotations

from .app import app
from .options import AllowPickle, ModelArg, Revision, resolve_model
from . import state


@app.command("fetch")
def fetch_command(model: ModelArg, revision: Revision = None, allow_pickle: AllowPickle = False) -> None:
    """Make MODEL available locally (hub download of config/tokenizer/safetensors only, or GGUF conversion)
    and print its folder."""
    ref = resolve_model(model, revision, allow_pickle)
    ref.checkpoint(allow_pickle=allow_pickle)  # validate what we fetched
    data = {"model": ref.spec, "source": ref.kind, "folder": str(ref.path), "revision": ref.revision}
    state.out().emit(data, lambda console, d: print(d["folder"]))
