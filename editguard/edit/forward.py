"""Run only the part of the network an edit can change, many sequences at once.

ROME/MEMIT add a vector δ at one position (the subject's last token) of one layer. Everything before
that position, at every layer, and everything below that layer, at every position, is the same at
every optimisation step. So one no-grad pass caches:

* the keys/values of the prefix (positions before the subject's last token) at every layer, and
* the hidden states entering the edited layer at the remaining (suffix) positions;

and each step then runs only the layers from the edited one up (from the next one, where δ joins the
residual stream as it is: `injection_point`), only on the suffix tokens (often 1-4 tokens instead of
15-30), attending to the cached prefix. The suffixes of many sequences run packed into one long
sequence (no padding; each linear layer gets one big matrix, which a CPU runs ~2x more efficiently than
a few small ones), with attention batched over rows, not over the pack. Logits are computed only where
a loss reads them. The result is exact: the same numbers as a full forward, up to float rounding (tests
check it for every architecture in the table).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from ..arch import Arch
from ..errors import EditguardError


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


def cache_kwarg(base: torch.nn.Module) -> str:
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def replace_hidden_hook(replacement: torch.Tensor):
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
    keys: list[torch.Tensor]  # per layer [B, H, P, D], prefixes right-aligned (left padding), P = max(split)
    values: list[torch.Tensor]
    suffix_ids: torch.Tensor  # [B, S] (right padding)
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
    kwarg = cache_kwarg(base)
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
                raise EditguardError(f"a prompt of {width} tokens before the subject's end is longer than this model's "
                                     f"sliding attention window ({cached.keys.shape[2]}): shorten it")
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
    suffix_ids = torch.full((n, suffix_len), pad_id, dtype=torch.long)
    for r in range(n):
        tail = tokens.ids[r][tokens.split[r]:]
        suffix_ids[r, : len(tail)] = torch.tensor(tail)
    keys = [torch.cat([c[i] for c in parts["keys"]]) if parts["keys"][0][i] is not None else None
            for i in range(n_layers)]
    values = [torch.cat([c[i] for c in parts["values"]]) if parts["values"][0][i] is not None else None
              for i in range(n_layers)]
    return PrefixCache(
        start=start, keys=keys, values=values, suffix_ids=suffix_ids.to(device),
        hidden=torch.cat(parts["hidden"]), captured={k: torch.cat(v) for k, v in captured_parts.items()},
        split=split_all, suffix_len=torch.tensor(lengths) - split_all,
    )


def injection_point(model: torch.nn.Module, arch: Arch, site_path: str, layer: int) -> int:
    """The first layer a run must include when a vector is added to `site_path`'s output in `layer`.

    A vector added to a layer's output, or to an MLP output that joins the residual stream as it is,
    is the same vector added to the next layer's input: nothing in `layer` after the site reads it. So
    the run may start one layer higher (`run_suffix(add_to_input=...)`), saving a layer of every step.
    Returns `layer` itself where that does not hold (Gemma normalises its MLP output) or no layer is left."""
    on_residual = site_path == arch.module("layer", layer) or (
        site_path == arch.module("mlp", layer) and arch.mlp_adds_to_residual)
    return layer + 1 if on_residual and layer + 1 < len(_container(model, arch)) else layer


def run_suffix(
    model: torch.nn.Module,
    arch: Arch,
    cache: PrefixCache,
    rows: torch.Tensor | None = None,
    add_at_split: tuple[str, torch.Tensor] | None = None,
    pack_tokens: int = 2048,
    zero_at_split: Sequence[str] = (),
    add_to_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final (normalised) hidden states [B, S', d] of the suffix tokens of `rows` (S' = their longest
    suffix, zero beyond each row's own), running only layers >= cache.start. `add_at_split` = (module
    path, [B, d]) adds one vector per row to that module's output at the row's first suffix token (the
    split), e.g. ROME's δ; `add_to_input` ([B, d]) adds one vector per row to the state entering layer
    cache.start there (the residual stream: see `injection_point`); `zero_at_split` (module paths)
    zeroes those modules' outputs there (an ablation; the modules must be in layers >= cache.start).

    Rows run packed end to end into sequences of about `pack_tokens` tokens (prefix + suffix), without
    padding: a linear layer on a 2-core CPU is ~2x more efficient on a few hundred rows than on a few
    dozen, while the block mask (and attention itself, where it is not batched by rows) grows with the
    square of the pack. 2048 edits 16 SmolLM2 facts ~5 % faster than 1024 and as fast as 4096."""
    if rows is None:
        rows = torch.arange(cache.suffix_ids.shape[0])
    rows = rows.cpu()
    width = int(cache.suffix_len[rows].max())
    outputs = []
    for first, last in consecutive_groups((cache.suffix_len[rows] + cache.split[rows]).tolist(), pack_tokens):
        local = torch.arange(first, last)
        add = None if add_at_split is None else (add_at_split[0], add_at_split[1][local.to(add_at_split[1].device)])
        add_in = None if add_to_input is None else add_to_input[local.to(add_to_input.device)]
        outputs.append(_run_packed(model, arch, cache, rows[local], add, width, zero_at_split, add_in))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def consecutive_groups(sizes: list[int], budget: int) -> list[tuple[int, int]]:
    """[first, last) ranges of consecutive items, each closed once its sizes reach `budget`."""
    groups, first, filled = [], 0, 0
    for i, size in enumerate(sizes):
        filled += size
        if filled >= budget or i == len(sizes) - 1:
            groups.append((first, i + 1))
            first, filled = i + 1, 0
    return groups


def pack_index(lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of `lens` tokens laid end to end: each token's row and position in its row, each row's start."""
    row = torch.repeat_interleave(torch.arange(len(lens)), lens)
    start = torch.cumsum(lens, 0) - lens
    return row, torch.arange(len(row)) - start[row], start


def block_causal_mask(row: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype,
                      prefix_row: torch.Tensor | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Additive mask [N, P + N] for a pack, built on `device`: token q sees the prefix slots of its own
    row (`prefix_row`, P of them, may be none) and its own row's tokens up to itself. Additive: eager
    attention adds the mask, sdpa accepts it as well."""
    row, pos = row.to(device), pos.to(device)
    prefix_row = None if prefix_row is None else prefix_row.to(device)
    own = (row.unsqueeze(1) == row.unsqueeze(0)) & (pos.unsqueeze(1) >= pos.unsqueeze(0))
    allowed = own if prefix_row is None else torch.cat([row.unsqueeze(1) == prefix_row.unsqueeze(0), own], dim=1)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def _run_packed(model, arch, cache: PrefixCache, rows: torch.Tensor, add_at_split, width: int,
                zero_at_split: Sequence[str] = (), add_to_input: torch.Tensor | None = None) -> torch.Tensor:
    """run_suffix for rows packed into one sequence; an explicit 4D mask keeps each row to its own
    prefix and its own earlier tokens. Returns [B, width, d]."""
    from transformers import DynamicCache

    device = cache.suffix_ids.device
    n_rows = len(rows)
    lens, splits = cache.suffix_len[rows], cache.split[rows]
    total_prefix = int(cache.split.max())  # the cached prefixes' common (left-padded) width
    # packed index maps: prefix slot k belongs to row pre_row[k]; suffix token q is (suf_row[q], suf_pos[q])
    pre_row, pre_pos, _ = pack_index(splits)
    pre_slot = total_prefix - splits[pre_row] + pre_pos
    suf_row, suf_pos, suf_start = pack_index(lens)
    src_rows = rows[pre_row]
    tok_rows, tok_pos = rows[suf_row].to(device), suf_pos.to(device)

    def packed(t: torch.Tensor) -> torch.Tensor:  # [B, H, P, D] -> [1, H, sum(splits), D]
        return t[src_rows.to(t.device), :, pre_slot.to(t.device)].transpose(0, 1).unsqueeze(0)

    kv = DynamicCache()  # full layers even for sliding-window models: a pack can exceed the window
    first_k, first_v = packed(cache.keys[0]), packed(cache.values[0])
    for layer_idx, (k, v) in enumerate(zip(cache.keys, cache.values)):
        if k is None:  # placeholder of the right length for a skipped layer: never read
            kv.update(first_k, first_v, layer_idx)
        else:
            kv.update(packed(k), packed(v), layer_idx)
    mask = block_causal_mask(suf_row, suf_pos, cache.hidden.dtype, pre_row, device)
    hidden_in = cache.hidden[rows[suf_row].to(cache.hidden.device), suf_pos.to(cache.hidden.device)].unsqueeze(0)
    if add_to_input is not None:
        hidden_in = _added_at(hidden_in, suf_start, add_to_input)
    base = model.get_submodule(arch.base)
    layer_start = model.get_submodule(arch.module("layer", cache.start))
    handles = [layer_start.register_forward_pre_hook(replace_hidden_hook(hidden_in), with_kwargs=True)]
    if add_at_split is not None:
        path, vectors = add_at_split
        handles.append(model.get_submodule(path).register_forward_hook(_add_at_hook(vectors, suf_start)))
    for path in zero_at_split:
        handles.append(model.get_submodule(path).register_forward_hook(_zero_at_hook(suf_start)))
    try:
        with layers_skipped_below(model, arch, cache.start), attention_in_groups(model, splits, lens):
            out = base(
                input_ids=cache.suffix_ids[tok_rows, tok_pos].unsqueeze(0),
                attention_mask=mask[None, None].to(device),
                position_ids=(splits[suf_row] + suf_pos).to(device).unsqueeze(0),
                use_cache=True,
                **{cache_kwarg(base): kv},
            )
    finally:
        for handle in handles:
            handle.remove()
    flat = out.last_hidden_state[0]
    unpacked = flat.new_zeros(n_rows, width, flat.shape[-1])
    return unpacked.index_put((suf_row.to(flat.device), suf_pos.to(flat.device)), flat)


_GROUPED = "editguard_grouped"
# Devices where attention by groups of rows beats one masked call over the whole pack. On a CPU the
# pack's mask is mostly waste (work grows with the pack squared); on a GPU one masked call over the
# pack was faster than many small ones (bench/train_speed.py --device-map cuda).
GROUPED_ATTENTION_DEVICES = {"cpu"}
# Query tokens per group when the rows have no cached prefix (mask training): a few short prompts per
# group. Rows with a prefix (the edit path) go one per group, so each reads only its own prefix. Measured
# on SmolLM2: ROME fast path ~9 % faster with 1 row per group than with 64-token groups; mask training
# ~10 % slower.
GROUP_TOKENS = 64
_groups: contextvars.ContextVar = contextvars.ContextVar("editguard_attention_groups")


@dataclass
class _GroupLayout:
    """Where each group of consecutive rows of a pack lies, for attention batched over the groups."""

    n_prefix: int  # prefix slots in the pack (they come first), then the suffix tokens
    prefix_index: torch.Tensor  # [G, P] the pack's prefix slot at group g's prefix position p (0 beyond it)
    suffix_index: torch.Tensor  # [G, S] the pack's suffix token at group g's position s (0 beyond it)
    mask: torch.Tensor  # [G, 1, S, P + S] True where group g's query s may attend
    token_index: torch.Tensor  # [N] each suffix token's place in the [G, S] layout (group·S + position)
    additive: dict = field(default_factory=dict)  # the mask as an additive float tensor, per dtype


def _group_layout(splits: torch.Tensor, lens: torch.Tensor, group_tokens: int, device) -> _GroupLayout:
    splits, lens = splits.cpu(), lens.cpu()
    suf_row, _, _ = pack_index(lens)
    pre_row, _, _ = pack_index(splits)
    first, last = (torch.tensor(x) for x in zip(*consecutive_groups(lens.tolist(), group_tokens)))
    ends_s, ends_p = (torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(t, 0)]) for t in (lens, splits))
    start_s, n_s = ends_s[first], ends_s[last] - ends_s[first]
    start_p, n_p = ends_p[first], ends_p[last] - ends_p[first]
    s, p = torch.arange(int(n_s.max())), torch.arange(int(n_p.max()))
    suffix_valid, prefix_valid = s[None] < n_s[:, None], p[None] < n_p[:, None]
    suffix_index = torch.where(suffix_valid, start_s[:, None] + s[None], 0)
    prefix_index = torch.where(prefix_valid, start_p[:, None] + p[None], 0)
    query_row = torch.where(suffix_valid, suf_row[suffix_index], -1)  # [G, S]
    key_row = torch.where(prefix_valid, pre_row[prefix_index], -2)  # [G, P]
    sees_prefix = query_row[:, :, None] == key_row[:, None, :]  # its own row's prefix
    sees_suffix = ((query_row[:, :, None] == query_row[:, None, :]) & (s[:, None] >= s[None, :])
                   & suffix_valid[:, None, :])  # its own row's tokens up to itself
    sees_suffix[:, :, 0] |= ~suffix_valid  # a padded query sees one key: no NaN (its output is dropped)
    token_index = (torch.arange(len(first))[:, None] * len(s) + s[None])[suffix_valid]  # row-major: pack order
    return _GroupLayout(int(splits.sum()), prefix_index.to(device), suffix_index.to(device),
                        torch.cat([sees_prefix, sees_suffix], dim=2)[:, None].to(device), token_index.to(device))


@contextlib.contextmanager
def attention_in_groups(model: torch.nn.Module, splits: torch.Tensor, lens: torch.Tensor) -> Iterator[None]:
    """Within a pack, let attention run batched over groups of rows (each group's queries against its
    own rows' prefixes and suffixes only) instead of over the whole pack under the block mask, most of
    whose entries are masked out: same result, a fraction of the work. Only on GROUPED_ATTENTION_DEVICES
    and for attention functions in transformers' registry (sdpa, eager, ...); elsewhere the dense masked
    attention runs."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = model.config._attn_implementation
    if (not isinstance(original, str) or original not in ALL_ATTENTION_FUNCTIONS or original == _GROUPED
            or model.device.type not in GROUPED_ATTENTION_DEVICES):
        yield
        return
    if _GROUPED not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(_GROUPED, _grouped_attention)
    group_tokens = 1 if int(splits.sum()) else GROUP_TOKENS
    token = _groups.set((ALL_ATTENTION_FUNCTIONS[original], _group_layout(splits, lens, group_tokens, model.device)))
    model.config._attn_implementation = _GROUPED
    try:
        yield
    finally:
        model.config._attn_implementation = original
        _groups.reset(token)


def _grouped_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention over a pack [1, H, prefix + suffix, D], run as a batch of its groups [G, H, P + S, D].
    The pack's own mask is not needed: the group layout encodes the same block-causal pattern."""
    inner, rows = _groups.get()
    dtype = query.dtype
    if query.device.type == "cpu" and dtype == torch.bfloat16:
        # the CPU's bfloat16 attention backward is ~3x slower than float32 (measured); the matmuls stay bfloat16
        query, key, value = query.float(), key.float(), value.float()
    if query.dtype not in rows.additive:  # eager attention adds the mask; sdpa accepts an additive one too
        rows.additive[query.dtype] = torch.zeros(rows.mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~rows.mask, torch.finfo(query.dtype).min)
    n, (n_groups, width_p), width_s = rows.n_prefix, rows.prefix_index.shape, rows.suffix_index.shape[1]

    def gathered(t: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:  # [H, T, D] -> [H, G, width, D]
        # torch.gather, not t[:, index]: its backward (scatter_add) is ~2x faster on a CPU
        flat = torch.gather(t, 1, index.reshape(1, -1, 1).expand(t.shape[0], -1, t.shape[2]))
        return flat.view(t.shape[0], n_groups, width, t.shape[2])

    def by_row(t: torch.Tensor) -> torch.Tensor:  # [1, H, prefix + suffix, D] -> [G, H, P + S, D]
        # the prefix comes from a cache built without gradients (build_prefix_cache): detached, it costs no backward
        prefix = gathered(t[0, :, :n].detach(), rows.prefix_index, width_p)
        return torch.cat([prefix, gathered(t[0, :, n:], rows.suffix_index, width_s)], dim=2).transpose(0, 1)

    queries = gathered(query[0], rows.suffix_index, width_s).transpose(0, 1)  # [G, H, S, D]
    out, _ = inner(module, queries, by_row(key), by_row(value), rows.additive[query.dtype], **kwargs)
    # [G, S, H, D] -> [N, H, D], the pack's tokens in order
    flat = out.reshape(n_groups * width_s, *out.shape[2:]).index_select(0, rows.token_index)
    return flat.unsqueeze(0).to(dtype), None


def _output_hook(change):
    """Forward hook applying `change` to a module's [1, N, d] output (the first element of a tuple output)."""

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (change(output[0]),) + tuple(output[1:])
        return change(output)

    return hook


def _added_at(packed: torch.Tensor, token_index: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """packed [1, N, d] plus vectors[j] at token token_index[j] (out of place: autograd reaches δ)."""
    delta = torch.zeros_like(packed)
    delta[0, token_index.to(packed.device)] = vectors.to(packed.dtype)
    return packed + delta


def _add_at_hook(vectors: torch.Tensor, token_index: torch.Tensor):
    """Forward hook: `_added_at` on a module's packed output."""
    return _output_hook(lambda out: _added_at(out, token_index, vectors))


def _zero_at_hook(token_index: torch.Tensor):
    """Zeroes a packed output at tokens token_index."""

    def zero(out):
        keep = torch.ones(out.shape[1], 1, dtype=out.dtype, device=out.device)
        keep[token_index.to(out.device)] = 0
        return out * keep

    return _output_hook(zero)


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
    answers: bool = False,
) -> dict[str, torch.Tensor]:
    """Module inputs/outputs ({name: (path, "in"|"out")}) at each sequence's split position, [N, d] each;
    "in-norm"/"out-norm" keep only their L2 norms, [N] (all layers of a big model would not fit otherwise).
    With `stop_after` (a module path) the forward pass is abandoned once that module has run. With
    `answers`, "__answer__" holds the log-probability of each sequence's greedy next token, [N]."""
    if answers and stop_after is not None:
        raise ValueError("answers need the whole forward pass")
    base = model.get_submodule(arch.base)
    device = model.get_submodule(arch.embed).weight.device
    out: dict[str, list[torch.Tensor]] = {name: [] for name in captures} | ({"__answer__": []} if answers else {})
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
            hidden = base(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        for name in captures:
            out[name].append(seen[name])
        if answers:
            last = hidden[torch.arange(len(batch)), (mask.sum(1) - 1).to(hidden.device)]
            out["__answer__"].append(torch.log_softmax(unembed(model, arch, last).float(), dim=-1).max(dim=-1).values)
    return {name: torch.cat(parts) for name, parts in out.items()}
