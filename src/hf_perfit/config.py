"""`PerFITLoraConfig`: a `LoraConfig` plus the fields of PerFIT's expansion and architecture search.

PerFIT (docs/perfit.md, § A PerFIT adapter is a plain rank-R LoRA plus masks) gives every client a LoRA of rank
`R = expansion_factor * r`, initialises it symmetrically so that Taylor importance is measurable, then prunes it back
to the trainable budget of a rank-`r` LoRA. At run time the adapter *is* a plain PEFT LoRA of rank `R` whose scale
stays `lora_alpha / r`; [`PerFITLoraConfig.to_lora_config`] gives that plain config (`r = R`,
`lora_alpha = lora_alpha * expansion_factor`), which is also what an exported adapter records, so plain
`peft.PeftModel.from_pretrained` reproduces the same scale.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import numbers
from dataclasses import dataclass, field
from typing import Any

from peft import LoraConfig

IMPORTANCE_KINDS = ("taylor1", "taylor2", "mixed")
SEARCH_MODES = ("foresight", "train")
INIT_CHOICES = ("symmetric", True, False, "gaussian")

# PerFIT's own fields; everything else is LoraConfig's.
PERFIT_FIELDS = (
    "expansion_factor",
    "symmetric_init_std",
    "importance",
    "importance_ema",
    "search_steps",
    "prune_iterations",
    "budget_multiplier",
    "research_every",
    "search_mode",
    "search_batches",
)


@dataclass
class PerFITLoraConfig(LoraConfig):
    """Configuration of a PerFIT adapter: a LoRA that is expanded, symmetrically initialised and pruned.

    All [`~peft.LoraConfig`] fields keep their meaning for the *base* LoRA (`r`, `lora_alpha`,
    `target_modules`, ...); the fields below add PerFIT's architecture search.

    Args:
        expansion_factor (`int`, defaults to 4):
            `γ`: the adapter is built with rank `R = γ·r`. Must be an integer >= 1.
        init_lora_weights (`"symmetric"`, `True`, `False` or `"gaussian"`, defaults to `"symmetric"`):
            `"symmetric"` splits the `R` ranks in two halves, `A = [A₀; A₀]`, `B = [B₀, −B₀]`, so the model starts
            exactly at the base model while every element has a non-zero weight and gradient. `True` is PEFT's
            standard init (`B = 0`), with which every Taylor score of `B` and every gradient of `A` vanishes.
        symmetric_init_std (`float`, defaults to 0.02):
            `σ` of `B₀ ~ N(0, σ²)` in the symmetric init.
        importance (`str`, defaults to `"taylor1"`):
            `"taylor1"`: `|θ·g|`; `"taylor2"`: `½(θ·g)²`; `"mixed"`: the sum of the two scores' global ranks.
        importance_ema (`float`, defaults to 0.85):
            EMA coefficient `β` of the scores over the batches since the last pruning iteration
            (`s ← β·s + (1−β)·s_batch`; the first batch after a pruning iteration sets `s` directly).
        search_steps (`int`, defaults to 10):
            `search_mode="train"` only: optimizer steps the architecture search lasts; the last pruning iteration
            happens at this step.
        prune_iterations (`int`, defaults to 4):
            Number of evenly spaced pruning iterations; the density follows a geometric schedule from 1 to
            `budget / expanded_size`.
        budget_multiplier (`float`, defaults to 1.0):
            `b_k`: the client keeps `b_k × r·(d_in + d_out)` elements summed over target modules (capped at the
            expanded size). A resource-rich client uses a value > 1.
        research_every (`int`, defaults to 0):
            In federated training, repeat the search every this many rounds (0: search once, in the first round).
        search_mode (`"foresight"` or `"train"`, defaults to `"foresight"`):
            `"foresight"` (the paper's): before any training, [`PerFITModel.foresight_search`] scores the elements
            from gradients on `search_batches` local batches (no optimizer step in the expanded space) and prunes to
            the budget in `prune_iterations` iterations; training then updates the kept elements only, so a client
            never trains more than the budget. [`PerFITPruningCallback`] runs it at `on_train_begin` on the
            trainer's dataloader. `"train"`: the search runs during the first `search_steps` optimizer steps of
            dense training (the expanded adapter is trained until the last pruning iteration).
        search_batches (`int`, defaults to 8):
            `search_mode="foresight"` only: local batches the scores are computed on, split evenly over the
            `prune_iterations` iterations (each iteration scores the network pruned by the previous one).
    """

    expansion_factor: int = field(default=4, metadata={"help": "γ: adapters are built with rank γ·r."})
    init_lora_weights: Any = field(
        default="symmetric",
        metadata={"help": "'symmetric' (PerFIT), True (PEFT default, B=0), False or 'gaussian'."},
    )
    symmetric_init_std: float = field(default=0.02, metadata={"help": "σ of B₀ ~ N(0, σ²) in the symmetric init."})
    importance: str = field(default="taylor1", metadata={"help": "One of 'taylor1', 'taylor2', 'mixed'."})
    importance_ema: float = field(default=0.85, metadata={"help": "EMA coefficient of the importance scores."})
    search_steps: int = field(default=10, metadata={"help": "Optimizer steps of the search (search_mode='train')."})
    prune_iterations: int = field(default=4, metadata={"help": "Pruning iterations within the search."})
    budget_multiplier: float = field(default=1.0, metadata={"help": "Client budget multiplier b_k > 0."})
    research_every: int = field(default=0, metadata={"help": "Re-run the search every N rounds (0: never)."})
    search_mode: str = field(
        default="foresight",
        metadata={
            "help": "'foresight' (score before training, train only the kept) or 'train' (prune while training)."
        },
    )
    search_batches: int = field(default=8, metadata={"help": "Batches scored by the foresight search."})

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("expansion_factor", self.expansion_factor, minimum=1, hint="an integer >= 1, e.g. 4")
        _check_int("prune_iterations", self.prune_iterations, minimum=1, hint="an integer >= 1, e.g. 4")
        _check_int("search_steps", self.search_steps, minimum=1, hint="an integer >= 1, e.g. 10")
        _check_int("search_batches", self.search_batches, minimum=1, hint="an integer >= 1, e.g. 8")
        if self.search_mode not in SEARCH_MODES:
            raise ValueError(f"search_mode={self.search_mode!r} is not supported; allowed values: {SEARCH_MODES}.")
        _check_int("research_every", self.research_every, minimum=0, hint="an integer >= 0 (0: search once)")
        _check_int("r", self.r, minimum=1, hint="an integer >= 1")
        if self.search_mode == "train" and self.search_steps < self.prune_iterations:
            raise ValueError(
                f"search_steps={self.search_steps} is smaller than prune_iterations={self.prune_iterations}; "
                "allowed: search_steps >= prune_iterations (each pruning iteration needs its own optimizer step)."
            )
        if self.importance not in IMPORTANCE_KINDS:
            raise ValueError(f"importance={self.importance!r} is not supported; allowed values: {IMPORTANCE_KINDS}.")
        if not isinstance(self.budget_multiplier, numbers.Real) or not self.budget_multiplier > 0:
            raise ValueError(
                f"budget_multiplier={self.budget_multiplier!r} must be a number > 0 (1.0 keeps the budget of a "
                f"rank-r LoRA; values above 1 give a resource-rich client more elements)."
            )
        if not isinstance(self.importance_ema, numbers.Real) or not 0.0 <= self.importance_ema < 1.0:
            raise ValueError(f"importance_ema={self.importance_ema!r} must be in [0, 1).")
        if not isinstance(self.symmetric_init_std, numbers.Real) or not self.symmetric_init_std > 0:
            raise ValueError(f"symmetric_init_std={self.symmetric_init_std!r} must be a number > 0.")
        if (
            self.init_lora_weights not in INIT_CHOICES
            or isinstance(self.init_lora_weights, numbers.Number)
            and (not isinstance(self.init_lora_weights, bool))
        ):
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported by PerFIT; allowed values: "
                f"{INIT_CHOICES} ('symmetric' is the one that makes Taylor importance measurable)."
            )
        if self.init_lora_weights == "symmetric" and self.expanded_rank % 2:
            raise ValueError(
                f"init_lora_weights='symmetric' splits the expanded rank in two halves, but r * expansion_factor = "
                f"{self.r} * {self.expansion_factor} = {self.expanded_rank} is odd; choose an even r or an even "
                "expansion_factor."
            )
        for name, hint in (
            ("use_dora", "DoRA's magnitude vector has no element-wise budget"),
            ("use_rslora", "PerFIT keeps the scale lora_alpha / r of the base rank"),
            ("lora_bias", "a LoRA bias is outside the pruned budget"),
        ):
            if getattr(self, name):
                raise ValueError(f"{name}=True is not supported by PerFIT ({hint}); set {name}=False.")
        if self.target_parameters:
            raise ValueError("target_parameters is not supported by PerFIT; use target_modules.")

    @property
    def is_prompt_learning(self) -> bool:
        """Refuses a hand-over to PEFT's own constructors, which read this first.

        `peft.get_peft_model`, `peft.PeftModel(...)`, `peft.inject_adapter_in_model` and `trl.SFTTrainer(peft_config=)`
        would build a plain LoRA from this config: with `init_lora_weights="symmetric"` PEFT fails with "Unknown
        initialization", otherwise it silently builds an unexpanded rank-`r` LoRA with no search. `PerFITModel`
        gives PEFT `to_lora_config()` instead, so only such a direct hand-over reaches this property.
        """
        raise ValueError(
            "A PerFITLoraConfig cannot be passed to peft.get_peft_model / peft.PeftModel / trl.SFTTrainer(peft_config="
            "...): PEFT would build a plain LoRA without PerFIT's expansion, symmetric init and search. Build the "
            "model with `hf_perfit.get_perfit_model(base_model, config)` (a PerFITModel, itself a peft.PeftModel) and "
            "pass that model to the trainer with callbacks=[hf_perfit.PerFITPruningCallback()]."
        )

    @property
    def expanded_rank(self) -> int:
        """`R = expansion_factor · r`, the rank the adapter is built with."""
        return int(self.r) * int(self.expansion_factor)

    @property
    def scaling(self) -> float:
        """The adapter scale `lora_alpha / r` (of the base rank), the same as a vanilla rank-`r` LoRA."""
        return self.lora_alpha / self.r

    def to_lora_config(self) -> LoraConfig:
        """The plain `LoraConfig` of the expanded adapter: `r = R`, `lora_alpha = (lora_alpha / r) · R`.

        This is what PEFT builds the layers from and what `save_pretrained` writes to `adapter_config.json`,
        so plain PEFT loads an exported PerFIT adapter with the same scale.
        """
        kwargs = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(LoraConfig)
            if f.init and f.name not in ("r", "lora_alpha", "init_lora_weights")
        }
        if isinstance(kwargs.get("target_modules"), set):
            kwargs["target_modules"] = sorted(kwargs["target_modules"])
        init = self.init_lora_weights
        return LoraConfig(
            r=self.expanded_rank,
            lora_alpha=self.scaling * self.expanded_rank,
            # PEFT cannot build "symmetric": it builds the standard init and PerFITModel re-initialises.
            init_lora_weights=True if init == "symmetric" else init,
            **kwargs,
        )

    def perfit_dict(self) -> dict[str, Any]:
        """The full config as a JSON-serialisable dict (LoRA and PerFIT fields), for `perfit_config.json`."""
        # PEFT's to_dict() already drops runtime-only fields (e.g. runtime_config); keep the constructor's fields.
        init_fields = {f.name for f in dataclasses.fields(self) if f.init}
        out = {}
        for name, value in self.to_dict().items():
            if name not in init_fields:
                continue
            if isinstance(value, set):
                value = sorted(value)
            elif isinstance(value, enum.Enum):
                value = value.value  # e.g. task_type
            out[name] = value
        json.dumps(out)  # fail here, not half-way through writing a file
        return out

    @classmethod
    def from_perfit_dict(cls, data: dict[str, Any]) -> PerFITLoraConfig:
        """Inverse of [`perfit_dict`]; unknown keys raise `ValueError` naming them."""
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"perfit_config.json has unknown fields {unknown}; known fields: {sorted(known)}.")
        return cls(**data)


def _check_int(name: str, value: Any, *, minimum: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}={value!r} is not allowed; it must be {hint}.")
