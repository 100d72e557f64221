"""What each row of benchmarks/quality.py runs: the settings (a YAML of `FederatedConfig` keys plus `--key value`
overrides), the per-client data folder, the base model, FedAMoLE's expert pool and each row's `FederatedConfig`; and
the settings a cached run was made with. The command line and the benchmark's documentation: benchmarks/quality.py."""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import REPO_ROOT  # noqa: E402

HETERO = "perfit-hetero"  # PerFIT with per-client budget multipliers (run only with --perfit-budget-multipliers)
METHODS = ("local", "fedit", "fedprox", "perfit", "fedamole", "fedmut", "fedqp", HETERO)
STRATEGY_OF = {HETERO: "perfit"}  # a row's strategy when it is not the row's name
ROWS = ("base", *METHODS)
PRESET = "smollm2-135m-instruct"
FLAN8 = REPO_ROOT.parent / "shared" / "data" / "flan8"
RECIPES = REPO_ROOT / "recipes" / "smollm2-135m"
DEFAULT_ROOT = REPO_ROOT / "outputs" / "quality"
SETTINGS_FILE = "quality_settings.json"
IGNORED_CONFIG_KEYS = ("resume", "overwrite", "output_dir", "push_to_hub", "hub_repo_prefix", "hub_private")
TINY_CLIENTS = 3
VALIDATION_SEED = 1234  # fixed: the same held-out examples whatever --seed a run uses


# ------------------------------------------------------------------------------------------------------------ settings


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


TINY_DEFAULTS: dict[str, Any] = {"rouge_examples": 3, "max_new_tokens": 6, "validation_examples": 3}
"""What `--tiny` uses for every benchmark flag left at its default (its federated keys: settings/tiny.yaml)."""


def _key(flag: str) -> str:
    """The config key of a `--key[=value]` flag (dashes read as underscores, as the parser does)."""
    return flag[2:].split("=", 1)[0].replace("-", "_")


def _yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def available_methods() -> dict[str, str | None]:
    """`{method: None}` for a registered strategy, `{method: why not}` otherwise (e.g. FedAMoLE not built yet)."""
    try:
        from hf_perfit.federated import STRATEGIES
    except ImportError as err:  # pragma: no cover - the package itself is broken
        return {m: f"hf_perfit.federated does not import: {err}" for m in METHODS}
    return {
        m: None if STRATEGY_OF.get(m, m) in STRATEGIES else "strategy not registered in this version" for m in METHODS
    }


# ---------------------------------------------------------------------------------------------------------------- data


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


# -------------------------------------------------------------------------------------------------------------- models


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


# ------------------------------------------------------------------------------------------------------------- configs


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


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------------------- settings of cached runs


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
