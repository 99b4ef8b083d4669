"""How much of a ROME edit can one shared mask cut? The bound behind `lock --evaluate`'s figures.

    python bench/lock_bound.py --bank banks/smollm2-135m_rome_L9.safetensors \
        --mask masks/smollm2-135m_rome_L9.safetensors [--n 100]

A locked model computes (W ⊙ K + ΔW) ⊙ K = W ⊙ K + ΔW ⊙ K, so a later edit is hurt only by the part of
ΔW that K cuts; an editor working through the locked forward makes up for everything K did to W. For a
ROME edit ΔW = u vᵀ with C = I, v ∝ the subject's key k, and the edit's output at its own key keeps, along
u, the share  Σ_r (u_r² / ‖u‖²) Σ_j K_rj v_j² / ‖v‖².  Printed for the bank's edits (later 30 % judged,
earlier 70 % used to choose the oracles), at the trained mask's pruned fraction:
* the trained mask;
* the best shared column mask and the best shared elementwise mask (chosen on the other edits: no
  shared mask of that size cuts more of an unseen edit, on average);
* each edit's own best mask (a per-edit oracle, not a shared mask).
Then, from the model, how many edits still win (P(new) > P(true) on the rewrite prompt) with the edit
scaled to s·ΔW: the share of its output an edit must lose before it fails.
"""

from __future__ import annotations

import argparse

import torch

from editguard.data.counterfact import load_split, select
from editguard.edit.bank import EditBank
from editguard.edit.facts import Fact
from editguard.loading import load_model
from editguard.mask.evaluate import preference
from editguard.mask.file import MaskFile
from editguard.resolve import resolve


def kept_share(uu: torch.Tensor, w: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Σ_r uu_r Σ_j K_rj w_j per edit (uu, w: [N, out], [N, in], each row summing to 1)."""
    return torch.einsum("nr,rj,nj->n", uu, K, w)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo:smollm2-135m")
    parser.add_argument("--bank", default="banks/smollm2-135m_rome_L9.safetensors")
    parser.add_argument("--mask", default="masks/smollm2-135m_rome_L9.safetensors")
    parser.add_argument("--n", type=int, default=100, help="edits judged by the model for the scaling rows")
    args = parser.parse_args()
    bank = EditBank.open(args.bank)
    if bank.method != "rome" or bank.meta.get("hparams", {}).get("mom2_adjustment"):
        raise SystemExit("this bound assumes ROME edits with mom2_adjustment false (v ∝ k)")
    edits = bank.edits()
    u = torch.stack([e.u for e in edits]).float()
    v = torch.stack([e.v for e in edits]).float()
    uu, w = u ** 2 / (u ** 2).sum(1, keepdim=True), v ** 2 / (v ** 2).sum(1, keepdim=True)
    mask = MaskFile.load(args.mask)
    target = mask.targets[0]
    if target.tensor != edits[0].tensor:
        raise SystemExit(f"the mask covers {target.tensor}, the bank edits {edits[0].tensor}")
    K = mask.mask(0).float()
    K = K.T if K.shape != (u.shape[1], v.shape[1]) else K
    pruned = 1 - float(K.mean())
    fit, judged = slice(0, int(0.7 * len(edits))), slice(int(0.7 * len(edits)), len(edits))

    columns = w[fit].mean(0)
    column_mask = torch.ones_like(K)
    column_mask[:, columns.topk(round(pruned * K.shape[1])).indices] = 0
    entries = torch.einsum("nr,nj->rj", uu[fit], w[fit])
    shared_mask = torch.ones_like(K).flatten()
    shared_mask[entries.flatten().topk(round(pruned * K.numel())).indices] = 0
    shared_mask = shared_mask.view_as(K)
    own = []
    for i in range(judged.start, judged.stop):
        contrib = (uu[i][:, None] * w[i][None]).flatten()
        own.append(1 - contrib.topk(round(pruned * K.numel())).values.sum())
    rows = [("trained mask", kept_share(uu[judged], w[judged], K)),
            ("best shared column mask (oracle)", kept_share(uu[judged], w[judged], column_mask)),
            ("best shared elementwise mask (oracle)", kept_share(uu[judged], w[judged], shared_mask)),
            ("each edit's own best mask (per-edit oracle)", torch.stack(own))]
    print(f"{len(edits)} ROME edits of {target.tensor}; masks prune {pruned:.1%}; "
          f"{judged.stop - judged.start} edits judged")
    print(f"{'mask':46} {'edit output kept: median':>25} {'min':>6} {'max':>6}")
    for name, share in rows:
        print(f"{name:46} {share.median():25.3f} {share.min():6.3f} {share.max():6.3f}")

    loaded = load_model(resolve(args.model))
    picked = list(range(judged.start, judged.stop))[: args.n]
    pool = [r for split in ("rome-train", "rome-val", "rome-test") for r in load_split(split)]
    facts = [Fact.from_record(r) for r in select(pool, [bank.meta["records"][i]["case_id"] for i in picked])]
    eu, ev = u[picked], v[picked]
    path = loaded.arch.module("mlp_out", edits[0].layer)
    print(f"\n{'edit scaled to s·ΔW':46} {'edits that still win':>25}")
    for s in (1.0, 0.5, 0.25, 0.1):
        wins = preference(loaded, facts, path, eu * s, ev, None, loaded.arch.mlp_out_transposed) < 0
        print(f"{'s = ' + str(s):46} {wins.float().mean():25.1%}")


if __name__ == "__main__":
    main()
