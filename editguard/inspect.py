"""What a checkpoint is, read from its headers alone (no weights loaded)."""

from __future__ import annotations

from . import arch as arch_table
from . import masks_index
from .errors import EditguardError
from .resolve import ModelRef


def inspect_model(ref: ModelRef, allow_pickle: bool = False) -> dict:
    checkpoint = ref.checkpoint(allow_pickle=allow_pickle)
    arch = arch_table.for_config(checkpoint.config)
    num_layers = arch.num_layers(checkpoint.config)
    targets = []
    for layer in range(num_layers):
        canonical = arch.weight_name("mlp_out", layer)
        stored = checkpoint.find(arch.tensor_candidates(canonical))
        if stored is None:
            raise EditguardError(f"{ref.spec}: checkpoint lacks {canonical} (layer {layer}'s MLP output projection)")
        info = checkpoint.info(stored)
        out_in = info.shape[::-1] if arch.mlp_out_transposed else info.shape
        targets.append({
            "layer": layer, "tensor": stored, "module": arch.module("mlp_out", layer),
            "stored_shape": list(info.shape), "shape_out_in": list(out_in), "dtype": info.dtype, "file": info.file,
        })
    dtypes = sorted({checkpoint.info(n).dtype for n in checkpoint.names()}) if checkpoint.format == "safetensors" \
        else [targets[0]["dtype"]]
    files = []
    for item in sorted(checkpoint.folder.iterdir()):
        if item.is_file():
            files.append({"name": item.name, "bytes": item.stat().st_size})
    return {
        "model": ref.spec,
        "model_id": ref.model_id,
        "revision": ref.revision,
        "source": ref.kind,
        "folder": str(checkpoint.folder),
        "architecture": arch.model_type,
        "model_class": _model_class(checkpoint.config),
        "num_layers": num_layers,
        "hidden_size": checkpoint.config.get("hidden_size") or checkpoint.config.get("n_embd"),
        "attention_heads": dict(zip(("query", "key_value"), arch.heads(checkpoint.config) or (None, None))),
        "weight_format": checkpoint.format,
        "dtypes": dtypes,
        "tied_embeddings": arch.tied(checkpoint.config),
        "num_tensors": len(checkpoint.names()),
        "edit_targets": {
            "role": "MLP output projection (ROME/MEMIT rewrite target)",
            "stored_orientation": "[in, out] (Conv1D)" if arch.mlp_out_transposed else "[out, in] (Linear)",
            "transposed": arch.mlp_out_transposed,
            "layers": targets,
        },
        "files": files,
        "masks": [
            {"file": m["path"], "method": m.get("method"), "match": m["match"],
             "layers": sorted(set(m.get("layers") or [])),  # a --whole-mlp mask lists its layer per tensor
             "tensors": len(m.get("targets", [])), "test_rsr": m.get("test_rsr"),
             "perplexity_increase": m.get("perplexity_increase")}
            for m in masks_index.fitting(arch, checkpoint)
        ],
    }


def _model_class(config: dict) -> str | None:
    classes = config.get("architectures")
    return classes[0] if isinstance(classes, list) and classes and isinstance(classes[0], str) else None
