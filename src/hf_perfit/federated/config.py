"""[`FederatedConfig`]: one federated run, as YAML keys and `perfit federate` flags. Shared by the in-process
simulation and the Flower apps."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from ..config import SEARCH_MODES, PerFITLoraConfig
from ..mole.config import MoLEConfig
from .strategies import STRATEGIES

_PERFIT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(PerFITLoraConfig)}
PERFIT_INITS = ("symmetric", "zero")
"""`perfit_init` values: PerFIT's symmetric init, or PEFT's standard LoRA init (`B = 0`: the "zero" ablation)."""


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
    device: str = "auto"  # where the base model lives for the whole run: auto (CUDA when visible), cpu, cuda
    bf16: str = "auto"  # bf16 base weights + autocast: auto (on for CUDA with bf16 support), true, false
    max_length: int = 512
    output_dir: str = "outputs/federated"
    seed: int = 0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    expansion_factor: int = 4
    search_steps: int = _PERFIT_DEFAULTS["search_steps"]  # declared once: PerFITLoraConfig's default
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
    # Appended keys (issue 17); keep new keys at the end.
    lr_decay_per_round: float = 1.0  # learning rate of round t: learning_rate * lr_decay_per_round ** t
    search_mode: str = _PERFIT_DEFAULTS["search_mode"]  # PerFIT: "foresight" (the paper's) or "train"
    search_batches: int = _PERFIT_DEFAULTS["search_batches"]  # PerFIT foresight: local batches scored
    # ------------------------------------------------------------------ engine (docs/federated.md)
    client_state_memory_mb: float = 2048.0  # client states kept in memory up to this size; beyond, read from disk
    finetune_steps: int = 0  # after the last round, every client fine-tunes its personalized adapter this many steps
    eval_clients: str = "auto"  # "all", "sampled" (the round's sampled clients; all in the last round), "auto"
    eval_local_model: bool = False  # also evaluate each trained client's local adapter before aggregation
    # ------------------------------------------------------------------ ablations (issue 18, docs/perfit.md)
    perfit_init: str = "symmetric"  # PerFIT's expanded adapter: "symmetric" (the paper's) or "zero" (PEFT's, B = 0)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field's type and range, and the combinations the run needs, before anything is loaded,
        trained or written; the first problem found is a `ValueError` naming the field and what to set instead.

        Called by `__post_init__`; call it again after changing fields of an existing config."""
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} is unknown; allowed values: {sorted(STRATEGIES)}.")
        for name, minimum in _INT_FIELDS.items():
            _check_int(name, getattr(self, name), minimum)
        self._check_device()
        if self.max_eval_examples is not None:
            _check_int("max_eval_examples", self.max_eval_examples, 1, "or null for all of them")
        for name, (low, high, low_open, high_open) in _FLOAT_FIELDS.items():
            _check_range(name, getattr(self, name), low, high, low_open, high_open)
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false.")
        targets = self.lora_target_modules
        if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(
                f"lora_target_modules={targets!r} must be a non-empty list of module names, e.g. [q_proj, v_proj]."
            )
        if self.partition not in ("category", "dirichlet", "iid"):
            raise ValueError(f"partition={self.partition!r} is unknown; allowed values: category, dirichlet, iid.")
        if self.budget_multipliers is not None:
            if isinstance(self.budget_multipliers, str | bytes) or not hasattr(self.budget_multipliers, "__len__"):
                raise ValueError(
                    f"budget_multipliers={self.budget_multipliers!r} must be a list of numbers, one per client."
                )
            if len(self.budget_multipliers) != self.num_clients:
                raise ValueError(
                    f"budget_multipliers has {len(self.budget_multipliers)} entries for num_clients={self.num_clients}; "
                    "give one per client."
                )
            for index, value in enumerate(self.budget_multipliers):
                # b_k scales client k's budget r·(d_in + d_out): 0 or less keeps nothing to train (docs/perfit.md)
                _check_range(f"budget_multipliers[{index}]", value, 0.0, math.inf, True, True)
        if (
            STRATEGIES[self.strategy].uses_masks
            and self.search_mode == "train"
            and self.search_steps > self.local_steps
        ):
            raise ValueError(
                f"search_steps={self.search_steps} > local_steps={self.local_steps}: PerFIT's search must finish "
                "within a client's first round; set search_steps <= local_steps."
            )
        self._check_fedamole()
        if self.search_mode not in SEARCH_MODES:
            raise ValueError(f"search_mode={self.search_mode!r} is not supported; allowed values: {SEARCH_MODES}.")
        decay = self.lr_decay_per_round
        if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0.0 < decay <= 1.0:
            raise ValueError(
                f"lr_decay_per_round={decay!r} must be a number in (0, 1] (1.0: the same learning rate every round; "
                "FedAMoLE's authors use 0.99)."
            )
        self._check_engine()
        if self.perfit_init not in PERFIT_INITS:
            raise ValueError(
                f"perfit_init={self.perfit_init!r} is unknown; allowed values: {list(PERFIT_INITS)} ('symmetric' is "
                "the paper's; 'zero' is PEFT's standard LoRA init, B = 0, with which every Taylor score is 0)."
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
        if self.strategy == "fedamole":
            self._check_mole_top_k()
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
        self.adapter_config()  # the adapter's own checks (importance kind, ...) now, not after the data is loaded

    def _check_device(self) -> None:
        """`device` and `bf16` (YAML may give `bf16: true` as a boolean): normalized to lower-case strings."""
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r} is unknown; allowed values: auto, cpu, cuda.")
        bf16 = str(self.bf16).strip().lower()
        if bf16 not in ("auto", "true", "false"):
            raise ValueError(f"bf16={self.bf16!r} is unknown; allowed values: auto, true, false.")
        self.bf16 = bf16

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

    def _check_mole_top_k(self) -> None:
        """The router mixes `mole_top_k` of the experts a client holds, and a client holds at most
        `experts_per_client_max` (and at most `num_experts`) of them: a larger `mole_top_k` is never honoured for any
        client. Between `experts_per_client_min` and the max it is, for the clients holding that many (a client holding
        fewer mixes all of its experts, docs/fedamole.md)."""
        options = self.resolved_strategy_options()
        most = min(int(options.get("experts_per_client_max", self.experts_per_client_max)), self.num_experts)
        if self.mole_top_k > most:
            raise ValueError(
                f"mole_top_k={self.mole_top_k} but a client holds at most {most} experts (experts_per_client_max="
                f"{options.get('experts_per_client_max', self.experts_per_client_max)}, num_experts={self.num_experts})"
                f", so no router could mix {self.mole_top_k}; set mole_top_k <= {most} or raise "
                "experts_per_client_max."
            )

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
                prune_iterations=self.prune_iterations
                if self.search_mode == "foresight"
                else min(self.prune_iterations, self.search_steps),
                importance=self.importance,
                research_every=self.research_every,
                search_mode=self.search_mode,
                search_batches=self.search_batches,
                init_lora_weights="symmetric" if self.perfit_init == "symmetric" else True,
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


# Integer fields and their least allowed value: counts and sizes are >= 1 (a 0 batch size or step count only fails
# deep inside training), `seed` and `research_every` (0 = never search again) are >= 0.
_INT_FIELDS: dict[str, int] = {
    "num_clients": 1,
    "num_rounds": 1,
    "local_steps": 1,
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "max_length": 1,
    "eval_batch_size": 1,
    "seed": 0,
    "lora_r": 1,
    "expansion_factor": 1,
    "search_steps": 1,
    "prune_iterations": 1,
    "research_every": 0,
}

# Number fields: (low, high, low excluded, high excluded).
_FLOAT_FIELDS: dict[str, tuple[float, float, bool, bool]] = {
    "learning_rate": (0.0, math.inf, True, True),  # 0 trains nothing, < 0 climbs the loss
    "fraction_clients": (0.0, 1.0, True, False),
    "lora_alpha": (0.0, math.inf, True, True),  # the LoRA scale alpha / r; 0 switches the adapter off
    "proximal_mu": (0.0, math.inf, False, True),
    "dirichlet_alpha": (0.0, math.inf, True, True),
    "test_fraction": (0.0, 1.0, False, True),  # 0 still holds out one row per client for the personalized test
}

_BOOL_FIELDS = (
    "gradient_checkpointing",
    "trust_remote_code",
    "push_to_hub",
    "hub_private",
    "resume",
    "overwrite",
)


def _check_int(name: str, value: Any, minimum: int, extra: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        hint = f" {extra}" if extra else ""
        raise ValueError(f"{name}={value!r} is not allowed; it must be an integer >= {minimum}{hint}.")


def _check_range(name: str, value: Any, low: float, high: float, low_open: bool, high_open: bool) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name}={value!r} is not allowed; it must be a number in {interval}.")


__all__ = ["FederatedConfig"]
