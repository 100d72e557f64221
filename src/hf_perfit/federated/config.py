"""[`FederatedConfig`]: one federated run, as YAML keys and `perfit federate` flags. Shared by the in-process
simulation and the Flower apps.

A federated recipe reads like a TRL / alignment-handbook recipe: the keys a TRL user knows keep TRL's names, types,
defaults and help, because they are *taken from* the dataclass that declares them, not declared again here:

- `trl.ModelConfig`: `model_name_or_path`, `lora_r`, `lora_alpha`, `lora_target_modules`;
- `trl.SFTConfig`: `learning_rate`, `per_device_train_batch_size`, `gradient_accumulation_steps`,
  `gradient_checkpointing`, `max_length`, `output_dir`, `seed`, `trust_remote_code`, `push_to_hub`;
- [`PerFITLoraConfig`]: `expansion_factor`, `search_steps`, `prune_iterations`, `importance`, `research_every`,
  `search_mode`, `search_batches`;
- [`MoLEConfig`]: `num_experts`, `top_k` (as `mole_top_k`), `balance_loss_coef`;
- [`FederatedArguments`] (this module): the settings only a federation has (clients, rounds, strategy, partition,
  evaluation plan, Hub push, resume, ...).

[`FederatedConfig`] is generated from [`FIELD_SOURCES`] (key -> the dataclass field that declares it); where our
default differs from the library's, [`DEFAULT_OVERRIDES`] holds it with the reason. The config stays one flat dataclass
(not a tuple of `SFTConfig`, `ModelConfig`, ...) because a federation reads a dozen of SFTConfig's ~150 fields and sets
the rest per client round itself (`federated/client.py`): accepting them all would let `num_train_epochs: 3` or
`lr_scheduler_type: cosine` pass silently with no effect. Such keys are refused with a message that names the key to use
instead ([`RENAMED_KEYS`]). [`load_config`] reads a YAML file plus overrides the way `perfit federate` does
(`trl.TrlParser`: YAML under `--config`, then `--key value` flags).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trl import ModelConfig, SFTConfig, TrlParser

from .._compose import compose
from ..config import SEARCH_MODES, PerFITLoraConfig
from ..mole.config import MoLEConfig
from .strategies import STRATEGIES
from .strategies.fedamole import FedAMoLEStrategy
from .strategies.fedprox import FedProxStrategy

_FEDAMOLE_OPTIONS = FedAMoLEStrategy.default_options
PERFIT_INITS = ("symmetric", "zero")
"""`perfit_init` values: PerFIT's symmetric init, or PEFT's standard LoRA init (`B = 0`: the "zero" ablation)."""


@dataclass
class FederatedArguments:
    """The settings only a federation has; every other key of [`FederatedConfig`] is declared by `trl.ModelConfig`,
    `trl.SFTConfig`, [`PerFITLoraConfig`] or [`MoLEConfig`] (see [`FIELD_SOURCES`]). docs/federated.md § Config keys
    describes each key."""

    dataset_name: str = field(
        default="", metadata={"help": "builtin:stdlib, a Hub id, a json/jsonl/parquet file or a per-client folder."}
    )
    strategy: str = field(
        default="perfit", metadata={"help": "local, fedit, fedprox, perfit, fedmut, fedqp or fedamole."}
    )
    num_clients: int = field(default=8, metadata={"help": "Clients of the federation."})
    num_rounds: int = field(default=3, metadata={"help": "Federated rounds."})
    fraction_clients: float = field(
        default=1.0, metadata={"help": "Share of the clients sampled per round, in (0, 1]."}
    )
    local_steps: int = field(default=10, metadata={"help": "Optimizer steps of a client per round."})
    device: str = field(
        default="auto",
        metadata={"help": "Where the base model lives for the whole run: auto (CUDA when visible), cpu, cuda."},
    )
    # Not SFTConfig's `bf16` (a bool, autocast only): "auto"/"true"/"false", and it also loads the frozen base weights
    # in bf16 (docs/federated.md § Config keys).
    bf16: str = field(
        default="auto",
        metadata={"help": "bf16 base weights + autocast: auto (on for CUDA with bf16 support), true, false."},
    )
    budget_multipliers: list[float] | None = field(
        default=None, metadata={"help": "PerFIT: one budget multiplier b_k > 0 per client (heterogeneous budgets)."}
    )
    proximal_mu: float = field(
        default=FedProxStrategy.default_options["proximal_mu"], metadata={"help": "FedProx: proximal coefficient μ."}
    )
    experts_per_client_min: int = field(
        default=_FEDAMOLE_OPTIONS["experts_per_client_min"],
        metadata={"help": "FedAMoLE: fewest domain experts a client holds."},
    )
    experts_per_client_max: int = field(
        default=_FEDAMOLE_OPTIONS["experts_per_client_max"],
        metadata={"help": "FedAMoLE: most domain experts a client holds."},
    )
    clients_per_expert: int = field(
        default=_FEDAMOLE_OPTIONS["clients_per_expert"],
        metadata={"help": "FedAMoLE: clients that train each domain expert per round."},
    )
    partition: str = field(
        default="category", metadata={"help": "Splitting one dataset over the clients: category, dirichlet, iid."}
    )
    partition_column: str = field(default="category", metadata={"help": "Column of partition=category."})
    dirichlet_alpha: float = field(default=0.5, metadata={"help": "Concentration of partition=dirichlet."})
    test_fraction: float = field(default=0.1, metadata={"help": "Share of a client's rows held out for its test."})
    max_eval_examples: int | None = field(
        default=None, metadata={"help": "Test examples per client and round (null: all)."}
    )
    eval_batch_size: int = field(default=8, metadata={"help": "Batch size of the per-round evaluation."})
    strategy_options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Any option of the strategy, as JSON: '{\"mutation_alpha\": 0.5}'."}
    )
    hub_repo_prefix: str | None = field(
        default=None, metadata={"help": "push_to_hub: repos are <prefix>-<client_id> (e.g. my-org/perfit-flan8)."}
    )
    hub_private: bool = field(default=False, metadata={"help": "push_to_hub: create the repos private."})
    resume: bool = field(default=False, metadata={"help": "Continue the run in output_dir from its last round."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an earlier run of ours in output_dir."})
    lr_decay_per_round: float = field(
        default=1.0, metadata={"help": "Round t trains with learning_rate * lr_decay_per_round ** t."}
    )
    client_state_memory_mb: float = field(
        default=2048.0, metadata={"help": "Client states kept in memory up to this size; beyond, read from disk."}
    )
    finetune_steps: int = field(
        default=0, metadata={"help": "After the last round, every client fine-tunes its adapter this many steps."}
    )
    eval_clients: str = field(
        default="auto",
        metadata={
            "help": "all, sampled (the round's sampled clients) or auto (all when every client trains, else sampled)."
        },
    )
    eval_local_model: bool = field(
        default=False, metadata={"help": "Also evaluate each trained client's local adapter before aggregation."}
    )
    # An ablation (docs/perfit.md): PerFITLoraConfig's `init_lora_weights` takes PEFT's values too, but only these two
    # are meaningful for a searched adapter, so the federation names them.
    perfit_init: str = field(
        default="symmetric",
        metadata={
            "help": "PerFIT's expanded adapter init: symmetric (the paper's) or zero (PEFT's, B = 0: an ablation)."
        },
    )


FIELD_SOURCES: dict[str, tuple[type, str]] = {
    # key of FederatedConfig: (the dataclass that declares it, its name there); in the order of `to_dict()`, which
    # every saved run's config.json and checkpoint.json follow (new keys go at the end).
    "model_name_or_path": (ModelConfig, "model_name_or_path"),
    "dataset_name": (FederatedArguments, "dataset_name"),
    "strategy": (FederatedArguments, "strategy"),
    "num_clients": (FederatedArguments, "num_clients"),
    "num_rounds": (FederatedArguments, "num_rounds"),
    "fraction_clients": (FederatedArguments, "fraction_clients"),
    "local_steps": (FederatedArguments, "local_steps"),
    "learning_rate": (SFTConfig, "learning_rate"),
    "per_device_train_batch_size": (SFTConfig, "per_device_train_batch_size"),
    "gradient_accumulation_steps": (SFTConfig, "gradient_accumulation_steps"),
    "gradient_checkpointing": (SFTConfig, "gradient_checkpointing"),
    "device": (FederatedArguments, "device"),
    "bf16": (FederatedArguments, "bf16"),
    "max_length": (SFTConfig, "max_length"),
    "output_dir": (SFTConfig, "output_dir"),
    "seed": (SFTConfig, "seed"),
    "lora_r": (ModelConfig, "lora_r"),
    "lora_alpha": (ModelConfig, "lora_alpha"),
    "lora_target_modules": (ModelConfig, "lora_target_modules"),
    "expansion_factor": (PerFITLoraConfig, "expansion_factor"),
    "search_steps": (PerFITLoraConfig, "search_steps"),
    "prune_iterations": (PerFITLoraConfig, "prune_iterations"),
    "importance": (PerFITLoraConfig, "importance"),
    "budget_multipliers": (FederatedArguments, "budget_multipliers"),
    "research_every": (PerFITLoraConfig, "research_every"),
    "proximal_mu": (FederatedArguments, "proximal_mu"),
    "num_experts": (MoLEConfig, "num_experts"),
    "experts_per_client_min": (FederatedArguments, "experts_per_client_min"),
    "experts_per_client_max": (FederatedArguments, "experts_per_client_max"),
    "clients_per_expert": (FederatedArguments, "clients_per_expert"),
    "mole_top_k": (MoLEConfig, "top_k"),
    "balance_loss_coef": (MoLEConfig, "balance_loss_coef"),
    "partition": (FederatedArguments, "partition"),
    "partition_column": (FederatedArguments, "partition_column"),
    "dirichlet_alpha": (FederatedArguments, "dirichlet_alpha"),
    "test_fraction": (FederatedArguments, "test_fraction"),
    "max_eval_examples": (FederatedArguments, "max_eval_examples"),
    "eval_batch_size": (FederatedArguments, "eval_batch_size"),
    "strategy_options": (FederatedArguments, "strategy_options"),
    "trust_remote_code": (SFTConfig, "trust_remote_code"),
    "push_to_hub": (SFTConfig, "push_to_hub"),
    "hub_repo_prefix": (FederatedArguments, "hub_repo_prefix"),
    "hub_private": (FederatedArguments, "hub_private"),
    "resume": (FederatedArguments, "resume"),
    "overwrite": (FederatedArguments, "overwrite"),
    "lr_decay_per_round": (FederatedArguments, "lr_decay_per_round"),
    "search_mode": (PerFITLoraConfig, "search_mode"),
    "search_batches": (PerFITLoraConfig, "search_batches"),
    "client_state_memory_mb": (FederatedArguments, "client_state_memory_mb"),
    "finetune_steps": (FederatedArguments, "finetune_steps"),
    "eval_clients": (FederatedArguments, "eval_clients"),
    "eval_local_model": (FederatedArguments, "eval_local_model"),
    "perfit_init": (FederatedArguments, "perfit_init"),
}
"""Where each key of [`FederatedConfig`] is declared (type, default, help): one dataclass per key."""

DEFAULT_OVERRIDES: dict[str, tuple[Any, str]] = {
    # key: (our default, the library's and why ours differs). Each is also the default every saved run and recipe
    # was made with, so changing one changes what a run without that key does.
    "model_name_or_path": (
        "smollm2-135m-instruct",
        "ModelConfig: None; the preset is converted locally, nothing is downloaded (README)",
    ),
    "learning_rate": (
        2e-4,
        "SFTConfig: 2e-5, a full fine-tuning rate; the FLAN-8 recipes train their LoRA at 10x that",
    ),
    "per_device_train_batch_size": (4, "TrainingArguments: 8; the FLAN-8 recipes' batch per local step"),
    "gradient_checkpointing": (
        False,
        "SFTConfig: True, which recomputes activations (TRL: ~20% slower training) to save memory a 135M model does "
        "not need; opt in for big models",
    ),
    "max_length": (512, "SFTConfig: 1024; the FLAN-8 recipes' length, half the activation memory per example"),
    "output_dir": ("outputs/federated", "TrainingArguments: None; a run folder under outputs/"),
    "seed": (0, "TrainingArguments: 42; every recipe and saved run uses 0"),
    "lora_r": (8, "ModelConfig: 16; rank 8 is the budget the benchmark compares every method at (docs/perfit.md)"),
    "lora_alpha": (16, "ModelConfig: 32; the scale lora_alpha / r = 2 at r = 8"),
    "lora_target_modules": (
        ["q_proj", "v_proj"],
        "ModelConfig: None (PEFT's per-model defaults, q_proj and v_proj "
        "for Llama); named, so the budget does not depend on the architecture table",
    ),
}
"""Keys whose default is not their declaring dataclass's: `key -> (default, why)`."""

RENAMED_KEYS: dict[str, str] = {
    # a key of TRL / PEFT (or an alignment-handbook recipe) -> the message naming the key to use here
    "r": "lora_r (trl.ModelConfig's name for LoraConfig.r)",
    "target_modules": "lora_target_modules (trl.ModelConfig's name for LoraConfig.target_modules)",
    "top_k": "mole_top_k (MoLEConfig.top_k)",
    "budget_multiplier": "budget_multipliers (a list: one multiplier per client)",
    "max_seq_length": "max_length (trl.SFTConfig's current name)",
    "max_steps": "local_steps (optimizer steps per client and round) and num_rounds",
    "num_train_epochs": "local_steps (optimizer steps per client and round) and num_rounds",
    "per_device_eval_batch_size": "eval_batch_size",
    "hub_model_id": "hub_repo_prefix (one repo per client: <prefix>-<client_id>)",
    "hub_private_repo": "hub_private",
    "resume_from_checkpoint": "resume (true continues the run in output_dir)",
    "overwrite_output_dir": "overwrite",
    "dtype": "bf16 (auto, true or false; the adapters stay fp32)",
    "torch_dtype": "bf16 (auto, true or false; the adapters stay fp32)",
    "use_cpu": "device (auto, cpu or cuda)",
    # transformers 5.24's name; `gradient_checkpointing` is its deprecated alias, kept here for every saved run
    "activation_checkpointing": "gradient_checkpointing",
}
"""Keys of the libraries' configs that a federated config spells differently: `key -> "new key (why)"`."""


@compose(FIELD_SOURCES, {key: default for key, (default, _) in DEFAULT_OVERRIDES.items()})
class FederatedConfig:
    """A federated run. YAML keys and command-line flags are these field names; [`FIELD_SOURCES`] says which
    dataclass declares each (`trl.ModelConfig`, `trl.SFTConfig`, [`PerFITLoraConfig`], [`MoLEConfig`] or
    [`FederatedArguments`]), docs/federated.md § Config keys what each does. Build one with `FederatedConfig(**keys)`,
    [`from_dict`] or [`load_config`] (a YAML file plus overrides)."""

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
        """Build from a dict of typed values (a saved `config.json`, a Flower message); an unknown key is a
        `ValueError` naming it and the key to use (see [`unknown_keys_error`])."""
        unknown = sorted(set(data) - set(FIELD_SOURCES))
        if unknown:
            raise unknown_keys_error(unknown, FIELD_SOURCES, renamed=_federated_renames())
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Every key with its value, in [`FIELD_SOURCES`]' order (what `config.json` and checkpoints hold)."""
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


def unknown_keys_error(
    unknown: Iterable[str], known: Iterable[str], renamed: Mapping[str, str] | None = None, where: str = "config keys"
) -> ValueError:
    """A `ValueError` for keys no dataclass of the parser declares: each is named with the key to use instead, from
    `renamed` (a library's name for one of ours, or a library key the run does not read) or else the closest known
    key (`difflib`), so a typo or a TRL habit is one edit away from a working config."""
    unknown, known, renamed = sorted(unknown), sorted(known), renamed or {}
    hints = []
    for key in unknown:
        if key in renamed:
            hints.append(f"{key!r}: {renamed[key]}")
        else:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hints.append(f"{key!r}: did you mean {close[0]!r}?" if close else f"{key!r}: no key is close")
    return ValueError(
        f"unknown {where} {unknown} ({'; '.join(hints)}); the keys are listed by `--help` and in docs/federated.md."
    )


def _federated_renames() -> dict[str, str]:
    """[`RENAMED_KEYS`], plus every other `trl.SFTConfig` / `trl.ModelConfig` field: a federation sets its clients'
    trainer arguments itself (`federated/client.py`), so such a key would silently do nothing."""
    out = {}
    for source in (SFTConfig, ModelConfig):
        for f in dataclasses.fields(source):
            if f.init and f.name not in FIELD_SOURCES:
                out[f.name] = (
                    f"a field of trl.{source.__name__} that a federated run does not read (each client round's "
                    "SFTConfig is built from the federation's keys); remove it"
                )
    return {**out, **{key: f"use {new} instead" for key, new in RENAMED_KEYS.items()}}


def _json_object(text: str) -> dict[str, Any]:
    """argparse type of dict-valued fields given on the command line as JSON (`--strategy_options '{"a": 1}'`)."""
    import argparse

    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(
            f"expected a JSON object such as '{{\"proximal_mu\": 0.1}}', got {text!r} ({err})"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


class ConfigParser(TrlParser):
    """`trl.TrlParser` (YAML under `--config`, then `--key value` flags, which win) that reads a YAML syntax error as
    one line (file, line, column), names the key to use for an unknown YAML key or flag ([`unknown_keys_error`]),
    takes exact flag names only (no argparse abbreviations), raises a bad flag value as a `ValueError`, takes
    dict-valued fields as JSON on the command line, and applies `overrides` (typed values) over the YAML.

    Args:
        dataclass_types: the dataclasses parsed, as for `TrlParser`.
        renamed (`Mapping[str, str]`, *optional*): unknown key -> what to use instead.
        overrides (`Mapping[str, Any]`, *optional*): values applied after the YAML and before the flags.
        **kwargs: passed to `TrlParser` (e.g. `prog`).
    """

    def __init__(
        self,
        dataclass_types: Any,
        renamed: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # exact keys only, as in the YAML: argparse's prefix matching reads `--num_round 4` as num_rounds and
        # `--lora 4` as an ambiguity error, where an unknown key should name the key to use
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(dataclass_types=dataclass_types, **kwargs)
        self._renamed = dict(renamed or {})
        self._overrides = dict(overrides or {})
        # HfArgumentParser gives dict fields `type=dict`, which cannot parse a string; accept JSON instead.
        for action in self._actions:
            if getattr(action.type, "__origin__", action.type) is dict:
                action.type = _json_object

    def error(self, message: str) -> typing.NoReturn:
        """A bad flag value (`--num_rounds x`) is a `ValueError` like every other config error (argparse would print
        the whole usage and exit), so `load_config` callers can catch it and `perfit` prints it as one line."""
        raise ValueError(f"{message}; `{self.prog} --help` lists the keys and their types.")

    def _known(self) -> set[str]:
        return {f.name for t in self.dataclass_types for f in dataclasses.fields(t) if f.init}

    def parse_args_and_config(self, args: Iterable[str] | None = None, *a: Any, **kw: Any) -> tuple[Any, ...]:
        """As `TrlParser.parse_args_and_config`, with the YAML checked first and `overrides` applied."""
        import sys

        from ..cli import check_yaml_config

        args = list(sys.argv[1:] if args is None else args)
        check_yaml_config(args)
        if self._overrides and "--config" not in args:
            self.set_defaults_with_config()  # no YAML: TrlParser would not apply the overrides
        return super().parse_args_and_config(args, *a, **kw)

    def set_defaults_with_config(self, **kwargs: Any) -> list[str]:
        """The YAML's values (then `overrides`) become the defaults; an unknown key is refused here, naming it."""
        kwargs = {**kwargs, **self._overrides}
        unknown = set(kwargs) - self._known()
        if unknown:
            raise unknown_keys_error(unknown, self._known(), self._renamed)
        return super().set_defaults_with_config(**kwargs)

    def parse_args_into_dataclasses(
        self, args: Iterable[str] | None = None, return_remaining_strings: bool = False, **kwargs: Any
    ) -> tuple[Any, ...]:
        *outputs, remaining = super().parse_args_into_dataclasses(args=args, return_remaining_strings=True, **kwargs)
        if return_remaining_strings:
            return (*outputs, remaining)
        flags = [arg[2:].split("=", 1)[0] for arg in remaining if arg.startswith("--")]
        if flags:
            raise unknown_keys_error(flags, self._known(), self._renamed, where="flags")
        if remaining:
            raise ValueError(f"unexpected arguments {remaining}; give every value after its --key.")
        return tuple(outputs)


def federated_parser(prog: str = "perfit federate", overrides: Mapping[str, Any] | None = None) -> ConfigParser:
    """The [`ConfigParser`] of [`FederatedConfig`]: `perfit federate`'s and `recipes/perfit_sft.py`'s."""
    return ConfigParser([FederatedConfig], renamed=_federated_renames(), overrides=overrides, prog=prog)


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
    *,
    defaults: Mapping[str, Any] | None = None,
) -> FederatedConfig:
    """A [`FederatedConfig`] from a recipe YAML plus overrides, exactly as `perfit federate --config path ...` reads it.

    Precedence, lowest first: the dataclass defaults, `defaults`, the YAML, a dict `overrides`, flag `overrides`.

    Args:
        path (`str` or `os.PathLike`, *optional*): a YAML file of [`FederatedConfig`] keys (`None`: defaults only).
        overrides (`list[str]` or `dict`, *optional*): command-line flags (`["--num_rounds", "5"]`, parsed as the
            command line is) or a dict of typed values (`{"num_rounds": 5}`, applied over the YAML like YAML values).
        defaults (`dict`, *optional*): a script's own defaults (typed values), under the YAML and the overrides.

    Raises:
        ValueError: a YAML syntax error, an unknown key (named, with the key to use) or a bad value.
        FileNotFoundError: no file at `path`.

    Example:
        ```python
        from hf_perfit.federated import load_config

        config = load_config("recipes/smollm2-135m/perfit/config_flan8.yaml", {"num_rounds": 2, "seed": 1})
        ```
    """
    if isinstance(overrides, str | bytes):
        raise ValueError(f"overrides={overrides!r} must be a list of flags (['--num_rounds', '5']) or a dict.")
    mapping = dict(overrides) if isinstance(overrides, Mapping) else {}
    flags = [] if isinstance(overrides, Mapping) else [str(arg) for arg in overrides or ()]
    argv = (["--config", os.fspath(path)] if path is not None else []) + flags
    parser = federated_parser(prog="load_config", overrides=mapping)
    if defaults:
        parser.set_defaults_with_config(**defaults)  # first: the YAML's values, then `overrides`, replace them
    (config,) = parser.parse_args_and_config(argv)
    return config


__all__ = [
    "DEFAULT_OVERRIDES",
    "FIELD_SOURCES",
    "RENAMED_KEYS",
    "ConfigParser",
    "FederatedArguments",
    "FederatedConfig",
    "federated_parser",
    "load_config",
    "unknown_keys_error",
]
