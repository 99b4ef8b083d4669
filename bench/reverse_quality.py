"""Reversal methods side by side on the same ROME edits of the demo model.

    python bench/reverse_quality.py --bank banks/smollm2-135m_rome_L6.safetensors --split rome-val --n 100 \
        --mask masks/smollm2-135m_rome.safetensors

For N records of a split whose edits the bank holds, each edit applied alone (factored, never dense), the
RSR (edited model + reversal prefers the true object, full multi-token log-prob) of: no reversal; the
training-free SVD baseline (drop the top singular component of Ŵ_i); the shared mask (if given); key
projection (`reverse --method project`: the subject's keys, under context templates written with another
seed than the editor's, projected out of Ŵ_i). The original model's own preference is the ceiling; the
last column divides by it. The control row applies each reversal to the unedited model.
"""

from __future__ import annotations

import argparse
import time

import torch

from editguard.data.counterfact import load_split
from editguard.edit.bank import EditBank
from editguard.edit.facts import Fact
from editguard.edit.templates import context_templates
from editguard.harden.project import KEY_TEMPLATES, key_basis, subject_keys
from editguard.loading import load_model
from editguard.mask.evaluate import preference, svd_reversal_factors
from editguard.mask.file import MaskFile
from editguard.mask.pipeline import per_relation
from editguard.mask.splits import edits_by_case
from editguard.resolve import resolve


def projection_factors(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bases: torch.Tensor):
    """Ŵ_i (I − Q_i Q_iᵀ) − W as rank-(1 + r) factors: [u_i, −Ŵ_i Q_i] and [v_i, Q_i]."""
    w_hat_q = torch.einsum("oi,nir->nor", weight, bases) + u[:, :, None] * torch.einsum("ni,nir->nr", v, bases)[:, None]
    return torch.cat([u[:, :, None], -w_hat_q], 2), torch.cat([v[:, :, None], bases], 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo:smollm2-135m")
    parser.add_argument("--bank", default="banks/smollm2-135m_rome_L6.safetensors")
    parser.add_argument("--split", default="rome-val")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--mask", default=None)
    parser.add_argument("--key-seed", type=int, default=1, help="seed of our context templates (the bank used 0)")
    args = parser.parse_args()
    loaded = load_model(resolve(args.model))
    bank = EditBank.open(args.bank)
    index = edits_by_case(bank)
    facts = [Fact.from_record(r) for r in per_relation(load_split(args.split), 10 * args.n) if r.case_id in index][: args.n]
    if not facts:
        raise SystemExit(f"the bank holds no edit of the {args.split} split")
    edits = bank.edits([index[f.case_id] for f in facts])
    layer = edits[0].layer
    path = loaded.arch.module("mlp_out", layer)
    transposed = loaded.arch.mlp_out_transposed
    u = torch.stack([e.u for e in edits]).float()
    v = torch.stack([e.v for e in edits]).float()
    weight = loaded.model.get_submodule(path).weight.detach().float()
    weight = weight.T if transposed else weight

    started = time.perf_counter()
    templates = context_templates(loaded.model, loaded.tokenizer, KEY_TEMPLATES, args.key_seed)
    bases = []
    for f in facts:
        keys = subject_keys(loaded, layer, [{"prompt": f.text, "subject": f.subject}], templates)
        bases.append(key_basis(keys))
    bases = torch.stack(bases)
    key_seconds = time.perf_counter() - started

    def rsr(uu, vv, K=None) -> float:
        return float((preference(loaded, facts, path, uu, vv, K, transposed) > 0).float().mean())

    ceiling = rsr(None, None)
    rows = [("no reversal", rsr(u, v), None)]
    su, sv = svd_reversal_factors(u, v, weight)
    rows.append(("SVD: drop the top singular component", rsr(su, sv), None))
    if args.mask:
        mask = MaskFile.load(args.mask)
        K = mask.mask(0)
        rows.append((f"shared mask ({100 * float((1 - K).mean()):.1f} % pruned)", rsr(u, v, K), rsr(None, None, K)))
    pu, pv = projection_factors(weight, u, v, bases)
    cu, cv = projection_factors(weight, torch.zeros_like(u), torch.zeros_like(v), bases)  # unedited: u = 0
    rows.append((f"key projection (rank {bases.shape[2]})", rsr(pu, pv), rsr(cu, cv)))

    print(f"{len(facts)} {args.split} ROME edits at layer {layer} of {args.model}; original model prefers the true "
          f"object on {100 * ceiling:.1f} % (the ceiling); keys took {key_seconds:.1f} s")
    print("| method | RSR | RSR / ceiling | control: unedited + reversal prefers true |")
    print("|---|---|---|---|")
    for name, value, control in rows:
        ctrl = "" if control is None else f"{100 * control:.1f} %"
        print(f"| {name} | {100 * value:.1f} % | {value / ceiling:.2f} | {ctrl} |")


if __name__ == "__main__":
    main()
