"""A federated run's folder: its layout, its metrics record schema, a reader, and the client-state file format.

Every module that reads or writes a run folder goes through here (the coordinator, the in-process and Flower
transports, plots, results, hub, benchmarks), so a file name or a record field is defined once.

```
<output_dir>/
    config.json                 the FederatedConfig of the run (what --resume compares against)
    metrics.jsonl               one record per line (schema below); a copy of the last checkpoint's
    results.md, *.png           written after the last round
    clients/<client_id>/adapter each client's final adapter, plain PEFT format
    state/
        run.json                marker: "this folder is an hf_perfit run" (--overwrite deletes only such folders)
        checkpoint.json         the commit pointer: names the last committed round folder and its manifest's sha256
        round_<c>/              the whole state after c completed rounds (see docs/federated.md, "Checkpoint")
            manifest.json       sha256 of every file of the folder
            strategy.safetensors, metrics.jsonl, coordinator.json, clients/<client_id>.safetensors
        pending_<r>/            round r in progress: one file per client that finished training (reused on resume)
```

Metrics records (`metrics.jsonl`; fields are only ever added):

- per client and round: `round` (-1 = base model), `client`, `strategy` (`"base"` in round -1), `eval_loss`,
  `perplexity`, `num_examples`, `train_loss` (None when not trained), `bytes_up`, `bytes_down`, and from round 0
  `trained`, `budget_multiplier`, `density` (PerFIT); optional `local_eval_loss` / `local_perplexity` (the locally
  trained adapter before aggregation), `finetune` (the fine-tuning phase after the last round), `failed`.
- per round, a summary: `round`, `summary: true`, `strategy`, `mean_perplexity` (over the evaluated clients),
  `bytes_up`, the strategy's round metrics; `num_evaluated` when not every client was evaluated, `failed_clients`
  when a client failed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.md"
CLIENTS_DIR = "clients"
STATE_DIR = "state"
RUN_MARKER = "run.json"
CHECKPOINT_FILE = "checkpoint.json"
MANIFEST_FILE = "manifest.json"
STRATEGY_FILE = "strategy.safetensors"
COORDINATOR_FILE = "coordinator.json"
FLOWER_REPORT_FILE = "flower_run.json"
RUN_FORMAT = "hf_perfit-run"
INFO_KEY = "i/info"  # a round result's bookkeeping (JSON bytes) inside a client-state file

_CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def check_client_id(client_id: Any) -> str:
    """`client_id` if it can safely become a file name (letters, digits, `_`, `-`, `.`, no `..`; at most 64
    characters), else `ValueError`: client ids read back from a run become paths (`clients/<id>/adapter`)."""
    if not isinstance(client_id, str) or not _CLIENT_ID_RE.match(client_id) or ".." in client_id:
        raise ValueError(
            f"client id {client_id!r} cannot be used as a folder name: use letters, digits, '_', '-' and '.' only "
            "(at most 64 characters, starting with a letter or digit, no '..')."
        )
    return client_id


# ---------------------------------------------------------------------- layout


class RunFolder:
    """The paths of one run folder (nothing is created by building it).

    Args:
        root (`str` or `os.PathLike`): the run's `output_dir`.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def results(self) -> Path:
        return self.root / RESULTS_FILE

    @property
    def state(self) -> Path:
        return self.root / STATE_DIR

    @property
    def marker(self) -> Path:
        return self.state / RUN_MARKER

    @property
    def checkpoint(self) -> Path:
        return self.state / CHECKPOINT_FILE

    def round_dir(self, completed: int) -> Path:
        """The checkpoint folder holding the state after `completed` rounds."""
        return self.state / f"round_{int(completed)}"

    def pending_dir(self, round_idx: int) -> Path:
        """Round `round_idx` in progress: one result file per client that finished."""
        return self.state / f"pending_{int(round_idx)}"

    def adapter_dir(self, client_id: str) -> Path:
        return self.root / CLIENTS_DIR / check_client_id(client_id) / "adapter"

    def is_ours(self) -> bool:
        """Whether the folder was written by `perfit federate` (or the Flower engine): our state marker, a
        checkpoint of an earlier hf_perfit, or a Flower run report, next to our `config.json`."""
        if not self.config.is_file():
            return False
        try:
            config = json.loads(self.config.read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(config, dict) or "strategy" not in config or "num_rounds" not in config:
            return False
        return self.marker.is_file() or self.checkpoint.is_file() or (self.root / FLOWER_REPORT_FILE).is_file()

    def foreign_entries(self) -> list[str]:
        """The folder's entries when it exists, is not empty and is not one of our runs (else `[]`)."""
        if not self.root.exists():
            return []
        if not self.root.is_dir():
            return [self.root.name]
        if self.is_ours():
            return []
        return sorted(p.name for p in self.root.iterdir())

    def write_marker(self) -> None:
        from .._io import atomic_write_json

        atomic_write_json(self.marker, {"format": RUN_FORMAT, "version": 1})

    # ------------------------------------------------------------------ reading

    def read_config(self) -> dict[str, Any]:
        """The run's config as a dict (`{}` when the run has none)."""
        return json.loads(self.config.read_text()) if self.config.is_file() else {}

    def read_metrics(self) -> list[dict[str, Any]]:
        """The records of `metrics.jsonl`.

        Raises:
            FileNotFoundError: the folder has no `metrics.jsonl`.
        """
        if not self.metrics.is_file():
            raise FileNotFoundError(
                f"{self.metrics} does not exist: is {self.root} the output_dir of a federated run?"
            )
        return parse_records(self.metrics.read_text())

    def client_ids(self, records: Iterable[dict[str, Any]] | None = None) -> list[str]:
        """The clients of the run in their order (from the base-model records), each checked with
        [`check_client_id`]."""
        records = self.read_metrics() if records is None else records
        out: list[str] = []
        for r in records:
            if "client" in r and int(r["round"]) < 0 and r["client"] not in out:
                out.append(check_client_id(r["client"]))
        return out


def parse_records(text: str) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl` text."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def records_text(records: Iterable[dict[str, Any]]) -> str:
    """The `metrics.jsonl` text of `records` (one JSON object per line, the records' own key order)."""
    return "".join(json.dumps(r) + "\n" for r in records)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a run's `metrics.jsonl` (see the module docstring for the schema)."""
    return RunFolder(run_dir).read_metrics()


# ---------------------------------------------------------------------- client state files


def save_client_state(path: str | os.PathLike, state, extra: dict[str, torch.Tensor] | None = None, info=None) -> Path:
    """Write a client's adapter state atomically: LoRA tensors under `t/`, keep-masks as uint8 under `m/`, the search
    progress as the JSON metadata `meta`; `extra` tensors (kept under their own prefixes) and `info` (JSON, stored as a uint8 tensor)
    ride along (the coordinator's per-client round results use them).

    Returns:
        `Path`: the written file.
    """
    tensors, masks, meta = state
    blob = {f"t/{k}": v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    blob.update({f"m/{k}": m.detach().to("cpu", torch.uint8).contiguous() for k, m in (masks or {}).items()})
    blob.update({k: v.detach().to("cpu").contiguous() for k, v in (extra or {}).items()})
    # One metadata key only: safetensors writes the metadata map in a per-process random order (a Rust HashMap), so
    # a second key would make identical runs differ in bytes. `info` travels as a uint8 tensor instead.
    metadata = {"meta": json.dumps(meta, sort_keys=True)}
    if info is not None:
        blob[INFO_KEY] = torch.tensor(list(json.dumps(info, sort_keys=True).encode("utf-8")), dtype=torch.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    save_file(blob, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def load_client_state(path: str | os.PathLike, with_extra: bool = False):
    """Read a file written by [`save_client_state`]: `(tensors, masks, meta)` (masks `{}` when none), and with
    `with_extra` also `(extra tensors, info)`."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    blob = load_file(str(path))
    tensors = {k[2:]: v for k, v in blob.items() if k.startswith("t/")}
    masks = {}
    for k, v in blob.items():
        if k.startswith("m/"):
            # a keep-mask is 0/1 (uint8 or bool); anything else was not written by save_client_state
            if v.dtype not in (torch.uint8, torch.bool) or bool((v.to(torch.uint8) > 1).any()):
                raise ValueError(
                    f"{path}: the keep-mask {k[2:]!r} holds values other than 0/1 ({v.dtype}); the client state "
                    "was edited or damaged. Restore it, or resume from a checkpoint that verifies (see "
                    "docs/federated.md, Resume)."
                )
            masks[k[2:]] = v.bool()
    state = (tensors, masks, json.loads(metadata.get("meta", "{}")))
    if not with_extra:
        return state
    extra = {k: v for k, v in blob.items() if not k.startswith(("t/", "m/")) and k != INFO_KEY}
    info = json.loads(bytes(blob[INFO_KEY].tolist()).decode("utf-8")) if INFO_KEY in blob else None
    return state, extra, info


class StateCache:
    """Client states `(tensors, masks, meta)` kept in memory, least recently used first, within a byte budget
    (`client_state_memory_mb`): the in-process engine's states and a Flower ClientApp process's copies of what it
    saved. A state larger than the whole budget is not kept; the disk stays the truth in both.

    Args:
        budget_mb (`float`): the budget in MiB.
    """

    def __init__(self, budget_mb: float) -> None:
        self._items: OrderedDict[str, tuple[Any, Any, int]] = OrderedDict()  # key -> (tag, state, bytes)
        self._bytes = 0
        self.resize(budget_mb)

    def resize(self, budget_mb: float) -> None:
        """Set the budget (MiB), evicting the least recently used states over it at once."""
        self.budget_bytes = int(float(budget_mb) * 2**20)
        self._evict()

    def _evict(self) -> None:
        while self._bytes > self.budget_bytes:
            _, (_, _, old) = self._items.popitem(last=False)
            self._bytes -= old

    @staticmethod
    def nbytes(state: Any) -> int:
        tensors, masks, _ = state
        return sum(t.numel() * t.element_size() for t in tensors.values()) + sum(
            m.numel() for m in (masks or {}).values()
        )

    def get(self, key: str, tag: Any = None) -> Any:
        """The state kept under `key` (marked most recently used) when its tag is `tag`, else `None`."""
        hit = self._items.get(key)
        if hit is None or hit[0] != tag:
            return None
        self._items.move_to_end(key)
        return hit[1]

    def put(self, key: str, state: Any, tag: Any = None) -> None:
        """Keep `state` under `key` (replacing what was there), evicting the least recently used over the budget."""
        self.pop(key)
        size = self.nbytes(state)
        if size > self.budget_bytes:
            return
        self._items[key] = (tag, state, size)
        self._bytes += size
        self._evict()

    def pop(self, key: str) -> None:
        hit = self._items.pop(key, None)
        if hit is not None:
            self._bytes -= hit[2]

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0


class ClientStateStore:
    """Versioned adapter state of one client, on its own disk (the Flower ClientApp's store).

    One safetensors file per round the client trained (`round_{r}.safetensors`, the format of
    [`save_client_state`]), written atomically.

    Args:
        root (`str` or `os.PathLike`): the client's own state folder (created on first write).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def _path(self, round_idx: int) -> Path:
        return self.root / f"round_{int(round_idx)}.safetensors"

    def versions(self) -> list[int]:
        """The rounds with a stored version, ascending."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.glob("round_*.safetensors"):
            try:
                out.append(int(p.stem.split("_", 1)[1]))
            except ValueError:
                continue
        return sorted(out)

    def reset(self) -> None:
        """Forget every version (a new run starts)."""
        if self.root.exists():
            shutil.rmtree(self.root)

    def load(self, round_idx: int | None):
        """The state the client had after round `round_idx`; `None` (or a negative round) means "no state yet".

        Raises:
            FileNotFoundError: the server accepted round `round_idx` from this client, but its version is gone (its
                state folder was deleted or belongs to another machine).
        """
        if round_idx is None or round_idx < 0:
            return None
        path = self._path(round_idx)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist: the server accepted this client's round {round_idx}, but its state is gone "
                f"(stored versions: {self.versions()}). Was the client's state folder deleted during the run?"
            )
        return load_client_state(path)

    def save(self, round_idx: int, state, keep: int | None = None) -> Path:
        """Write the state after round `round_idx` atomically, then delete every other version but `keep` (the last
        accepted one, still needed if this round's upload is lost).

        Returns:
            `Path`: the written file.
        """
        path = save_client_state(self._path(round_idx), state)
        for r in self.versions():
            if r != round_idx and r != keep:
                self._path(r).unlink(missing_ok=True)
        return path


# ---------------------------------------------------------------------- crash points (tests only)

CRASH_ENV = "HF_PERFIT_CRASH_AT"


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL when the environment variable `HF_PERFIT_CRASH_AT` equals `name`.

    Only tests set it (tests/test_crash.py): it marks the instants of a round at which a kill must leave a run that
    `--resume` either reproduces bit for bit or refuses. Names: `round{r}.client{i}.after_train`,
    `round{r}.client{i}.after_save`, `round{r}.after_aggregate`, `round{r}.after_evaluate`,
    `checkpoint{c}.after_files`, `checkpoint{c}.after_manifest`, `checkpoint{c}.after_rename`,
    `checkpoint{c}.after_commit`, `export.client{i}`.
    """
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


__all__ = [
    "ClientStateStore",
    "RunFolder",
    "check_client_id",
    "crash_point",
    "load_client_state",
    "parse_records",
    "read_metrics",
    "records_text",
    "save_client_state",
]
