"""Run only the part of the network an edit can change, many sequences at once.

ROME/MEMIT add a vector δ at one position (the subject's last token) of one layer. Everything before
that position, at every layer, and everything below that layer, at every position, is the same at
every optimisation step. So one no-grad pass caches:

* the keys/values of the prefix (positions before the subject's last token) at every layer, and
* the hidden states entering the edited layer at the remaining (suffix) positions;

and each step then runs only the layers from the edited one up, only on the suffix tokens (often 1-4
tokens instead of 15-30), attending to the cached prefix. Logits are computed only where a loss reads
them. The result is exact: the same numbers as a full forward, up to float rounding (tests check it
for every architecture in the table).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from ..arch import Arch


class _Skip(torch.nn.Module):
    """Stands in for a layer below the edited one: its output is replaced by cached states anyway."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _container(model: torch.nn.Module, arch: Arch) -> torch.nn.ModuleList:
    return model.get_submodule(arch.layer.rsplit(".", 1)[0])


@contextlib.contextmanager
def layers_skipped_below(model: torch.nn.Module, arch: Arch, start: int) -> Iterator[None]:
    """Swap layers [0, start) for pass-throughs (same list length, so per-layer config indexing holds)."""
    layers = _container(model, arch)
    saved = [layers[i] for i in range(start)]
    try:
        for i in range(start):
            layers[i] = _Skip()
        yield
    finally:
        for i, layer in enumerate(saved):
            layers[i] = layer


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask for token id lists."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for j, seq in enumerate(seqs):
        ids[j, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[j, : len(seq)] = 1
    return ids, mask


def _cache_kwarg(base: torch.nn.Module) -> str:
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _replace_hidden_hook(replacement: torch.Tensor):
    def hook(module, args, kwargs):
        if args:
            return (replacement,) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = replacement
        return args, kwargs

    return hook


def unembed(model: torch.nn.Module, arch: Arch, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from final (already normalised) hidden states, with the model's soft-capping if any."""
    logits = model.get_submodule(arch.unembed)(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@dataclass
class Tokenized:
    """Sequences with the position where each starts to depend on δ (the subject's last token)."""

    ids: list[list[int]]
    split: list[int]

    def __post_init__(self):
        for ids, split in zip(self.ids, self.split):
            if not 0 <= split < len(ids):
                raise ValueError("split position outside the sequence")


@dataclass
class PrefixCache:
    start: int  # first layer that runs
    keys: list[torch.Tensor]  # per layer [B, H, P, D], prefixes right-aligned (left padding)
    values: list[torch.Tensor]
    prefix_mask: torch.Tensor  # [B, P]
    suffix_ids: torch.Tensor  # [B, S] (right padding)
    suffix_mask: torch.Tensor  # [B, S]
    positions: torch.Tensor  # [B, S] true position ids of suffix tokens
    hidden: torch.Tensor  # [B, S, d] states entering layer `start`
    captured: dict[str, torch.Tensor]  # name -> [B, d] at the split position
    split: torch.Tensor  # [B] prefix length of each sequence
    suffix_len: torch.Tensor  # [B]


@torch.no_grad()
def build_prefix_cache(
    model: torch.nn.Module,
    arch: Arch,
    tokens: Tokenized,
    start: int,
    captures: dict[str, tuple[str, str]] | None = None,
    pad_id: int = 0,
    chunk: int = 64,
) -> PrefixCache:
    """One full no-grad pass over all sequences: the prefix keys/values, the hidden states entering
    layer `start` at suffix positions, and `captures` ({name: (module path, "in"|"out")}) at the split."""
    from transformers import DynamicCache

    device = model.get_submodule(arch.embed).weight.device
    captures = captures or {}
    lengths = [len(ids) for ids in tokens.ids]
    prefix_len = max(tokens.split)
    suffix_len = max(n - s for n, s in zip(lengths, tokens.split))
    n_layers = len(_container(model, arch))
    parts: dict[str, list[torch.Tensor]] = {"keys": [], "values": [], "hidden": []}
    captured_parts: dict[str, list[torch.Tensor]] = {name: [] for name in captures}
    base = model.get_submodule(arch.base)
    kwarg = _cache_kwarg(base)
    for lo in range(0, len(lengths), chunk):
        rows = range(lo, min(lo + chunk, len(lengths)))
        ids, mask = pad_batch([tokens.ids[r] for r in rows], pad_id)
        width = ids.shape[1]
        split = torch.tensor([tokens.split[r] for r in rows])
        seen: dict[str, torch.Tensor] = {}
        handles = []

        def keep(name, kind):
            def hook(module, args, kwargs, output=None):
                value = output if kind == "out" else (args[0] if args else kwargs["hidden_states"])
                if isinstance(value, tuple):
                    value = value[0]
                seen[name] = value.detach()

            return hook

        layer_start = model.get_submodule(arch.module("layer", start))
        handles.append(layer_start.register_forward_pre_hook(
            lambda m, a, k: seen.__setitem__("__hidden__", (a[0] if a else k["hidden_states"]).detach()),
            with_kwargs=True))
        for name, (path, kind) in captures.items():
            module = model.get_submodule(path)
            if kind == "in":
                handles.append(module.register_forward_pre_hook(keep(name, "in"), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(keep(name, "out"), with_kwargs=True))
        try:
            cache = DynamicCache(config=model.config)
            base(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True, **{kwarg: cache})
        finally:
            for handle in handles:
                handle.remove()
        rel = torch.arange(prefix_len)
        # prefix slot p of row j holds true position p - (P - split_j) (left padding)
        src = (rel.unsqueeze(0) - (prefix_len - split).unsqueeze(1)).clamp(min=0)
        keys_chunk, values_chunk = [], []
        for layer_idx in range(n_layers):
            if layer_idx < start and layer_idx != 0:
                keys_chunk.append(None)
                values_chunk.append(None)
                continue  # never read (layers below `start` are skipped); layer 0 sets the cache length
            cached = cache.layers[layer_idx]
            if cached.keys.shape[2] < width:
                raise ValueError("sequence longer than the sliding window: the prefix cache cannot hold it")
            gather = src.to(cached.keys.device)[:, None, :, None].expand(
                -1, cached.keys.shape[1], -1, cached.keys.shape[3])
            keys_chunk.append(torch.gather(cached.keys, 2, gather))
            values_chunk.append(torch.gather(cached.values, 2, gather))
        parts["keys"].append(keys_chunk)
        parts["values"].append(values_chunk)
        srel = torch.arange(suffix_len)
        pos = (split.unsqueeze(1) + srel.unsqueeze(0))
        valid = pos < torch.tensor([lengths[r] for r in rows]).unsqueeze(1)
        pos_clamped = torch.where(valid, pos, torch.zeros_like(pos))
        hidden = seen["__hidden__"]
        parts["hidden"].append(torch.gather(hidden, 1, pos_clamped.to(hidden.device)[..., None].expand(-1, -1, hidden.shape[-1])))
        for name in captures:
            value = seen[name]
            captured_parts[name].append(value[torch.arange(len(rows)), split.to(value.device)])
    n = len(lengths)
    split_all = torch.tensor(tokens.split)
    prefix_mask = (torch.arange(prefix_len).unsqueeze(0) >= (prefix_len - split_all).unsqueeze(1)).long()
    pos = split_all.unsqueeze(1) + torch.arange(suffix_len).unsqueeze(0)
    suffix_mask = (pos < torch.tensor(lengths).unsqueeze(1)).long()
    suffix_ids = torch.full((n, suffix_len), pad_id, dtype=torch.long)
    for r in range(n):
        tail = tokens.ids[r][tokens.split[r]:]
        suffix_ids[r, : len(tail)] = torch.tensor(tail)
    keys = [torch.cat([c[i] for c in parts["keys"]]) if parts["keys"][0][i] is not None else None
            for i in range(n_layers)]
    values = [torch.cat([c[i] for c in parts["values"]]) if parts["values"][0][i] is not None else None
              for i in range(n_layers)]
    return PrefixCache(
        start=start, keys=keys, values=values, prefix_mask=prefix_mask.to(device),
        suffix_ids=suffix_ids.to(device), suffix_mask=suffix_mask.to(device),
        positions=torch.where(suffix_mask.bool(), pos, torch.zeros_like(pos)).to(device),
        hidden=torch.cat(parts["hidden"]), captured={k: torch.cat(v) for k, v in captured_parts.items()},
        split=split_all, suffix_len=suffix_mask.sum(1).cpu(),
    )


def run_suffix(
    model: torch.nn.Module,
    arch: Arch,
    cache: PrefixCache,
    rows: torch.Tensor | None = None,
    hooks: Sequence[tuple[str, Callable]] = (),
) -> torch.Tensor:
    """Final (normalised) hidden states [B, S', d] of the suffix tokens of `rows` (S' = their longest
    suffix), running only layers >= cache.start. `hooks` are (module path, forward hook) pairs, e.g.
    one that adds δ."""
    from transformers import DynamicCache

    if rows is None:
        rows = torch.arange(cache.suffix_ids.shape[0])
    rows = rows.cpu()
    # trim the padding these rows do not need: prefixes are right-aligned, suffixes left-aligned
    total_prefix = cache.prefix_mask.shape[1]
    p0 = total_prefix - int(cache.split[rows].max())
    width = int(cache.suffix_len[rows].max())
    kv = DynamicCache(config=model.config)
    first_k, first_v = cache.keys[0][rows, :, p0:], cache.values[0][rows, :, p0:]
    for layer_idx, (k, v) in enumerate(zip(cache.keys, cache.values)):
        if k is None:  # placeholder of the right length for a skipped layer: never read
            kv.update(first_k, first_v, layer_idx)
        else:
            kv.update(k[rows, :, p0:], v[rows, :, p0:], layer_idx)
    base = model.get_submodule(arch.base)
    layer_start = model.get_submodule(arch.module("layer", cache.start))
    handles = [layer_start.register_forward_pre_hook(_replace_hidden_hook(cache.hidden[rows, :width]),
                                                     with_kwargs=True)]
    handles += [model.get_submodule(path).register_forward_hook(fn) for path, fn in hooks]
    try:
        with layers_skipped_below(model, arch, cache.start):
            out = base(
                input_ids=cache.suffix_ids[rows, :width],
                attention_mask=torch.cat([cache.prefix_mask[rows, p0:], cache.suffix_mask[rows, :width]], dim=1),
                position_ids=cache.positions[rows, :width],
                use_cache=True,
                **{_cache_kwarg(base): kv},
            )
    finally:
        for handle in handles:
            handle.remove()
    return out.last_hidden_state


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_at(
    model: torch.nn.Module,
    arch: Arch,
    tokens: Tokenized,
    captures: dict[str, tuple[str, str]],
    pad_id: int = 0,
    chunk: int = 64,
    stop_after: str | None = None,
) -> dict[str, torch.Tensor]:
    """Module inputs/outputs ({name: (path, "in"|"out")}) at each sequence's split position, [N, d] each;
    "in-norm"/"out-norm" keep only their L2 norms, [N] (all layers of a big model would not fit otherwise).
    With `stop_after` (a module path) the forward pass is abandoned once that module has run."""
    base = model.get_submodule(arch.base)
    device = model.get_submodule(arch.embed).weight.device
    out: dict[str, list[torch.Tensor]] = {name: [] for name in captures}
    for lo in range(0, len(tokens.ids), chunk):
        batch = tokens.ids[lo: lo + chunk]
        split = torch.tensor(tokens.split[lo: lo + chunk])
        ids, mask = pad_batch(batch, pad_id)
        seen: dict[str, torch.Tensor] = {}
        handles = []
        for name, (path, kind) in captures.items():
            module = model.get_submodule(path)

            def hook(m, args, kwargs, output=None, name=name, kind=kind):
                value = output if kind.startswith("out") else (args[0] if args else kwargs["hidden_states"])
                value = value[0] if isinstance(value, tuple) else value
                value = value[torch.arange(value.shape[0]), split.to(value.device)].detach()
                seen[name] = value.float().norm(dim=-1) if kind.endswith("-norm") else value

            if kind.startswith("in"):
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(hook, with_kwargs=True))
        if stop_after is not None:
            def stop(m, args, output):
                raise _Stop
            handles.append(model.get_submodule(stop_after).register_forward_hook(stop))
        try:
            base(input_ids=ids.to(device), attention_mask=mask.to(device))
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        for name in captures:
            out[name].append(seen[name])
    return {name: torch.cat(parts) for name, parts in out.items()}
