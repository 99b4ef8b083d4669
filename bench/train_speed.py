"""Mask-training speed: the paper's loop against editguard's trainer, same records, same mask, one run.

    python bench/train_speed.py --model demo:smollm2-135m --records 16 --steps 3 --batch 8

Paper loop: for every record, rebuild the dense edited weight Ŵ_i = W + u_i v_iᵀ, run the teacher (the
unedited model) and the student (Ŵ_i ⊙ K) over its prompts from the embeddings up, full logits at every
position. editguard: per-prompt factored edits in one packed sequence (no padding), cached states below
the layer, cached teacher logits, logits only at the last position. Both start from the same Θ and see
the same batches; the table shows records/second, the ratio, and how far the losses drift apart after
the identical steps.
Edits come from a fresh ROME run (the demo preset) on the first records of rome-train (not timed).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from editguard.data.counterfact import load_split
from editguard.edit.facts import Fact, target_ids
from editguard.edit.hparams import load_hparams
from editguard.edit.rome import rome_edits
from editguard.loading import load_model
from editguard.mask.train import (MaskedProjection, MaskTrainer, canonical_weight, config_for, make_optimizer,
                                  prepare_prompts, record_prompts, swapped)
from editguard.resolve import resolve


def paper_loss(loaded, trainer: MaskTrainer, theta, records, facts, progress, module_path, weight, bias):
    cfg, tok, model = trainer.cfg, loaded.tokenizer, loaded.model
    K = torch.sigmoid(theta / cfg.tau(progress))
    margins, kls = [], []
    for r in records:
        dense = weight + torch.outer(trainer.u[r], trainer.v[r])  # Ŵ_i, rebuilt for every record
        fact = facts[r]
        new_tok, true_tok = target_ids(tok, fact.target_new)[0], target_ids(tok, fact.target_true)[0]
        for text in record_prompts(fact, cfg.paraphrases):
            ids = tok(text, return_tensors="pt").input_ids
            with torch.no_grad():
                teacher = model(input_ids=ids).logits[0, -1]
            student_module = MaskedProjection(dense, bias)
            student_module.K = K
            with swapped(model, module_path, student_module):
                logits = model(input_ids=ids).logits[0, -1].float()  # full logits everywhere, then the last
            margins.append(F.relu(logits[new_tok] - logits[true_tok] + cfg.margin))
            T = cfg.temperature(progress)
            kls.append(F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(teacher.float() / T, -1),
                                log_target=True, reduction="sum"))
    T = cfg.temperature(progress)
    pruned = (1 - K).mean()
    return (torch.stack(margins).mean() + cfg.lam(progress) * F.relu(pruned - cfg.sparsity_max)
            + cfg.beta_kl * T * T * torch.stack(kls).mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo:smollm2-135m")
    parser.add_argument("--hparams", default="smollm2-135m")
    parser.add_argument("--records", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    loaded = load_model(resolve(args.model))
    hp = load_hparams(args.hparams, "rome")
    facts = [Fact.from_record(r) for r in load_split("rome-train")[: args.records]]
    edits = rome_edits(loaded, facts, hp)
    layer, module_path = hp.layers[0], hp.rewrite_module_tmp.format(hp.layers[0])
    transposed = loaded.arch.mlp_out_transposed
    cfg = config_for("cpu", "rome", batch_records=args.batch, epochs=10)
    u = torch.stack([e.u for e in edits]).float()
    v = torch.stack([e.v for e in edits]).float()

    start = time.perf_counter()
    data = prepare_prompts(loaded, facts, layer, cfg.paraphrases)
    prep = time.perf_counter() - start
    trainer = MaskTrainer(loaded, [(module_path, transposed)], layer, data, cfg, u=u, v=v)
    state = trainer.init_state()
    theta0 = state.theta[0].clone()
    optimizer = make_optimizer(state, cfg)
    start = time.perf_counter()
    trainer.train(state, optimizer, stop_after=args.steps)
    ours = time.perf_counter() - start
    ours_loss = float(trainer.loss(state.theta, trainer.batch_records(args.steps), args.steps / (trainer.total_steps - 1))[0])

    module = loaded.model.get_submodule(module_path)
    weight = canonical_weight(module, transposed)
    bias = module.bias.detach().float() if getattr(module, "bias", None) is not None else None
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([theta], lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    start = time.perf_counter()
    for step in range(args.steps):
        opt.zero_grad()
        loss = paper_loss(loaded, trainer, theta, trainer.batch_records(step), facts, step / (trainer.total_steps - 1),
                          module_path, weight, bias)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([theta], cfg.grad_clip)
        opt.step()
    paper = time.perf_counter() - start
    with torch.no_grad():
        paper_final = float(paper_loss(loaded, trainer, theta, trainer.batch_records(args.steps), facts,
                                       args.steps / (trainer.total_steps - 1), module_path, weight, bias))
    n = args.steps * args.batch
    print(f"{args.model}: layer {layer}, {args.steps} steps x {args.batch} records (3 prompts each)")
    print(f"{'loop':<10} {'seconds':>8} {'records/s':>10}")
    print(f"{'paper':<10} {paper:>8.1f} {n / paper:>10.2f}")
    print(f"{'editguard':<10} {ours:>8.1f} {n / ours:>10.2f}   (+ {prep:.1f} s one-off caching of states and teacher)")
    print(f"speed-up {paper / ours:.1f}x (with caching counted once: {paper / (ours + prep):.1f}x); "
          f"loss after {args.steps} steps: paper {paper_final:.5f}, editguard {ours_loss:.5f}, "
          f"|diff| {abs(paper_final - ours_loss):.2e}; max |Θ diff| {float((theta.detach() - state.theta[0]).abs().max()):.2e}")


if __name__ == "__main__":
    main()
