"""The edits a mask is trained and judged against, one split (train / val / test) at a time.

ROME: every fact carries its own rank-one edit, applied factored per row. MEMIT: the split's facts are
edited in one or more batches (the bank's groups); a fact is judged with its own batch edit on every
edited layer, then the masks on top. Both give the trainer its edit inputs, preferences under masks, the
full RSR report with baselines (weight-only SVD reversal, magnitude pruning of ΔW at the masks' pruned
fraction), and the edits a perplexity run applies.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..arch import oriented
from ..edit.bank import EditBank
from ..edit.edits import Edit, edits_applied, weight_param, weights_restored
from ..edit.facts import Fact
from ..errors import EditguardError
from ..loading import LoadedModel
from .evaluate import check_mask_on, masks_applied, outside_largest, preference, reversal_sources, rsr_report, share, \
    summarise

Targets = list[tuple[str, bool]]  # (module path, transposed)
WeightChange = Callable[[LoadedModel, list[Edit]], contextlib.AbstractContextManager]  # a baseline


def edits_by_case(bank: EditBank) -> dict[int, int]:
    return {r["case_id"]: i for i, r in enumerate(bank.meta["records"])}


@dataclass
class RomeSplit:
    facts: list[Fact]
    edits: list[Edit]  # edits[i] is facts[i]'s rank-one edit

    @classmethod
    def from_bank(cls, bank: EditBank, facts: list[Fact]) -> "RomeSplit":
        bank.unbanked(facts)  # refuses a case id the bank holds as another fact (a bank of other data)
        index = edits_by_case(bank)
        missing = [f.case_id for f in facts if f.case_id not in index]
        if missing:
            raise EditguardError(f"the bank {bank.path} lacks the edits of {len(missing)} of these records "
                                 f"(e.g. case {missing[0]})")
        return cls(facts, bank.edits([index[f.case_id] for f in facts]))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([e.u for e in self.edits]).float(), torch.stack([e.v for e in self.edits]).float()

    def trainer_inputs(self, targets: Targets) -> dict:
        u, v = self.factors()
        return {"u": u, "v": v}

    # targets[0] is the edited tensor; any further targets (`train --whole-mlp`: the layer's MLP inputs)
    # are masked, never edited
    def preference(self, loaded: LoadedModel, targets: Targets, masks: list[torch.Tensor] | None = None,
                   edited: bool = True) -> torch.Tensor:
        (path, transposed), rest = targets[0], targets[1:]
        u, v = self.factors() if edited else (None, None)
        with masks_applied(loaded, rest, masks[1:] if masks else None):
            return preference(loaded, self.facts, path, u, v, masks[0] if masks else None, transposed)

    def report(self, loaded: LoadedModel, targets: Targets, masks: list[torch.Tensor], baselines: bool = True) -> dict:
        (path, transposed), rest = targets[0], targets[1:]
        return rsr_report(loaded, self.facts, path, transposed, *self.factors(), masks[0], baselines=baselines,
                          also_masked=lambda: masks_applied(loaded, rest, masks[1:]))

    def head(self, n: int) -> "RomeSplit":
        return RomeSplit(self.facts[:n], self.edits[:n])

    def sample_edits(self) -> list[Edit]:
        """What the perplexity run's "edited" model carries: one edit."""
        return self.edits[:1]


@dataclass
class MemitSplit:
    facts: list[Fact]
    groups: list[list[int]]  # indices into `facts`, one list per batch edit
    edits: list[list[Edit]]  # per group: one Edit per edited layer

    @classmethod
    def from_bank(cls, bank: EditBank, facts: list[Fact]) -> "MemitSplit":
        """The bank's batch edits made of these facts only; every fact must be covered by one."""
        bank.unbanked(facts)  # refuses a case id the bank holds as another fact (a bank of other data)
        position = {f.case_id: i for i, f in enumerate(facts)}
        groups, edits, covered = [], [], set()
        records = bank.meta["records"]
        for g, group in enumerate(bank.meta.get("groups", [])):
            cases = [records[i]["case_id"] for i in group["records"]]
            if cases and all(c in position for c in cases):
                groups.append([position[c] for c in cases])
                edits.append(bank.edits([g]))
                covered.update(cases)
        missing = [f.case_id for f in facts if f.case_id not in covered]
        if missing:
            raise EditguardError(f"the bank {bank.path} has no MEMIT batch edit made of these records only for "
                                 f"{len(missing)} of them (e.g. case {missing[0]})")
        return cls(facts, groups, edits)

    def trainer_inputs(self, targets: Targets) -> dict:
        """Dense [out, in] ΔW per batch edit and target, each batch edit's edits of tensors the mask does
        not cover (`train --mask-layer`), and each fact's batch edit."""
        dense, unmasked = [], []
        covered = {path + ".weight" for path, _ in targets}
        for edits in self.edits:
            by_tensor = {e.tensor: e for e in edits}
            dense.append([by_tensor[path + ".weight"].delta() if path + ".weight" in by_tensor else None
                          for path, _ in targets])
            unmasked.append([e for e in edits if e.tensor not in covered])
        group_of = torch.empty(len(self.facts), dtype=torch.long)
        for g, idx in enumerate(self.groups):
            group_of[torch.tensor(idx)] = g
        return {"dense": dense, "unmasked": unmasked, "record_group": group_of}

    def edits_below(self, layer: int) -> list[tuple[list[int], list[Edit]]] | None:
        """[(facts, their batch edit's edits of layers below `layer`)], for the states cached entering it
        (`prepare_prompts(edits_below=...)`); None when no batch edit reaches below it."""
        below = [(idx, [e for e in edits if e.layer < layer]) for idx, edits in zip(self.groups, self.edits)]
        return below if any(edits for _, edits in below) else None

    def head(self, n: int) -> "MemitSplit":
        """Whole batch edits, in order, until at least n facts are covered (a batch is never cut)."""
        keep, count = [], 0
        for g, idx in enumerate(self.groups):
            if count >= n:
                break
            keep.append(g)
            count += len(idx)
        order = [i for g in keep for i in self.groups[g]]
        position = {old: new for new, old in enumerate(order)}
        return MemitSplit([self.facts[i] for i in order], [[position[i] for i in self.groups[g]] for g in keep],
                          [self.edits[g] for g in keep])

    def sample_edits(self) -> list[Edit]:
        """What the perplexity run's "edited" model carries: the first batch edit."""
        return self.edits[0]

    def preference(self, loaded: LoadedModel, targets: Targets, masks: list[torch.Tensor] | None = None,
                   edited: bool = True, change: WeightChange | None = None, mask_on: str = "both") -> torch.Tensor:
        """log p(true) − log p(new) per fact with its group's edit (unless `edited` is False), then
        `change` (a baseline) and the masks: on the whole edited weights, or (`mask_on`) on the base
        weights only ("weights") or on the edit only ("edit")."""
        check_mask_on(mask_on)
        out = torch.empty(len(self.facts))
        for idx, edits in zip(self.groups, self.edits):
            with contextlib.ExitStack() as stack:
                if mask_on == "weights":
                    stack.enter_context(masks_applied(loaded, targets, masks))
                if edited:  # "edit": W + ΔW ⊙ K
                    cut = {p + ".weight": K for (p, _), K in zip(targets, masks or [])} if mask_on == "edit" else None
                    stack.enter_context(edits_applied(loaded.model, loaded.arch, edits, masks=cut))
                if change is not None:
                    stack.enter_context(change(loaded, edits))
                if mask_on == "both":
                    stack.enter_context(masks_applied(loaded, targets, masks))
                out[torch.tensor(idx)] = preference(loaded, [self.facts[i] for i in idx], None, None, None, None,
                                                    False)
        return out

    def report(self, loaded: LoadedModel, targets: Targets, masks: list[torch.Tensor], baselines: bool = True) -> dict:
        report = summarise(self.facts, self.preference(loaded, targets, edited=False),
                           self.preference(loaded, targets), self.preference(loaded, targets, masks),
                           self.preference(loaded, targets, masks, edited=False))
        report |= reversal_sources(self.preference(loaded, targets, masks, mask_on="weights"),
                                   self.preference(loaded, targets, masks, mask_on="edit"))
        report["memit_batches"] = [len(g) for g in self.groups]
        if baselines:  # on the tensors the edits change, whichever the mask covers
            edited = {e.tensor for edits in self.edits for e in edits}
            # the magnitude baseline prunes as much as the mask does: over the edited tensors it covers
            # (`--whole-mlp` also masks inputs the edits leave alone), else (a `--mask-layer` mask that
            # covers none of them) over all of it
            cut = [K for (path, _), K in zip(targets, masks) if path + ".weight" in edited] or masks
            fraction = float(torch.cat([(1 - K).reshape(-1) for K in cut]).mean())
            report["baseline_svd_rsr"] = share(self.preference(loaded, targets, change=top_component_dropped) > 0)
            report["baseline_magnitude_rsr"] = share(self.preference(
                loaded, targets, change=lambda lo, e: largest_delta_pruned(lo, e, fraction)) > 0)
            report["baseline_magnitude_n"] = len(self.facts)
        return report


@contextlib.contextmanager
def top_component_dropped(loaded: LoadedModel, edits: list[Edit]) -> Iterator[None]:
    """Each weight the edits change minus its top singular component, inside the block."""
    names = sorted({e.tensor for e in edits})
    with weights_restored(loaded.model, names), torch.no_grad():
        for name in names:
            weight = weight_param(loaded.model, name)
            U, S, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
            weight -= (S[0] * torch.outer(U[:, 0], Vh[0])).to(weight)
        yield


@contextlib.contextmanager
def largest_delta_pruned(loaded: LoadedModel, edits: list[Edit], fraction: float) -> Iterator[None]:
    """Zero, in each weight the edits change, the `fraction` of entries where |ΔW| is largest, inside the block."""
    by_tensor = {e.tensor: e for e in edits}
    transposed = loaded.arch.mlp_out_transposed  # edits change MLP output projections only
    with weights_restored(loaded.model, sorted(by_tensor)), torch.no_grad():
        for name, edit in by_tensor.items():
            keep = outside_largest(edit.delta(), fraction)
            weight = weight_param(loaded.model, name)
            weight.mul_(oriented(keep, transposed).to(weight))
        yield
