"""The target vector of an edit: v* (ROME, at the MLP output) or z (MEMIT, at a layer's output).

For each fact, δ is optimised so the model, with δ added at the subject's last token, predicts the new
object after the rewrite prompt under every context template, while keeping "{subject} is a" close to
its original distribution (EasyEdit's loss: NLL + kl_factor·KL + weight decay, norm clamp, early stop).

Two implementations with the same maths:
* `optimise_fast` — many facts at once, cached prefixes, only layers above the edited one (from the
  edited one itself where its MLP output is normalised) on only the suffix tokens, logits only at the
  positions the loss reads, per-fact Adam and early stopping;
* `optimise_reference` — EasyEdit's loop, one fact, a full forward of every prompt each step. It is
  the correctness oracle (`bench/edit_speed.py` compares the two).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .facts import Fact, encode_at_subject, target_ids
from .forward import Tokenized, build_prefix_cache, injection_point, run_suffix, unembed

KL_TEMPLATE = "{} is a"


@dataclass
class FactPlan:
    """The token sequences of one fact: one rewrite prompt per context template, then the KL prompt."""

    fact: Fact
    targets: list[int]
    seqs: list[list[int]]
    splits: list[int]  # subject's last token in each sequence

    @property
    def n_rewrite(self) -> int:
        return len(self.seqs) - 1

    def loss_positions(self, i: int) -> list[int]:
        """Positions whose logits predict the target tokens in rewrite sequence i."""
        n = len(self.seqs[i])
        return list(range(n - len(self.targets), n))


def plan_fact(tokenizer, fact: Fact, templates: list[str]) -> FactPlan:
    fact.validate()
    targets = target_ids(tokenizer, fact.target_new)
    seqs, splits = [], []
    for context in templates:
        ids, split = encode_at_subject(tokenizer, context.replace("{}", fact.prompt, 1), fact.subject)
        seqs.append(ids + targets[:-1])  # ids, not text: the target tokens land exactly where the loss reads
        splits.append(split)
    ids, split = encode_at_subject(tokenizer, KL_TEMPLATE, fact.subject)
    seqs.append(ids[: split + 1])  # the KL term reads the subject's last token; later tokens cannot matter
    splits.append(split)
    return FactPlan(fact, targets, seqs, splits)


@dataclass
class DeltaResult:
    v0: torch.Tensor  # [F, d] the value at the injection point before editing (target_init)
    delta: torch.Tensor  # [F, d]
    steps: list[int]  # optimisation steps each fact took
    final_loss: list[float]
    captured: dict[str, torch.Tensor] = field(default_factory=dict)  # per sequence, at the split


class _RowAdam:
    """torch.optim.Adam's arithmetic (default betas/eps), with a step count per row so a fact that
    stopped early is frozen exactly as a single-fact run would leave it."""

    def __init__(self, param: torch.Tensor, lr: float, betas=(0.9, 0.999), eps=1e-8):
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self.t = torch.zeros(param.shape[0], dtype=torch.long, device=param.device)

    @torch.no_grad()
    def step(self, rows: torch.Tensor, grad: torch.Tensor) -> None:
        b1, b2 = self.betas
        self.t[rows] += 1
        t = self.t[rows].to(self.param.dtype).unsqueeze(1)
        m = self.m[rows].mul(b1).add(grad, alpha=1 - b1)
        v = self.v[rows].mul(b2).addcmul(grad, grad, value=1 - b2)
        self.m[rows], self.v[rows] = m, v
        bias1 = 1 - b1 ** t
        bias2_sqrt = (1 - b2 ** t).sqrt()
        denom = (v.sqrt() / bias2_sqrt).add(self.eps)
        self.param[rows] = self.param[rows] - (self.lr / bias1) * m / denom


def optimise_fast(
    model, arch, plans: list[FactPlan], hp, site_path: str, start_layer: int, pad_id: int,
    captures: dict[str, tuple[str, str]] | None = None, progress: Callable[[int], None] | None = None,
) -> DeltaResult:
    """Optimise δ for all `plans` together. `site_path` is the module whose output gets δ (in layer
    `start_layer`); `captures` are read at each sequence's split during the no-grad prefix pass.

    Each fact's loss depends only on its own δ and the per-row Adam keeps each fact's state apart,
    so the result equals running the facts one by one."""
    seq_fact, seqs, splits, first_seq = [], [], [], []
    for f, plan in enumerate(plans):
        first_seq.append(len(seqs))
        seqs += plan.seqs
        splits += plan.splits
        seq_fact += [f] * len(plan.seqs)
    captures = dict(captures or {})
    captures["__site__"] = (site_path, "out")
    run_from = injection_point(model, arch, site_path, start_layer)
    cache = build_prefix_cache(model, arch, Tokenized(seqs, splits), run_from, captures, pad_id=pad_id)
    device = cache.hidden.device
    v0 = cache.captured["__site__"][torch.tensor(first_seq)].float()  # target_init: the plain rewrite prompt
    n_facts, dim = v0.shape
    delta = torch.zeros(n_facts, dim, device=device)  # fp32 even for bf16 models
    adam = _RowAdam(delta, hp.v_lr)
    max_norm = hp.clamp_norm_factor * v0.norm(dim=1)
    # what the NLL reads, one entry per target token: sequence, suffix position, token, weight
    reads: list[tuple[int, int, int, float]] = []
    is_kl = torch.zeros(len(seqs), dtype=torch.bool)  # the KL prompt: read at suffix position 0
    for plan, s0 in zip(plans, first_seq):
        for i in range(plan.n_rewrite):
            w = 1.0 / (len(plan.targets) * plan.n_rewrite)  # -sum(log p)/T per prompt, mean over prompts
            reads += [(s0 + i, p - plan.splits[i], t, w) for p, t in zip(plan.loss_positions(i), plan.targets)]
        is_kl[s0 + plan.n_rewrite] = True
    read_seq, read_pos, read_tgt = (torch.tensor([r[k] for r in reads]) for k in range(3))
    read_w = torch.tensor([r[3] for r in reads], device=device)
    seq_fact_t = torch.tensor(seq_fact)
    init_kl = torch.zeros(n_facts, 0)
    active = torch.ones(n_facts, dtype=torch.bool)
    steps = [hp.v_num_grad_steps] * n_facts
    final_loss = [float("nan")] * n_facts
    for it in range(hp.v_num_grad_steps):
        facts = active.nonzero().squeeze(1)
        if facts.numel() == 0:
            break
        fact_local = torch.full((n_facts,), -1, dtype=torch.long)
        fact_local[facts] = torch.arange(facts.numel())
        delta_param = delta[facts].clone().requires_grad_(True)
        nll = torch.zeros(facts.numel(), device=device)
        rows = active[seq_fact_t].nonzero().squeeze(1)
        row_fact = fact_local[seq_fact_t[rows]]
        if run_from > start_layer:  # δ joins the residual stream as it is: add it where the run starts
            hidden = run_suffix(model, arch, cache, rows, add_to_input=delta_param[row_fact])
        else:
            hidden = run_suffix(model, arch, cache, rows, add_at_split=(site_path, delta_param[row_fact]))
        row_of_seq = torch.full((len(seqs),), -1, dtype=torch.long)
        row_of_seq[rows] = torch.arange(len(rows))
        live = active[seq_fact_t[read_seq]]
        read_row = row_of_seq[read_seq[live]]
        logits = unembed(model, arch, hidden[read_row, read_pos[live]])
        lp = torch.log_softmax(logits.float(), dim=-1).gather(1, read_tgt[live].to(device)[:, None])[:, 0]
        nll = nll.index_add(0, row_fact[read_row].to(device), -lp * read_w[live.to(device)])
        kl_j = is_kl[rows].nonzero().squeeze(1)  # one KL prompt per fact, in fact order
        kl_lp = torch.log_softmax(unembed(model, arch, hidden[kl_j, 0]).float(), dim=-1)
        if init_kl.shape[1] == 0:
            init_kl = kl_lp.detach().clone()  # step 0: every fact is active
        # F.kl_div(init, current, log_target=True, reduction="batchmean") with one KL prompt per fact
        kl = hp.kl_factor * (kl_lp.exp() * (kl_lp - init_kl[facts])).sum(dim=1)
        wd = hp.v_weight_decay * (delta_param.norm(dim=1) / v0[facts].norm(dim=1) ** 2)
        per_fact = nll + kl + wd
        losses = per_fact.detach().cpu()
        for j, f in enumerate(facts.tolist()):
            final_loss[f] = float(losses[j])
        stop = losses < hp.early_stop_loss  # before the last-step exit, as the reference loop counts steps
        for f in facts[stop].tolist():
            active[f] = False
            steps[f] = it
        if it == hp.v_num_grad_steps - 1:
            break
        go = ~stop
        if go.any():
            (grad,) = torch.autograd.grad(per_fact[go.to(device)].sum(), delta_param)
            adam.step(facts[go], grad[go.to(device)])
            moved = facts[go]
            norms = delta[moved].norm(dim=1)
            scale = torch.where(norms > max_norm[moved], max_norm[moved] / norms, torch.ones_like(norms))
            delta[moved] = delta[moved] * scale.unsqueeze(1)
        if progress:
            progress(it)
    captured = {k: v for k, v in cache.captured.items() if k != "__site__"}
    return DeltaResult(v0=v0, delta=delta.detach(), steps=steps, final_loss=final_loss, captured=captured)


def optimise_reference(model, tokenizer, plan: FactPlan, hp, site_path: str, pad_id: int) -> DeltaResult:
    """EasyEdit's compute_v loop for one fact: full forward of all prompts each step, torch Adam."""
    device = next(model.parameters()).device
    n = len(plan.seqs)
    width = max(len(s) for s in plan.seqs)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    targets = torch.full((plan.n_rewrite, width), -100, dtype=torch.long)
    for i, seq in enumerate(plan.seqs):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        if i < plan.n_rewrite:
            targets[i, len(seq) - len(plan.targets): len(seq)] = torch.tensor(plan.targets)
    ids, mask, targets = ids.to(device), mask.to(device), targets.to(device)
    dim = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    delta = torch.zeros(dim, requires_grad=True, device=device)
    target_init = None
    kl_init = None

    def hook(module, args, output):
        nonlocal target_init
        out = output[0] if isinstance(output, tuple) else output
        if target_init is None:
            target_init = out[0, plan.splits[0]].detach().clone()
        add = torch.zeros_like(out)
        add[torch.arange(n), torch.tensor(plan.splits)] = delta
        out = out + add
        return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out

    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    steps, loss_value = hp.v_num_grad_steps, float("nan")
    for it in range(hp.v_num_grad_steps):
        opt.zero_grad()
        handle = model.get_submodule(site_path).register_forward_hook(hook)
        try:
            logits = model(input_ids=ids, attention_mask=mask).logits
        finally:
            handle.remove()
        kl_log_probs = torch.log_softmax(logits[n - 1, plan.splits[-1]].unsqueeze(0).float(), dim=1)
        if kl_init is None:
            kl_init = kl_log_probs.detach().clone()
        log_probs = torch.log_softmax(logits[: plan.n_rewrite].float(), dim=2)
        token_lp = torch.gather(log_probs, 2, torch.where(targets != -100, targets, 0).unsqueeze(2)).squeeze(2)
        nll = (-(token_lp * (targets != -100).float()).sum(1) / len(plan.targets)).mean()
        kl = hp.kl_factor * torch.nn.functional.kl_div(kl_init, kl_log_probs, log_target=True, reduction="batchmean")
        wd = hp.v_weight_decay * (torch.norm(delta) / torch.norm(target_init) ** 2)
        loss = nll + kl + wd
        loss_value = loss.item()
        if loss < hp.early_stop_loss:
            steps = it
            break
        if it == hp.v_num_grad_steps - 1:
            break
        loss.backward()
        opt.step()
        max_norm = hp.clamp_norm_factor * target_init.norm()
        if delta.norm() > max_norm:
            with torch.no_grad():
                delta[...] = delta * max_norm / delta.norm()
    return DeltaResult(v0=target_init.unsqueeze(0), delta=delta.detach().unsqueeze(0), steps=[steps],
                       final_loss=[loss_value])
