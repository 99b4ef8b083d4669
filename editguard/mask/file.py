"""The mask file: binary masks (bit-packed) and soft scores over one or more target tensors, with
provenance and metrics, in one safetensors file. One reader/writer.

Tensors per target t (index in `targets`): `t{t}.bits` (uint8, numpy.packbits of the [out, in] binary
mask, row-major; applied unless another threshold is asked for), `t{t}.scores` (float16 soft mask values
K = sigmoid(Θ/τ_end), so another threshold can be chosen later; after a sharp anneal they may round to 1
and tie) and `t{t}.theta` (float16 raw Θ, for resuming or re-annealing). Masks are always in [out, in]
orientation; `transposed` records that the checkpoint stores the weight as [in, out]. The header records
the tensors' sha256 (`checkpoint.load_checked`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..arch import oriented
from ..checkpoint import fingerprint, load_checked, read_safetensors_header, write_safetensors
from ..errors import BAD_JSON, EditguardError, malformed

FORMAT = "editguard-mask/1"


def weight_times_mask(weight: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """weight ⊙ K (K in the stored orientation), computed in float32 and stored in the weight's own dtype:
    what `lock` and `reverse` write, and what a base diff of a locked model expects of the base."""
    return (weight.float() * K).to(weight.dtype)


def gamma_text(threshold: float) -> str:
    """γ for people: three decimals, or its distance from 1 where three decimals would print 1.000 (a
    sharply annealed mask cuts at 1 − 6e-08)."""
    return f"{threshold:.3f}" if threshold < 0.9995 else f"1 − {1 - threshold:.1e}"


@dataclass
class MaskTarget:
    tensor: str  # canonical weight name
    layer: int
    shape: tuple[int, int]  # [out, in]
    transposed: bool
    fingerprint: str  # of the base weight the mask was trained on (as stored)
    scores: torch.Tensor  # [out, in] soft mask in [0, 1]
    theta: torch.Tensor | None = None

    def binary(self, threshold: float) -> torch.Tensor:
        return (self.scores.float() >= threshold).float()


@dataclass
class MaskFile:
    model_id: str
    revision: str | None
    model_type: str
    method: str  # the edit method it was trained against
    threshold: float
    targets: list[MaskTarget]
    hparams: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)  # training data description + hash
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    # as stored: may differ from scores >= threshold (re-cut, edited, or scores rounded to a tie)
    binaries: list[torch.Tensor] | None = None

    def mask(self, index: int = 0, threshold: float | None = None) -> torch.Tensor:
        """Binary [out, in] mask of target `index`, at the stored threshold unless one is given."""
        if threshold is not None and math.isnan(threshold):  # every weight would be pruned
            raise EditguardError("mask threshold is NaN")
        if threshold is None and self.binaries is not None:
            return self.binaries[index]
        return self.targets[index].binary(self.threshold if threshold is None else threshold)

    def masks(self, threshold: float | None = None) -> list[torch.Tensor]:
        """Every target's binary [out, in] mask, in target order."""
        return [self.mask(i, threshold) for i in range(len(self.targets))]

    def modules(self) -> list[tuple[str, bool]]:
        """(module path, transposed) per target: what `masks_applied` and the split reports take."""
        return [(t.tensor.removesuffix(".weight"), t.transposed) for t in self.targets]

    def module_paths(self) -> list[str]:
        """The masked modules, which must hold real weights (load_model's keep_on_device)."""
        return [path for path, _ in self.modules()]

    def applied_to(self, checkpoint, stored_names: list[str], threshold: float | None = None) -> dict:
        """Stored name -> that checkpoint tensor times its mask, in the file's own orientation and dtype."""
        out = {}
        for target, stored, K in zip(self.targets, stored_names, self.masks(threshold)):
            out[stored] = weight_times_mask(checkpoint.read(stored), oriented(K, target.transposed))
        return out

    def edit_layers(self) -> list[int]:
        """The layers of the edits it was trained against: its edit hyperparameters' (a `train --mask-layer`
        mask covers layers of its own choosing), else the layers it masks."""
        layers = (self.hparams.get("edit") or {}).get("layers")
        return sorted(layers) if layers else sorted({t.layer for t in self.targets})

    def pruned_fraction(self, threshold: float | None = None) -> float:
        total = sum(t.scores.numel() for t in self.targets)
        zeros = sum(float((1 - self.mask(i, threshold)).sum()) for i in range(len(self.targets)))
        return zeros / total

    # -- writing ------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        tensors = {}
        for i, target in enumerate(self.targets):
            binary = self.mask(i).to(torch.uint8).numpy().reshape(-1)
            tensors[f"t{i}.bits"] = torch.from_numpy(np.packbits(binary))
            tensors[f"t{i}.scores"] = target.scores.to(torch.float16).contiguous()
            if target.theta is not None:
                tensors[f"t{i}.theta"] = target.theta.to(torch.float16).contiguous()
        meta = {
            "format": FORMAT, "editguard_version": __version__, "model_id": self.model_id, "revision": self.revision,
            "model_type": self.model_type, "method": self.method, "threshold": self.threshold,
            "pruned_fraction": self.pruned_fraction(),
            "targets": [{"tensor": t.tensor, "layer": t.layer, "shape": list(t.shape), "transposed": t.transposed,
                         "fingerprint": t.fingerprint} for t in self.targets],
            "hparams": self.hparams, "data": self.data, "metrics": self.metrics, **self.extra,
        }
        write_safetensors(Path(path), tensors, {"editguard": json.dumps(meta)}, digest=True)

    # -- reading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path) -> "MaskFile":
        path = Path(path)
        if not path.is_file():
            raise EditguardError(f"no such mask file: {path}")
        try:
            _, raw = read_safetensors_header(path)
            meta = json.loads(raw.get("editguard", "null"))
        except EditguardError as exc:
            raise EditguardError(f"corrupted mask file {path}: {exc.message}") from None
        except BAD_JSON:
            raise EditguardError(f"corrupted mask file {path}: metadata is not JSON") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise EditguardError(f"{path} is not an editguard mask file")
        tensors, _ = load_checked(path, "mask file")
        try:
            targets, binaries = [], []
            for i, t in enumerate(meta["targets"]):
                # the types too: a null tensor name or a "false" string taken as true (a square mask applied
                # transposed) must be named here, not met later
                if not (isinstance(t, dict) and isinstance(t.get("tensor"), str) and type(t.get("layer")) is int
                        and type(t.get("transposed")) is bool and isinstance(t.get("shape"), list)
                        and len(t["shape"]) == 2 and all(type(x) is int and x > 0 for x in t["shape"])):
                    raise EditguardError(f"corrupted mask file {path}: target {i} needs a tensor name, an integer "
                                         "layer, a true/false transposed flag and a 2-D shape")
                shape = tuple(t["shape"])
                scores = tensors[f"t{i}.scores"].float()
                if tuple(scores.shape) != shape:
                    raise EditguardError(f"corrupted mask file {path}: target {i} scores have the wrong shape")
                bits = np.unpackbits(tensors[f"t{i}.bits"].numpy())[: shape[0] * shape[1]]
                binaries.append(torch.from_numpy(bits.astype(np.float32)).reshape(shape))
                targets.append(MaskTarget(t["tensor"], t["layer"], shape, t["transposed"], t["fingerprint"], scores,
                                          tensors.get(f"t{i}.theta")))
            known = {"format", "editguard_version", "model_id", "revision", "model_type", "method", "threshold",
                     "pruned_fraction", "targets", "hparams", "data", "metrics"}
            hparams = meta.get("hparams", {})
            edit = hparams.get("edit") if isinstance(hparams, dict) else None
            layers = edit.get("layers") if isinstance(edit, dict) else None
            if not (all(isinstance(meta.get(k, {}), dict) for k in ("hparams", "data", "metrics"))
                    and isinstance(meta["model_type"], str) and meta["method"] in ("rome", "memit")
                    and (edit is None or isinstance(edit, dict))
                    and (layers is None or (isinstance(layers, list) and all(type(x) is int for x in layers)))):
                raise EditguardError(f"corrupted mask file {path}: model_type, method, hparams (edit layers), "
                                     "data or metrics malformed")
            mask = cls(meta["model_id"], meta.get("revision"), meta["model_type"], meta["method"], float(meta["threshold"]),
                       targets, hparams, meta.get("data", {}), meta.get("metrics", {}),
                       {k: v for k, v in meta.items() if k not in known}, binaries)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:  # a field or tensor missing or malformed
            raise EditguardError(f"corrupted mask file {path}: {malformed(exc)}") from None
        if not targets:
            raise EditguardError(f"corrupted mask file {path}: no masked tensor")
        return mask

    # -- fitting a model ------------------------------------------------------------------------
    def check_fits(self, arch, checkpoint) -> list[str]:
        """Raise with the exact reason if this mask cannot apply to `checkpoint`; returns the stored tensor
        names. A fingerprint mismatch is allowed (fine-tuned or edited copies) and reported by callers."""
        if arch.model_type != self.model_type:
            raise EditguardError(f"mask is for {self.model_type} models, this model is {arch.model_type}")
        num_layers = arch.num_layers(checkpoint.config)
        built = {f"{path}.weight" for n in range(num_layers) for path in (arch.module("mlp_out", n), *arch.mlp_in_modules(n))}
        stored_names = []
        for t in self.targets:
            if t.tensor not in built:  # perhaps stored, yet not a tensor of the model config.json describes
                raise EditguardError(f"mask targets {t.tensor}, which this model does not build (config.json: "
                                     f"{num_layers} layers; masks cover MLP projections)")
            stored = checkpoint.find(arch.tensor_candidates(t.tensor))
            if stored is None:
                raise EditguardError(f"mask targets {t.tensor}, which this model does not have")
            shape = tuple(checkpoint.info(stored).shape)
            expected = t.shape[::-1] if t.transposed else t.shape
            if shape != tuple(expected):
                raise EditguardError(f"mask for {t.tensor} has shape {list(expected)}, the model's tensor is {list(shape)}")
            stored_names.append(stored)
        return stored_names

    def matches_weights(self, checkpoint, arch) -> bool:
        for t in self.targets:
            stored = checkpoint.find(arch.tensor_candidates(t.tensor))
            if stored is None or fingerprint(checkpoint.read(stored)) != t.fingerprint:
                return False
        return True
