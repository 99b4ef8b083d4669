"""The architecture table: where each model family keeps the pieces editguard reads and rewrites.

Data, not classes: `arch_table.json` holds one row per `config.model_type` with module-path templates
(`{layer}` placeholders). Nothing else in editguard branches on the model family.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, Iterable

from .errors import EditguardError, UnsupportedError

ROLES = ("layer", "mlp", "mlp_out", "attn", "attn_out", "attn_norm", "mlp_norm")  # per-layer module templates
GLOBAL_ROLES = ("base", "final_norm", "embed", "unembed")


@lru_cache(maxsize=1)
def _table() -> dict[str, dict[str, Any]]:
    raw = json.loads(resources.files("editguard").joinpath("arch_table.json").read_text())
    defaults = raw.pop("_defaults")
    raw.pop("_doc", None)
    return {name: {**defaults, **row} for name, row in raw.items()}


def supported() -> list[str]:
    return sorted(_table())


@dataclass(frozen=True)
class Arch:
    model_type: str
    base: str
    layer: str
    mlp: str
    mlp_out: str
    mlp_in: tuple[str, ...]  # the MLP's input projections (hidden -> intermediate), same orientation as mlp_out
    attn: str
    attn_out: str
    attn_norm: str  # the norm whose output the attention reads
    mlp_norm: str  # the norm whose output the MLP reads (GPT-J: the same as attn_norm)
    final_norm: str
    embed: str
    unembed: str
    mlp_out_transposed: bool
    tie_default: bool
    mlp_out_norm: str  # the norm the MLP's output passes before joining the residual stream; "" for none
    rms_norm: bool  # every norm an RMSNorm: residual dimensions may be sign-flipped as well as permuted
    num_layers_keys: tuple[str, ...]
    aliases: tuple[tuple[str, str], ...] = field(default=())
    # the attention's query, key and value projections, each a matrix of its own (empty: one fused matrix)
    attn_in: tuple[str, ...] = field(default=())
    attn_qkv: str = ""  # the one matrix holding query, key and value where they are fused ("" where separate)
    qkv_layout: str = ""  # its output axis: "sections" (all q, all k, all v) or "per_head" (q, k, v per head)
    heads_keys: tuple[str, ...] = field(default=())
    kv_heads_keys: tuple[str, ...] = field(default=())

    @property
    def rotatable(self) -> bool:
        """The residual stream may be rotated without changing the function, once the norms' weights are folded
        into the matrices that read them: every norm an RMSNorm (rotation-equivariant without its weight) and
        no norm on a sublayer's output before it joins the stream (Gemma's would need its weight there)."""
        return self.rms_norm and not self.mlp_out_norm

    @property
    def mlp_adds_to_residual(self) -> bool:
        """The MLP's output joins the residual stream as it is (no norm after it)."""
        return not self.mlp_out_norm

    # -- module paths -------------------------------------------------------------------------
    def module(self, role: str, layer: int | None = None) -> str:
        template = getattr(self, role)
        if "{layer}" in template:
            if layer is None:
                raise ValueError(f"role {role!r} needs a layer index")
            return template.format(layer=layer)
        return template

    def mlp_in_modules(self, layer: int) -> list[str]:
        return [template.format(layer=layer) for template in self.mlp_in]

    def attn_in_modules(self, layer: int) -> list[str]:
        """The query, key and value projections of layer `layer` (none where one fused matrix holds them)."""
        return [template.format(layer=layer) for template in self.attn_in]

    def weight_name(self, role: str, layer: int | None = None) -> str:
        """Canonical tensor name (as the transformers module tree names it)."""
        return self.module(role, layer) + ".weight"

    def tensor_candidates(self, canonical: str) -> list[str]:
        """The canonical name and the other spellings files may use for it (the table's aliases, then the
        base model's own name), in that order."""
        names = [canonical]
        for canon_prefix, stored_prefix in self.aliases:
            if canonical.startswith(canon_prefix):
                names.append(stored_prefix + canonical[len(canon_prefix):])
        if self._in_base_model(canonical):
            names.append(canonical[len(self.base) + 1:])
        return list(dict.fromkeys(names))

    def canonical_tensor_name(self, stored: str) -> str:
        """Inverse of the spellings: how transformers names a tensor a file stores as `stored`."""
        for canon_prefix, stored_prefix in self.aliases:
            if stored.startswith(stored_prefix) and not stored.startswith(canon_prefix):
                return canon_prefix + stored[len(stored_prefix):]
        # transformers loads a base model's checkpoint (`layers.N...`, no `model.`) into the model with a
        # head, so that spelling is the same tensor (and a second copy of it, if both are stored)
        if not stored.startswith(self.base + ".") and self._in_base_model(f"{self.base}.{stored}"):
            return f"{self.base}.{stored}"
        return stored

    def _in_base_model(self, canonical: str) -> bool:
        """`canonical` names a tensor of the base model (a layer's, the embedding's or the final norm's)."""
        roots = (self.layer.split("{layer}")[0], self.embed + ".", self.final_norm + ".")
        return canonical.startswith(roots) and canonical.startswith(self.base + ".")

    def is_mlp_out(self, tensor_name: str, layer: int) -> bool:
        """`tensor_name` (any alias) is layer `layer`'s MLP output projection weight, the tensor edits change."""
        return self.canonical_tensor_name(tensor_name) == self.weight_name("mlp_out", layer)

    def mlp_out_layer_of(self, tensor_name: str, num_layers: int) -> int | None:
        """Layer index if `tensor_name` (any alias) is an MLP output projection weight."""
        return next((layer for layer in range(num_layers) if self.is_mlp_out(tensor_name, layer)), None)

    # -- config -------------------------------------------------------------------------------
    def num_layers(self, config: dict[str, Any]) -> int:
        config = _text_config(config)
        for key in self.num_layers_keys:
            if config.get(key) is None:
                continue
            if not isinstance(config[key], int) or isinstance(config[key], bool):
                raise EditguardError(f"config.json: {key} is {config[key]!r}, not a whole number")
            if config[key] < 1:
                raise EditguardError(f"config.json: {key} is {config[key]}; a model needs at least one layer")
            return config[key]
        raise EditguardError(f"config.json of this {self.model_type} model has none of {list(self.num_layers_keys)}")

    def heads(self, config: dict[str, Any]) -> tuple[int, int] | None:
        """(query heads, key/value heads) from the config; None where it does not say, or says something no
        attention could have (a key/value head count that does not divide the query heads')."""
        config = _text_config(config)

        def count(keys: tuple[str, ...]) -> int | None:
            return next((config[k] for k in keys if isinstance(config.get(k), int) and not isinstance(config[k], bool)),
                        None)

        heads, kv_heads = count(self.heads_keys), count(self.kv_heads_keys)
        kv_heads = heads if kv_heads is None else kv_heads  # (no key: as many key/value heads as query heads)
        if heads is None or heads < 1 or kv_heads < 1 or heads % kv_heads:
            return None
        return heads, kv_heads

    def tied(self, config: dict[str, Any]) -> bool:
        value = config.get("tie_word_embeddings")
        if value is None:
            value = _text_config(config).get("tie_word_embeddings")
        return self.tie_default if value is None else bool(value)


def oriented(matrix, transposed: bool):
    """`matrix` between the canonical [out, in] orientation and the stored one (GPT-2's Conv1D stores
    [in, out]); its own inverse."""
    return matrix.T if transposed else matrix


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    # Multimodal wrappers keep the language model's settings in text_config.
    text = config.get("text_config")
    if text is not None and not isinstance(text, dict):
        raise EditguardError("config.json: text_config is not a JSON object")
    return text or config


def for_model_type(model_type: str | None) -> Arch:
    if model_type is not None and not isinstance(model_type, str):
        raise UnsupportedError(f"config.json: model_type must be a string, not {model_type!r}")
    row = _table().get(model_type or "")
    if model_type is None:
        raise UnsupportedError(f"config.json has no model_type; supported: {', '.join(supported())}")
    if row is None:
        raise UnsupportedError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(supported())}"
        )
    # JSON lists become tuples (the Arch is frozen and hashable); aliases are pairs
    fields = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
              for k, v in row.items()}
    return Arch(model_type=model_type, **fields)


def for_config(config: dict[str, Any]) -> Arch:
    return for_model_type(config.get("model_type"))


def canonical_names(arch: Arch, checkpoint, what: str, refusing: str) -> dict[str, str]:
    """{canonical name: stored name} of `checkpoint`'s tensors; one tensor stored under two spellings (GPT-2's
    `h.N.` beside `transformer.h.N.`) is refused with the consequence `refusing` names: which copy
    transformers loads is not ours to guess, and working on the other would hide (or miss) a change."""
    out: dict[str, str] = {}
    for stored in checkpoint.names():
        canonical = arch.canonical_tensor_name(stored)
        if canonical in out:
            raise EditguardError(f"{what} stores {canonical} twice ({out[canonical]} and {stored}): {refusing}")
        out[canonical] = stored
    return out


def module_names(arch: Arch, num_layers: int) -> Iterable[tuple[str, int | None, str]]:
    """Every (role, layer, module path) the table names for a model with `num_layers` layers."""
    for role in GLOBAL_ROLES:
        yield role, None, arch.module(role)
    for layer in range(num_layers):
        for role in ROLES:
            yield role, layer, arch.module(role, layer)
        for path in arch.mlp_in_modules(layer):
            yield "mlp_in", layer, path
        for path in arch.attn_in_modules(layer):
            yield "attn_in", layer, path
        if arch.attn_qkv:
            yield "attn_qkv", layer, arch.module("attn_qkv", layer)
        if arch.mlp_out_norm:
            yield "mlp_out_norm", layer, arch.module("mlp_out_norm", layer)
