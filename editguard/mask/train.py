"""Training one shared mask K over the edited matrix (Holmov et al., "One Mask to Rule Them All").

Loss per step, on the last prompt position (the first object token):
    mean relu(z_new − z_true + margin)                                  (the edit must lose)
  + λ(p) · relu(mean(1 − K) − S_max)                                    (prune at most S_max)
  + β · T(p)² · KL(softmax(teacher/T) ‖ softmax(student/T))            (stay the original model)
with K = sigmoid(Θ/τ(p)), Θ ~ N(0.85, 0.1), schedules as functions of training progress p ∈ [0, 1]
(so a short run still anneals), AdamW and gradient-norm clipping.

Speed: each ROME record has its own edited weight Ŵ_i = W + u_i v_iᵀ, never built:
    (Ŵ_i ⊙ K) x = (W ⊙ K) x + u_i ⊙ (K (v_i ⊙ x)),
so one forward pass carries a whole batch of different edits (MEMIT: one dense W + ΔW per batch edit,
built once). The states entering the masked layer
and the teacher's logits are computed once; each step runs only the layers from the masked one up,
on the batch's prompts packed end to end (no padding), and reads logits only at the last prompt position
(where the last layer's MLP runs too: its output elsewhere is never read).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ..arch import oriented
from ..checkpoint import load_checked, write_safetensors
from ..edit.edits import edits_applied
from ..edit.facts import target_ids
from ..edit.forward import (attention_in_groups, block_causal_mask, consecutive_groups, layers_skipped_below,
                             pack_index, pad_batch, replace_hidden_hook, unembed)
from ..errors import BAD_JSON, EditguardError, first_line
from ..loading import LoadedModel, real_weight


@dataclass
class TrainConfig:
    epochs: int = 301
    batch_records: int = 50  # 3 prompts each: the paper's ~18,000 steps for 3,000 records x 301 epochs
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01  # torch's AdamW default
    grad_clip: float = 1.0  # 0: no clipping
    theta_mean: float = 0.85
    theta_std: float = 0.1
    tau_start: float = 6.0  # τ(p) = tau_start · exp(−tau_decay · p)
    tau_decay: float = 3.0
    margin: float = 3.0
    # not in the paper (1 = as the paper): the margin term's weight at prompts where the original model
    # (the teacher) does not prefer the true object's first token to the new one's: there the margin
    # teaches the mask a fact the model never knew instead of undoing an edit
    margin_unknown: float = 1.0
    sparsity_max: float = 0.10
    lambda_start: float = 1e-6
    lambda_end: float = 60.0
    beta_kl: float = 3.2552
    # not in the paper (0 = off): the same KL for the mask on the *unedited* model at the same prompts, so
    # the mask is also taught to leave the original's answers alone (MEMIT masks cost the base model much)
    beta_anchor: float = 0.0
    temp_start: float = 1.643
    temp_end: float = 4.301
    threshold: float = 0.9
    paraphrases: int = 2  # prompts per record: the rewrite prompt + this many paraphrases
    seed: int = 0
    checkpoint_every: int = 25  # steps

    def tau(self, p: float) -> float:
        return self.tau_start * math.exp(-self.tau_decay * p)

    def lam(self, p: float) -> float:
        return self.lambda_start + (self.lambda_end - self.lambda_start) * p

    def temperature(self, p: float) -> float:
        return self.temp_start + (self.temp_end - self.temp_start) * p

    def to_dict(self) -> dict:
        data = asdict(self)
        data["betas"] = list(self.betas)
        return data

    def check(self) -> None:
        """Settings a run could not train with (found before any edit is made): one clear line."""
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise EditguardError(f"training setting {what}")

        numbers = {k: v for k, v in self.to_dict().items() if isinstance(v, float)}
        for key, value in numbers.items():
            need(math.isfinite(value), f"{key} must be a finite number, got {value}")
        for key in ("epochs", "batch_records", "checkpoint_every"):
            need(getattr(self, key) >= 1, f"{key} must be at least 1, got {getattr(self, key)}")
        for key in ("lr", "tau_start", "temp_start", "temp_end", "theta_std"):
            need(getattr(self, key) > 0, f"{key} must be positive, got {getattr(self, key)}")
        for key in ("weight_decay", "grad_clip", "margin", "margin_unknown", "lambda_start", "lambda_end", "beta_kl",
                    "beta_anchor", "tau_decay"):
            need(getattr(self, key) >= 0, f"{key} must not be negative, got {getattr(self, key)}")
        need(0 < self.sparsity_max < 1 and 0 < self.threshold < 1, "sparsity_max and threshold must lie in (0, 1)")
        need(len(self.betas) == 2 and all(0 <= b < 1 and math.isfinite(b) for b in self.betas),
             f"betas must be two numbers in [0, 1), got {','.join(map(str, self.betas))}")
        need(self.paraphrases >= 0, f"paraphrases must not be negative, got {self.paraphrases}")
        need(0 <= self.seed < 2 ** 32, f"seed must lie in [0, 2^32), got {self.seed}")  # (seeds each epoch's order)


PRESETS: dict[str, dict] = {
    # The paper's schedule, for GPU users (ROME; MEMIT switches λ to 1e-4 -> 100).
    "paper": {},
    # A 2-core CPU budget: the schedule of the shipped layer-9 demo mask (456 steps over 600 records,
    # ~1 h; masks/README.md has its time-to-RSR curve). lr scaled up from the paper's 1e-3 for ~450
    # instead of ~18,000 steps; 5e-2 (the earlier preset) overfit the training edits.
    "cpu": {"epochs": 24, "batch_records": 32, "lr": 5e-3},
}


def config_for(preset: str, method: str, settings: dict | None = None, **overrides) -> TrainConfig:
    """The preset, then `settings` (any fields, see parse_settings), then the non-None `overrides`."""
    if preset not in PRESETS:
        raise EditguardError(f"unknown training preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[preset])
    if method == "memit":
        values.setdefault("lambda_start", 1e-4)
        values.setdefault("lambda_end", 100.0)
    values.update(settings or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig(**values)
    cfg.check()
    return cfg


def parse_settings(items: list[str], reserved: dict[str, str] | None = None) -> dict:
    """`KEY=VALUE` items naming TrainConfig fields, typed as the field's default (betas: `B1,B2`).
    `reserved` maps fields that have an option of their own to that option, which they must use."""
    defaults = TrainConfig()
    names = [f.name for f in fields(TrainConfig)]
    out: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in names:
            raise EditguardError(f"--set {item!r}: expected KEY=VALUE, KEY one of {', '.join(names)}")
        if reserved and key in reserved:
            raise EditguardError(f"--set {key}: use {reserved[key]}")
        if key in out:
            raise EditguardError(f"--set {key} is given twice")
        default = getattr(defaults, key)
        try:
            if isinstance(default, tuple):
                value = tuple(float(x) for x in text.split(","))
            else:
                value = type(default)(text.strip())
        except ValueError:
            kind = "an integer" if isinstance(default, int) else "a number" if isinstance(default, float) else "B1,B2"
            raise EditguardError(f"--set {key}: {text!r} is not {kind}") from None
        out[key] = value
    return out


# -- the masked projection -----------------------------------------------------------------------
class MaskedProjection(torch.nn.Module):
    """Stands in for a masked MLP projection: y = (W ⊙ K) x + b + u ⊙ (K (v ⊙ x)), a rank-one (ROME)
    edit per row on the edited output projection (the MLP inputs `--whole-mlp` masks carry no edit).
    u [..., out] and v [..., in] broadcast against x's leading dimensions: [B, 1, ·] for the batch rows
    of x [B, T, in], [1, N, ·] for the tokens of one packed sequence x [1, N, in] (each token carrying
    its own prompt's edit)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = weight  # [out, in], frozen
        self.bias = bias
        self.K: torch.Tensor | None = None
        self.u: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @classmethod
    def standing_in(cls, module: torch.nn.Module, weight: torch.Tensor) -> "MaskedProjection":
        """For `module`, with `weight` ([out, in]) and the module's own bias."""
        bias = getattr(module, "bias", None)
        return cls(weight, bias.detach().float() if bias is not None else None)

    def forward(self, x):
        K, dtype = self.K, x.dtype
        x = x.to(self.weight.dtype)  # the mask and the edit in float32 even inside a bfloat16 model
        y = F.linear(x, self.weight if K is None else self.weight * K, self.bias)
        if self.u is not None:
            xv = x * self.v
            # K (v ⊙ x); without a mask that is vᵀx in every output coordinate
            proj = F.linear(xv, K) if K is not None else xv.sum(-1, keepdim=True)
            y = y + proj * self.u
        return y.to(dtype)


class OnlyAt(torch.nn.Module):
    """Stands in for the last layer's MLP: runs it only at the pack's positions `index`, where the loss
    reads the logits. Its output elsewhere would reach nothing the loss reads (the last layer has no
    later attention), so there it is left zero; saves that MLP's work, forward and backward, on every
    other token."""

    def __init__(self, inner: torch.nn.Module, index: torch.Tensor):
        super().__init__()
        self.inner, self.index = inner, index

    def forward(self, hidden_states, *args, **kwargs):
        picked = self.inner(hidden_states[:, self.index], *args, **kwargs)
        return picked.new_zeros(hidden_states.shape[:-1] + picked.shape[-1:]).index_copy(1, self.index, picked)


def canonical_weight(module: torch.nn.Module, transposed: bool, path: str = "a masked projection") -> torch.Tensor:
    w = real_weight(module.weight, path).detach()
    return oriented(w, transposed).float().contiguous()


@contextlib.contextmanager
def swapped(model: torch.nn.Module, path: str, replacement: torch.nn.Module) -> Iterator[None]:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    original = getattr(parent, name)
    setattr(parent, name, replacement)
    try:
        yield
    finally:
        setattr(parent, name, original)


# -- data -----------------------------------------------------------------------------------------
@dataclass
class PromptSet:
    """The training prompts (rewrite + paraphrases of each record), prepared once."""

    record: torch.Tensor  # [P] record index of each prompt
    ids: torch.Tensor  # [P, S] right-padded
    mask: torch.Tensor  # [P, S]
    last: torch.Tensor  # [P] last prompt position
    new_tok: torch.Tensor  # [P] first token of " " + new object
    true_tok: torch.Tensor  # [P]
    hidden: torch.Tensor  # [P, S, d] states entering the masked layer (unedited model)
    teacher: torch.Tensor  # [P, V] original model's logits at the last position (float16)
    # [P, S, d] states entering the masked layer with each prompt's edit applied, when the edits lie below
    # that layer (`train --mask-layer`): the mask then trains against their fixed effect on these states
    hidden_edited: torch.Tensor | None = None


def record_prompts(fact, paraphrases: int) -> list[str]:
    return [fact.text] + list(fact.paraphrase_prompts[:paraphrases])


@torch.no_grad()
def prepare_prompts(loaded: LoadedModel, facts: list, start_layer: int, paraphrases: int,
                    progress: Callable[[int, int], None] | None = None, chunk: int = 64,
                    edits_below: list[tuple[list[int], list]] | None = None) -> PromptSet:
    """`edits_below`: [(record indices, their batch edit's Edits)] whose layers lie below `start_layer`;
    given, the states entering it are also cached with each record's batch edit applied."""
    tok = loaded.tokenizer
    prompts, record, new_tok, true_tok = [], [], [], []
    for i, fact in enumerate(facts):
        new_first = target_ids(tok, fact.target_new)[0]
        true_first = target_ids(tok, fact.target_true)[0]
        for text in record_prompts(fact, paraphrases):
            prompts.append(list(tok(text).input_ids))
            record.append(i)
            new_tok.append(new_first)
            true_tok.append(true_first)
    ids, mask = pad_batch(prompts, tok.pad_token_id)
    record = torch.tensor(record)
    steps = len(prompts) * (2 if edits_below else 1)
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        if progress:
            progress(done[0], steps)

    hidden, teacher = _states_entering(loaded, ids, mask, torch.arange(len(prompts)), start_layer, chunk, advance)
    hidden_edited = None
    if edits_below:
        hidden_edited = torch.empty_like(hidden)
        for records, edits in edits_below:
            rows = torch.nonzero(torch.isin(record, torch.tensor(records)))[:, 0]
            with edits_applied(loaded.model, loaded.arch, edits):
                hidden_edited[rows] = _states_entering(loaded, ids, mask, rows, start_layer, chunk, advance,
                                                       logits=False)[0]
    return PromptSet(record, ids, mask, mask.sum(1) - 1, torch.tensor(new_tok), torch.tensor(true_tok),
                     hidden, teacher, hidden_edited)


def _states_entering(loaded: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, layer_index: int,
                     chunk: int, advance: Callable[[int], None], logits: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([len(rows), S, d] states entering layer `layer_index`, [len(rows), V] float16 last-position logits
    or, without `logits`, None) of prompt rows `rows` of the right-padded `ids`, in chunks."""
    model, arch = loaded.model, loaded.arch
    base = model.get_submodule(arch.base)
    layer = model.get_submodule(arch.module("layer", layer_index))
    width, last = ids.shape[1], mask.sum(1) - 1
    hidden_parts, teacher_parts = [], []
    seen = {}
    handle = layer.register_forward_pre_hook(
        lambda m, a, k: seen.__setitem__("h", (a[0] if a else k["hidden_states"]).detach()), with_kwargs=True)
    try:
        for lo in range(0, len(rows), chunk):
            sl = rows[lo:lo + chunk]
            w = int(mask[sl].sum(1).max())
            out = base(input_ids=ids[sl, :w].to(loaded.device), attention_mask=mask[sl, :w].to(loaded.device))
            if logits:  # the teacher's; the edited states need none
                h_last = out.last_hidden_state[torch.arange(out.last_hidden_state.shape[0]), last[sl]]
                teacher_parts.append(unembed(model, arch, h_last).to(torch.float16).cpu())
            h = torch.zeros(seen["h"].shape[0], width, seen["h"].shape[-1])
            h[:, :w] = seen["h"].float().cpu()
            hidden_parts.append(h)
            advance(len(sl))
    finally:
        handle.remove()
    return torch.cat(hidden_parts), torch.cat(teacher_parts) if logits else None


# -- training ---------------------------------------------------------------------------------------
@dataclass
class TrainState:
    theta: list[torch.Tensor]
    step: int = 0
    seconds: float = 0.0
    curve: list[dict] = field(default_factory=list)
    # Θ at the best validation point so far (a short, high-rate run can overshoot; the mask ships from here)
    best_theta: list[torch.Tensor] | None = None
    best_step: int | None = None

    def keep_if_best(self, score: float) -> bool:
        """Call before appending this point to `curve`; ties keep the earlier (less trained) Θ."""
        if self.best_theta is not None and self.curve and score <= max(c["val_rsr"] for c in self.curve):
            return False
        self.best_theta = [t.detach().clone() for t in self.theta]
        self.best_step = self.step
        return True

    def shipped(self, best: bool) -> tuple[list[torch.Tensor], int]:
        """(Θ, step) to ship: the best validation point when asked for and validated, else the last step."""
        if best and self.best_theta is not None:
            return self.best_theta, self.best_step
        return self.theta, self.step


class MaskTrainer:
    """Trains Θ for the masked tensors of `targets` ([(module path, transposed)]) against edits.

    ROME: `u`, `v` are per-record factors of the first target (any further targets are masked, not
    edited). MEMIT: `dense[g][t]` is batch edit g's ΔW on
    target t (None: that edit leaves t alone) and `record_group[i]` the batch edit record i belongs to;
    a record is trained against the masked weights of its own batch edit. `unmasked[g]`: batch edit g's
    edits of tensors no target covers (`train --mask-layer`); those at or above `start_layer` run
    unmasked in the forward, those below reach it through `data.hidden_edited`."""

    def __init__(self, loaded: LoadedModel, targets: list[tuple[str, bool]], start_layer: int, data: PromptSet,
                 config: TrainConfig, u: torch.Tensor | None = None, v: torch.Tensor | None = None,
                 dense: list[list[torch.Tensor | None]] | None = None, record_group: torch.Tensor | None = None,
                 unmasked: list[list] | None = None):
        self.loaded, self.targets, self.start, self.data, self.cfg = loaded, targets, start_layer, data, config
        # [P] the original model prefers the true object's first token to the new one's (margin_unknown)
        self.original_knew = (data.teacher.gather(1, data.true_tok[:, None])
                              > data.teacher.gather(1, data.new_tok[:, None]))[:, 0]
        # Θ, the edit factors and the frozen weights live where the model runs; prompts stay on the CPU
        self.device = loaded.device
        self.u, self.v = (None, None) if u is None else (u.to(self.device), v.to(self.device))
        self.modules, self.base_weights = [], []
        for path, transposed in targets:
            module = loaded.model.get_submodule(path)
            self.base_weights.append(canonical_weight(module, transposed, path))
            self.modules.append(MaskedProjection.standing_in(module, self.base_weights[-1]))
        # the edited weights of each batch edit, built once (one dense matrix per edit and target, not per record)
        self.group_weights = [[w if d is None else w + d.float().to(w.device) for w, d in zip(self.base_weights, deltas)]
                              for deltas in dense or []]
        # the unmasked edited projections above the mask, one stand-in per batch edit and tensor (the
        # frozen weights are never written: a backward still to come reads them)
        unmasked = unmasked if unmasked is not None else [[] for _ in dense or []]
        bases: dict[str, torch.Tensor] = {}  # each tensor oriented once, whatever the number of batch edits

        def stand_in(edit) -> tuple[str, MaskedProjection]:
            path = edit.tensor.removesuffix(".weight")
            module = loaded.model.get_submodule(path)
            if path not in bases:  # MEMIT edits only MLP output projections, hence their orientation
                bases[path] = canonical_weight(module, loaded.arch.mlp_out_transposed, path)
            return path, MaskedProjection.standing_in(module, bases[path] + edit.delta().to(bases[path].device))

        self.group_unmasked = [[stand_in(e) for e in edits if e.layer >= start_layer] for edits in unmasked]
        if data.hidden_edited is None and any(e.layer < start_layer for edits in unmasked for e in edits):
            raise ValueError("edits below the masked layers need the states they leave (prepare_prompts' edits_below)")
        self.record_group = record_group
        n_records = int(data.record.max()) + 1
        if dense is not None and (record_group is None or len(record_group) != n_records):
            raise ValueError("dense batch edits need the batch edit of every record")
        self.prompts_of = [[] for _ in range(n_records)]
        for j, r in enumerate(data.record.tolist()):
            self.prompts_of[r].append(j)

    def init_state(self) -> TrainState:
        gen = torch.Generator().manual_seed(self.cfg.seed)
        # drawn on the CPU: the same seed gives the same Θ on every device
        theta = [torch.empty(m.weight.shape).normal_(self.cfg.theta_mean, self.cfg.theta_std, generator=gen)
                 .to(self.device) for m in self.modules]
        return TrainState(theta)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.prompts_of) / self.cfg.batch_records)

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch

    def batch_records(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.prompts_of), generator=torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch))
        return order[k * self.cfg.batch_records:(k + 1) * self.cfg.batch_records].tolist()

    def loss(self, theta: list[torch.Tensor], records: list[int], progress: float, edited: bool = True,
             pack_tokens: int = 4096):
        """The training loss on `records` (their rewrite + paraphrase prompts), whose prompts run packed
        end to end without padding (padding was a third of the tokens in length buckets)."""
        cfg, data = self.cfg, self.data
        rows = torch.tensor([j for r in records for j in self.prompts_of[r]])
        tau = cfg.tau(progress)
        masks = [torch.sigmoid(t / tau) for t in theta]
        T = cfg.temperature(progress)
        margin_sum, kl_sum, anchor_sum, flips = 0.0, 0.0, 0.0, 0.0
        anchored = cfg.beta_anchor > 0 and edited

        def kl_to_teacher(pack: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:  # KL(teacher ‖ student)
            teacher = F.log_softmax(data.teacher[pack].float().to(logits.device) / T, dim=-1)
            return F.kl_div(F.log_softmax(logits / T, dim=-1), teacher, log_target=True, reduction="sum")

        for group, pack in self._packs(rows, pack_tokens):
            logits = self._last_logits(pack, masks, edited, group)
            device = logits.device
            z_new = logits.gather(1, data.new_tok[pack, None].to(device))[:, 0]
            z_true = logits.gather(1, data.true_tok[pack, None].to(device))[:, 0]
            weight = torch.where(self.original_knew[pack], 1.0, cfg.margin_unknown).to(device)
            margin_sum = margin_sum + (weight * F.relu(z_new - z_true + cfg.margin)).sum()
            kl_sum = kl_sum + kl_to_teacher(pack, logits)
            flips += float((z_true > z_new).sum())
            if anchored:
                anchor_sum = anchor_sum + kl_to_teacher(pack, self._last_logits(pack, masks, False, group))
        n = len(rows)
        margin, kl, anchor = margin_sum / n, kl_sum / n, anchor_sum / n
        pruned = torch.cat([(1 - K).reshape(-1) for K in masks]).mean()
        sparsity = cfg.lam(progress) * F.relu(pruned - cfg.sparsity_max)
        total = margin + sparsity + T * T * (cfg.beta_kl * kl + cfg.beta_anchor * anchor)
        info = {"margin": margin.item(), "kl": kl.item(), "pruned_soft": pruned.item(), "flip": flips / n}
        if anchored:
            info["anchor_kl"] = anchor.item()
        return total, info

    def _packs(self, rows: torch.Tensor, pack_tokens: int) -> list[tuple[int | None, torch.Tensor]]:
        """(batch edit, rows): rows of one batch edit each (MEMIT), in packs of about `pack_tokens` tokens."""
        if self.record_group is None:
            parts = [(None, rows)]
        else:
            of_row = self.record_group[self.data.record[rows]]
            parts = [(g, rows[of_row == g]) for g in of_row.unique().tolist()]
        lengths = self.data.mask.sum(1)
        return [(g, part[first:last]) for g, part in parts
                for first, last in consecutive_groups(lengths[part].tolist(), pack_tokens)]

    def _last_logits(self, rows: torch.Tensor, masks: list[torch.Tensor], edited: bool,
                     group: int | None = None) -> torch.Tensor:
        """Logits at the last prompt position of `rows`, from the layers >= the masked one, the rows'
        tokens packed into one sequence (a block-causal mask keeps each prompt to itself)."""
        data, model, arch = self.data, self.loaded.model, self.loaded.arch
        device = self.loaded.device
        lens = data.mask[rows].sum(1)
        tok_row, tok_pos, starts = pack_index(lens)
        src = rows[tok_row]
        states = data.hidden_edited if edited and data.hidden_edited is not None else data.hidden
        weights = self.group_weights[group] if group is not None and edited else self.base_weights
        read = starts + data.last[rows]  # the pack positions the loss reads
        last_mlp = arch.module("mlp", self.loaded.num_layers - 1)
        for i, (module, K, weight) in enumerate(zip(self.modules, masks, weights)):
            module.K, module.weight = K, weight
            if self.u is not None and edited and i == 0:  # one edit per packed token: its prompt's record's
                # inside the last MLP only the read positions run (OnlyAt below), so only their edits
                tokens = src[read] if self.targets[0][0].startswith(last_mlp + ".") else src
                module.u, module.v = self.u[data.record[tokens]][None], self.v[data.record[tokens]][None]
            else:
                module.u = module.v = None
        mask = block_causal_mask(tok_row, tok_pos, model.dtype, device=device)
        read = read.to(device)
        with contextlib.ExitStack() as stack:
            for (path, _), module in zip(self.targets, self.modules):
                stack.enter_context(swapped(model, path, module))
            for path, module in self.group_unmasked[group] if group is not None and edited else ():
                stack.enter_context(swapped(model, path, module))
            # after the swaps above, so the stand-in runs the swapped projections
            stack.enter_context(swapped(model, last_mlp, OnlyAt(model.get_submodule(last_mlp), read)))
            stack.enter_context(layers_skipped_below(model, arch, self.start))
            stack.enter_context(attention_in_groups(model, torch.zeros_like(lens), lens))
            layer = model.get_submodule(arch.module("layer", self.start))
            hidden = states[src, tok_pos].unsqueeze(0).to(device, model.dtype)
            handle = layer.register_forward_pre_hook(replace_hidden_hook(hidden), with_kwargs=True)
            try:
                out = model.get_submodule(arch.base)(
                    input_ids=data.ids[src, tok_pos].unsqueeze(0).to(device),
                    attention_mask=mask[None, None].to(device), position_ids=tok_pos.unsqueeze(0).to(device),
                    use_cache=False)
            finally:
                handle.remove()
        return unembed(model, arch, out.last_hidden_state[0, read]).float()

    def train(self, state: TrainState, optimizer: torch.optim.Optimizer, on_step: Callable | None = None,
              on_epoch_end: Callable | None = None, checkpoint: Callable | None = None, stop_after: int | None = None):
        cfg = self.cfg
        for p in state.theta:
            p.requires_grad_(True)
        last = stop_after if stop_after is not None else self.total_steps
        while state.step < min(last, self.total_steps):
            start = time.perf_counter()
            progress = state.step / max(self.total_steps - 1, 1)
            optimizer.zero_grad(set_to_none=True)
            loss, info = self.loss(state.theta, self.batch_records(state.step), progress)
            loss.backward()
            if cfg.grad_clip > 0:  # 0: no clipping (clipping to norm 0 would zero every step)
                torch.nn.utils.clip_grad_norm_(state.theta, cfg.grad_clip)
            optimizer.step()
            state.step += 1
            state.seconds += time.perf_counter() - start
            info["loss"] = loss.item()
            if on_step:
                on_step(state, info)
            if state.step % self.steps_per_epoch == 0 and on_epoch_end:
                on_epoch_end(state)
            if checkpoint and (state.step % cfg.checkpoint_every == 0 or state.step == self.total_steps):
                checkpoint(state, optimizer)
        for p in state.theta:
            p.requires_grad_(False)
        return state

    def score_logits(self, theta: list[torch.Tensor]) -> list[torch.Tensor]:
        """Θ/τ_end, the logits of the final K, on the CPU: what thresholds cut (K itself rounds to 1)."""
        return [(t.detach().float() / self.cfg.tau(1.0)).cpu() for t in theta]


def make_optimizer(state: TrainState, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(state.theta, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


# -- checkpoints (safetensors + JSON: nothing is ever unpickled) ------------------------------------
def save_checkpoint(path: Path, state: TrainState, optimizer: torch.optim.AdamW, meta: dict) -> None:
    tensors = {}
    for i, theta in enumerate(state.theta):
        tensors[f"theta.{i}"] = theta.detach().cpu()
        if state.best_theta is not None:
            tensors[f"best_theta.{i}"] = state.best_theta[i].cpu()
        opt = optimizer.state.get(theta, {})
        if opt:
            tensors[f"exp_avg.{i}"] = opt["exp_avg"].cpu()
            tensors[f"exp_avg_sq.{i}"] = opt["exp_avg_sq"].cpu()
            tensors[f"opt_step.{i}"] = torch.as_tensor(opt["step"]).reshape(1).float().cpu()
    info = {**meta, "step": state.step, "seconds": state.seconds, "curve": state.curve, "best_step": state.best_step}
    write_safetensors(path, tensors, {"editguard_train": json.dumps(info)}, digest=True)


def checkpoint_info(path: Path) -> dict:
    """A training checkpoint's metadata, read from its header alone."""
    from ..checkpoint import read_safetensors_header

    try:
        _, raw = read_safetensors_header(path)
        info = json.loads(raw["editguard_train"])
    except (EditguardError, KeyError, *BAD_JSON):
        raise EditguardError(f"{path}: not a readable editguard training checkpoint") from None
    if not isinstance(info, dict):
        raise EditguardError(f"{path}: not a readable editguard training checkpoint")
    types = {"config": dict, "fingerprints": dict, "targets": list, "settings": dict, "model_fingerprint": str,
             "data_hash": str}
    bad = [k for k, kind in types.items() if k in info and not isinstance(info[k], kind)]
    if bad:
        raise EditguardError(f"corrupted training checkpoint {path}: {bad[0]} is malformed; remove it to start over")
    return info


def load_checkpoint(path: Path, cfg: TrainConfig, device: torch.device | str = "cpu",
                    shapes: list[tuple[int, ...]] | None = None) -> tuple[TrainState, torch.optim.AdamW, dict]:
    """The training state a checkpoint holds; with `shapes` (the masked tensors'), each Θ must fit one.
    Anything malformed is named as a corrupted checkpoint, never met later as a shape error or a mask
    silently missing a tensor."""

    def corrupted(why: str) -> EditguardError:
        return EditguardError(f"corrupted training checkpoint {path}: {why}; remove it to start over")

    info = checkpoint_info(path)
    step, seconds, curve = info.get("step"), info.get("seconds"), info.get("curve", [])
    if type(step) is not int or step < 0 or type(seconds) not in (int, float):
        raise corrupted("step or seconds missing or not numbers")
    if not (isinstance(curve, list) and all(isinstance(c, dict) and isinstance(c.get("val_rsr"), (int, float))
                                            for c in curve)):
        raise corrupted("the validation curve is malformed")
    try:
        stored, _ = load_checked(path, "training checkpoint")
    except EditguardError as exc:
        raise EditguardError(f"{exc.message}; remove it to start over") from None
    keys = set(stored)

    def get(name: str) -> torch.Tensor:
        if name not in keys:  # named by its siblings but absent
            raise corrupted(f"{name} missing")
        return stored[name].to(device)

    n = len([k for k in keys if k.startswith("theta.")])
    if shapes is not None and n != len(shapes):
        raise corrupted(f"{n} Θ tensors for {len(shapes)} masked tensors")
    try:
        theta = [get(f"theta.{i}") for i in range(n)]
        state = TrainState(theta, step, float(seconds), curve)
        if "best_theta.0" in keys:
            state.best_theta = [get(f"best_theta.{i}") for i in range(n)]
            state.best_step = info.get("best_step")
        optimizer = make_optimizer(state, cfg)
        for i, t in enumerate(theta):
            if f"exp_avg.{i}" in keys:
                step_i = get(f"opt_step.{i}").reshape(-1)
                if not len(step_i):
                    raise corrupted(f"opt_step.{i} is empty")
                optimizer.state[t] = {"step": torch.tensor(float(step_i[0])),  # CPU, as Adam keeps it
                                      "exp_avg": get(f"exp_avg.{i}"), "exp_avg_sq": get(f"exp_avg_sq.{i}")}
    except EditguardError:
        raise
    except Exception as exc:  # a tensor of a kind the optimizer cannot take (an integer Θ, say)
        raise corrupted(first_line(exc)) from None
    for i, t in enumerate(theta):
        want = tuple(shapes[i]) if shapes is not None else tuple(t.shape)
        tensors = [t, *(state.best_theta[i:i + 1] if state.best_theta else []),
                   *(optimizer.state[t][k] for k in ("exp_avg", "exp_avg_sq") if t in optimizer.state)]
        if any(tuple(x.shape) != want for x in tensors):
            raise corrupted(f"Θ {i} or its optimizer state is not of shape {list(want)}")
    return state, optimizer, info


def data_hash(case_ids: list, bank_hash: str) -> str:
    return hashlib.sha256(json.dumps([sorted(case_ids), bank_hash]).encode()).hexdigest()[:16]
