"""ROME / MEMIT hyperparameters, read from EasyEdit's YAML keys so users' configs carry over.

Presets ship in `editguard/presets/` (`rome-gpt2-xl`, `memit-smollm2-135m`, ...). Module templates use
EasyEdit's `{}` placeholder; missing ones are filled from the architecture table, and every template is
checked against the loaded model before any work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from importlib import resources

import yaml

from ..data.text import WIKITEXT
from ..errors import EditguardError, first_line
from ..home import user_path

# Keys EasyEdit configs carry that have no effect here (devices, paths, precision switches).
IGNORED_KEYS = {"model_name", "stats_dir", "device", "model_parallel", "fp16", "max_length", "batch_size",
                "alg_name", "layer_selection", "enable_random_prefix_keys", "original_implementation", "enable_prompt_keys"}


@dataclass
class EditHparams:
    method: str = "rome"  # "rome" | "memit" (EasyEdit's alg_name)
    layers: list[int] = field(default_factory=lambda: [5])
    fact_token: str = "subject_last"
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_loss_layer: int = -1  # logits are always read at the last layer; kept for EasyEdit compatibility
    v_weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    mom2_adjustment: bool = False
    mom2_update_weight: float = 15000.0  # MEMIT's λ
    mom2_dataset: str = "wikitext2"
    mom2_n_samples: int = 100000
    mom2_dtype: str = "float32"
    context_template_length_params: list[list[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])
    rewrite_module_tmp: str | None = None
    layer_module_tmp: str | None = None
    mlp_module_tmp: str | None = None
    attn_module_tmp: str | None = None
    ln_f_module: str | None = None
    lm_head_module: str | None = None
    # editguard's own keys
    seed: int = 0  # context templates are sampled from the model with this seed
    early_stop_loss: float = 5e-2  # EasyEdit's hard-coded stop
    facts_per_batch: int = 16  # fast path: facts optimised together

    @property
    def edit_layer(self) -> int:
        """ROME's rewrite layer / MEMIT's z layer (the last of `layers`)."""
        return max(self.layers)

    def digest(self) -> str:
        """Stable hash of everything that changes the numbers (not the batching)."""
        data = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("facts_per_batch",)}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fill_templates(self, arch) -> "EditHparams":
        """Fill missing module templates from the architecture table (EasyEdit `{}` style)."""
        defaults = {
            "rewrite_module_tmp": arch.mlp_out, "layer_module_tmp": arch.layer, "mlp_module_tmp": arch.mlp,
            "attn_module_tmp": arch.attn, "ln_f_module": arch.final_norm, "lm_head_module": arch.unembed,
        }
        for key, template in defaults.items():
            if getattr(self, key) is None:
                setattr(self, key, template.replace("{layer}", "{}"))
        return self

    def check_layers(self, num_layers: int) -> None:
        for layer in self.layers:
            if not 0 <= layer < num_layers:
                raise EditguardError(f"layer {layer} is out of range: this model has layers 0-{num_layers - 1}")

    def check_against(self, model, num_layers: int, arch=None) -> None:
        self.check_layers(num_layers)
        # every template, used or only recorded (the architecture table says where attention, the final norm
        # and the head are): a typo is named, not carried silently into a bank's hparams
        paths = [(key, getattr(self, key), getattr(self, key).format(layer))
                 for key in ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp")
                 if getattr(self, key) is not None for layer in self.layers]  # one {}: checked by hparams_from_dict
        paths += [(key, getattr(self, key), getattr(self, key)) for key in ("ln_f_module", "lm_head_module")
                  if getattr(self, key) is not None]
        for key, template, path in paths:
            try:
                model.get_submodule(path)
            except AttributeError:
                raise EditguardError(f"{key} {template!r} does not resolve on this model ({path} not found)") from None
        if arch is not None:  # ΔW is solved for the MLP output projection's shape and orientation
            for layer in self.layers:
                path = self.rewrite_module_tmp.format(layer)
                weight = getattr(model.get_submodule(path), "weight", None)
                expected = list(model.get_submodule(arch.module("mlp_out", layer)).weight.shape)
                if weight is None or list(weight.shape) != expected:
                    found = "no weight" if weight is None else f"weight {list(weight.shape)}"
                    raise EditguardError(f"rewrite_module_tmp must name the MLP output projection (weight {expected}); "
                                         f"{path} has {found}")
        if self.fact_token != "subject_last":
            raise EditguardError(f"fact_token {self.fact_token!r} is not implemented (only subject_last)")
        if self.method == "rome" and len(self.layers) != 1:
            raise EditguardError("ROME with more than one layer is not implemented; use MEMIT for several layers")


INT_KEYS = ("v_num_grad_steps", "seed", "facts_per_batch", "mom2_n_samples", "v_loss_layer")
FLOAT_KEYS = ("v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor", "mom2_update_weight", "early_stop_loss")
STR_KEYS = ("fact_token", "mom2_dataset", "mom2_dtype", "rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp",
            "attn_module_tmp", "ln_f_module", "lm_head_module")
# recorded with the edit; the statistics are summed in float64 whichever it names
MOM2_DTYPES = ("float32", "float64", "float16", "bfloat16")


class _Typed:
    """Values of one hparams source checked one key at a time, so an error names the key."""

    def __init__(self, where: str):
        self.where = where

    def integer(self, key: str, value, at_least: int | None = None) -> int:
        # bools are ints in Python and 2.7 would truncate silently: both are mistakes in a config
        if isinstance(value, bool) or not isinstance(value, int):
            raise EditguardError(f"{self.where}: {key} must be a whole number, got {value!r}")
        if at_least is not None and value < at_least:
            raise EditguardError(f"{self.where}: {key} values must be at least {at_least}, got {value}")
        return value

    def number(self, key: str, value) -> float:
        # YAML 1.1 reads `5e-1` (no dot) as a string, so numeric strings are accepted as EasyEdit's configs use them
        try:
            number = None if isinstance(value, bool) else float(value)
        except (TypeError, ValueError, OverflowError):  # (an integer too large for a float)
            number = None
        if number is None or not math.isfinite(number):
            raise EditguardError(f"{self.where}: {key} must be a finite number, got {value!r}")
        return number


def presets() -> list[str]:
    folder = resources.files("editguard").joinpath("presets")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_hparams(source: str | None, method: str, overrides: dict | None = None) -> EditHparams:
    """A preset name (e.g. `smollm2-135m`, looked up as `{method}-{name}`), or a YAML file path."""
    if source is None:
        raise EditguardError(f"give --hparams: a YAML file or one of the presets: {', '.join(presets())}")
    path = user_path(source)
    if path.is_file():
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise EditguardError(f"{path}: not valid YAML ({first_line(exc)})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise EditguardError(f"{path}: not readable UTF-8 text ({exc.__class__.__name__})") from None
        where = str(path)
    else:
        name = source if source.startswith(("rome-", "memit-")) else f"{method}-{source}"
        file = resources.files("editguard").joinpath("presets", f"{name}.yaml")
        if not file.is_file():
            raise EditguardError(f"no hparams file or preset {source!r}; presets: {', '.join(presets())}")
        raw = yaml.safe_load(file.read_text())
        where = f"preset {name}"
    if not isinstance(raw, dict):
        raise EditguardError(f"{where}: expected a mapping of hyperparameters")
    return hparams_from_dict(raw, method, where, overrides)


def hparams_from_dict(raw: dict, method: str, where: str = "hparams", overrides: dict | None = None) -> EditHparams:
    known = {f.name for f in dataclasses.fields(EditHparams)}
    raw = dict(raw)
    alg = str(raw.get("alg_name", method)).lower()
    if alg not in ("rome", "memit"):
        raise EditguardError(f"{where}: alg_name {raw.get('alg_name')!r} is not ROME or MEMIT")
    if alg != method:
        raise EditguardError(f"{where}: these are {alg.upper()} hyperparameters, but --method is {method}")
    unknown = sorted(str(k) for k in raw if not (isinstance(k, str) and (k in known or k in IGNORED_KEYS)))
    if unknown:
        raise EditguardError(f"{where}: unknown key(s) {', '.join(unknown)}")
    values = {k: v for k, v in raw.items() if k in known}
    if "layers" in values and "layers" in (overrides or {}):  # an overridden value is still the user's to get right
        for layer in values["layers"] if isinstance(values["layers"], list) else [values["layers"]]:
            _Typed(where).integer("layers", layer)
    values.update(overrides or {})
    values["method"] = method
    hp = EditHparams(**values)
    typed = _Typed(where)
    hp.layers = [typed.integer("layers", x) for x in (hp.layers if isinstance(hp.layers, list) else [hp.layers])]
    for key in INT_KEYS:
        setattr(hp, key, typed.integer(key, getattr(hp, key)))
    for key in FLOAT_KEYS:
        setattr(hp, key, typed.number(key, getattr(hp, key)))
    for key in STR_KEYS:
        value = getattr(hp, key)
        if value is not None and not isinstance(value, str):
            raise EditguardError(f"{where}: {key} must be a string, got {value!r}")
    if not isinstance(hp.mom2_adjustment, bool):  # a quoted "false" would be true in Python
        raise EditguardError(f"{where}: mom2_adjustment must be true or false, got {hp.mom2_adjustment!r}")
    if hp.mom2_dtype not in MOM2_DTYPES:
        raise EditguardError(f"{where}: mom2_dtype must be one of {', '.join(MOM2_DTYPES)}, got {hp.mom2_dtype!r}")
    pairs = hp.context_template_length_params
    if not isinstance(pairs, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
        raise EditguardError(f"{where}: context_template_length_params must be a list of [length, count] pairs")
    hp.context_template_length_params = [[typed.integer("context_template_length_params", a, at_least=1),
                                          typed.integer("context_template_length_params", b, at_least=0)]
                                         for a, b in pairs]
    if not hp.layers:
        raise EditguardError(f"{where}: layers is empty")
    if len(set(hp.layers)) != len(hp.layers):  # two steps on one tensor: a bank keeps one layer's factors each
        raise EditguardError(f"{where}: layers {hp.layers} names a layer twice")
    for key in ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp"):
        template = getattr(hp, key)
        # one "{}" for the layer: without it every layer would name the same module (a silent wrong edit)
        if template is not None and (template.count("{}") != 1 or any(c in template.replace("{}", "") for c in "{}")):
            raise EditguardError(f"{where}: {key} must hold one {{}} for the layer number, got {template!r}")
    if hp.method == "memit" or hp.mom2_adjustment:  # the statistics are used: their corpus must exist now,
        _check_corpus(where, hp.mom2_dataset)  # not after the long optimisation of every fact
    for key in ("v_num_grad_steps", "facts_per_batch", "mom2_n_samples"):
        if getattr(hp, key) < 1:
            raise EditguardError(f"{where}: {key} must be at least 1, got {getattr(hp, key)}")
    if not 0 <= hp.seed < 2 ** 63:
        raise EditguardError(f"{where}: seed must lie in [0, 2^63), got {hp.seed}")
    for key in ("v_lr", "clamp_norm_factor"):
        if not getattr(hp, key) > 0:
            raise EditguardError(f"{where}: {key} must be positive, got {getattr(hp, key)}")
    for key in ("v_weight_decay", "kl_factor", "mom2_update_weight", "early_stop_loss"):
        if not getattr(hp, key) >= 0:
            raise EditguardError(f"{where}: {key} must not be negative, got {getattr(hp, key)}")
    if hp.method == "memit" and not hp.mom2_update_weight > 0:  # λ = 0 leaves K Kᵀ alone: singular for n < width
        raise EditguardError(f"{where}: mom2_update_weight must be positive for MEMIT, got {hp.mom2_update_weight}")
    return hp


def _check_corpus(where: str, dataset: str) -> None:
    if dataset == WIKITEXT:
        return
    if dataset == "wikipedia":
        raise EditguardError(f"{where}: mom2_dataset 'wikipedia' (EasyEdit's) needs a Wikipedia dump editguard does "
                             f"not download; use {WIKITEXT} (shipped) or the path of a text file")
    if not user_path(dataset).is_file():
        raise EditguardError(f"{where}: mom2_dataset {dataset!r} is neither {WIKITEXT} nor a text file")
