"""The transport-agnostic coordinator of a federated run.

```
                 Coordinator  (sampling, seeds, strategy calls, evaluation plan, records, checkpoint/resume, export)
                /           \\
   InProcessTransport     Flower transport            <- Transport protocol: fit / evaluate / export / state hooks
   (one process, one      (ServerApp: Grid messages,
    shared model)          state and evaluation on the nodes)
                \\           /
                  Strategy  (pure tensor code: configure_round / configure_client / aggregate / personalized_tensors)
```

The [`Coordinator`] owns one round end to end and everything that must be identical whatever carries the messages:

1. sampling: `random.Random(seed * 1000 + r).sample(range(K), max(1, round(fraction_clients * K)))`, sorted;
2. per-client seeds: `seed * 100003 + r * 1009 + k` for client index `k`;
3. `strategy.configure_round(r, ids)`, then `strategy.configure_client(cid, r)` for every sampled client, in order;
4. `transport.fit(r, jobs, on_result)`; every result is persisted atomically (`state/pending_<r>/<cid>.safetensors`)
   as it arrives, so a restarted round reuses it instead of training that client again;
5. `strategy.aggregate(r, updates)` over the clients that returned an update, in sampling order;
   `transport.accept(r, accepted, rejected)` (a rejected/failed client rolls back to its last accepted state);
6. evaluation of the personalized adapters (`strategy.personalized_tensors`) through `transport.evaluate`;
7. records (schema in [`hf_perfit.federated.run`]) and one checkpoint committed as a unit
   ([`hf_perfit.federated.checkpoint`]); round callbacks;
8. after the last round: optional local fine-tuning (`finetune_steps`), export, `results.md`, plots, Hub push.

A transport implements [`Transport`]. Its contract, for a port (e.g. Flower's `ServerApp`):

- `start()` -> [`Roster`]: the client ids in partition order (index `k` = position), the initial adapter (identical
  on every client), and whether the client-side state lives with the coordinator (`True` in-process: then
  [`FitResult.state`] is filled and persisted with the result) or on the clients (Flower: `state=None`).
- `fit(r, jobs, on_result) -> failures`: train every [`FitJob`]; call `on_result(client_id, FitResult)` once per
  client that succeeded, as soon as it is known (the coordinator persists it before the call returns); return
  `{client_id: reason}` for the others. A client must train from the state of round `job.state_round` (its last
  accepted round, `None` = no state yet), never from a rejected round.
- `evaluate(r, jobs) -> (metrics, failures)`: per [`EvalJob`], `{eval_loss, perplexity, num_examples}` (+ `density`
  when `job.uses_masks`) of `job.tensors` with the client's own masks/search meta (`job.base`: the base model with the
  adapter disabled).
- `local_tensors(client_id)`: the adapter the client last uploaded and the coordinator accepted (what
  `Strategy.personalized_tensors` personalizes), or `None` when it never trained.
- `accept(r, accepted, rejected)`: commit the accepted clients' states of round `r`, roll back the rejected ones.
- `adopt(r, job, result)`: a result of round `r` reused from disk after a restart (before `accept`).
- `write_state(folder, previous)` / `restore_state(folder)` / `committed(folder)`: the transport's part of a
  checkpoint (the in-process transport writes the client states there; Flower can keep its cache of uploads).
- `export(jobs)`: write each client's final adapter to `<output_dir>/clients/<client_id>/adapter` (on the nodes for
  Flower). It is called after the last checkpoint, also when a resumed run had nothing left to train, so a transport
  that exports during the `final` evaluation must still export here when that evaluation did not run in this process.

Base-model evaluation is `evaluate(-1, jobs)` with `job.base=True` (a transport may answer it from what it measured
in `start()`, as Flower's hello does). Wiring a transport: `Coordinator(config, transport).run()`; the constructor
runs the non-destructive output-folder checks ([`check_output_dir`]) and `run()` calls [`Coordinator.prepare`]
(`transport.start()`, then overwrite/resume/fresh start) before the first round.
- `is_main_process` / `barrier()`: multi-process launches (only the main process writes files).

A round, step by step. [`run`] drives every round itself; code that receives the clients' replies on its own
schedule (a Flower `Strategy`, whose `configure_*` / `aggregate_*` calls Flower makes) drives the same round through
the same public calls, after [`prepare`]:

```
sampled, ids, jobs = coordinator.plan_round(r)               # 1. sampling, seeds, strategy.configure_*
...the clients train `jobs`...; for each result: coordinator.save_result(r, client_id, result)   # 2.
round_metrics = coordinator.aggregate_round(r, ids, results, failures)   # 3. strategy.aggregate, accept
jobs = coordinator.eval_jobs(r, sampled)                     # 4. what each client is evaluated on
summary = coordinator.finish_round(r, jobs, results, failures, round_metrics)   # 5. evaluate, records
coordinator.commit_round(r, summary)                         # 6. checkpoint, round callbacks
coordinator.finish_run(summary)                              # after the last round: export, results, Hub push
```

[`run`] is exactly these calls with `transport.fit` in step 2 (and the fine-tuning phase after the last round).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .._io import atomic_write_json, atomic_write_text
from .checkpoint import CheckpointError, begin_checkpoint, clean_state, commit_checkpoint, read_checkpoint
from .config import FederatedConfig
from .messages import ClientInstruction, ClientUpdate
from .run import (
    COORDINATOR_FILE,
    METRICS_FILE,
    STRATEGY_FILE,
    RunFolder,
    check_client_id,
    crash_point,
    load_client_state,
    parse_records,
    records_text,
    save_client_state,
)
from .strategies import Strategy, get_strategy

RESUME_SAFE_KEYS = frozenset(
    {
        "output_dir",
        "resume",
        "overwrite",
        "push_to_hub",
        "hub_repo_prefix",
        "hub_private",
        "eval_batch_size",
        "trust_remote_code",
        "gradient_checkpointing",
        "client_state_memory_mb",
    }
)
"""Config keys `--resume` lets change: where outputs go, whether to push, and memory/speed knobs that do not change
the training (a different `eval_batch_size` can change the last bits of later evaluations, never an adapter).
Every other key changes the result, and a resume with a changed value is refused, naming the keys."""


# ---------------------------------------------------------------------- messages between coordinator and transport


@dataclass
class Roster:
    """What a transport reports at the start: the clients, the initial adapter, where client state lives."""

    client_ids: list[str]
    initial_tensors: dict[str, torch.Tensor]
    state_with_coordinator: bool = True


@dataclass
class FitJob:
    """One client's training in one round.

    Args:
        client_id: the client. index: its partition index `k` (seed and budget multiplier).
        round_idx: the round (`num_rounds` for the fine-tuning phase).
        instruction: what the strategy sends. seed: the seed of this client round.
        budget_multiplier: PerFIT's `b_k`. uses_masks: `Strategy.uses_masks`.
        state_round: the last round whose state of this client the coordinator accepted (`None`: none yet).
        local_steps: overrides the config's `local_steps` (the fine-tuning phase).
        evaluate_local: also evaluate the trained adapter before aggregation (`local_eval_loss`, `local_perplexity`).
    """

    client_id: str
    index: int
    round_idx: int
    instruction: ClientInstruction
    seed: int
    budget_multiplier: float
    uses_masks: bool
    state_round: int | None
    local_steps: int | None = None
    evaluate_local: bool = False


@dataclass
class FitResult:
    """A client's training result.

    Args:
        update: the upload the strategy aggregates.
        metrics: per-record numbers: `bytes_up`, `bytes_down`, `train_loss`, `density`, and optionally
            `local_eval_loss`, `local_perplexity` or transport-specific ones (e.g. Flower's `wire_bytes_up`).
        state: the client's new state `(tensors, masks, meta)` when it lives with the coordinator, else `None`.
    """

    update: ClientUpdate
    metrics: dict[str, Any]
    state: Any = None


@dataclass
class EvalJob:
    """One client's evaluation: `tensors` (with its own masks and search meta), or the base model (`base=True`).
    `final` marks the run's last evaluation (a transport may export there)."""

    client_id: str
    index: int
    round_idx: int
    tensors: dict[str, torch.Tensor] | None
    uses_masks: bool
    state_round: int | None
    base: bool = False
    final: bool = False


@runtime_checkable
class Transport(Protocol):
    """How the coordinator reaches the clients (see the module docstring for the contract)."""

    is_main_process: bool

    def barrier(self) -> None: ...

    def start(self) -> Roster: ...

    def fit(
        self, round_idx: int, jobs: Sequence[FitJob], on_result: Callable[[str, FitResult], None]
    ) -> dict[str, str]: ...

    def evaluate(
        self, round_idx: int, jobs: Sequence[EvalJob]
    ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]: ...

    def local_tensors(self, client_id: str) -> dict[str, torch.Tensor] | None: ...

    def accept(self, round_idx: int, accepted: Sequence[str], rejected: Sequence[str]) -> None: ...

    def adopt(self, round_idx: int, job: FitJob, result: FitResult) -> None: ...

    def write_state(self, folder: Path, previous: Path | None) -> None: ...

    def restore_state(self, folder: Path) -> None: ...

    def committed(self, folder: Path) -> None: ...

    def export(self, jobs: Sequence[EvalJob]) -> None: ...


@dataclass
class RoundCallback:
    """Hooks called by the coordinator (subclass and override; all default to nothing)."""

    def on_round_end(self, coordinator: Coordinator, round_idx: int, summary: dict[str, Any]) -> None:
        return None

    def on_run_end(self, coordinator: Coordinator, summary: dict[str, Any]) -> None:
        return None


# ---------------------------------------------------------------------- per-client results on disk


def save_fit_result(path: Path, result: FitResult) -> None:
    """Persist one client's round result atomically, in the client-state format (so the file doubles as the
    client's state file and a checkpoint hard-links it instead of writing it again)."""
    u = result.update
    state = result.state
    info: dict[str, Any] = {
        "client_id": u.client_id,
        "num_examples": int(u.num_examples),
        "mask_changed": bool(u.mask_changed),
        "update_metrics": u.metrics,
        "metrics": result.metrics,
        "has_state": state is not None,
    }
    extra: dict[str, torch.Tensor] = {f"x/{k}": v for k, v in u.extra_tensors.items()}
    if state is None:
        state = (u.tensors, {}, {})
        info["update_tensors"] = "state"
    elif u.tensors is state[0]:
        info["update_tensors"] = "state"
    elif _part_of(u.tensors, state[0]):  # the state's tensors less the client's personal ones (perfit personal_b)
        info["update_tensors"] = "state"
        info["update_keys"] = list(u.tensors)
    else:
        info["update_tensors"] = "own"
        extra.update({f"u/{k}": v for k, v in u.tensors.items()})
    if u.masks is None:
        info["update_masks"] = None
    elif state[1] is not None and (u.masks is state[1] or _part_of(u.masks, state[1])):
        info["update_masks"] = "state"
        if u.masks is not state[1]:
            info["update_mask_keys"] = list(u.masks)
    else:
        info["update_masks"] = "own"
        extra.update({f"um/{k}": v.to(torch.uint8) for k, v in u.masks.items()})
    save_client_state(path, state, extra=extra, info=info)


def load_fit_result(path: Path) -> FitResult:
    """Read a result written by [`save_fit_result`]."""
    (tensors, masks, meta), extra, info = load_client_state(path, with_extra=True)
    if info is None:
        raise ValueError(f"{path} is not a round result (no 'info' metadata).")
    own = {k[2:]: v for k, v in extra.items() if k.startswith("u/")}
    own_masks = {k[3:]: v.bool() for k, v in extra.items() if k.startswith("um/")}
    upd_masks = {"state": masks, "own": own_masks, None: None}[info["update_masks"]]
    if "update_mask_keys" in info:
        upd_masks = {k: upd_masks[k] for k in info["update_mask_keys"]}
    upd_tensors = tensors if info["update_tensors"] == "state" else own
    if "update_keys" in info:
        upd_tensors = {k: upd_tensors[k] for k in info["update_keys"]}
    update = ClientUpdate(
        client_id=info["client_id"],
        num_examples=int(info["num_examples"]),
        tensors=upd_tensors,
        masks=upd_masks,
        mask_changed=bool(info["mask_changed"]),
        metrics=dict(info["update_metrics"]),
        extra_tensors={k[2:]: v for k, v in extra.items() if k.startswith("x/")},
    )
    state = (tensors, masks, meta) if info["has_state"] else None
    return FitResult(update=update, metrics=dict(info["metrics"]), state=state)


def _part_of(part: Mapping[str, torch.Tensor], whole: Mapping[str, torch.Tensor]) -> bool:
    """Whether every tensor of `part` is the very tensor object of `whole` under the same key (a sub-dict)."""
    return all(k in whole and whole[k] is t for k, t in part.items())


# ---------------------------------------------------------------------- the coordinator


class Coordinator:
    """Runs a [`FederatedConfig`] over a [`Transport`].

    Build it, call [`prepare`] once the transport has loaded everything it needs (so `--overwrite` deletes nothing
    before every check passed), then [`run`].

    Args:
        config ([`FederatedConfig`]): the run.
        transport ([`Transport`]): how the clients are reached.
        strategy ([`Strategy`], *optional*): defaults to `get_strategy(config.strategy, **resolved options)`.
        callbacks (`list[RoundCallback]`, *optional*): round hooks.
        check (`bool`, defaults to `True`): run [`check_output_dir`] now (pass `False` when the caller already did).
    """

    def __init__(
        self,
        config: FederatedConfig,
        transport: Transport,
        strategy: Strategy | None = None,
        callbacks: Sequence[RoundCallback] = (),
        check: bool = True,
    ) -> None:
        self.config = config
        self.transport = transport
        self.run_folder = RunFolder(config.output_dir)
        self.out = self.run_folder.root
        self.strategy = strategy or get_strategy(config.strategy, **config.resolved_strategy_options())
        self.callbacks = list(callbacks)
        self.client_ids: list[str] = []
        self.client_rounds: dict[str, int] = {}  # last round whose state the coordinator accepted, per client
        self.records: list[dict[str, Any]] = []
        self.completed_rounds = 0
        self.initial_tensors: dict[str, torch.Tensor] = {}
        self._prepared = False
        if check:  # non-destructive: a foreign folder, a missing checkpoint, a changed config
            check_output_dir(config)

    # ------------------------------------------------------------------ set-up

    @property
    def is_main_process(self) -> bool:
        return self.transport.is_main_process

    @property
    def total_rounds(self) -> int:
        """Rounds plus the fine-tuning phase (one more "round", index `num_rounds`) when `finetune_steps > 0`."""
        return self.config.num_rounds + (1 if self.config.finetune_steps > 0 else 0)

    def prepare(self) -> None:
        """Start the transport, then (every check passed) replace the output folder (`overwrite`), restore the last
        checkpoint (`resume`), or start fresh: base-model evaluation and the round-0 checkpoint."""
        cfg = self.config
        roster = self.transport.start()
        self.client_ids = [check_client_id(c) for c in roster.client_ids]
        if len(set(self.client_ids)) != len(self.client_ids):
            raise ValueError(f"the clients' ids are not unique: {self.client_ids}.")
        self.initial_tensors = roster.initial_tensors
        self.transport.barrier()  # every process checked the output folder before the main one changes it
        if cfg.resume:
            self._restore()
        else:
            if self.is_main_process:
                if cfg.overwrite and self.out.exists():
                    shutil.rmtree(self.out)  # recognisably ours (check_output_dir), and every check has passed
                elif self.run_folder.state.exists():
                    shutil.rmtree(self.run_folder.state)  # ours, with no committed round (check_output_dir)
                self.out.mkdir(parents=True, exist_ok=True)
                self.run_folder.write_marker()
                atomic_write_json(self.run_folder.config, cfg.to_dict())
            self.transport.barrier()
            self.strategy.initialize(self.initial_tensors)
            jobs = [self._eval_job(-1, cid, base=True) for cid in self.client_ids]
            metrics, failed = self.transport.evaluate(-1, jobs)
            if failed:
                raise RuntimeError(f"the base-model evaluation failed on {_describe_failures(failed)}.")
            records = [self._record(-1, cid, metrics[cid], base=True) for cid in self.client_ids]
            self.records = records + [self._summary(-1, records, {}, {})]
            self._write_checkpoint(0)
        self._prepared = True

    def _restore(self) -> None:
        ckpt = read_checkpoint(self.run_folder)
        folder = ckpt.folder
        coord = json.loads((folder / COORDINATOR_FILE).read_text())
        if coord["client_ids"] != self.client_ids:
            raise CheckpointError(
                f"--resume: the checkpoint's clients {coord['client_ids']} differ from this run's {self.client_ids}; "
                "resume with the same data."
            )
        tensors = load_file(str(folder / STRATEGY_FILE))
        self.strategy.load_state_dict(tensors, ckpt.pointer["strategy_meta"])
        self.records = parse_records((folder / METRICS_FILE).read_text())
        self.client_rounds = {k: int(v) for k, v in coord["client_rounds"].items()}
        self.completed_rounds = ckpt.completed_rounds
        self.transport.restore_state(folder)
        if self.is_main_process:  # the top-level copy may be a round behind (a kill before it was rewritten)
            atomic_write_text(self.run_folder.metrics, records_text(self.records))
            clean_state(self.run_folder, keep=folder.name, completed=self.completed_rounds)  # a kill's leftovers
        self.transport.barrier()

    def _budget(self, index: int) -> float:
        mult = self.config.budget_multipliers
        return 1.0 if mult is None else float(mult[index])

    def _seed(self, round_idx: int, index: int) -> int:
        return self.config.seed * 100003 + round_idx * 1009 + index

    def sample(self, round_idx: int) -> list[int]:
        """The indices of the clients sampled in round `round_idx` (sorted)."""
        rng = random.Random(self.config.seed * 1000 + round_idx)
        k = max(1, round(self.config.fraction_clients * len(self.client_ids)))
        return sorted(rng.sample(range(len(self.client_ids)), k))

    def eval_clients(self, round_idx: int, sampled: Sequence[int]) -> list[int]:
        """The indices evaluated after round `round_idx`: all clients (`eval_clients="all"`, and in the final round),
        else the sampled ones."""
        mode = self.config.resolved_eval_clients()
        if mode == "all" or round_idx >= self.config.num_rounds - 1:
            return list(range(len(self.client_ids)))
        return list(sampled)

    @property
    def evaluate_local_model(self) -> bool:
        return bool(self.config.eval_local_model or getattr(self.strategy, "evaluate_local_model", False))

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        """Run (or resume) every round, the fine-tuning phase, the export; returns the last summary record."""
        if not self._prepared:
            self.prepare()
        cfg = self.config
        n = len(self.client_ids)
        summary = self.records[-1]
        self._bar = tqdm(
            total=self.total_rounds * n,
            initial=min(self.completed_rounds, self.total_rounds) * n,
            desc="rounds",
            disable=not self.is_main_process,
        )
        try:
            for r in range(self.completed_rounds, self.total_rounds):
                if r < cfg.num_rounds:
                    summary = self._round(r)
                else:
                    summary = self._finetune(r)
                self.commit_round(r, summary)
        finally:
            self._bar.close()
        self.finish_run(summary)
        return summary

    def _fit(self, r: int, jobs: list[FitJob]) -> tuple[dict[str, FitResult], dict[str, str]]:
        """Reuse the results persisted before a restart, train the others; every new result is persisted first."""
        pending = self.run_folder.pending_dir(r)
        results: dict[str, FitResult] = {}
        todo = []
        for job in jobs:
            path = pending / f"{job.client_id}.safetensors"
            if path.is_file():
                result = load_fit_result(path)
                self.transport.adopt(r, job, result)
                results[job.client_id] = result
                self._bar.update(1)
            else:
                todo.append(job)
        index = {j.client_id: j.index for j in jobs}

        def on_result(cid: str, result: FitResult) -> None:
            crash_point(f"round{r}.client{index[cid]}.after_train")
            self.save_result(r, cid, result)
            crash_point(f"round{r}.client{index[cid]}.after_save")
            results[cid] = result
            self._bar.set_postfix_str(f"round {r} client {cid}")
            self._bar.update(1)

        failures = self.transport.fit(r, todo, on_result) if todo else {}
        self.transport.barrier()
        return results, dict(failures)

    # ------------------------------------------------------------------ a round, step by step (public)

    def plan_round(self, r: int) -> tuple[list[int], list[str], list[FitJob]]:
        """Step 1 of a round: sample round `r`'s clients, let the strategy configure the round, and build one
        [`FitJob`] per sampled client.

        Returns:
            `(sampled, ids, jobs)`: the sampled client indices (sorted), their ids, and their jobs in that order.
        """
        sampled = self.sample(r)
        ids = [self.client_ids[i] for i in sampled]
        self.strategy.configure_round(r, ids)
        jobs = [
            FitJob(
                client_id=self.client_ids[i],
                index=i,
                round_idx=r,
                instruction=self.strategy.configure_client(self.client_ids[i], r),
                seed=self._seed(r, i),
                budget_multiplier=self._budget(i),
                uses_masks=self.strategy.uses_masks,
                state_round=self.client_rounds.get(self.client_ids[i]),
                evaluate_local=self.evaluate_local_model,
            )
            for i in sampled
        ]
        return sampled, ids, jobs

    def save_result(self, r: int, client_id: str, result: FitResult) -> None:
        """Step 2 (for each result, as soon as it arrives): persist a client's round-`r` result atomically to
        `state/pending_<r>/<client_id>.safetensors` (the main process only), so a restarted round reuses it instead
        of training that client again. A transport's `fit` gets this through `on_result`; a caller that trains
        outside [`run`] (a Flower `Strategy`) calls it for each decoded result."""
        if self.is_main_process:
            save_fit_result(self.run_folder.pending_dir(r) / f"{client_id}.safetensors", result)

    def aggregate_round(
        self, r: int, ids: Sequence[str], results: Mapping[str, FitResult], failures: Mapping[str, str]
    ) -> dict[str, float]:
        """Step 3: aggregate the updates of the sampled clients `ids` that returned one (`strategy.aggregate`, in
        sampling order), commit their states (`transport.accept`; the others roll back) and remember each accepted
        client's round.

        Returns:
            `dict[str, float]`: the strategy's round metrics.

        Raises:
            RuntimeError: none of the sampled clients returned an update (`failures` say why).
        """
        accepted = [cid for cid in ids if cid in results]
        if not accepted:
            raise RuntimeError(
                f"round {r}: none of the {len(ids)} sampled clients returned an update ({_describe_failures(failures)})."
            )
        round_metrics = self.strategy.aggregate(r, [results[cid].update for cid in accepted])
        self.transport.accept(r, accepted, [cid for cid in ids if cid not in results])
        for cid in accepted:
            self.client_rounds[cid] = r
        crash_point(f"round{r}.after_aggregate")
        return round_metrics

    def eval_jobs(self, r: int, sampled: Sequence[int]) -> list[EvalJob]:
        """Step 4: the evaluation plan of round `r`: one [`EvalJob`] (the personalized tensors,
        `Strategy.personalized_tensors`) per evaluated client ([`eval_clients`]); `final` in the run's last round."""
        final = r == self.total_rounds - 1
        return [self._eval_job(r, self.client_ids[i], final=final) for i in self.eval_clients(r, sampled)]

    def finish_round(
        self,
        r: int,
        eval_jobs: Sequence[EvalJob],
        results: Mapping[str, FitResult],
        failures: Mapping[str, str],
        round_metrics: Mapping[str, float],
    ) -> dict[str, Any]:
        """Step 5: evaluate `eval_jobs` (`transport.evaluate`) and add the round's records: one per evaluated client
        (with its training numbers from `results`, `failed` from `failures` and evaluation failures) and the
        summary (with `round_metrics`).

        Returns:
            `dict[str, Any]`: the round's summary record.
        """
        return self._finish_round(r, eval_jobs, results, failures, round_metrics)

    def commit_round(self, r: int, summary: dict[str, Any]) -> None:
        """Step 6: commit the checkpoint after round `r` (one unit: strategy, records, client states, the
        transport's part) and call the round callbacks with `summary`."""
        self._checkpoint(r + 1, self.records)
        for cb in self.callbacks:
            cb.on_round_end(self, r, summary)

    def finish_run(self, summary: dict[str, Any]) -> None:
        """After the last round: export every client's final adapter (`transport.export`), write `results.md` and
        the plots, push to the Hub (`push_to_hub`), and call the run callbacks with the last `summary`."""
        self._export()
        if self.config.push_to_hub and self.is_main_process:
            from ..hub import push_run

            push_run(self.out, self.config.hub_repo_prefix, private=self.config.hub_private)
        for cb in self.callbacks:
            cb.on_run_end(self, summary)

    def _round(self, r: int) -> dict[str, Any]:
        """One round through the public steps, the transport's `fit` in between."""
        sampled, ids, jobs = self.plan_round(r)
        results, failures = self._fit(r, jobs)
        round_metrics = self.aggregate_round(r, ids, results, failures)
        self._bar.update(len(self.client_ids) - len(sampled))
        return self.finish_round(r, self.eval_jobs(r, sampled), results, failures, round_metrics)

    def _finetune(self, r: int) -> dict[str, Any]:
        """Every client fine-tunes its final personalized adapter for `finetune_steps` local steps (no aggregation);
        the fine-tuned adapter is what is evaluated and exported."""
        jobs = []
        for i, cid in enumerate(self.client_ids):
            instruction = self.strategy.finetune_instruction(cid, self._personalized(cid))
            jobs.append(
                FitJob(
                    client_id=cid,
                    index=i,
                    round_idx=r,
                    instruction=instruction,
                    seed=self._seed(r, i),
                    budget_multiplier=self._budget(i),
                    uses_masks=self.strategy.uses_masks,
                    state_round=self.client_rounds.get(cid),
                    local_steps=self.config.finetune_steps,
                    evaluate_local=False,
                )
            )
        results, failures = self._fit(r, jobs)
        accepted = [cid for cid in self.client_ids if cid in results]
        self.transport.accept(r, accepted, [cid for cid in self.client_ids if cid not in results])
        for cid in accepted:
            self.client_rounds[cid] = r
        crash_point(f"round{r}.after_aggregate")
        eval_jobs = [self._eval_job(r, cid, final=True) for cid in self.client_ids]
        return self._finish_round(r, eval_jobs, results, failures, {})

    def _finish_round(self, r, eval_jobs, results, failures, round_metrics) -> dict[str, Any]:
        metrics, eval_failed = self.transport.evaluate(r, eval_jobs)
        crash_point(f"round{r}.after_evaluate")
        failed = {cid: f"train: {why}" for cid, why in failures.items()}
        for cid, why in eval_failed.items():
            failed[cid] = f"{failed[cid]}; evaluate: {why}" if cid in failed else f"evaluate: {why}"
        round_records = []
        for job in eval_jobs:
            if job.client_id not in metrics:
                continue
            rec = self._record(r, job.client_id, metrics[job.client_id])
            res = results.get(job.client_id)
            comm = {"bytes_up": 0, "bytes_down": 0, "trained": False}
            if res is not None:
                m = dict(res.metrics)
                comm = {
                    "bytes_up": m.pop("bytes_up"),
                    "bytes_down": m.pop("bytes_down"),
                    "train_loss": m.pop("train_loss"),
                    "trained": True,
                    "density": m.pop("density"),
                    **m,
                }
            rec.update(comm)
            rec["budget_multiplier"] = self._budget(job.index)
            if r >= self.config.num_rounds:
                rec["finetune"] = True
            if job.client_id in failed:
                rec["failed"] = failed[job.client_id]
            round_records.append(rec)
        # the trained clients' numbers when not every trained client was evaluated (their records are absent)
        summary = self._summary(r, round_records, round_metrics, failed)
        if r >= self.config.num_rounds:
            summary["finetune"] = True
        self.records += round_records + [summary]
        return summary

    def _personalized(self, cid: str) -> dict[str, torch.Tensor]:
        local = self.transport.local_tensors(cid)
        return self.strategy.personalized_tensors(cid, local if local is not None else self.strategy.global_tensors)

    def _eval_job(self, r: int, cid: str, base: bool = False, final: bool = False) -> EvalJob:
        if base:
            tensors = None
        elif r >= self.config.num_rounds:  # after fine-tuning: the client's own fine-tuned adapter
            tensors = self.transport.local_tensors(cid)
        else:
            tensors = self._personalized(cid)
        return EvalJob(
            client_id=cid,
            index=self.client_ids.index(cid),
            round_idx=r,
            tensors=tensors,
            uses_masks=self.strategy.uses_masks,
            state_round=self.client_rounds.get(cid),
            base=base,
            final=final,
        )

    def _record(self, r: int, cid: str, ev: dict[str, Any], base: bool = False) -> dict[str, Any]:
        rec = {
            "round": r,
            "client": cid,
            "strategy": "base" if base else self.config.strategy,
            "eval_loss": ev["eval_loss"],
            "perplexity": ev["perplexity"],
            "num_examples": ev["num_examples"],
            "train_loss": None,
            "bytes_up": 0,
            "bytes_down": 0,
        }
        if not base and self.strategy.uses_masks:
            rec["density"] = ev["density"]
        return rec

    def _summary(self, r: int, recs: list[dict], round_metrics: dict, failed: dict[str, str]) -> dict[str, Any]:
        ppl = [x["perplexity"] for x in recs if x["round"] == r and "client" in x]
        out = {
            "round": r,
            "summary": True,
            "strategy": "base" if r < 0 else self.config.strategy,
            "mean_perplexity": float(np.mean(ppl)) if ppl else math.nan,
            "bytes_up": sum(x.get("bytes_up", 0) for x in recs if x["round"] == r and "client" in x),
            **{k: float(v) for k, v in round_metrics.items()},
        }
        if len(ppl) != len(self.client_ids):
            out["num_evaluated"] = len(ppl)
        if failed:
            out["failed_clients"] = dict(failed)
        return out

    # ------------------------------------------------------------------ checkpoint

    def _checkpoint(self, completed: int, records: list[dict]) -> None:
        """Commit the state after `completed` rounds (benchmarks time rounds by wrapping this method)."""
        self._write_checkpoint(completed)

    def _write_checkpoint(self, completed: int) -> None:
        if self.is_main_process:
            run = self.run_folder
            tmp = begin_checkpoint(run, completed)
            tensors, meta = self.strategy.state_dict()
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / STRATEGY_FILE))
            atomic_write_text(tmp / METRICS_FILE, records_text(self.records))
            atomic_write_json(
                tmp / COORDINATOR_FILE,
                {"client_ids": self.client_ids, "client_rounds": self.client_rounds, "completed_rounds": completed},
            )
            previous = run.round_dir(completed - 1) if completed > 0 else None
            self.transport.write_state(tmp, previous if previous is not None and previous.is_dir() else None)
            crash_point(f"checkpoint{completed}.after_files")
            commit_checkpoint(run, tmp, completed, {"strategy_meta": meta, "config": self.config.to_dict()})
            atomic_write_text(run.metrics, records_text(self.records))
        self.transport.barrier()
        folder = self.run_folder.round_dir(completed)
        self.transport.committed(folder)
        self.completed_rounds = completed

    # ------------------------------------------------------------------ outputs

    def _export(self) -> None:
        """Each client's final adapter (personalized, or fine-tuned), `results.md` and the plots."""
        final_round = self.total_rounds - 1
        jobs = [self._eval_job(final_round, cid, final=True) for cid in self.client_ids]
        self.transport.export(jobs)
        if self.is_main_process:
            self._write_results()
        self.transport.barrier()

    def _write_results(self) -> None:
        from .plots import plot_run

        cfg = self.config
        last = self.total_rounds - 1
        base = {x["client"]: x["perplexity"] for x in self.records if x["round"] == -1 and "client" in x}
        final = {x["client"]: x for x in self.records if x["round"] == last and "client" in x}
        rows = []
        for cid in self.client_ids:
            f = final.get(cid)
            if f is None:
                rows.append(f"| {cid} | {base[cid]:.3f} | failed | - |")
            else:
                density = f"{f['density']:.3f} |" if "density" in f else "- |"
                rows.append(f"| {cid} | {base[cid]:.3f} | {f['perplexity']:.3f} | {density}")
        mean = float(np.mean([f["perplexity"] for f in final.values()])) if final else math.nan
        title = f"# {cfg.strategy}: {cfg.num_rounds} rounds, {len(self.client_ids)} clients"
        if cfg.finetune_steps > 0:
            title += f", then {cfg.finetune_steps} local fine-tuning steps"
        text = (
            title
            + "\n\n| client | base perplexity | personalized perplexity | density |\n|---|---:|---:|---:|\n"
            + "\n".join(rows)
            + f"\n\nMean personalized perplexity: {mean:.3f}\n"
        )
        plots = plot_run(self.out)
        text += "\n" + "".join(f"![{p.stem}]({p.name})\n" for p in plots)
        atomic_write_text(self.run_folder.results, text)


def _describe_failures(failures: dict[str, str]) -> str:
    return "; ".join(f"{cid}: {why}" for cid, why in failures.items()) or "no reply"


# ---------------------------------------------------------------------- output folder checks


def check_output_dir(config: FederatedConfig) -> None:
    """Every check on `output_dir` that needs no model or data, before anything is loaded, written or deleted.

    Raises:
        FileExistsError: a folder that is not one of our runs (refused with or without `--overwrite`), or another
            run's results without `--resume`/`--overwrite`.
        CheckpointError: `--resume` without a resumable checkpoint.
        ValueError: `--resume` with a config that changes the result (the message names the keys).
    """
    run = RunFolder(config.output_dir)
    foreign = run.foreign_entries()
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise FileExistsError(
            f"output_dir {run.root} is not empty and is not an hf_perfit run (it holds {shown}); nothing was written "
            "or deleted. Choose a new or empty folder: --overwrite only replaces a folder that `perfit federate` wrote."
        )
    if config.resume:
        ckpt = read_checkpoint(run)
        stored = ckpt.pointer.get("config") or run.read_config()
        changed = config_changes(stored, config.to_dict())
        if changed:
            detail = ", ".join(f"{k}: {stored.get(k)!r} -> {config.to_dict().get(k)!r}" for k in changed)
            raise ValueError(
                f"--resume with a config that changes the run ({detail}); resuming would mix two runs. Use the "
                f"stored config ({run.config}), or start a new run in another output_dir. Only "
                f"{sorted(RESUME_SAFE_KEYS - {'resume', 'overwrite'})} may change on resume."
            )
        return
    if config.overwrite or not run.root.exists():
        return
    if run.checkpoint.is_file() or run.metrics.is_file():
        raise FileExistsError(
            f"{run.root} holds another run's state; pass --resume to continue it or --overwrite to replace it."
        )


def config_changes(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The keys (outside [`RESUME_SAFE_KEYS`]) whose value differs between a stored and the current config; a key the
    stored config lacks counts as changed unless the current value is that key's default."""
    defaults = {f.name: f.default for f in dataclasses.fields(FederatedConfig) if f.default is not dataclasses.MISSING}
    out = []
    for key in sorted(set(stored) | set(current)):
        if key in RESUME_SAFE_KEYS:
            continue
        old = stored.get(key, defaults.get(key))
        new = current.get(key, defaults.get(key))
        if json.loads(json.dumps(old)) != json.loads(json.dumps(new)):
            out.append(key)
    return out


__all__ = [
    "RESUME_SAFE_KEYS",
    "Coordinator",
    "EvalJob",
    "FitJob",
    "FitResult",
    "Roster",
    "RoundCallback",
    "Transport",
    "check_output_dir",
    "config_changes",
    "load_fit_result",
    "save_fit_result",
]
