"""`editguard inspect MODEL`: what the checkpoint is and where ROME/MEMIT would write."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from ..inspect import inspect_model
from .app import app
from .options import AllowPickle, ModelArg, Revision, resolve_model
from .output import human_bytes
from . import state


@app.command("inspect")
def inspect_command(model: ModelArg, revision: Revision = None, allow_pickle: AllowPickle = False) -> None:
    """Architecture, layers, edit-target tensors (names, shapes, shards), files, and the mask that fits."""
    ref = resolve_model(model, revision, allow_pickle)
    state.out().emit(inspect_model(ref, allow_pickle=allow_pickle), _render)


def _render(console, info: dict) -> None:
    tied = "tied" if info["tied_embeddings"] else "untied"
    heads = info["attention_heads"]
    shown = "" if heads["query"] is None else f"{heads['query']} heads" + (
        f" ({heads['key_value']} key/value)" if heads["key_value"] != heads["query"] else "") + ", "
    console.print(f"[bold]{escape(info['model'])}[/]  {info['architecture']} ({escape(str(info['model_class']))}), "
                  f"{info['num_layers']} layers, hidden {info['hidden_size']}, {shown}{'/'.join(info['dtypes'])}, "
                  f"{tied} embeddings, {info['num_tensors']} tensors ({info['weight_format']})")
    console.print(f"folder: {escape(str(info['folder']))}" + (f"  revision: {escape(info['revision'])}" if info["revision"] else ""))
    targets = info["edit_targets"]
    table = Table(title=f"edit targets: {targets['role']}, stored {escape(targets['stored_orientation'])}",
                  title_justify="left", box=None, pad_edge=False)
    for column in ("layer", "tensor", "shape", "dtype", "shard"):
        table.add_column(column)
    for row in targets["layers"]:
        table.add_row(str(row["layer"]), row["tensor"], escape(str(row["stored_shape"])), row["dtype"], row["file"])
    console.print(table)
    console.print("files: " + ", ".join(f"{f['name']} ({human_bytes(f['bytes'])})" for f in info["files"]))
    if info["masks"]:
        for mask in info["masks"]:
            console.print(f"mask: {mask['file']} ({mask['method']}, layers {mask['layers']}, {mask['tensors']} "
                          f"tensor{'s' if mask['tensors'] != 1 else ''}, {mask['match']} match{_mask_figures(mask)})")
    else:
        console.print("mask: none of the shipped masks fits this model")


def _mask_figures(mask: dict) -> str:
    """The card's test RSR and what the mask alone costs in perplexity, where the index has them."""
    figures = []
    if mask.get("test_rsr") is not None:
        figures.append(f"test RSR {100 * mask['test_rsr']:.1f} %")
    if mask.get("perplexity_increase") is not None:
        figures.append(f"perplexity {100 * mask['perplexity_increase']:+.1f} %")
    return "".join(f", {f}" for f in figures)
