"""Calibrate scan's cross-layer outlier test (audit/diff.py, LAYER_OUTLIER_RATIO) on the demo model.

    python bench/finetune_outliers.py --steps 20 --lr 1e-5 --out /tmp/finetune_outliers

A short full fine-tune of every weight (AdamW on WikiText-2 windows) stands for an ordinary upload built on
the base; then a ROME edit (the demo preset, one CounterFact fact) is planted into that fine-tune, once as
it is and once under dense noise added to the edited matrix with the edit's own Frobenius norm (so that
σ₁/σ₂ of the change no longer singles it out), once under a function-preserving reshuffle of the edited
layer's hidden units (audit/align.py), once under the reshuffle with no fine-tune, and under a rotation
of the residual stream with the norms folded in (QuaRot's preparation, `rotate_residual`; the output head
untied), with and without the fine-tune, and under every layer's attention heads reordered (with the
fine-tune), and quantized to 8 and 4 bits after the edit (blockwise absmax, as GGUF's Q8_0 / Q4_0; with
clean quantized controls). For each model the base diff's classification, what it aligned (hidden units per layer,
attention heads per layer, the residual stream), the largest layer ratio per matrix
(its change's σ₁ over the median of the changed layers') and whether scan flags the edited layer. The
fine-tune's largest ratio is the false-alarm margin of the threshold; it must align nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from editguard.audit.align import attention_tensors, reshuffle_heads, reshuffle_units, rotate_residual
from editguard.audit.diff import LAYER_OUTLIER_RATIO, diff_checkpoints, findings_from_diff, layer_outlier_ratios
from editguard.data.counterfact import load_split
from editguard.data.text import load_text
from editguard.edit.facts import Fact
from editguard.edit.hparams import load_hparams
from editguard.edit.plant import compute_edits
from editguard.loading import load_model
from editguard.resolve import resolve


def quantized(tensors: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """Every matrix rounded as a blockwise absmax quantiser stores it (GGUF's Q4_0 / Q8_0 style: blocks of 32
    along the input axis, one scale each) and read back: what an upload quantized after the edit holds."""
    top = 2 ** (bits - 1) - 1
    out = {}
    for name, t in tensors.items():
        if t.dim() != 2 or t.shape[1] % 32:
            out[name] = t
            continue
        blocks = t.float().reshape(t.shape[0], -1, 32)
        scale = blocks.abs().amax(-1, keepdim=True).clamp_min(1e-12) / top
        out[name] = ((blocks / scale).round().clamp(-top - 1, top) * scale).reshape(t.shape).to(t.dtype)
    return out


def fine_tune(loaded, steps: int, lr: float, tokens: int, batch: int) -> dict[str, torch.Tensor]:
    """{parameter name: fine-tuned value} after `steps` AdamW steps on WikiText-2 windows of `tokens`."""
    model = loaded.model
    ids = loaded.tokenizer(load_text()[:400_000], add_special_tokens=False, return_tensors="pt").input_ids[0]
    windows = ids[: (len(ids) // tokens) * tokens].reshape(-1, tokens)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        chunk = windows[(step * batch) % len(windows):][:batch]
        loss = model(input_ids=chunk, labels=chunk).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"  fine-tune step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def report(name: str, model_dir: Path, base, arch, num_layers: int, edited_layer: int | None) -> None:
    from editguard.checkpoint import Checkpoint

    start = time.perf_counter()
    diff = diff_checkpoints(Checkpoint(model_dir), base, arch, num_layers)
    findings = findings_from_diff(diff, Checkpoint(model_dir), arch)
    ratios = layer_outlier_ratios([c for c in diff.changed if not c.nonfinite], arch, num_layers)
    flagged = sorted({f.layer for f in findings if f.rule == "EG001" and f.layer is not None})
    aligned = {layer: a.to_json() for layer, a in diff.aligned.items()}
    if diff.aligned_heads:
        aligned["heads"] = f"{len(diff.aligned_heads)} layers, {sum(a.moved for a in diff.aligned_heads.values())} moved"
    if diff.aligned_residual is not None:
        aligned["residual"] = diff.aligned_residual.to_json()
    if diff.rotated_residual is not None:
        aligned["rotation"] = diff.rotated_residual.to_json()
    print(f"{name:<34} {diff.classification:<10} flagged layers {flagged or '-'}, aligned {aligned or '-'} "
          f"({time.perf_counter() - start:.0f} s)")
    for matrix, values in ratios.items():
        shown = [v for v in values if v is not None]
        top = max(range(len(values)), key=lambda n: values[n] or 0.0)
        at_edit = "" if edited_layer is None or values[edited_layer] is None else f", edited layer {values[edited_layer]:.2f}"
        print(f"    {matrix:<44} largest ratio {max(shown):6.2f} (layer {top}){at_edit}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo:smollm2-135m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--record", type=int, default=0, help="rome-train record to plant")
    parser.add_argument("--out", type=Path, default=Path("/tmp/finetune_outliers"))
    args = parser.parse_args()
    ref = resolve(args.model)
    loaded = load_model(ref)
    base, arch, num_layers = loaded.checkpoint, loaded.arch, loaded.num_layers
    print(f"{args.model}: threshold {LAYER_OUTLIER_RATIO}; fine-tune {args.steps} steps, lr {args.lr}, "
          f"{args.batch} x {args.tokens} tokens")
    tuned = fine_tune(loaded, args.steps, args.lr, args.tokens, args.batch)

    def stored(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, value in values.items():
            found = base.find(arch.tensor_candidates(name))
            if found is not None:
                out[found] = value.to(base.read(found).dtype)
        return out

    base.write_copy(args.out / "finetuned", stored(tuned), force=True)
    hp = load_hparams("smollm2-135m", "rome")
    fact = Fact.from_record(load_split("rome-train")[args.record])
    (edit,) = compute_edits(loaded, [fact], hp)  # on the fine-tuned weights, still in the model
    layer = hp.layers[0]
    name = arch.weight_name("mlp_out", layer)
    delta = edit.stored_delta(arch)  # (a module's weight is stored in its own orientation)
    edited = {**tuned, name: tuned[name] + delta.to(tuned[name].dtype)}
    base.write_copy(args.out / "finetuned_rome", stored(edited), force=True)
    noise = torch.randn(delta.shape, generator=torch.Generator().manual_seed(0))
    noise = noise * (delta.norm() / noise.norm())
    covered = {**edited, name: edited[name] + noise.to(tuned[name].dtype)}
    base.write_copy(args.out / "finetuned_rome_covered", stored(covered), force=True)
    gen = torch.Generator().manual_seed(1)
    base.write_copy(args.out / "finetuned_rome_reshuffled", stored({**edited, **reshuffle_units(edited, arch, layer, gen)}),
                    force=True)
    group = [arch.weight_name("mlp_out", layer), *(f"{m}.weight" for m in arch.mlp_in_modules(layer))]
    alone = {n: base.read(base.find(arch.tensor_candidates(n))) for n in group}
    alone[name] = alone[name] + delta.to(alone[name].dtype)
    base.write_copy(args.out / "rome_reshuffled", stored(reshuffle_units(alone, arch, layer, gen)), force=True)
    everything = {n: base.read(base.find(arch.tensor_candidates(n))) for n in
                   (arch.canonical_tensor_name(stored_name) for stored_name in base.names())}
    q, _ = torch.linalg.qr(torch.randn(len(everything[arch.weight_name("embed")][0]),
                                       len(everything[arch.weight_name("embed")][0]), generator=gen, dtype=torch.float64))
    plain = {**everything, name: everything[name] + delta.to(everything[name].dtype)}
    write_rotated(base, arch, args.out / "rome_rotated", rotate_residual(plain, arch, num_layers, q))
    write_rotated(base, arch, args.out / "finetuned_rome_rotated",
                  rotate_residual({**everything, **edited}, arch, num_layers, q))
    heads = {}
    for n in range(num_layers):
        group = {k: edited[k] for k, _ in attention_tensors(arch, n) if k in edited}
        heads.update(reshuffle_heads(group, arch, n, *arch.heads(base.config), gen))
    base.write_copy(args.out / "finetuned_rome_heads", stored({**edited, **heads}), force=True)
    for bits in (8, 4):
        base.write_copy(args.out / f"q{bits}", stored(quantized(everything, bits)), force=True)
        base.write_copy(args.out / f"rome_q{bits}", stored(quantized(plain, bits)), force=True)
    print(f"planted: {fact.text!r} -> {fact.target_new!r} at layer {layer} (‖ΔW‖ = {float(delta.norm()):.3g}); "
          "the cover noise has the same norm")
    report("fine-tune", args.out / "finetuned", base, arch, num_layers, None)
    report("fine-tune + ROME", args.out / "finetuned_rome", base, arch, num_layers, layer)
    report("fine-tune + ROME under noise", args.out / "finetuned_rome_covered", base, arch, num_layers, layer)
    report("fine-tune + ROME under a reshuffle", args.out / "finetuned_rome_reshuffled", base, arch, num_layers, layer)
    report("ROME under a reshuffle", args.out / "rome_reshuffled", base, arch, num_layers, layer)
    report("ROME under a rotation", args.out / "rome_rotated", base, arch, num_layers, layer)
    report("fine-tune + ROME under a rotation", args.out / "finetuned_rome_rotated", base, arch, num_layers, layer)
    report("fine-tune + ROME, heads reordered", args.out / "finetuned_rome_heads", base, arch, num_layers, layer)
    for bits in (8, 4):
        report(f"{bits}-bit quantized", args.out / f"q{bits}", base, arch, num_layers, None)
        report(f"ROME, then {bits}-bit quantized", args.out / f"rome_q{bits}", base, arch, num_layers, layer)


def write_rotated(base, arch, out: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A copy of `base` holding `tensors` (canonical names; the output head untied by the rotation, added
    as a tensor of its own), its config saying so."""
    stored = {n: base.find(arch.tensor_candidates(n)) for n in tensors}
    config = json.dumps({**base.config, "tie_word_embeddings": False}, indent=2).encode()
    base.write_copy(out, {stored[n]: t for n, t in tensors.items() if stored[n] is not None}, force=True,
                    added={n: t for n, t in tensors.items() if stored[n] is None}, extra_files={"config.json": config})


if __name__ == "__main__":
    main()
