"""[`FederatedConfig`]: one federated run, as YAML keys and `perfit federate` flags. Shared by the in-process
simulation and the Flower apps."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ..config import PerFITLoraConfig
from .strategies import STRATEGIES


@dataclass
class FederatedConfig:
    """A federated run. YAML keys and command-line flags are these field names."""

    model_name_or_path: str = "smollm2-135m-instruct"
    dataset_name: str = ""
    strategy: str = "perfit"
    num_clients: int = 8
    num_rounds: int = 3
    fraction_clients: float = 1.0
    local_steps: int = 10
    learning_rate: float = 2e-4
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 512
    output_dir: str = "outputs/federated"
    seed: int = 0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    expansion_factor: int = 4
    search_steps: int = 10
    prune_iterations: int = 4
    importance: str = "taylor1"
    budget_multipliers: list[float] | None = None
    research_every: int = 0
    proximal_mu: float = 0.01
    partition: str = "category"
    partition_column: str = "category"
    dirichlet_alpha: float = 0.5
    test_fraction: float = 0.1
    max_eval_examples: int | None = None
    eval_batch_size: int = 8
    strategy_options: dict[str, Any] = field(default_factory=dict)
    trust_remote_code: bool = False
    push_to_hub: bool = False
    hub_repo_prefix: str | None = None
    hub_private: bool = False
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} is unknown; allowed values: {sorted(STRATEGIES)}.")
        for name in ("num_clients", "num_rounds", "local_steps", "max_length", "per_device_train_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1.")
        if not 0.0 < self.fraction_clients <= 1.0:
            raise ValueError(f"fraction_clients={self.fraction_clients} must be in (0, 1].")
        if self.partition not in ("category", "dirichlet", "iid"):
            raise ValueError(f"partition={self.partition!r} is unknown; allowed values: category, dirichlet, iid.")
        if self.budget_multipliers is not None and len(self.budget_multipliers) != self.num_clients:
            raise ValueError(
                f"budget_multipliers has {len(self.budget_multipliers)} entries for num_clients={self.num_clients}; "
                "give one per client."
            )
        if STRATEGIES[self.strategy].uses_masks and self.search_steps > self.local_steps:
            raise ValueError(
                f"search_steps={self.search_steps} > local_steps={self.local_steps}: PerFIT's search must finish "
                "within a client's first round; set search_steps <= local_steps."
            )
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other; choose one.")
        if isinstance(self.strategy_options, str):  # from the command line: --strategy_options '{"mu": 0.1}'
            try:
                self.strategy_options = json.loads(self.strategy_options or "{}")
            except json.JSONDecodeError as err:
                raise ValueError(f"strategy_options={self.strategy_options!r} is not valid JSON: {err}.") from None
        if not isinstance(self.strategy_options, dict):
            raise ValueError(f"strategy_options must be a mapping of option -> value, got {self.strategy_options!r}.")
        if self.push_to_hub and not self.hub_repo_prefix:
            raise ValueError("push_to_hub=True needs hub_repo_prefix (e.g. 'my-org/perfit-flan8').")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FederatedConfig:
        """Build from a dict (e.g. a YAML file); an unknown key is a ValueError naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}.")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def adapter_config(self) -> PerFITLoraConfig:
        """PerFIT's expanded adapter for `perfit`; for every other method a vanilla rank-r LoRA (γ = 1, PEFT init)."""
        common = dict(r=self.lora_r, lora_alpha=self.lora_alpha, target_modules=list(self.lora_target_modules))
        if STRATEGIES[self.strategy].uses_masks:
            return PerFITLoraConfig(
                **common,
                expansion_factor=self.expansion_factor,
                search_steps=self.search_steps,
                prune_iterations=min(self.prune_iterations, self.search_steps),
                importance=self.importance,
                research_every=self.research_every,
            )
        return PerFITLoraConfig(
            **common, expansion_factor=1, init_lora_weights=True, search_steps=1, prune_iterations=1
        )

    def resolved_strategy_options(self) -> dict[str, Any]:
        """The options the strategy is built with: those of the named config keys (`research_every` for perfit,
        `proximal_mu` for fedprox), overridden by `strategy_options` (any option the strategy defines)."""
        named = {"perfit": {"research_every": self.research_every}, "fedprox": {"proximal_mu": self.proximal_mu}}
        return {**named.get(self.strategy, {}), **self.strategy_options}


__all__ = ["FederatedConfig"]
