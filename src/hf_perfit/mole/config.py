"""`MoLEConfig`: the PEFT configuration of a mixture of LoRA experts (MoLE) adapter, as used by FedAMoLE.

Per target module (docs/fedamole.md § The MoLE adapter is a PEFT method): one shared expert `(A₀, B₀)` that is
always on, a pool of `num_experts` domain experts `(A_j, B_j)` of rank `r`, and a token projection `P ∈ R^{r×d_in}`.
The router scores the experts an adapter *holds* (a client's assigned experts) with `z_j(x) = (A_j x)ᵀ(P x)/√r`, keeps
the `top_k` and renormalizes their softmax weights:

    h = W₀x + s·B₀A₀x + Σ_{j ∈ top-k} p̃_j(x) · s·B_jA_jx,        s = lora_alpha / r

The config is a `peft.PeftConfig` registered with PEFT under the type `"MOLE"` (see [`hf_perfit.mole.register`]), so
a saved adapter loads with `peft.PeftModel.from_pretrained(base_model, folder)` once `hf_perfit` is imported.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

from peft import PeftConfig

MOLE_PEFT_TYPE = "MOLE"
"""The `peft_type` string written into `adapter_config.json`. PEFT's `PeftType` enum is closed, so the registry keys
on this plain string (`PeftType` members are `str` too, which is how PEFT's own lookups by the string read from
`adapter_config.json` work)."""


@dataclass
class MoLEConfig(PeftConfig):
    """Configuration of a MoLE adapter (FedAMoLE's mixture of LoRA experts).

    Args:
        r (`int`, defaults to 8):
            Rank of the shared expert, of every domain expert and of the token projection `P`.
        lora_alpha (`float`, defaults to 16):
            Scale numerator: every expert's output is multiplied by `s = lora_alpha / r`, as in LoRA.
        target_modules (`list[str]` or `str`, *optional*):
            Module names (or a regex) to wrap, as in `LoraConfig`; `None` uses PEFT's LoRA defaults for the
            architecture (e.g. `q_proj`, `v_proj` for Llama). Linear layers only.
        exclude_modules (`list[str]` or `str`, *optional*):
            Module names (or a regex) not to wrap, as in `LoraConfig`.
        layers_to_transform (`list[int]` or `int`, *optional*):
            Only wrap these layer indices, as in `LoraConfig`.
        layers_pattern (`list[str]` or `str`, *optional*):
            The layer pattern used with `layers_to_transform`, as in `LoraConfig`.
        num_experts (`int`, defaults to 30):
            `E`: size of the domain-expert pool of every target module (expert ids are `0 .. E-1`).
        top_k (`int`, defaults to 2):
            Experts mixed per token (`min(top_k, held experts)` when a module holds fewer).
        balance_loss_coef (`float`, defaults to 0.001):
            Weight of the Switch-style load-balancing loss added to the LM loss during training.
        held_experts (`dict[str, list[int]]`, *optional*):
            The domain experts this adapter holds per wrapped module (module name as in `model.named_modules()` of
            the base model, e.g. `"model.layers.0.self_attn.q_proj"`). `None`: every module holds all `E` experts.
            An exported FedAMoLE client adapter records its assigned experts here, so it stores and routes over
            exactly those.
        lora_dropout (`float`, defaults to 0.05):
            Dropout on the experts' input during training, as `LoraConfig.lora_dropout`: every expert (shared and
            domain) computes `B·A·dropout(x)`, while the router scores the undropped `x` (`A_j x` and `P x`), as the
            authors' code does (docs/fedamole.md). 0.05 is their default.
        init_weights (`bool`, defaults to `True`):
            `True`: LoRA's init (`A` Kaiming-uniform, `B = 0`, so the adapter starts at the base model; `P`
            Kaiming-uniform). `False`: `B` is drawn from `N(0, 0.02²)` too (for tests of a non-trivial adapter).
    """

    r: int = field(default=8, metadata={"help": "Rank of every expert and of the token projection P."})
    lora_alpha: float = field(default=16, metadata={"help": "Expert outputs are scaled by lora_alpha / r."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex of the Linear layers to wrap."}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex of layers not to wrap."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only wrap these layer indices."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Layer pattern used with layers_to_transform."}
    )
    num_experts: int = field(default=30, metadata={"help": "E: domain experts per target module."})
    top_k: int = field(default=2, metadata={"help": "Experts mixed per token."})
    balance_loss_coef: float = field(default=0.001, metadata={"help": "Weight of the load-balancing loss."})
    held_experts: dict[str, list[int]] | None = field(
        default=None, metadata={"help": "Domain experts held per module; None: all of them."}
    )
    init_weights: bool = field(default=True, metadata={"help": "True: B = 0 (start at the base model)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the experts' input (training only)."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Not supported by MoLE; must stay None."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = MOLE_PEFT_TYPE
        for name in ("r", "num_experts", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1.")
        if self.top_k > self.num_experts:  # no module can hold more than the pool: top_k would never be honoured
            raise ValueError(f"top_k={self.top_k} > num_experts={self.num_experts}; set top_k <= num_experts.")
        for name in ("lora_alpha", "balance_loss_coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or value < 0:
                raise ValueError(f"{name}={value!r} must be a number >= 0.")
        dropout = self.lora_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"lora_dropout={dropout!r} must be a number in [0, 1), e.g. 0.05.")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"init_weights={self.init_weights!r} must be True or False.")
        if self.modules_to_save:
            raise ValueError("MoLEConfig does not support modules_to_save; leave it None.")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ValueError("layers_to_transform / layers_pattern cannot be used when target_modules is a regex.")
        if self.held_experts is not None:
            self.held_experts = {
                str(module): check_expert_ids(ids, self.num_experts, f"held_experts[{module!r}]")
                for module, ids in dict(self.held_experts).items()
            }

    @property
    def scaling(self) -> float:
        """`s = lora_alpha / r`."""
        return float(self.lora_alpha) / int(self.r)

    def experts_of(self, module_name: str) -> list[int]:
        """The expert ids module `module_name` holds: `held_experts[module_name]`, or all `E` when `held_experts` is
        `None`.

        Raises:
            ValueError: `held_experts` is given but does not name this module.
        """
        if self.held_experts is None:
            return list(range(self.num_experts))
        if module_name not in self.held_experts:
            raise ValueError(
                f"held_experts names no experts for module {module_name!r} (it names {sorted(self.held_experts)[:3]}"
                f"{'...' if len(self.held_experts) > 3 else ''}); the adapter was saved for another model or "
                "target_modules."
            )
        return list(self.held_experts[module_name])

    def to_dict(self) -> dict[str, Any]:
        """As `PeftConfig.to_dict`, with JSON-friendly containers (sets become sorted lists)."""
        out = super().to_dict()
        for key in ("target_modules", "exclude_modules"):
            if isinstance(out.get(key), set):
                out[key] = sorted(out[key])
        return out


def check_expert_ids(ids: Any, num_experts: int, what: str = "expert ids") -> list[int]:
    """`ids` as a sorted list of distinct ints in `[0, num_experts)`, else a `ValueError` naming `what`."""
    if isinstance(ids, str | bytes) or not hasattr(ids, "__iter__"):
        raise ValueError(f"{what}={ids!r} must be a list of expert ids.")
    out = []
    for j in ids:
        if isinstance(j, bool) or not isinstance(j, numbers.Integral) or not 0 <= int(j) < num_experts:
            raise ValueError(f"{what} contains {j!r}; expert ids are integers in [0, {num_experts}).")
        out.append(int(j))
    if len(set(out)) != len(out):
        raise ValueError(f"{what}={out} lists an expert twice.")
    return sorted(out)


__all__ = ["MOLE_PEFT_TYPE", "MoLEConfig", "check_expert_ids"]
