"""Personalized quality of every method on the 8-client FLAN benchmark (issue 9): mean personalized perplexity, its
ratio to FedIT, per-client perplexity, ROUGE-L of greedy answers, wall time and bytes sent.

SmolLM2-135M-Instruct on `../shared/data/flan8` (one FLAN task category per client, 300 training examples each,
evaluated on its own test split). Every method runs with the same rounds, local steps, batch, learning rate, seed and
the same trainable-parameter budget per client (that of a rank-r LoRA on the same target modules): `local`, `fedit`,
`fedprox`, `fedmut`, `fedqp` train exactly a rank-r LoRA; `perfit` expands it γ× and prunes back to the rank-r budget;
`fedamole` runs the authors' expert pool (rank-r experts, E = 30 per module, each to 2 clients, 2..8 per client: the
recipe's), and the table states its trainable parameters per client against the rank-r budget (`fedamole_pool`;
about 9.1× on SmolLM2 q/v) instead of shrinking the experts to fit the budget (rank-1 experts collapse its
reverse-selection assignment). The optional `perfit-hetero` row is PerFIT with per-client budget multipliers
(`--perfit-budget-multipliers`, the paper's resource heterogeneity). The `base` row is the model without an adapter.

The federated settings are a recipe-style YAML of `FederatedConfig` keys (`--config`, default
benchmarks/settings/flan8_default.yaml; docs/federated.md § Config keys) plus `--key value` overrides of those keys
(`--num_rounds 10 --local_steps 10 --max_eval_examples 50 --seed 1`), read by `hf_perfit.federated.federated_parser`
exactly as `perfit federate --config ... --key value` reads them; `--tiny` applies benchmarks/settings/tiny.yaml over
the YAML. PerFIT's keys (`expansion_factor`, `search_steps` (default: all of the first round's local steps), ...,
[`METHOD_KEYS`]) count for the PerFIT rows only, FedProx's μ, FedMut/FedQP's options and FedAMoLE's routing come from
recipes/smollm2-135m/<method>/config_flan8.yaml unless the YAML or an override sets them, and the benchmark sets the
model, data folder (`--data`), strategy, client count and run folder itself ([`PLACED_KEYS`]). The flags of the
benchmark's own settings ([`Settings`]: ROUGE-L, FedAMoLE's pool, the hetero row, the split) keep their dashed
names. The flags of the earlier version still work: `--rounds`, `--batch-size`, `--lr`, `--eval-examples`,
`--targets` are `--num_rounds`, `--per_device_train_batch_size`, `--learning_rate`, `--max_eval_examples`,
`--lora_target_modules` ([`OLD_FLAGS`]); `--local-steps`, `--lora-r`, ... are the keys' dashed spellings.

Each method is run through `hf_perfit.federated` (`FederatedSimulation(config).run()`, i.e. `run_federated`) into
`<output-root>/<method>`. A finished run there (same settings) is reused, a partial one resumed (`resume=True`), so
the table can be built one method at a time, and a killed run loses at most the round in progress. Wall time is
recorded per session in `<method>/wall_time.json` (setup + completed rounds + export, summed over the sessions of a
resumed run). After a run, each client's exported adapter (`clients/<id>/adapter`) is loaded on the base model and
answers the first `--rouge-examples` examples of its own test split greedily; answers and ROUGE-L
(`hf_perfit.evaluation.rouge_l`) are cached per client in `<method>/rouge.json`. Every invocation then rebuilds the
section of `docs/benchmarks.md` and `docs/quality_perplexity.png` from whatever runs are cached.

Default scale (benchmarks/settings/flan8_default.yaml): 3 rounds × 6 local steps of batch 4, max_length 128, lr 2e-4
(the recipes'), 40 test examples per client for perplexity (every round) and for ROUGE-L; chosen so that the seven
methods fit one working session on 2 cores (the measured times are in the table). The estimate that sized it, for 4
rounds and 50 examples (from the facts of this machine: a SmolLM2 optimizer step on 2×128 tokens takes ~1.5 s, on 4×256
~6 s):

- Token lengths with the SmolLM2 tokenizer (chat template incl. its default system prompt, prompt + answer) of the
  2,400 training examples: mean 88, median 83, p90 111, p95 132, p99 190, max 262; `max_length 128` keeps 94.5% of
  them whole (all of clients 0-2, 4 and 7, 99.3% of client 3's; it cuts the end of the answer of 28.7% of client 5's
  structure_to_text and 14.3% of client 6's text_formatting examples; 160 would keep 97.8% for ~4% more compute).
  Answers of the first 50 test examples per client: median 4 tokens, p90 32, p95 43.
- Training: a batch of 4 is padded to its longest example: 395 tokens per step on average (299-495 per client).
  At ~5.9 ms per token for forward + backward + AdamW (no activation checkpointing): ~2.3 s per step,
  ~20 s per client round with the trainer's setup, ~160 s per round for 8 clients.
- Evaluation (after every round and once for the base model, 50 test examples per client): 41,000 padded tokens
  forward only, ~2 ms per token: ~80 s per evaluation.
- ROUGE-L (50 examples per client, ≤ 32 new tokens, batch 8): ~2.5 min per method (prompt prefill ~9 s and up to
  7 × 32 cached decoding steps per client; short answers stop early).
- Total: 15 s setup + 80 s base evaluation + 4 × (160 + 80) s + 10 s export + 150 s ROUGE-L ≈ 20 min per method
  (PerFIT's rank-4r storage and FedAMoLE's routing within a few % of it).

On a loaded machine (load average above the 2 cores) PyTorch's two threads wait for each other at every operation
and everything takes several times longer; `--threads 1` then helps a lot. Measured here at load 3-6 with 2
threads: 4 optimizer steps of batch 4 in 63 s, perplexity of 50 test examples in 82 s, 8 greedy 32-token answers of
the base model in 135 s; at load ~4, 8 answers of 16 tokens took 5.2 s with 1 thread against 19.5 s with 2, and a
forward of 8×100 tokens 3.0 s against 7.4 s. Each run's `wall_time.json` records the load and thread count.

    python benchmarks/quality.py --methods base           # ROUGE-L of the base model (~3 min)
    python benchmarks/quality.py --methods fedit          # one method per call, ~20 min each; cached and resumable
    python benchmarks/quality.py --report-only            # rebuild the table and the plot from the cached runs
    python benchmarks/quality.py --split validation ...   # tune on held-out training examples, never the test split
    python benchmarks/quality.py --config benchmarks/settings/flan8_recipe.yaml --output-root outputs/q-r  # a setting
    python benchmarks/quality.py --methods perfit --learning_rate 1e-4 --output-root outputs/q-lr  # a YAML key changed
    python benchmarks/quality.py --tiny                   # smoke test: tiny random Llama, synthetic clients (~1 min)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import shlex
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import DOC_PATH, REPO_ROOT, command_line, machine_lines, update_doc  # noqa: E402
from base_eval_cache import BASE_EVAL_FILE, cached_evaluate  # noqa: E402

SECTION = "## Personalized quality on FLAN-8 (benchmarks/quality.py)"
PLOT_NAME = "quality_perplexity.png"
PLOT_PATH = DOC_PATH.parent / PLOT_NAME
# The human reading of the table (where PerFIT wins, where not, why): kept in its own file so that rebuilding the
# generated section never loses it; included verbatim under "Analysis" for the real benchmark (not --tiny).
ANALYSIS_PATH = DOC_PATH.parent / "quality_analysis.md"
HETERO = "perfit-hetero"  # PerFIT with per-client budget multipliers (run only with --perfit-budget-multipliers)
METHODS = ("local", "fedit", "fedprox", "perfit", "fedamole", "fedmut", "fedqp", HETERO)
STRATEGY_OF = {HETERO: "perfit"}  # a row's strategy when it is not the row's name
ROWS = ("base", *METHODS)
PRESET = "smollm2-135m-instruct"
FLAN8 = REPO_ROOT.parent / "shared" / "data" / "flan8"
RECIPES = REPO_ROOT / "recipes" / "smollm2-135m"
DEFAULT_ROOT = REPO_ROOT / "outputs" / "quality"
GOAL_RATIO = 0.77
WALL_FILE = "wall_time.json"
ROUGE_FILE = "rouge.json"
BUDGET_FILE = "fedamole_budget.json"
SETTINGS_FILE = "quality_settings.json"
IGNORED_CONFIG_KEYS = ("resume", "overwrite", "output_dir", "push_to_hub", "hub_repo_prefix", "hub_private")
TINY_CLIENTS = 3
VALIDATION_SEED = 1234  # fixed: the same held-out examples whatever --seed a run uses


# ---------------------------------------------------------------------------------------------------- settings


SETTINGS_DIR = REPO_ROOT / "benchmarks" / "settings"
DEFAULT_CONFIG = "benchmarks/settings/flan8_default.yaml"  # relative to the repository, as the docs show it
TINY_CONFIG = SETTINGS_DIR / "tiny.yaml"
"""`--tiny` applies this file's keys over the setting's YAML (under the command line's flags)."""

PLACED_KEYS: dict[str, str] = {
    "model_name_or_path": "SmolLM2-135M-Instruct, or the tiny random Llama with --tiny",
    "dataset_name": "--data (and --split)",
    "strategy": "--methods",
    "num_clients": "the data folder's client count",
    "output_dir": "--output-root",
    "budget_multipliers": "--perfit-budget-multipliers (the perfit-hetero row)",
    "resume": "a cached partial run is always resumed",
    "overwrite": "delete the run folder to rerun",
}
"""FederatedConfig keys the benchmark sets itself, refused in a settings YAML or override: key -> what sets it."""

OLD_FLAGS: dict[str, str] = {
    "--rounds": "--num_rounds",
    "--batch-size": "--per_device_train_batch_size",
    "--lr": "--learning_rate",
    "--eval-examples": "--max_eval_examples",
    "--targets": "--lora_target_modules",
}
"""The flags of benchmarks/quality.py before its settings became YAML (commit 6705756) whose name differs from the
`FederatedConfig` key they set (`--local-steps`, `--lora-r`, ... are the keys' dashed spellings, which the parser
takes as they are): still accepted, and written back as the key's flag."""

OLD_KEYS: dict[str, str] = {
    "rounds": "num_rounds",
    "local_steps": "local_steps",
    "batch_size": "per_device_train_batch_size",
    "max_length": "max_length",
    "learning_rate": "learning_rate",
    "eval_examples": "max_eval_examples",
    "seed": "seed",
    "lora_r": "lora_r",
    "lora_alpha": "lora_alpha",
    "targets": "lora_target_modules",
    "expansion_factor": "expansion_factor",
    "search_steps": "search_steps",
    "prune_iterations": "prune_iterations",
    "importance": "importance",
    "search_mode": "search_mode",
    "search_batches": "search_batches",
}
"""Fields of the old `Settings` (in the `quality_settings.json` of a run made up to commit 6705756) -> the
`FederatedConfig` key that holds them now."""

_PERFIT_KEYS = "expansion_factor search_steps prune_iterations importance research_every search_mode search_batches"
_MOLE_KEYS = (
    "num_experts clients_per_expert experts_per_client_min experts_per_client_max mole_top_k balance_loss_coef"
)
METHOD_KEYS: dict[str, frozenset[str]] = {
    "perfit": frozenset(_PERFIT_KEYS.split()),
    "fedprox": frozenset({"proximal_mu"}),
    "fedmut": frozenset({"strategy_options"}),
    "fedqp": frozenset({"strategy_options"}),
    "fedamole": frozenset(_MOLE_KEYS.split()),
}
"""The keys of a settings YAML that only a strategy's rows read (the rest is every row's); every other row runs with
`FederatedConfig`'s default for them, so that e.g. `--expansion_factor 2` changes PerFIT's rows only."""
PER_METHOD_KEYS = frozenset({"strategy", "lora_r", "lora_alpha", "budget_multipliers"}).union(*METHOD_KEYS.values())
"""Config keys that differ between methods by design (everything else must be the same in every run)."""


@dataclass
class Settings:
    """The settings of one invocation: the federated settings of every method's run (a recipe-style YAML of
    `FederatedConfig` keys plus `--key value` overrides, read by `hf_perfit.federated.federated_parser` as
    `perfit federate` reads them), and the benchmark's own (evaluation, FedAMoLE's pool, the rows, the data).

    Args:
        config (`str`): the settings YAML (default benchmarks/settings/flan8_default.yaml; a path relative to the
            repository or absolute).
        overrides (`list[str]`): `--key value` flags of `FederatedConfig` keys over the YAML (and over
            benchmarks/settings/tiny.yaml with `tiny`).
        rouge_examples (`int`): first test examples per client answered for ROUGE-L (after the run).
        max_new_tokens (`int`): greedy answer length cap.
        perfit_budget_multipliers (`list[float]`): one budget multiplier per client for the `perfit-hetero` row
            (empty: the row is not run).
        fedamole_rank (`int`), fedamole_experts (`int`): FedAMoLE's expert rank and pool size per module; 0 takes the
            authors' (rank `lora_r`, the recipe's E = 30).
        data (`str`): a per-client folder (FLAN-8 by default).
        split (`str`): `test` (the benchmark) or `validation` (held-out training examples, for tuning).
        validation_examples (`int`): held-out training examples per client with `split="validation"`.
        tiny (`bool`): tiny random Llama and synthetic clients (smoke test).
    """

    config: str = DEFAULT_CONFIG
    overrides: list[str] = field(default_factory=list)
    rouge_examples: int = 40
    max_new_tokens: int = 32
    fedamole_rank: int = 0
    fedamole_experts: int = 0
    data: str = str(FLAN8)
    perfit_budget_multipliers: list[float] = field(default_factory=list)
    split: str = "test"
    validation_examples: int = 50
    tiny: bool = False

    def config_path(self) -> Path:
        path = Path(self.config).expanduser()
        return path if path.is_absolute() else REPO_ROOT / path

    def federated(self, overrides: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None):
        """The `FederatedConfig` of the YAML plus the overrides (before the benchmark's per-method choices).

        Precedence, lowest first: `FederatedConfig`'s defaults (but `search_steps`: `local_steps`), `defaults`, the
        YAML, benchmarks/settings/tiny.yaml (with `tiny`), `overrides` (typed values), the flags of `self.overrides`.

        Raises:
            SystemExit: a missing YAML, an unknown key (named with the key to use), a bad value, or a key the
                benchmark sets itself (named with what sets it).
        """
        from hf_perfit.federated.config import federated_parser

        path = self.config_path()
        if not path.is_file():
            raise SystemExit(f"--config {self.config}: no such file (the settings are in {_rel(SETTINGS_DIR)}/).")
        layers = {**(_yaml(TINY_CONFIG) if self.tiny else {}), **(overrides or {})}
        given = set(_yaml(path)) | set(layers) | {_key(a) for a in self.overrides if a.startswith("--")}
        placed = sorted(given & set(PLACED_KEYS))
        if placed:
            raise SystemExit(
                "the benchmark sets " + "; ".join(f"{k} ({PLACED_KEYS[k]})" for k in placed) + f" itself: remove "
                f"{'them' if len(placed) > 1 else 'it'} from {self.config} / the command line."
            )
        config = None
        # PerFIT's search_steps defaults to all of the first round's local steps: a first pass reads local_steps
        # (with a search_steps of 1, valid in either search mode), the second uses it as the default
        for search_steps in (1, None):
            parser = federated_parser(overrides=layers)  # its errors point to `perfit federate --help`, the keys
            parser.set_defaults_with_config(**{"search_steps": search_steps or config.local_steps, **(defaults or {})})
            try:
                (config,) = parser.parse_args_and_config(["--config", str(path), *self.overrides])
            except ValueError as err:
                raise SystemExit(f"{self.config} {shlex.join(self.overrides)}: {err}") from None
        return config


def _key(flag: str) -> str:
    """The config key of a `--key[=value]` flag (dashes read as underscores, as the parser does)."""
    return flag[2:].split("=", 1)[0].replace("-", "_")


def _yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


TINY_DEFAULTS: dict[str, Any] = {"rouge_examples": 3, "max_new_tokens": 6, "validation_examples": 3}
"""What `--tiny` uses for every benchmark flag left at its default (its federated keys: settings/tiny.yaml)."""

FLAGS: dict[str, str] = {
    "config": "--config",
    "rouge_examples": "--rouge-examples",
    "max_new_tokens": "--max-new-tokens",
    "fedamole_rank": "--fedamole-rank",
    "fedamole_experts": "--fedamole-experts",
    "data": "--data",
    "split": "--split",
    "validation_examples": "--validation-examples",
    "perfit_budget_multipliers": "--perfit-budget-multipliers",
}
"""Settings field -> command-line flag (the benchmark's own; `overrides` are written as they are)."""


def available_methods() -> dict[str, str | None]:
    """`{method: None}` for a registered strategy, `{method: why not}` otherwise (e.g. FedAMoLE not built yet)."""
    try:
        from hf_perfit.federated import STRATEGIES
    except ImportError as err:  # pragma: no cover - the package itself is broken
        return {m: f"hf_perfit.federated does not import: {err}" for m in METHODS}
    return {
        m: None if STRATEGY_OF.get(m, m) in STRATEGIES else "strategy not registered in this version" for m in METHODS
    }


# ---------------------------------------------------------------------------------------------------- data


def _clear_client_folder(folder: Path) -> None:
    """Create `folder`, or remove the client and test files a previous call wrote there."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("local_training_*.json*"), *folder.glob("test.json*")]:
        old.unlink()


def write_tiny_clients(
    folder: Path, num_clients: int = TINY_CLIENTS, train_rows: int = 12, test_rows: int = 6
) -> Path:
    """A tiny synthetic per-client folder (`local_training_{k}.json` + `test.jsonl`, one category per client) for
    `--tiny`; deterministic content, rewritten in place."""
    _clear_client_folder(folder)
    tests = []
    for k in range(num_clients):
        rows = [
            {"instruction": f"Task {k}: echo {i}", "output": f"{k}{i}{k}", "category": f"cat{k}"}
            for i in range(train_rows + test_rows)
        ]
        (folder / f"local_training_{k}.json").write_text(json.dumps(rows[:train_rows]))
        tests += rows[train_rows:]
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tests))
    return folder


def write_validation_clients(source: Path, folder: Path, per_client: int, seed: int = VALIDATION_SEED) -> Path:
    """A per-client folder for tuning without the test split: from each client's training file, `per_client`
    examples (a seeded choice, the same for every run) become its `test.jsonl` rows and the rest its training
    file. The source's `test.jsonl` is never read."""
    import numpy as np

    from hf_perfit.data import _client_files

    _clear_client_folder(folder)
    held = []
    for k, path in sorted(_client_files(source).items()):
        text = path.read_text(encoding="utf-8").strip()
        rows = json.loads(text) if text.startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
        if per_client >= len(rows):
            raise ValueError(f"{path} has {len(rows)} rows; --validation-examples {per_client} leaves none to train.")
        pick = set(np.random.default_rng([seed, k]).choice(len(rows), size=per_client, replace=False).tolist())
        (folder / f"local_training_{k}.json").write_text(json.dumps([r for i, r in enumerate(rows) if i not in pick]))
        held += [r for i, r in enumerate(rows) if i in pick]
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    return folder


def data_folder(s: Settings, root: Path) -> Path:
    """The per-client folder the runs train and evaluate on."""
    if s.tiny:
        source = write_tiny_clients(Path(tempfile.gettempdir()) / "hf_perfit_quality_tiny_clients")
    else:
        source = Path(s.data).expanduser().resolve()
        if not source.is_dir():
            raise SystemExit(f"--data {s.data}: no such folder (the FLAN-8 client folder, e.g. {FLAN8}).")
    if s.split == "validation":
        return write_validation_clients(source, root / "validation_data", s.validation_examples)
    return source


# ---------------------------------------------------------------------------------------------------- models


def _tiny_model_and_tokenizer():
    sys.path.insert(0, str(REPO_ROOT))
    from tests.conftest import build_tokenizer, tiny_llama

    return tiny_llama(), build_tokenizer()


def base_model_and_tokenizer(s: Settings):
    """A fresh base model and its tokenizer (the tiny random Llama with `--tiny`)."""
    if s.tiny:
        return _tiny_model_and_tokenizer()
    from hf_perfit.federated import FederatedConfig
    from hf_perfit.federated.runtime import load_model

    return load_model(FederatedConfig(model_name_or_path=PRESET, strategy="fedit"))


def target_shapes(s: Settings, targets: list[str]) -> list[tuple[int, int]]:
    """`(d_in, d_out)` of every Linear layer named in `targets` of the base model (built on the meta device: no
    weights)."""
    import torch

    if s.tiny:
        model = _tiny_model_and_tokenizer()[0]
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        from hf_perfit.presets import resolve_model_path

        config = AutoConfig.from_pretrained(resolve_model_path(PRESET))  # may convert the GGUF: not under meta
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    return [
        (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]


def mole_params(shapes: list[tuple[int, int]], rank: int, experts: float) -> float:
    """Trainable parameters of a FedAMoLE client holding `experts` domain experts in every module: per module a
    shared expert `r(d_in + d_out)`, the router projection `P` (`r·d_in`) and `experts × r(d_in + d_out)`."""
    return sum(rank * ((1 + experts) * (d_in + d_out) + d_in) for d_in, d_out in shapes)


def fedamole_pool(
    shapes: list[tuple[int, int]],
    lora_r: int,
    num_clients: int,
    recipe: dict[str, Any],
    rank: int = 0,
    num_experts: int = 0,
) -> dict[str, Any]:
    """FedAMoLE's expert pool as the authors run it (the recipe's: rank-`lora_r` experts, E = 30, each expert to
    `clients_per_expert` = 2 clients, 2..8 experts per client and module), and its trainable parameters per client
    against the rank-r LoRA budget `lora_r · Σ (d_in + d_out)`. `rank`/`num_experts` > 0 override the rank and E.

    Every expert goes to exactly `clients_per_expert` of the `num_clients` clients, so a client holds `E·k/C`
    experts per module on average (7.5 for 8 clients).

    Returns:
        `dict` with `rank`, `num_experts`, `clients_per_expert`, `experts_min`, `experts_max`, `experts_mean`,
        `params_mean` (trainable per client, mean), `budget` and `ratio` (mean / budget).

    Raises:
        ValueError: the pool has no assignment for these clients (the message says which constraint fails).
    """
    from hf_perfit.mole.assignment import assignment_error

    r = rank or lora_r
    e = num_experts or int(recipe.get("num_experts", 30))
    k = int(recipe.get("clients_per_expert", 2))
    lo, hi = int(recipe.get("experts_per_client_min", 2)), int(recipe.get("experts_per_client_max", 8))
    if not num_experts:  # too few clients for the recipe's pool (e.g. --tiny's 3): the largest pool that fits
        while e > 1 and assignment_error(e, num_clients, k, lo, hi) is not None:
            e -= 1
    error = assignment_error(e, num_clients, k, lo, hi)
    if error is not None:
        raise ValueError(f"FedAMoLE with E={e}, {k} clients per expert and {num_clients} clients: {error}")
    budget = lora_r * sum(d_in + d_out for d_in, d_out in shapes)
    mean = e * k / num_clients
    params = mole_params(shapes, r, mean)
    return {
        "rank": r,
        "num_experts": e,
        "clients_per_expert": k,
        "experts_min": lo,
        "experts_max": hi,
        "experts_mean": mean,
        "params_mean": params,
        "budget": budget,
        "ratio": params / budget,
    }


# ---------------------------------------------------------------------------------------------------- configs


def _recipe(method: str) -> dict[str, Any]:
    path = RECIPES / method / "config_flan8.yaml"
    if not path.is_file():
        return {}
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def method_config(
    method: str,
    s: Settings,
    data: Path,
    out: Path,
    budget: dict | None = None,
    overrides: dict[str, Any] | None = None,
):
    """The `FederatedConfig` of one method's run: the settings YAML plus overrides ([`Settings.federated`], with
    `overrides` typed values over the YAML, e.g. a benchmarks/quality_scale.py row's changes), where the keys of
    [`METHOD_KEYS`] count for their strategy's rows only; plus what the method's FLAN-8 recipe sets for it under the
    YAML (FedProx's μ, FedMut/FedQP's mutation options with β decaying over the first half of the rounds, FedAMoLE's
    routing), plus FedAMoLE's expert pool (`budget`, from [`fedamole_pool`]). PerFIT searches over all of the first
    round's local steps unless `search_steps` is given. The `perfit-hetero` row is PerFIT with `budget_multipliers`."""
    from hf_perfit.federated import FederatedConfig

    strategy = STRATEGY_OF.get(method, method)
    own = METHOD_KEYS.get(strategy, frozenset())
    num_clients = len(list(data.glob("local_training_*.json*")))
    recipe = _recipe(strategy)
    defaults = {
        k: recipe[k]
        for k in ("proximal_mu", "strategy_options", "mole_top_k", "balance_loss_coef")
        if k in own and k in recipe
    }
    c = s.federated(overrides, defaults)
    every_method_key = frozenset().union(*METHOD_KEYS.values())
    base = config_defaults()
    kw = {k: v if k in own or k not in every_method_key else base[k] for k, v in c.to_dict().items()}
    kw.update(
        model_name_or_path="tiny-random-llama" if s.tiny else PRESET,
        dataset_name=str(data),
        strategy=strategy,
        num_clients=num_clients,
        output_dir=str(out),
    )
    if strategy == "perfit":
        if c.search_mode == "train":  # the search's pruning iterations happen during its steps
            kw["prune_iterations"] = min(c.prune_iterations, c.search_steps)
        if method == HETERO:
            if len(s.perfit_budget_multipliers) != num_clients:
                raise ValueError(
                    f"the {HETERO} row needs one budget multiplier per client ({num_clients}); got "
                    f"--perfit-budget-multipliers {s.perfit_budget_multipliers}."
                )
            kw["budget_multipliers"] = [float(b) for b in s.perfit_budget_multipliers]
    elif strategy in ("fedmut", "fedqp"):
        options = dict(c.strategy_options)
        options["mutation_beta_rounds"] = max(1, math.ceil(c.num_rounds / 2))  # the recipes: β -> 0 over half the run
        kw["strategy_options"] = options
    elif strategy == "fedamole":
        assert budget is not None
        alpha = budget["rank"] * (c.lora_alpha / c.lora_r)  # the same scale alpha / r
        kw.update(
            lora_r=budget["rank"],
            lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
            num_experts=budget["num_experts"],
            clients_per_expert=budget["clients_per_expert"],
            experts_per_client_min=budget["experts_min"],
            experts_per_client_max=budget["experts_max"],
        )
    return FederatedConfig(**kw)


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in json.loads(json.dumps(config)).items() if k not in IGNORED_CONFIG_KEYS}


def config_defaults() -> dict[str, Any]:
    """Every `FederatedConfig` key's default (a `default_factory` called), JSON-normalized."""
    from hf_perfit.federated import FederatedConfig

    out = {}
    for f in dataclasses.fields(FederatedConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return json.loads(json.dumps(out))


def run_status(out: Path, config, client_ids: list[str]) -> str:
    """`"missing"` (nothing to resume), `"partial"` (resume it) or `"finished"` (results.md and every client's
    adapter exported).

    Raises:
        SystemExit: `out` holds a run with other settings (it is never overwritten silently).
    """
    from hf_perfit.federated.run import RunFolder

    run = RunFolder(out)
    if not run.checkpoint.is_file():
        return "missing"
    saved = json.loads(run.checkpoint.read_text())
    # A key added to FederatedConfig after the run was saved is absent there: the run had that key's default.
    old = _comparable({**config_defaults(), **saved["config"]})
    new = _comparable(config.to_dict())
    if old != new:
        diff = ", ".join(
            f"{k}: {old.get(k)!r} there, {new.get(k)!r} now"
            for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)
        )
        raise SystemExit(
            f"{out} holds a run with other settings ({diff}); use another --output-root, or delete {out} to rerun."
        )
    adapters = all(
        (run.adapter_dir(cid) / name).is_file()
        for cid in client_ids
        for name in ("adapter_config.json", "adapter_model.safetensors")
    )
    done = int(saved["completed_rounds"]) >= config.num_rounds and run.results.is_file() and adapters
    return "finished" if done else "partial"


# ---------------------------------------------------------------------------------------------------- wall time


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _device() -> str:
    """Where a run's base model lives (`device: auto`): `cuda (<name>)` when CUDA is visible, else `cpu`; on CUDA
    `bf16: auto` also means bf16 weights, so a table mixing the two says so."""
    import torch

    return f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _write_json(path: Path, obj: Any) -> None:
    from hf_perfit._io import atomic_write_json

    atomic_write_json(path, obj)


class WallClock:
    """The wall time of a method's run over all its sessions, in `<run>/wall_time.json`: per session the setup
    (model, data, tokenization), each completed round (round 0 includes the base model's evaluation) and the final
    export. A round counts once its checkpoint is written, so the part of a round a killed session lost (and redid
    after `resume`) is not counted; the setup of every session is."""

    def __init__(self, path: Path, fresh: bool) -> None:
        self.path = path
        self.data = {"sessions": []} if fresh or not path.is_file() else json.loads(path.read_text())

    def start(self, resumed_from: int, setup_s: float) -> None:
        self.data["sessions"].append(
            {
                "started": _now(),
                "resumed_from_round": resumed_from,
                "setup_s": setup_s,
                "rounds": {},
                "export_s": None,
                "load_start": os.getloadavg()[0],
                "load_end": None,
                "threads": _threads(),
                "device": _device(),
            }
        )
        self._save()

    def round_done(self, round_idx: int, seconds: float) -> None:
        self.data["sessions"][-1]["rounds"][str(round_idx)] = seconds
        self.data["sessions"][-1]["load_end"] = os.getloadavg()[0]
        self._save()

    def exported(self, seconds: float) -> None:
        self.data["sessions"][-1]["export_s"] = seconds
        self.data["sessions"][-1]["load_end"] = os.getloadavg()[0]
        self._save()

    def _save(self) -> None:
        self.data["wall_s"] = wall_seconds(self.data)
        _write_json(self.path, self.data)


def wall_seconds(data: dict[str, Any]) -> float:
    """Total wall time of a run from its `wall_time.json` content."""
    return float(
        sum(
            (s.get("setup_s") or 0.0) + sum(s.get("rounds", {}).values()) + (s.get("export_s") or 0.0)
            for s in data.get("sessions", [])
        )
    )


def run_method(method: str, s: Settings, root: Path, data: Path, client_ids: list[str]) -> str:
    """Run (or resume, or reuse) one method's federated run; returns its status before this call."""
    out = root / method
    budget = None
    if method == "fedamole":
        common = s.federated()
        budget = fedamole_pool(
            target_shapes(s, common.lora_target_modules),
            common.lora_r,
            len(client_ids),
            _recipe("fedamole"),
            rank=s.fedamole_rank,
            num_experts=s.fedamole_experts,
        )
    config = method_config(method, s, data, out, budget)
    return run_config(method, config, s, out, client_ids, budget, base_eval=root / BASE_EVAL_FILE)


def run_config(
    method: str,
    config,
    s: Settings,
    out: Path,
    client_ids: list[str],
    budget: dict | None = None,
    base_eval: Path | None = None,
) -> str:
    """Run (or resume, or reuse) the federated run of `config` in `out` (`method` names it in the prints), with
    [`WallClock`] timing and the settings file; returns its status before this call (see [`run_status`]). With
    `base_eval`, the base model's evaluation is read from / stored in that cache (benchmarks/base_eval_cache.py)."""
    from hf_perfit.federated import FederatedSimulation

    status = run_status(out, config, client_ids)
    if status == "finished":
        _write_json(out / SETTINGS_FILE, dataclasses.asdict(s))  # same run config; ROUGE-L follows these settings
        print(f"[{method}] finished run in {out}: reused")
        return status
    config.resume = status == "partial"
    print(f"[{method}] {'resuming' if config.resume else 'starting'} {config.num_rounds} rounds in {out}")
    kwargs = {}
    if s.tiny:
        model, tokenizer = _tiny_model_and_tokenizer()
        kwargs = {"model": model, "tokenizer": tokenizer}

    class TimedSimulation(FederatedSimulation):
        """The simulation, with a clock on its checkpoints and export, and the base-model evaluation cached."""

        def prepare(self) -> None:
            if base_eval is not None:
                self.transport.evaluate = cached_evaluate(self.transport, base_eval)
            super().prepare()

        def _checkpoint(self, completed: int, records: list[dict]) -> None:
            super()._checkpoint(completed, records)
            now = time.perf_counter()
            clock.round_done(completed - 1, now - self._mark)
            self._mark = now

        def _export(self) -> None:
            t0 = time.perf_counter()
            super()._export()
            clock.exported(time.perf_counter() - t0)

    t0 = time.perf_counter()
    # the simulation checks and creates its run folder first: it refuses a non-empty folder that is not a run
    sim = TimedSimulation(config, **kwargs)
    setup_s = time.perf_counter() - t0
    _write_json(out / SETTINGS_FILE, dataclasses.asdict(s))  # same run config; ROUGE-L follows these settings
    clock = WallClock(out / WALL_FILE, fresh=status == "missing")
    if budget is not None:
        _write_json(out / BUDGET_FILE, budget)
    clock.start(sim.completed_rounds, setup_s)
    sim._mark = time.perf_counter()
    sim.run()
    print(f"[{method}] done: {wall_seconds(clock.data) / 60:.1f} min of run wall time over all sessions")
    return status


# ---------------------------------------------------------------------------------------------------- ROUGE-L


def rouge_for(row: str, s: Settings, root: Path, clients: list, base_cache: dict) -> None:
    """Greedy answers and ROUGE-L of `row` (a finished method's run, or `base`) on the first `s.rouge_examples`
    test examples of every client's own test split, cached per client in `<root>/<row>/rouge.json`."""
    from peft import PeftModel

    import hf_perfit  # noqa: F401  (registers FedAMoLE's MOLE PEFT type for PeftModel.from_pretrained)
    from hf_perfit.evaluation import generate_answers, rouge_l

    path = root / row / ROUGE_FILE
    if row == "base":
        _write_json(root / row / SETTINGS_FILE, dataclasses.asdict(s))
    settings = {"examples": s.rouge_examples, "max_new_tokens": s.max_new_tokens, "split": s.split}
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if cached.get("settings") != settings:
        cached = {"settings": settings, "clients": {}}
    todo = [c for c in clients if c.client_id not in cached["clients"]]
    if not todo:
        print(f"[{row}] ROUGE-L cached in {path}")
        return
    if "model" not in base_cache:
        base_cache["model"], base_cache["tokenizer"] = base_model_and_tokenizer(s)
    base, tokenizer = base_cache["model"], base_cache["tokenizer"]
    for c in todo:
        t0 = time.perf_counter()
        if row == "base":
            model = base
        else:
            model = PeftModel.from_pretrained(
                copy.deepcopy(base), str(root / row / "clients" / c.client_id / "adapter")
            )
        model.eval()
        examples = c.test.select(range(min(s.rouge_examples, len(c.test))))
        answers = generate_answers(model, tokenizer, examples, max_new_tokens=s.max_new_tokens, batch_size=8)
        references = list(examples["response"])
        scores = [rouge_l(a, r) for a, r in zip(answers, references, strict=True)]
        cached["clients"][c.client_id] = {
            "category": c.categories[0] if c.categories else "",
            "rouge_l": sum(scores) / len(scores),
            "scores": scores,
            "answers": answers,
            "references": references,
            "seconds": time.perf_counter() - t0,
        }
        _write_json(path, cached)
        print(f"[{row}] ROUGE-L {c.client_id}: {sum(scores) / len(scores):.3f} ({time.perf_counter() - t0:.0f} s)")
        del model


# ---------------------------------------------------------------------------------------------------- results


def _adapter_trainable(folder: Path) -> int:
    """Trainable elements of an exported client adapter: PerFIT's kept elements (its masks), otherwise every
    stored element (a rank-r LoRA; a MoLE adapter stores exactly its shared expert, `P` and assigned experts)."""
    from safetensors.torch import load_file

    masks = folder / "perfit_masks.safetensors"
    if masks.is_file():
        return int(sum(int(m.bool().sum()) for m in load_file(str(masks)).values()))
    return int(sum(t.numel() for t in load_file(str(folder / "adapter_model.safetensors")).values()))


def collect(root: Path, row: str) -> dict[str, Any] | None:
    """What the table needs from `<root>/<row>` (read from disk only), or `None` when nothing is there."""
    out = root / row
    rouge = json.loads((out / ROUGE_FILE).read_text()) if (out / ROUGE_FILE).is_file() else None
    if row == "base":
        return {"rouge": rouge} if rouge else None
    from hf_perfit.federated.run import RunFolder

    run = RunFolder(out)
    if not run.metrics.is_file() or not run.config.is_file():
        return None
    config = run.read_config()
    records = run.read_metrics()
    clients = [r for r in records if "client" in r]
    rounds = sorted({int(r["round"]) for r in clients})
    last = rounds[-1]
    finished = (out / "results.md").is_file() and last == int(config["num_rounds"]) - 1
    wall = json.loads((out / WALL_FILE).read_text()) if (out / WALL_FILE).is_file() else {}
    trainable = []
    if finished:
        for folder in sorted((out / "clients").glob("*/adapter")):
            trainable.append(_adapter_trainable(folder))
    budget = json.loads((out / BUDGET_FILE).read_text()) if (out / BUDGET_FILE).is_file() else None
    return {
        "config": config,
        "finished": finished,
        "last_round": last,
        "mean_per_round": {int(r["round"]): float(r["mean_perplexity"]) for r in records if r.get("summary")},
        "base": {r["client"]: float(r["perplexity"]) for r in clients if r["round"] == -1},
        "final": {r["client"]: float(r["perplexity"]) for r in clients if r["round"] == last},
        "bytes_up": sum(int(r.get("bytes_up") or 0) for r in clients if r["round"] >= 0),
        "bytes_down": sum(int(r.get("bytes_down") or 0) for r in clients if r["round"] >= 0),
        "trainable": trainable,
        "wall_s": wall_seconds(wall) if wall else None,
        "sessions": wall.get("sessions", []),
        "rouge": rouge,
        "budget": budget,
    }


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _client_order(ids) -> list[str]:
    return sorted(ids, key=lambda c: (len(c), c))


def _rouge_mean(rouge: dict | None, client_ids: list[str]) -> float | None:
    if not rouge or any(c not in rouge["clients"] for c in client_ids):
        return None
    return _mean(rouge["clients"][c]["rouge_l"] for c in client_ids)


def plot_rounds(results: dict[str, dict], paths: list[Path], title: str) -> None:
    """Mean personalized perplexity per round (round -1: the base model), one line per method (PerFIT thick and
    black); log scale when the values span more than 3×. Written atomically to every path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    values = []
    for method in METHODS:
        res = results.get(method)
        if not res:
            continue
        rounds = sorted(res["mean_per_round"])
        values += [res["mean_per_round"][r] for r in rounds]
        style = {"lw": 2.6, "color": "black", "zorder": 3} if method == "perfit" else {"lw": 1.4}
        label = method if res["finished"] else f"{method} (partial)"
        ax.plot(rounds, [res["mean_per_round"][r] for r in rounds], marker="o", ms=3.5, label=label, **style)
    if values and max(values) > 3 * min(values):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (-1 = base model)")
    ax.set_ylabel("mean personalized perplexity")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    plt.close(fig)


def _fmt_mb(n: float) -> str:
    return f"{n / 1e6:,.1f}" if n >= 1e6 else f"{n / 1e6:.4f}"


def _fmt_int(n: float) -> str:
    return f"{n:,.0f}"


def _settings_lines(ref: dict, results: dict[str, dict], rouge_settings: dict | None, s: Settings) -> list[str]:
    c = ref["config"]
    tiny = s.tiny
    common = s.federated()
    r = common.lora_r  # the budget's rank from the settings, not `ref`: a FedAMoLE run's own lora_r is its expert rank
    model = "tiny random Llama (hidden 16, 2 layers; smoke test)" if tiny else "SmolLM2-135M-Instruct (fp32)"
    n = len(ref["final"])
    lines = [
        f"- model: {model}; data: `{_show_path(c['dataset_name'])}`, {n} clients, "
        + (
            "each evaluated on held-out examples of its own training file (`--split validation`, not the test split)"
            if Path(c["dataset_name"]).name == "validation_data"
            else "each evaluated on its own test split"
        ),
        f"- every method: {c['num_rounds']} rounds, all {n} clients every round, {c['local_steps']} local steps of "
        f"batch {c['per_device_train_batch_size']} (max_length {c['max_length']}), AdamW lr {c['learning_rate']:g} "
        f"constant, completion-only loss, seed {c['seed']}",
        f"- budget: a rank-{r} LoRA (lora_alpha {common.lora_alpha}) on "
        f"{', '.join(c['lora_target_modules'])}; local, fedit, fedprox, fedmut, fedqp train exactly that",
    ]
    p = results.get("perfit")
    if p:
        pc = p["config"]
        lines.append(
            f"- perfit: expansion_factor {pc['expansion_factor']} (rank {pc['expansion_factor'] * pc['lora_r']}), "
            f"symmetric init, {pc['importance']} importance, "
            + (
                f"searched over the first {pc['search_steps']} local steps"
                if pc.get("search_mode") == "train"
                else f"foresight search on {pc.get('search_batches', 8)} local batches before training"
            )
            + f" in {pc['prune_iterations']} pruning iterations back to the rank-{pc['lora_r']} budget, mask fixed after"
        )
    h = results.get(HETERO)
    if h:
        lines.append(
            f"- {HETERO}: perfit with per-client budget multipliers {h['config'].get('budget_multipliers')} "
            "(client k keeps round(b_k · budget) elements, capped at the expanded size)"
        )
    fa = results.get("fedamole")
    if fa:
        fc, b = fa["config"], fa.get("budget") or {}
        extra = (
            f"; the authors' pool, not shrunk to the budget: {b['params_mean']:,.0f} trainable per client on average "
            f"= {b['ratio']:.2f}× the rank-{r} budget"
            if b
            else ""
        )
        lines.append(
            f"- fedamole: rank-{fc['lora_r']} experts (lora_alpha {fc['lora_alpha']}, the same scale), "
            f"E={fc['num_experts']} per module, each to {fc['clients_per_expert']} clients, "
            f"{fc['experts_per_client_min']}–{fc['experts_per_client_max']} per client and module, "
            f"top-{fc['mole_top_k']} routing, balance loss {fc['balance_loss_coef']:g}{extra}"
        )
    if results.get("fedprox"):
        lines.append(f"- fedprox: μ = {results['fedprox']['config']['proximal_mu']:g}")
    for m in ("fedmut", "fedqp"):
        if results.get(m):
            opts = results[m]["config"]["strategy_options"]
            lines.append(f"- {m}: " + ", ".join(f"{k} {v}" for k, v in sorted(opts.items())))
    lines.append(
        f"- personalized perplexity: the first {c['max_eval_examples']} test examples of each client's own split, "
        "after every round (round -1: the base model)"
    )
    if rouge_settings:
        lines.append(
            f"- ROUGE-L: greedy answers (≤ {rouge_settings['max_new_tokens']} new tokens, chat template as in "
            f"training) to the first {rouge_settings['examples']} test examples of each client, LCS F-measure on "
            "lowercased word tokens with punctuation removed (`hf_perfit.evaluation.rouge_l`), mean over examples, "
            "then over clients"
        )
    common = _comparable(c)
    for m, res in results.items():
        if m == "base" or not res:
            continue
        diff = [k for k, v in _comparable(res["config"]).items() if k not in PER_METHOD_KEYS and common.get(k) != v]
        if diff:
            lines.append(f"- **{m} ran with other settings**: " + ", ".join(f"{k}={res['config'][k]!r}" for k in diff))
    return lines


def render(results: dict[str, dict | None], s: Settings, root: Path, commands: list[str]) -> str:
    """The markdown section (table, per-client tables, plot, computed facts)."""
    unavailable = available_methods()
    done = {m: r for m, r in results.items() if m != "base" and r and r["finished"]}
    ref = done.get("fedit") or next(iter(done.values()), None)
    lines = [
        SECTION,
        "",
        "Personalized quality of every method on FLAN-8 at the same rounds, local steps, seed and trainable budget "
        "per client: mean personalized perplexity (final round, mean over clients), its ratio to FedIT, ROUGE-L of "
        "greedy answers, wall time and bytes sent. Goal: PerFIT at most "
        f"{GOAL_RATIO}× FedIT's mean personalized perplexity and the lowest of all methods.",
        "",
        "Commands (one method per call, 10-18 min each on 2 cores, see the table; every run is cached in "
        f"`{_rel(root)}/<method>` and resumes where it stopped; the last call rebuilds this section):",
        "",
        "```bash",
        *commands,
        "```",
        "",
        f"This section was written by `{command_line()}`.",
        "",
        "Machine (where the report was built; the runs' wall times and load averages are below):",
        "",
        machine_lines(),
    ]
    if ref is None:
        lines += ["No finished run yet.", ""]
        return "\n".join(lines)
    client_ids = _client_order(ref["final"])
    base_res = results.get("base")
    rouge_settings = next((r["rouge"]["settings"] for r in [base_res, *done.values()] if r and r.get("rouge")), None)
    lines += ["Settings:", "", *_settings_lines(ref, done, rouge_settings, s), ""]
    fedit_mean = _mean(done["fedit"]["final"][c] for c in client_ids) if "fedit" in done else None
    budget = None
    for m in ("fedit", "local", "fedprox", "fedmut", "fedqp"):
        if m in done and done[m]["trainable"]:
            budget = done[m]["trainable"][0]
            break
    header = (
        "| method | mean personalized perplexity | / FedIT | ROUGE-L | trainable per client | × budget | "
        "run wall (min) | ROUGE-L wall (min) | MB up | MB down |"
    )
    lines += [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base_ppl = ref["base"]
    base_mean = _mean(base_ppl[c] for c in client_ids)
    base_rouge = _rouge_mean(base_res["rouge"] if base_res else None, client_ids)
    base_rouge_s = sum(v["seconds"] for v in base_res["rouge"]["clients"].values()) if base_rouge is not None else None
    base_cells = [
        "base model",
        f"{base_mean:.3f}",
        f"{base_mean / fedit_mean:.3f}" if fedit_mean else "–",
        f"{base_rouge:.3f}" if base_rouge is not None else "not run",
        "0",
        "–",
        "–",
        f"{base_rouge_s / 60:.1f}" if base_rouge_s is not None else "–",
        "0",
        "0",
    ]
    lines.append("| " + " | ".join(base_cells) + " |")
    means: dict[str, float] = {}
    rouges: dict[str, float] = {}
    for m in METHODS:
        res = results.get(m)
        if unavailable.get(m):
            lines.append(f"| {m} | not available ({unavailable[m]}) | | | | | | | | |")
            continue
        if not res:
            lines.append(f"| {m} | not run yet | | | | | | | | |")
            continue
        if not res["finished"]:
            lines.append(
                f"| {m} | partial: {res['last_round'] + 1} of {res['config']['num_rounds']} rounds | | | | | | | | |"
            )
            continue
        mean = _mean(res["final"][c] for c in client_ids)
        means[m] = mean
        rl = _rouge_mean(res["rouge"], client_ids)
        if rl is not None:
            rouges[m] = rl
        tr = res["trainable"]
        tr_s = _fmt_int(_mean(tr)) + (f" ({_fmt_int(min(tr))}–{_fmt_int(max(tr))})" if min(tr) != max(tr) else "")
        rouge_s = sum(v["seconds"] for v in res["rouge"]["clients"].values()) if rl is not None else None
        lines.append(_method_row(m, res, mean, fedit_mean, rl, tr_s, budget, rouge_s))
    lines += [
        "",
        "Trainable per client: elements of the exported client adapter (PerFIT: the kept elements of its mask; "
        "FedAMoLE: shared expert, `P` and its assigned experts; mean and range over clients); the budget is the "
        "rank-r LoRA's. Run wall: setup + rounds + export over all sessions of the (resumed) run, round 0 "
        "including the base model's evaluation. MB: total over the run and all clients (float32 values, "
        "`docs/federated.md`).",
        "",
    ]
    lines += _per_client_tables(results, done, client_ids, base_ppl)
    lines += [f"![mean personalized perplexity per round per method]({PLOT_NAME})", ""]
    loads = []
    for m in METHODS:
        res = done.get(m)
        if res and res["sessions"]:
            starts = [x["load_start"] for x in res["sessions"]]
            ends = [x["load_end"] for x in res["sessions"] if x.get("load_end") is not None]
            threads = sorted({x["threads"] for x in res["sessions"] if "threads" in x})
            loads.append(
                f"{m} {len(res['sessions'])} session(s)"
                + (f", load {max(starts + ends):.1f} max" if ends else "")
                + (f", {'/'.join(map(str, threads))} thread(s)" if threads else "")
            )
    if loads:
        lines += [
            "Load average (1 min) seen by the runs (2 cores: above 2 the wall times are inflated): "
            + "; ".join(loads)
            + ".",
            "",
        ]
    prose = None
    if ANALYSIS_PATH.is_file() and not s.tiny and s.split == "test":
        text = ANALYSIS_PATH.read_text().splitlines()
        prose = "\n".join(x for x in text if not x.startswith("<!--")).strip()  # the file's own header comment
    lines += _analysis(done, means, rouges, client_ids, base_mean, prose)
    return "\n".join(lines)


def _method_row(m, res, mean, fedit_mean, rl, tr_s, budget, rouge_s) -> str:
    bold = "**" if m == "perfit" else ""
    cells = [
        m,
        f"{bold}{mean:.3f}{bold}",
        f"{mean / fedit_mean:.3f}" if fedit_mean else "–",
        f"{rl:.3f}" if rl is not None else "not run",
        tr_s,
        f"{_mean(res['trainable']) / budget:.3f}" if budget else "–",
        f"{res['wall_s'] / 60:.1f}" if res["wall_s"] is not None else "–",
        f"{rouge_s / 60:.1f}" if rouge_s is not None else "–",
        _fmt_mb(res["bytes_up"]),
        _fmt_mb(res["bytes_down"]),
    ]
    return "| " + " | ".join(cells) + " |"


def _unique_best(values: dict[str, float], pick) -> str | None:
    """The key of the best value (`pick` is `min` or `max`) when no other key ties with it at 3 decimals."""
    if not values:
        return None
    best = pick(values, key=values.get)
    ties = [k for k, v in values.items() if f"{v:.3f}" == f"{values[best]:.3f}"]
    return best if len(ties) == 1 else None


def _per_client_tables(results, done, client_ids, base_ppl) -> list[str]:
    cats = {}
    for res in [results.get("base"), *done.values()]:
        if res and res.get("rouge"):
            cats.update({c: v.get("category", "") for c, v in res["rouge"]["clients"].items()})
    names = [m for m in METHODS if m in done]
    label = {c: f"{c} ({cats[c]})" if cats.get(c) else c for c in client_ids}
    lines = [
        "Per-client personalized perplexity (final round; lowest method per client in bold):",
        "",
        "| client | base | " + " | ".join(names) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for c in client_ids:
        vals = {m: done[m]["final"][c] for m in names}
        best = _unique_best(vals, min)
        cells = [f"**{v:.3f}**" if m == best else f"{v:.3f}" for m, v in vals.items()]
        lines.append(f"| {label[c]} | {base_ppl[c]:.3f} | " + " | ".join(cells) + " |")
    rouge_rows = [
        m for m in ["base", *names] if _rouge_mean((results.get(m) or {}).get("rouge"), client_ids) is not None
    ]
    if rouge_rows:
        lines += [
            "",
            "Per-client ROUGE-L (highest method per client in bold):",
            "",
            "| client | " + " | ".join(rouge_rows) + " |",
            "|---|" + "---:|" * len(rouge_rows),
        ]
        for c in client_ids:
            vals = {m: results[m]["rouge"]["clients"][c]["rouge_l"] for m in rouge_rows}
            best = _unique_best(vals, max)
            cells = [f"**{v:.3f}**" if m == best else f"{v:.3f}" for m, v in vals.items()]
            lines.append(f"| {label[c]} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _analysis(done, means, rouges, client_ids, base_mean, prose: str | None = None) -> list[str]:
    lines = ["### Analysis", "", "Computed by the script from the runs above:", ""]
    if means:
        lowest = min(means, key=means.get)
        lines.append(
            f"- Lowest mean personalized perplexity: {lowest} ({means[lowest]:.3f}; base model {base_mean:.3f}). "
            "Order: " + " < ".join(f"{m} {means[m]:.3f}" for m in sorted(means, key=means.get)) + "."
        )
    if "perfit" in means and "fedit" in means:
        ratio = means["perfit"] / means["fedit"]
        lowest = min(means, key=means.get)
        met = ratio <= GOAL_RATIO and lowest == "perfit"
        why = []
        if ratio > GOAL_RATIO:
            why.append(f"ratio {ratio:.3f} > {GOAL_RATIO}")
        if lowest != "perfit":
            why.append(f"{lowest} is lower ({means[lowest]:.3f})")
        lines.append(
            f"- PerFIT / FedIT mean personalized perplexity: **{ratio:.3f}**; goal (≤ {GOAL_RATIO} and the lowest of "
            f"all methods): **{'met' if met else 'missed'}**" + (f" ({'; '.join(why)})" if why else "") + "."
        )
        p, f = done["perfit"]["final"], done["fedit"]["final"]
        wins = [c for c in client_ids if p[c] < f[c]]
        best = [c for c in client_ids if all(p[c] <= done[m]["final"][c] for m in done)]
        lines.append(
            f"- PerFIT below FedIT on {len(wins)} of {len(client_ids)} clients"
            + (f" ({', '.join(wins)})" if wins else "")
            + f"; the lowest of all methods on {len(best)}"
            + (f" ({', '.join(best)})" if best else "")
            + "."
        )
    else:
        lines.append("- PerFIT / FedIT: not measured yet (both runs must be finished).")
    if rouges:
        top = _unique_best(rouges, max) or "tie of " + ", ".join(
            m for m in rouges if f"{rouges[m]:.3f}" == f"{max(rouges.values()):.3f}"
        )
        lines.append(
            f"- Highest mean ROUGE-L: {top} ({max(rouges.values()):.3f})"
            + (
                f"; PerFIT {rouges['perfit']:.3f}, FedIT {rouges['fedit']:.3f}"
                if {"perfit", "fedit"} <= set(rouges)
                else ""
            )
            + "."
        )
    placeholder = (
        "_Prose analysis (where PerFIT wins, where it does not, and why): to be written after the full runs._"
    )
    lines += ["", prose or placeholder, ""]
    return lines


def _show_path(path: str) -> str:
    """A data path as the docs show it: relative to the repository (`outputs/...`) or to its parent folder
    (`../shared/data/flan8`) when under them."""
    resolved = Path(path).resolve()
    for anchor, prefix in ((REPO_ROOT, Path()), (REPO_ROOT.parent, Path(".."))):
        if resolved.is_relative_to(anchor):
            return str(prefix / resolved.relative_to(anchor))
    return path


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------------- main


def stored_settings(root: Path) -> Settings | None:
    """The settings the cached runs were made with (`quality_settings.json` of FedIT's run, else the first row's
    that has one), so that `--report-only` lists the commands that really built them. A file written up to commit
    6705756 (the federated settings as fields of their own, see [`OLD_KEYS`]) is read as the same settings."""
    for row in ("fedit", *ROWS):
        path = root / row / SETTINGS_FILE
        if path.is_file():
            data = json.loads(path.read_text())
            if "config" not in data:
                data = _from_old_settings(data)
            known = {f.name for f in dataclasses.fields(Settings)}
            return Settings(**{k: v for k, v in data.items() if k in known})
    return None


def _from_old_settings(old: dict[str, Any]) -> dict[str, Any]:
    """An old `quality_settings.json` (see [`OLD_KEYS`]) as [`Settings`] fields: its federated values that differ
    from benchmarks/settings/flan8_default.yaml (and tiny.yaml) become `overrides` flags."""
    base = Settings(tiny=bool(old.get("tiny"))).federated()
    overrides: list[str] = []
    for old_key, key in OLD_KEYS.items():
        value = old.get(old_key)
        if value is None or (key == "search_steps" and value == 0):  # 0 meant the default: all first-round steps
            continue
        if key == "search_steps" or value != getattr(base, key):
            overrides += [f"--{key}", *([str(v) for v in value] if isinstance(value, list) else [str(value)])]
    return {**{k: v for k, v in old.items() if k not in OLD_KEYS}, "overrides": overrides}


def commands_for(s: Settings, root: Path, default_root: Path) -> list[str]:
    """The exact commands that build the table with these settings: one per row, then the report."""
    defaults = Settings(tiny=s.tiny, **(TINY_DEFAULTS if s.tiny else {}))
    flags: list[str] = ["--tiny"] if s.tiny else []
    if s.config_path().resolve() != defaults.config_path().resolve():
        flags += ["--config", _rel(s.config_path())]
    flags += s.overrides
    for name, flag in FLAGS.items():
        value, default = getattr(s, name), getattr(defaults, name)
        if name == "config" or (name == "data" and Path(value).expanduser().resolve() == Path(default).resolve()):
            continue
        if value != default:
            flags += [flag, *([str(v) for v in value] if isinstance(value, list) else [str(value)])]
    if root.resolve() != default_root.resolve():
        flags += ["--output-root", _rel(root)]
    base = ["python", "benchmarks/quality.py"]
    rows = [m for m in ROWS if m != HETERO or s.perfit_budget_multipliers]
    return [shlex.join([*base, "--methods", m, *flags]) for m in rows] + [shlex.join([*base, "--report-only", *flags])]


def federated_flags(argv: list[str]) -> list[str]:
    """`--key value` flags of `FederatedConfig` keys as the parser reads them: `--key_name` (dashes are the same key
    to the parser, underscores are how the docs and YAML spell it), old benchmark flags renamed ([`OLD_FLAGS`])."""
    out = []
    for arg in argv:
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            name = OLD_FLAGS.get(name, "--" + name[2:].replace("-", "_"))
            arg = name + eq + value
        out.append(arg)
    return out


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    """The benchmark's own flags, and the federated settings: `--config` (a YAML of `FederatedConfig` keys) plus every
    other `--key value` flag as an override of a `FederatedConfig` key (refused, naming the key to use, when there is
    no such key)."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        allow_abbrev=False,
        epilog="Any other --key value sets a FederatedConfig key over the YAML, as `perfit federate` reads it "
        "(docs/federated.md § Config keys), e.g. --num_rounds 10 --local_steps 10 --max_eval_examples 50 --seed 1.",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(ROWS),
        choices=[*ROWS, "all"],
        metavar="METHOD",
        help=f"rows to run (default: all): {', '.join(ROWS)}",
    )
    p.add_argument("--output-root", type=Path, help="cached runs (default: outputs/quality, -tiny, -validation)")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild the table and plot from the cached runs (their own settings; setting flags are ignored)",
    )
    p.add_argument("--no-write", action="store_true", help="print the section; leave docs/ alone")
    p.add_argument("--tiny", action="store_true", help="tiny random Llama + synthetic clients (never writes docs/)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    p.add_argument(
        "--config",
        help=f"the federated settings: a YAML of FederatedConfig keys (default: {DEFAULT_CONFIG}; "
        f"{_rel(TINY_CONFIG)} is applied over it with --tiny)",
    )
    p.add_argument("--rouge-examples", type=int, help="test examples per client answered for ROUGE-L")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--fedamole-rank", type=int, help="FedAMoLE expert rank (default: lora_r, the authors')")
    p.add_argument("--fedamole-experts", type=int, help="FedAMoLE experts per module (default: the recipe's 30)")
    p.add_argument(
        "--perfit-budget-multipliers",
        nargs="+",
        type=float,
        help=f"one budget multiplier per client: runs the {HETERO} row (e.g. 0.5 0.5 1 1 1 1 2 2)",
    )
    p.add_argument("--data", help=f"per-client folder (default: {_rel(FLAN8)}, i.e. ../shared/data/flan8)")
    p.add_argument(
        "--split",
        choices=["test", "validation"],
        help="test: the benchmark; validation: tune on held-out training examples (never the test split)",
    )
    p.add_argument(
        "--validation-examples", type=int, help="held-out training examples per client (--split validation)"
    )
    args, rest = p.parse_known_args(argv)
    if rest and not rest[0].startswith("--"):
        p.error(f"unexpected arguments {rest}; give every value after its --key.")
    base = {**dataclasses.asdict(Settings()), **(TINY_DEFAULTS if args.tiny else {}), "tiny": args.tiny}
    given = {k: v for k, v in vars(args).items() if k in base and v is not None}
    if args.config is not None and Path(args.config).expanduser().is_file():  # relative to the working directory
        given["config"] = _rel(Path(args.config).expanduser().resolve())
    settings = Settings(**{**base, **given, "overrides": federated_flags(rest)})
    settings.federated()  # a bad key or value fails now, naming it, not after the first run
    if "all" in args.methods:
        args.methods = list(ROWS)
    return args, settings


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args, s = parse_args(argv)
    warnings.filterwarnings("ignore")
    import datasets
    import torch

    datasets.disable_progress_bars()
    if args.threads:
        torch.set_num_threads(args.threads)
    suffix = "-tiny" if s.tiny else ""
    suffix += "-validation" if s.split == "validation" else ""
    default_root = REPO_ROOT / "outputs" / f"quality{suffix}"
    root = (args.output_root or default_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    failures = []
    if not args.report_only:
        from hf_perfit.data import load_client_folder

        data = data_folder(s, root)
        clients = load_client_folder(data)
        client_ids = [c.client_id for c in clients]
        unavailable = available_methods()
        base_cache: dict[str, Any] = {}
        for row in [r for r in ROWS if r in args.methods]:
            if row == HETERO and not s.perfit_budget_multipliers:
                if args.methods != list(ROWS):  # asked for by name
                    print(f"[{row}] skipped: give --perfit-budget-multipliers (one per client)")
                continue
            if row != "base" and unavailable[row]:
                print(f"[{row}] not available: {unavailable[row]}")
                continue
            try:
                if row != "base":
                    run_method(row, s, root, data, client_ids)
                rouge_for(row, s, root, clients, base_cache)
            except SystemExit:
                raise
            except Exception:  # one broken method must not cost the others their runs
                traceback.print_exc()
                failures.append(row)
                print(f"[{row}] FAILED (see above); continuing with the other methods")
    results = {row: collect(root, row) for row in ROWS}
    finished = {m: r for m, r in results.items() if m != "base" and r}
    plots = [root / PLOT_NAME]
    write = not args.no_write and not s.tiny and s.split == "test"  # docs/ hold the real benchmark only
    if finished:
        title = "mean personalized perplexity per round" + (
            " (tiny smoke test)" if s.tiny else " on FLAN-8, SmolLM2-135M-Instruct"
        )
        plot_rounds(finished, plots + ([PLOT_PATH] if write else []), title)
    shown = stored_settings(root) if args.report_only else None
    section = render(results, shown or s, root, commands_for(shown or s, root, default_root))
    print(section)
    if write:
        update_doc(DOC_PATH, SECTION, section)
        print(f"wrote {DOC_PATH} and {PLOT_PATH}")
    elif not args.no_write:
        print(f"--tiny and --split validation never write docs/ (as --no-write); the plot is in {plots[0]}")
    if failures:
        print(f"failed: {', '.join(failures)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
