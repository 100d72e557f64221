"""[`FederatedConfig`]: one federated run, as YAML keys and `perfit federate` flags. Shared by the in-process
simulation and the Flower apps."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..config import PerFITLoraConfig
from ..mole.config import MoLEConfig
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
    gradient_checkpointing: bool = False  # trade compute for activation memory (large models)
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
    num_experts: int = 30
    experts_per_client_min: int = 2
    experts_per_client_max: int = 8
    clients_per_expert: int = 2
    mole_top_k: int = 2
    balance_loss_coef: float = 0.001
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
    # ------------------------------------------------------------------ engine (docs/federated.md)
    client_state_memory_mb: float = 2048.0  # client states kept in memory up to this size; beyond, read from disk
    finetune_steps: int = 0  # after the last round, every client fine-tunes its personalized adapter this many steps
    eval_clients: str = "auto"  # "all", "sampled" (the round's sampled clients; all in the last round), "auto"
    eval_local_model: bool = False  # also evaluate each trained client's local adapter before aggregation

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
        self._check_fedamole()
        self._check_engine()
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other; choose one.")
        if isinstance(self.strategy_options, str):  # from the command line: --strategy_options '{"mu": 0.1}'
            try:
                self.strategy_options = json.loads(self.strategy_options or "{}")
            except json.JSONDecodeError as err:
                raise ValueError(f"strategy_options={self.strategy_options!r} is not valid JSON: {err}.") from None
        if not isinstance(self.strategy_options, dict):
            raise ValueError(f"strategy_options must be a mapping of option -> value, got {self.strategy_options!r}.")
        if self.push_to_hub:  # checked now, not after hours of training
            if not self.hub_repo_prefix:
                raise ValueError("push_to_hub=True needs hub_repo_prefix (e.g. 'my-org/perfit-flan8').")
            from ..hub import parse_repo_prefix

            parse_repo_prefix(self.hub_repo_prefix)
            if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
                raise ValueError(
                    "push_to_hub=True but HF_HUB_OFFLINE is set: the push at the end would fail. Unset HF_HUB_OFFLINE, "
                    "or drop push_to_hub and push later with `perfit push --run <output_dir> --repo_prefix ...`."
                )

    def _check_fedamole(self) -> None:
        """FedAMoLE's fields: ranges always, and for `strategy=fedamole` that every round's expert assignment exists."""
        names = ("num_experts", "experts_per_client_min", "experts_per_client_max", "clients_per_expert", "mole_top_k")
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1.")
        coef = self.balance_loss_coef
        if isinstance(coef, bool) or not isinstance(coef, int | float) or not coef >= 0:
            raise ValueError(f"balance_loss_coef={coef!r} must be a number >= 0.")
        if self.strategy == "fedamole":
            from ..mole.assignment import assignment_error

            sampled = max(1, round(self.fraction_clients * self.num_clients))  # clients per round, as the simulation
            error = assignment_error(
                self.num_experts,
                sampled,
                self.clients_per_expert,
                self.experts_per_client_min,
                self.experts_per_client_max,
            )
            if error is not None:
                raise ValueError(f"strategy=fedamole with {sampled} clients per round: {error}")

    def _check_engine(self) -> None:
        """The engine keys: memory budget, fine-tuning steps, evaluation plan."""
        mb = self.client_state_memory_mb
        if isinstance(mb, bool) or not isinstance(mb, int | float) or not mb >= 0:
            raise ValueError(f"client_state_memory_mb={mb!r} must be a number >= 0 (0 keeps every state on disk).")
        steps = self.finetune_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"finetune_steps={steps!r} must be an integer >= 0 (0: no fine-tuning after the rounds).")
        if self.eval_clients not in ("auto", "all", "sampled"):
            raise ValueError(f"eval_clients={self.eval_clients!r} is unknown; allowed values: auto, all, sampled.")

    def resolved_eval_clients(self) -> str:
        """`"all"` or `"sampled"`: `auto` evaluates every client when every client trains (`fraction_clients == 1`)
        and only the sampled ones otherwise, so a round's cost grows with the sampled clients, not all of them."""
        if self.eval_clients != "auto":
            return self.eval_clients
        return "all" if self.fraction_clients >= 1.0 else "sampled"

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

    def adapter_config(self) -> PerFITLoraConfig | MoLEConfig:
        """PerFIT's expanded adapter for `perfit`; FedAMoLE's MoLE adapter (rank `lora_r` experts) for `fedamole`; for
        every other method a vanilla rank-r LoRA (γ = 1, PEFT init)."""
        common = dict(r=self.lora_r, lora_alpha=self.lora_alpha, target_modules=list(self.lora_target_modules))
        if self.strategy == "fedamole":
            return MoLEConfig(
                **common,
                num_experts=self.num_experts,
                top_k=self.mole_top_k,
                balance_loss_coef=float(self.balance_loss_coef),
            )
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
        `proximal_mu` for fedprox, the expert-assignment constraints and `seed` for fedamole), overridden by
        `strategy_options` (any option the strategy defines)."""
        named = {
            "perfit": {"research_every": self.research_every},
            "fedprox": {"proximal_mu": self.proximal_mu},
            "fedamole": {
                "clients_per_expert": self.clients_per_expert,
                "experts_per_client_min": self.experts_per_client_min,
                "experts_per_client_max": self.experts_per_client_max,
                "seed": self.seed,
            },
        }
        return {**named.get(self.strategy, {}), **self.strategy_options}


__all__ = ["FederatedConfig"]
