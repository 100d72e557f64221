"""Publish a finished federated run on the Hub: one model repo per client, plus a federation summary repo.

Client `k` goes to `<namespace>/<prefix>-<client_id>` with its adapter as the run exported it (loadable with
`peft.PeftModel.from_pretrained(base, repo_id)`; a FedAMoLE adapter after `import hf_perfit`), a card and, for PerFIT,
the searched architecture; `<namespace>/<prefix>-federation` holds `results.md`, the plots and a summary card.
Every repo is rendered into a folder before the first request, then pushed with `HfApi.upload_folder`, which skips
unchanged files and empty commits and retries with huggingface_hub's backoff; `create_repo` and `model_info` are single
requests (a failure stops the push, and pushing again goes on where it stopped). The commit names its parent, so a
re-sent commit is refused (HTTP 412), not applied twice. The token is never logged, written or shown. See docs/hub.md.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors.torch import load_file

from .._io import atomic_directory, atomic_write_bytes, atomic_write_text
from ..federated.plots import module_density, plot_density, plot_perplexity
from ..federated.results import ADAPTER_FILES, PERFIT_FILES, FinishedRun, check_comparable, load_finished_run
from . import cards

logger = logging.getLogger(__name__)

CLIENT_REPO_FILES = (*ADAPTER_FILES, *PERFIT_FILES, "README.md", "density.png")
"""Every file a client repo may hold: one present remotely but not rendered by this push is deleted."""
FEDERATION_REPO_FILES = ("README.md", "results.md", "perplexity.png", "density.png")
FEDERATION_SUFFIX = "federation"
_TRANSIENT = frozenset({408, 429, 500, 502, 503, 504})
_EXAMPLE = "e.g. 'my-org/perfit-flan8' (client k then goes to 'my-org/perfit-flan8-<client_id>')"


class HubPushError(RuntimeError):
    """A push stopped on a failure that `huggingface_hub`'s retries did not fix. Attributes: `repo_id` (the failing
    repo), `client_id` (`None` for the federation repo), `pushed` (repos pushed or found up to date before it),
    `not_pushed` (it and every repo after it), `status_code` (the HTTP status, if any)."""

    def __init__(self, err: Exception, repo: _Repo, pushed: list[str], not_pushed: list[str], again: str) -> None:
        status = getattr(getattr(err, "response", None), "status_code", None)
        self.status_code = status if isinstance(status, int) else None
        self.repo_id, self.client_id, self.pushed, self.not_pushed = repo.repo_id, repo.client_id, pushed, not_pushed
        namespace = repo.repo_id.split("/")[0]
        reasons = {
            401: "no valid token. Log in with `hf auth login` or set HF_TOKEN to a token with write access.",
            403: f"the token may not write to {repo.repo_id!r}: the namespace {namespace!r} or the repo belongs to "
            "someone else, or the token is read-only. Use a repo_prefix in a namespace you own, or a write token.",
            404: f"{repo.repo_id!r} or the namespace {namespace!r} does not exist or is not visible to this token. "
            "Check the namespace in repo_prefix and that the token belongs to one of its members.",
        }
        if self.status_code in reasons:
            reason = f"HTTP {self.status_code}: {reasons[self.status_code]}"
        elif self.status_code is None or self.status_code in _TRANSIENT or self.status_code >= 500:
            what = f"HTTP {status}" if self.status_code else f"{type(err).__name__}: {str(err)[:200]}"
            reason = (
                f"{what}: the Hub is unreachable or failing (huggingface_hub retried with backoff); try again later."
            )
        else:
            reason = f"HTTP {status}: {(getattr(err, 'server_message', None) or str(err)).strip()[:300]}"
        who = f"client {repo.client_id!r}" if repo.client_id else "the federation summary"
        super().__init__(
            f"pushing {who} to {repo.repo_id} failed: {reason}\nAlready pushed: {', '.join(pushed) or 'none'}.\n"
            f"Not pushed: {', '.join(not_pushed)}.\nFix the cause and push again (`{again}`): repos already up to "
            "date get no new commit."
        )


@dataclass
class RepoResult:
    """What a push did to one repo: `status` is `"created"`, `"updated"`, `"unchanged"` (no commit) or
    `"preview"`; `files_changed` lists the files the commit added, modified or deleted."""

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
    def num_commits(self) -> int:
        return sum(r.commit is not None for r in self.results)

    def table(self) -> str:
        """A plain-text table: repo, client, status, commit, files changed."""
        rows = [("repo", "client", "status", "commit", "files changed")]
        for r in self.results:
            changed = ", ".join(r.files_changed) or "-"
            rows.append((r.repo_id, r.client_id or "(federation)", r.status, (r.commit or "-")[:12], changed))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


@dataclass
class PushConfig:
    """`perfit push`: publish a finished federated run. Command-line flags are these field names."""

    run: str = field(default="", metadata={"help": "Output folder (output_dir) of a finished federated run."})
    repo_prefix: str = field(
        default="", metadata={"help": "'<namespace>/<prefix>': client k goes to '...-<client_id>'."}
    )
    private: bool = field(default=False, metadata={"help": "Create new repos as private."})
    clients: list[str] | None = field(default=None, metadata={"help": "Push only these client ids (default: all)."})
    federation_repo: bool = field(default=True, metadata={"help": "Also push '<prefix>-federation' (results, plots)."})
    compare_runs: list[str] | None = field(default=None, metadata={"help": "Runs on the same clients, e.g. FedIT."})
    base_model: str | None = field(default=None, metadata={"help": "Hub id for the cards' base_model."})
    preview_dir: str | None = field(default=None, metadata={"help": "Write the repos' files here; push nothing."})

    def __post_init__(self) -> None:
        self.clients, self.compare_runs = _as_list(self.clients), _as_list(self.compare_runs)


@dataclass
class _Repo:
    repo_id: str
    client_id: str | None
    render: Callable[[Path], None]  # writes the repo's files into a folder
    managed: tuple[str, ...]
    message: str


def push_run(
    run_dir: str | Path,
    repo_prefix: str,
    *,
    private: bool = False,
    clients: Sequence[str] | str | None = None,
    token: str | bool | None = None,
    federation_repo: bool = True,
    compare_runs: Sequence[str | Path] | None = None,
    base_model: str | None = None,
    endpoint: str | None = None,
    preview_dir: str | Path | None = None,
    template_dir: str | Path | None = None,
) -> PushReport:
    """Push each client's personalized adapter of a finished federated run to its own Hub repo.

    Everything is validated and rendered before the first request; then the repos are pushed one by one, clients in
    run order and the federation repo last.

    Args:
        run_dir: the run's `output_dir` (holds `config.json`, `metrics.jsonl`, `clients/<id>/adapter/`).
        repo_prefix: `"<namespace>/<prefix>"`; client `k` goes to `"<namespace>/<prefix>-<client_id>"`.
        private: create new repos as private (an existing repo keeps its visibility).
        clients: push only these client ids (default: all).
        token: a Hub token; `None` uses `huggingface_hub`'s sources (`HF_TOKEN`, `hf auth login`), `False` none.
        federation_repo: also push `"<namespace>/<prefix>-federation"` with `results.md` and plots.
        compare_runs: other runs on the same clients (same model, data, partition and seed), e.g. FedIT, whose final
            personalized perplexity the cards show next to this run's.
        base_model: Hub id for the cards' `base_model` (default: from the run's `model_name_or_path`).
        endpoint: Hub endpoint (default: `HF_ENDPOINT`, else huggingface.co).
        preview_dir: write each repo's files into `preview_dir/<repo name>/` and push nothing.
        template_dir: folder with `client_card.md` / `federation_card.md` replacing the shipped templates.

    Returns:
        [`PushReport`]: one [`RepoResult`] per repo.

    Raises:
        FileNotFoundError: the run folder, its metrics or a client's exported adapter is missing.
        ValueError: a malformed `repo_prefix`, an unknown or unsafe client id, a compare run on other clients or data.
        HubPushError: the Hub refused (401, 403, 404, ...) or kept failing after `huggingface_hub`'s retries; names
            the failing repo and the repos already pushed.
    """
    run = load_finished_run(run_dir)
    parse_repo_prefix(repo_prefix)
    selected = _select_clients(run, _as_list(clients))
    compare = [load_finished_run(p) for p in compare_runs or []]
    for other in compare:
        check_comparable(run, other)
    base = cards.base_model_info(run.config.get("model_name_or_path", ""), base_model)
    links = {cid: client_repo_id(repo_prefix, cid) for cid in run.client_ids}
    writer = cards.CardWriter(run, compare, base, links, cards.template_paths(template_dir))
    fed_id = f"{repo_prefix}-{FEDERATION_SUFFIX}"
    if fed_id in links.values():
        raise ValueError(f"a client id gives the federation repo's name {fed_id}; pass federation_repo=False.")
    method = cards.method_name(run.strategy)
    repos = []
    for c in selected:
        message = f"Upload {c} adapter ({method}, {run.num_rounds} rounds)"
        repos.append(_Repo(links[c], c, partial(_render_client, writer, c), CLIENT_REPO_FILES, message))
    if federation_repo:
        message = f"Upload {method} federation summary ({run.num_rounds} rounds)"
        repos.append(_Repo(fed_id, None, partial(_render_federation, writer, fed_id), FEDERATION_REPO_FILES, message))
    if preview_dir is None and constants.is_offline_mode():
        raise RuntimeError(
            "HF_HUB_OFFLINE is set, and offline mode blocks every Hub request (a local HF_ENDPOINT too): unset "
            "HF_HUB_OFFLINE to push, or pass preview_dir to only render the repos."
        )
    results: list[RepoResult] = []
    with tempfile.TemporaryDirectory(prefix="perfit-push-") as staging:
        pairs = [(r, Path(preview_dir or staging) / r.repo_id.split("/", 1)[1]) for r in repos]
        for repo, folder in pairs:  # every repo rendered before the first request
            with atomic_directory(folder) as tmp:
                repo.render(tmp)
        if preview_dir is not None:
            return PushReport([RepoResult(r.repo_id, r.client_id, "preview", None, _names(f)) for r, f in pairs])
        secrets = [t for t in (token if isinstance(token, str) else None, huggingface_hub.get_token()) if t]
        api = HfApi(endpoint=endpoint, token=token)
        for i, (repo, folder) in enumerate(pairs):
            try:
                results.append(_push_folder(api, repo, folder, private))
            except Exception as err:
                again = f"perfit push --run {run.path} --repo_prefix {repo_prefix}"
                error = HubPushError(err, repo, [r.repo_id for r in results], [r.repo_id for r in repos[i:]], again)
                for secret in secrets:  # huggingface_hub never puts the token in a message; this makes sure
                    error.args = (error.args[0].replace(secret, "***"),)
                raise error from err
            logger.info("%s: %s", repo.repo_id, results[-1].status)
    return PushReport(results)


def _render_client(writer: cards.CardWriter, cid: str, folder: Path) -> None:
    run, adapter = writer.run, writer.run.adapter_dir(cid)
    for name in ADAPTER_FILES + (PERFIT_FILES if run.strategy == "perfit" else ()):
        if (adapter / name).is_file():
            raw = (adapter / name).read_bytes()
            if name.endswith(".json"):
                raw = cards.scrub_base_model(raw, writer.base, nested=name == "perfit_config.json")
            atomic_write_bytes(folder / name, raw)
    density = None
    if all((folder / name).is_file() for name in PERFIT_FILES):
        density = module_density(load_file(str(folder / "perfit_masks.safetensors")))
        plot_density({cid: density}, folder / "density.png")
    else:
        for name in PERFIT_FILES:  # both or neither: PerFITModel.from_pretrained needs the pair
            (folder / name).unlink(missing_ok=True)
    atomic_write_text(folder / "README.md", writer.client(cid, folder, density))


def _render_federation(writer: cards.CardWriter, repo_id: str, folder: Path) -> None:
    run, compare = writer.run, writer.compare
    if (run.path / "results.md").is_file():
        atomic_write_bytes(folder / "results.md", (run.path / "results.md").read_bytes())
    labels = {cards.compare_label(o, compare): o.records for o in compare}
    plot_perplexity(run.records, folder / "perplexity.png", compare=labels)
    masks = {cid: run.adapter_dir(cid) / PERFIT_FILES[1] for cid in run.client_ids}
    if run.strategy == "perfit" and all(p.is_file() for p in masks.values()):
        plot_density({cid: module_density(load_file(str(p))) for cid, p in masks.items()}, folder / "density.png")
    atomic_write_text(folder / "README.md", writer.federation(repo_id, _names(folder)))


def _push_folder(api: Any, repo: _Repo, folder: Path, private: bool) -> RepoResult:
    """Create the repo if needed and upload the folder. `model_info` (the parent commit) already lists the repo's
    files, so `upload_folder` gets the stale names to delete and no tree listing: a re-push costs 4 requests, not 5."""
    try:
        before = api.model_info(repo.repo_id, files_metadata=True)
        created = False
    except RepositoryNotFoundError:
        # one POST without backoff (docs/hub.md § Failures): a 429/5xx stops the push; pushing again resumes here
        api.create_repo(repo.repo_id, private=private, exist_ok=True, repo_type="model")
        before, created = api.model_info(repo.repo_id, files_metadata=True), True
    rendered = set(_names(folder))

    def upload(head: Any) -> Any:
        stale = sorted(set(_remote_ids(head)) & set(repo.managed) - rendered)
        return api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=folder,
            delete_patterns=stale or None,
            commit_message=repo.message,
            parent_commit=head.sha,
        )

    try:
        info = upload(before)
    except HfHubHTTPError as err:
        if getattr(err.response, "status_code", None) != 412:
            raise
        # main moved since `before` (our own commit whose answer was lost and that the library re-sent, or another
        # writer): compare once more against the new head; unchanged files are again skipped
        info = upload(api.model_info(repo.repo_id, files_metadata=True))
    if info.oid == before.sha:
        return RepoResult(repo.repo_id, repo.client_id, "created" if created else "unchanged")
    after = api.model_info(repo.repo_id, files_metadata=True)
    old, new = _remote_ids(before), _remote_ids(after)
    changed = sorted(p for p in old.keys() | new.keys() if old.get(p) != new.get(p))
    return RepoResult(repo.repo_id, repo.client_id, "created" if created else "updated", info.oid, changed)


def _remote_ids(info: Any) -> dict[str, tuple[str | None, str | None]]:
    """`{path: (git blob id, LFS sha256)}` as the Hub reports them: what tells which files a commit changed."""
    return {s.rfilename: (s.blob_id, getattr(s.lfs, "sha256", None)) for s in info.siblings or []}


def push_main(config: PushConfig) -> int:
    """`perfit push`: push a run and print a table of the repos. Exit code 0 pushed (or nothing to push), 1 the Hub
    refused or failed, 2 bad input (missing run, bad prefix, unknown client)."""
    try:
        options = {k: v for k, v in asdict(config).items() if k not in ("run", "repo_prefix")}
        report = push_run(config.run, config.repo_prefix, **options)
    except (FileNotFoundError, ValueError) as err:
        print(f"perfit push: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # HubPushError, offline mode
        print(f"perfit push: {err}", file=sys.stderr)
        return 1
    print(report.table())
    changed = sum(r.status != "unchanged" for r in report.results)
    n = len(report.results)
    done = f"{n} repos, {changed} with a new commit, {n - changed} unchanged."
    print(
        "\n"
        + (done if config.preview_dir is None else f"Preview written to {config.preview_dir}; nothing was pushed.")
    )
    return 0


def parse_repo_prefix(repo_prefix: str) -> tuple[str, str]:
    """Split `"<namespace>/<prefix>"` after `huggingface_hub.utils.validate_repo_id` accepted it."""
    if not isinstance(repo_prefix, str) or repo_prefix.count("/") != 1:
        raise ValueError(f"repo_prefix={repo_prefix!r} must be '<namespace>/<prefix>', {_EXAMPLE}.")
    _check_repo_id(repo_prefix, f"repo_prefix={repo_prefix!r} is not a valid Hub name")
    namespace, prefix = repo_prefix.split("/")
    return namespace, prefix


def client_repo_id(repo_prefix: str, client_id: str) -> str:
    """The repo client `client_id` is pushed to, `"<namespace>/<prefix>-<client_id>"`; one the Hub would refuse is
    an error before anything is pushed."""
    parse_repo_prefix(repo_prefix)
    return _check_repo_id(f"{repo_prefix}-{client_id}", f"client {client_id!r} gives a repo id the Hub refuses")


def _check_repo_id(repo_id: str, what: str) -> str:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{what} ({err}); {_EXAMPLE}.") from None
    return repo_id


def _select_clients(run: FinishedRun, clients: list[str] | None) -> list[str]:
    """The clients to push, in run order; every client when `clients` is `None`."""
    if clients is None:
        return list(run.client_ids)
    unknown = [c for c in clients if c not in run.client_ids]
    if not clients or unknown:
        what = f"unknown client id(s) {unknown}" if clients else "clients is empty"
        raise ValueError(f"{what}; this run has: {', '.join(run.client_ids)}.")
    return [c for c in run.client_ids if c in set(clients)]


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _as_list(value: Any) -> list[str] | None:
    """Client ids given as a list, a comma-separated string or both (`--clients client_0,client_3`)."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else [str(v) for v in value]
    return [part.strip() for item in items for part in item.split(",") if part.strip()]
