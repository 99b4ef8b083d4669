"""Mask-training speed: the paper's loop against editguard's trainer, same records, same mask, one run.

    python bench/train_speed.py --model demo:smollm2-135m --records 16 --steps 3 --batch 8

Paper loop: for every record, rebuild the dense edited weight Ŵ_i = W + u_i v_iᵀ, run the teacher (the
unedited model) and the student (Ŵ_i ⊙ K) over the record's prompts (one right-padded forward each) from
the embeddings up, full logits at every position. editguard: per-prompt factored edits in one packed
sequence (no padding), cached states below the layer, cached teacher logits, logits only at the last
position. Both start from the same Θ and see the same batches; the table shows records/second, the
ratio, how far the losses drift apart after the identical steps, and the multiply-adds of one step of
each (torch's FLOP counter: matrix products, attention not counted), so the time ratio can be read
against the arithmetic ratio. A second editguard row runs the model's frozen layers in bfloat16
(`--dtype bfloat16`; Θ, K, the edit and attention stay float32), against the float32 paper loop and
against the paper's loop on the same bfloat16 model, so the table separates what precision buys from
what the trainer's design buys.
`--device-map cuda` runs everything on a GPU; `--compare-attention` adds a row with the other attention
choice for packs (attention batched over groups of rows, editguard's choice on a CPU, against one masked
call over the pack, its choice elsewhere). Edits come from a fresh ROME run (the demo preset) on the first records of
rome-train (not timed).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from editguard.data.counterfact import load_split
from editguard.edit import forward
from editguard.edit.facts import Fact, target_ids
from editguard.edit.forward import pad_batch
from editguard.edit.hparams import load_hparams
from editguard.edit.rome import rome_edits
from editguard.loading import load_model
from editguard.mask.train import (MaskedProjection, MaskTrainer, canonical_weight, config_for, make_optimizer,
                                  prepare_prompts, record_prompts, swapped)
from editguard.resolve import resolve


def paper_loss(loaded, trainer: MaskTrainer, theta, records, facts, progress, module_path, weight, bias):
    """One record at a time, as the paper routes each sample to its own Ŵ_i: the record's prompts (rewrite
    + paraphrases) in one right-padded forward of the teacher and one of the student."""
    cfg, tok, model = trainer.cfg, loaded.tokenizer, loaded.model
    K = torch.sigmoid(theta / cfg.tau(progress))
    T = cfg.temperature(progress)
    margins, kls = [], []
    for r in records:
        dense = weight + torch.outer(trainer.u[r], trainer.v[r])  # Ŵ_i, rebuilt for every record
        fact = facts[r]
        new_tok, true_tok = target_ids(tok, fact.target_new)[0], target_ids(tok, fact.target_true)[0]
        ids, mask = pad_batch([tok(text).input_ids for text in record_prompts(fact, cfg.paraphrases)],
                              tok.pad_token_id)
        ids, mask, last = ids.to(model.device), mask.to(model.device), (mask.sum(1) - 1).to(model.device)
        rows = torch.arange(len(ids), device=model.device)
        with torch.no_grad():
            teacher = model(input_ids=ids, attention_mask=mask).logits[rows, last].float()
        student_module = MaskedProjection(dense, bias)
        student_module.K = K
        with swapped(model, module_path, student_module):
            logits = model(input_ids=ids, attention_mask=mask).logits  # full logits everywhere
        logits = logits[rows, last].float()
        margins.append(F.relu(logits[:, new_tok] - logits[:, true_tok] + cfg.margin))
        kls.append(F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(teacher / T, -1),
                            log_target=True, reduction="none").sum(-1))
    pruned = (1 - K).mean()
    return (torch.cat(margins).mean() + cfg.lam(progress) * F.relu(pruned - cfg.sparsity_max)
            + cfg.beta_kl * T * T * torch.cat(kls).mean())


def step_gflop(loss_fn) -> float:
    """Matrix-product GFLOP of one loss + backward (not timed; the FLOP counter slows both loops alike)."""
    with FlopCounterMode(display=False) as counter:
        loss_fn().backward()
    return counter.get_total_flops() / 1e9


def ours(loaded, facts, layer, module_path, transposed, cfg, u, v, steps: int) -> dict:
    """editguard's trainer on `loaded` (its dtype is the compute dtype; Θ, K and the edit stay float32)."""
    start = time.perf_counter()
    data = prepare_prompts(loaded, facts, layer, cfg.paraphrases)
    prep = time.perf_counter() - start
    trainer = MaskTrainer(loaded, [(module_path, transposed)], layer, data, cfg, u=u, v=v)
    state = trainer.init_state()
    theta0 = state.theta[0].clone()
    optimizer = make_optimizer(state, cfg)
    start = time.perf_counter()
    trainer.train(state, optimizer, stop_after=steps)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        loss = float(trainer.loss(state.theta, trainer.batch_records(steps), steps / (trainer.total_steps - 1))[0])
    theta = [state.theta[0].detach().clone().requires_grad_(True)]
    gflop = step_gflop(lambda: trainer.loss(theta, trainer.batch_records(0), 0.0)[0])
    return dict(loaded=loaded, trainer=trainer, theta0=theta0, theta=state.theta[0].detach(), seconds=seconds, prep=prep,
                loss=loss, gflop=gflop)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo:smollm2-135m")
    parser.add_argument("--hparams", default="smollm2-135m")
    parser.add_argument("--records", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-bfloat16", dest="bfloat16", action="store_false",
                        help="skip the row with the model's frozen layers in bfloat16")
    parser.add_argument("--device-map", default="cpu", help="cpu | cuda | ... (every row runs there)")
    parser.add_argument("--compare-attention", action="store_true",
                        help="add a float32 row with the other attention choice for packs")
    args = parser.parse_args()
    loaded = load_model(resolve(args.model), device_map=args.device_map)
    hp = load_hparams(args.hparams, "rome")
    facts = [Fact.from_record(r) for r in load_split("rome-train")[: args.records]]
    edits = rome_edits(loaded, facts, hp)
    layer, module_path = hp.layers[0], hp.rewrite_module_tmp.format(hp.layers[0])
    transposed = loaded.arch.mlp_out_transposed
    u = torch.stack([e.u for e in edits]).float()
    v = torch.stack([e.v for e in edits]).float()

    cfg = config_for("cpu", "rome", batch_records=args.batch, epochs=10)
    runs = {"float32": ours(loaded, facts, layer, module_path, transposed, cfg, u, v, args.steps)}
    if args.compare_attention:
        grouped = loaded.device.type not in forward.GROUPED_ATTENTION_DEVICES
        with _grouped_attention_on(loaded.device.type, grouped):
            runs["float32, " + ("grouped" if grouped else "one-call") + " attention"] = ours(
                loaded, facts, layer, module_path, transposed, cfg, u, v, args.steps)
    if args.bfloat16:
        runs["bfloat16"] = ours(load_model(resolve(args.model), dtype="bfloat16", device_map=args.device_map),
                                facts, layer, module_path, transposed, cfg, u, v, args.steps)
    trainer, theta0 = runs["float32"]["trainer"], runs["float32"]["theta0"]
    n = args.steps * args.batch
    papers = {"float32": paper_run(loaded, trainer, theta0, facts, module_path, transposed, cfg, args.steps)}
    if args.bfloat16:  # the paper's loop in the same precision, so the bfloat16 ratio is not a precision gain alone
        papers["bfloat16"] = paper_run(runs["bfloat16"]["loaded"], trainer, theta0, facts, module_path, transposed,
                                       cfg, args.steps)
    print(f"{args.model} on {loaded.device}: layer {layer}, {args.steps} steps x {args.batch} records (3 prompts each)")
    width = max(19, *(len(f"editguard {d}") for d in runs))
    print(f"{'loop':<{width}} {'seconds':>8} {'records/s':>10} {'GFLOP/step':>11} {'GFLOP/s':>8}")

    def row(name: str, run: dict) -> str:
        return (f"{name:<{width}} {run['seconds']:>8.1f} {n / run['seconds']:>10.2f} {run['gflop']:>11.0f} "
                f"{run['gflop'] * args.steps / run['seconds']:>8.0f}")

    for dtype, paper in papers.items():
        print(row("paper " + dtype, paper))
    for dtype, run in runs.items():
        print(row(f"editguard {dtype}", run) + f"   (+ {run['prep']:.1f} s one-off caching of states and teacher)")
    base = papers["float32"]
    for dtype, run in runs.items():
        print(f"editguard {dtype}: speed-up {base['seconds'] / run['seconds']:.1f}x over the paper's float32 loop "
              f"on {base['gflop'] / run['gflop']:.1f}x fewer matrix-product FLOPs "
              f"(with caching counted once: {base['seconds'] / (run['seconds'] + run['prep']):.1f}x); loss after "
              f"{args.steps} steps: paper {base['loss']:.5f}, editguard {run['loss']:.5f}, "
              f"|diff| {abs(base['loss'] - run['loss']):.2e}; "
              f"max |Θ diff| {float((base['theta'] - run['theta'].cpu()).abs().max()):.2e}")
    if "bfloat16" in papers:
        same = papers["bfloat16"]
        print(f"editguard bfloat16: speed-up {same['seconds'] / runs['bfloat16']['seconds']:.1f}x over the paper's "
              f"loop in bfloat16 (paper float32 -> bfloat16 alone: {base['seconds'] / same['seconds']:.1f}x)")


def paper_run(loaded, trainer: MaskTrainer, theta0, facts, module_path, transposed, cfg, steps: int) -> dict:
    """The paper's loop on `loaded` for `steps` identical steps from Θ0: seconds, final loss, final Θ."""
    module = loaded.model.get_submodule(module_path)
    weight = canonical_weight(module, transposed)
    bias = module.bias.detach().float() if getattr(module, "bias", None) is not None else None
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([theta], lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    start = time.perf_counter()
    for step in range(steps):
        opt.zero_grad()
        loss = paper_loss(loaded, trainer, theta, trainer.batch_records(step), facts, step / (trainer.total_steps - 1),
                          module_path, weight, bias)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([theta], cfg.grad_clip)
        opt.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        final = float(paper_loss(loaded, trainer, theta, trainer.batch_records(steps), facts,
                                 steps / (trainer.total_steps - 1), module_path, weight, bias))
    probe = theta.detach().clone().requires_grad_(True)
    gflop = step_gflop(lambda: paper_loss(loaded, trainer, probe, trainer.batch_records(0), facts, 0.0, module_path,
                                          weight, bias))
    return dict(seconds=seconds, loss=final, theta=theta.detach().cpu(), gflop=gflop)

@contextlib.contextmanager
def _grouped_attention_on(device_type: str, on: bool):
    """Grouped attention for packs on `device_type` switched on or off, for one comparison row."""
    saved = set(forward.GROUPED_ATTENTION_DEVICES)
    if on:
        forward.GROUPED_ATTENTION_DEVICES.add(device_type)
    else:
        forward.GROUPED_ATTENTION_DEVICES.discard(device_type)
    try:
        yield
    finally:
        forward.GROUPED_ATTENTION_DEVICES.clear()
        forward.GROUPED_ATTENTION_DEVICES.update(saved)


if __name__ == "__main__":
    main()
