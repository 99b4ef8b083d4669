"""`editguard fetch MODEL`: resolve a model once (download what is needed, or convert a GGUF/demo)."""

from __future__ import annotations

from .. import arch as arch_table
from .app import app
from .options import AllowPickle, ModelArg, Revision, resolve_model
from . import state


@app.command("fetch")
def fetch_command(model: ModelArg, revision: Revision = None, allow_pickle: AllowPickle = False) -> None:
    """Make MODEL available locally (hub download of config/tokenizer/safetensors only, or GGUF conversion)
    and print its folder."""
    ref = resolve_model(model, revision, allow_pickle)
    checkpoint = ref.checkpoint(allow_pickle=allow_pickle)  # validate what we fetched
    arch_table.for_config(checkpoint.config)  # fetched but unsupported: exit 3 now, as every other command would
    data = {"model": ref.spec, "source": ref.kind, "folder": str(ref.path), "revision": ref.revision}
    state.out().emit(data, lambda console, d: print(d["folder"]))
