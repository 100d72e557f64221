"""hf_perfit's federated strategies as Flower strategies (`flwr.serverapp.strategy.Strategy`).

[`HFPerFITStrategy`] puts any registered hf_perfit strategy (`fedit`, `fedprox`, `perfit`, `fedmut`, `fedqp`,
`fedamole`, `local`) behind Flower's message-based strategy interface, so a user's own `ServerApp` can run it, alone or
inside one of Flower's strategy wrappers:

```python
import yaml
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

from hf_perfit.federated.config import FederatedConfig
from hf_perfit.flower.strategy import HFPerFITStrategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = FederatedConfig.from_dict(yaml.safe_load(open("fedit.yaml")))  # strategy: fedit
    strategy = DifferentialPrivacyClientSideFixedClipping(
        HFPerFITStrategy(config), noise_multiplier=1.0, clipping_norm=0.5, num_sampled_clients=config.num_clients
    )
    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=config.num_rounds)
```

(with the clients' app `hf_perfit.flower.client_app.make_client_app(train_mods=[fixedclipping_mod])`).

The algorithm stays in the hf_perfit strategy object ([`hf_perfit.federated.strategies`]): this class only turns its
[`ClientInstruction`]s into Flower messages and Flower replies into [`ClientUpdate`]s (with the encoders of
[`hf_perfit.flower.records`]), and keeps the run's records.

Mapping onto Flower's round (`server_round` counts from 1 in Flower, hf_perfit's `round_idx = server_round - 1`):

- `configure_train`: on the first call, meet the clients (a `query` message each: partition id, sizes, the initial
  adapter's digest, the base model's perplexity); then sample the round's clients (the in-process simulation's
  sampling and seeds) and build one `train` message per sampled client from `strategy.configure_client`. Entries of
  Flower's `config` (e.g. the DP wrapper's clipping norm) join each message's one `ConfigRecord`.
- `aggregate_train`: decode the replies and call `strategy.aggregate`; returns the new global adapter
  (`ArrayRecord`) and the round metrics.
- `configure_evaluate` / `aggregate_evaluate`: the personalized evaluation of every client
  (`strategy.personalized_tensors`); returns the mean personalized perplexity and writes the round's records.

Arrays changed between the phases by a wrapper (Flower's DP wrappers add noise to the aggregate it returned) are
adopted as the strategy's global adapter `θ_g` before the next message is built, so the clients train from and are
evaluated on what the wrapper released.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result
from flwr.serverapp.strategy import Strategy as FlowerStrategy

from .._io import atomic_write_json, atomic_write_text
from ..federated.config import FederatedConfig
from ..federated.messages import ClientInstruction, ClientUpdate
from ..federated.plots import plot_run
from ..federated.strategies import Strategy, get_strategy
from ..federated.strategies.base import GLOBAL_PREFIX
from .records import (
    META,
    METRICS,
    OWN,
    array_bytes,
    arrays_to_tensors,
    decode_update,
    encode_instruction,
    encode_tensors,
    tensors_to_arrays,
)
from .transport import REPORT_NAME, FlowerRunOptions, describe_error, send_and_receive

__all__ = ["REPORT_NAME", "FlowerRunOptions", "HFPerFITStrategy"]

logger = logging.getLogger(__name__)


@dataclass
class _Cached:
    """The server's copy of a client's last accepted upload (it already left the client): the `local_tensors` that
    `Strategy.personalized_tensors` personalizes from, exactly as the simulation reads them from the client state."""

    round_idx: int
    tensors: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor] | None


@dataclass
class _Sent:
    """A message of the current phase, to match its reply (by message id, else by node) and account its bytes."""

    client_id: str
    message: Message


class HFPerFITStrategy(FlowerStrategy):
    """A registered hf_perfit strategy as a Flower `Strategy` (see the module docstring).

    Args:
        config ([`FederatedConfig`]): the run. Every message carries it: the clients build their model, data and
            local training from it. `config.num_rounds` is the number of rounds (the last one exports the clients'
            adapters).
        strategy (`str` or [`~hf_perfit.federated.strategies.Strategy`], *optional*): the algorithm: a registry name
            or a strategy object (not yet initialized; its `name` must be `config.strategy`, since the clients build
            their adapter for it). Default: `get_strategy(config.strategy, **config.resolved_strategy_options())`.
        options ([`FlowerRunOptions`], *optional*): timeouts.
        write_outputs (`bool`, defaults to `True`): write `config.output_dir`'s `metrics.jsonl`, `results.md` and
            `flower_run.json` (set `False` when another component owns the run folder).

    Raises:
        ValueError: a strategy whose name differs from `config.strategy`, or one already initialized.
    """

    def __init__(
        self,
        config: FederatedConfig,
        strategy: str | Strategy | None = None,
        *,
        options: FlowerRunOptions | None = None,
        write_outputs: bool = True,
    ) -> None:
        if strategy is None or isinstance(strategy, str):
            name = config.strategy if strategy is None else strategy
            if name != config.strategy:
                raise ValueError(
                    f"strategy {name!r} differs from the config's strategy {config.strategy!r}: the clients build "
                    "their adapter for the config's; set config.strategy instead."
                )
            strategy = get_strategy(name, **config.resolved_strategy_options())
        elif not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a name or an hf_perfit Strategy, got {type(strategy).__name__}.")
        elif strategy.name != config.strategy:
            raise ValueError(
                f"the strategy object is {strategy.name!r} but config.strategy is {config.strategy!r}: the clients "
                "build their adapter for the config's strategy; make them agree."
            )
        if strategy.is_initialized:
            raise ValueError("pass a fresh strategy: HFPerFITStrategy initializes it from the clients' adapter.")
        self.config = config
        self.strategy: Strategy = strategy
        self.options = options or FlowerRunOptions()
        self.write_outputs = write_outputs
        self.out = Path(config.output_dir)
        self.config_json = json.dumps(config.to_dict(), sort_keys=True)
        self.client_ids: list[str] = []  # by partition id, like FederatedSimulation.clients
        self.nodes: dict[str, int] = {}
        self.accepted: dict[str, _Cached] = {}
        self.failures: list[dict[str, Any]] = []
        self.records: list[dict[str, Any]] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.wall: list[float] = []
        self.final_summary: dict[str, Any] | None = None
        self.round_callbacks: list[Callable[[int, list[dict[str, Any]]], None]] = []
        """Called as `callback(round_idx, records)` after each round's evaluation (`round_idx = -1`: the base model)."""
        self._round: dict[str, Any] = {}

    # ------------------------------------------------------------------ setup

    @property
    def is_set_up(self) -> bool:
        """Whether the clients were met (the first `configure_train` does it)."""
        return bool(self.client_ids)

    def _prepare_output(self) -> None:
        if not self.write_outputs:
            return
        if self.config.overwrite and self.out.exists():
            shutil.rmtree(self.out)
        elif (self.out / REPORT_NAME).exists() or (self.out / "metrics.jsonl").exists():
            raise FileExistsError(f"{self.out} holds another run's results; set overwrite=True to replace them.")
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / "config.json", self.config.to_dict())

    def _budget(self, index: int) -> float:
        mult = self.config.budget_multipliers
        return 1.0 if mult is None else float(mult[index])

    def _meta(self, **extra: Any) -> ConfigRecord:
        return ConfigRecord({"federated-config": self.config_json, **extra})

    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        want = self.config.num_clients
        deadline = time.monotonic() + self.options.node_wait_timeout
        nodes = sorted(grid.get_node_ids())
        while len(nodes) < want and time.monotonic() < deadline:
            time.sleep(min(self.options.poll_interval, 0.5) or 0.01)
            nodes = sorted(grid.get_node_ids())
        if len(nodes) < want:
            raise RuntimeError(
                f"only {len(nodes)} SuperNode(s) connected within node-wait-timeout={self.options.node_wait_timeout}s, "
                f"but the config has num_clients={want}: start one SuperNode per client "
                "(--node-config 'partition-id=<k> num-partitions=<K>')."
            )
        return nodes

    def setup(self, grid: Grid, initial_arrays: ArrayRecord | None = None) -> None:
        """Meet the clients: partition ids, sizes, the initial adapter (checked identical on every node) and the base
        model's perplexity (round -1). The strategy starts from `initial_arrays` when given (non-empty), else from
        the clients' initial adapter. Called by the first `configure_train`; idempotent."""
        if self.is_set_up:
            return
        self._prepare_output()
        nodes = self._wait_for_nodes(grid)
        self.report("running", phase="hello")
        sent = [
            _Sent(
                str(node),
                Message(
                    RecordDict({META: self._meta(**{"send-initial-adapter": i == 0})}),
                    dst_node_id=node,
                    message_type=MessageType.QUERY,
                    group_id="-1",
                ),
            )
            for i, node in enumerate(nodes)
        ]
        replies, failed = self._exchange(grid, sent, self.options.round_timeout)
        if failed:
            detail = "; ".join(f"node {n}: {why}" for n, why in failed.items())
            raise RuntimeError(f"the run cannot start, {len(failed)} SuperNode(s) failed to set up: {detail}")
        by_partition: dict[int, tuple[int, Message]] = {}
        for node_key, reply in replies.items():
            node, pid = int(node_key), int(reply.content[META]["partition-id"])
            if pid in by_partition:
                raise RuntimeError(
                    f"SuperNodes {by_partition[pid][0]} and {node} both have partition-id={pid}; give each its own."
                )
            by_partition[pid] = (node, reply)
        missing = sorted(set(range(self.config.num_clients)) - set(by_partition))
        if missing:
            raise RuntimeError(f"no SuperNode has partition-id {missing} (num_clients={self.config.num_clients}).")
        digests = {str(r.content[META]["adapter-digest"]) for _, r in by_partition.values()}
        if len(digests) != 1:
            raise RuntimeError(
                "the SuperNodes built different initial adapters: every node needs the same base model, the same "
                "hf_perfit version and the same config."
            )
        init = arrays_to_tensors(replies[str(nodes[0])].content["tensors"])
        self.shapes = {k: tuple(t.shape) for k, t in init.items()}
        if initial_arrays is not None and len(initial_arrays) > 0:
            given = arrays_to_tensors(initial_arrays)
            got = {k: tuple(t.shape) for k, t in given.items()}
            if got != self.shapes:
                raise ValueError(
                    "initial_arrays do not fit the clients' adapter (keys or shapes differ); pass an empty "
                    "ArrayRecord() to start from the clients' initial adapter."
                )
            init = given
        self.strategy.initialize(init)
        records = []
        for pid in sorted(by_partition):
            node, reply = by_partition[pid]
            cid = str(reply.content[META]["client-id"])
            m = reply.content[METRICS]
            self.client_ids.append(cid)
            self.nodes[cid] = node
            records.append(
                {
                    "round": -1,
                    "client": cid,
                    "strategy": "base",
                    "eval_loss": float(m["eval_loss"]),
                    "perplexity": float(m["perplexity"]),
                    "num_examples": int(m["num-examples"]),
                    "train_loss": None,
                    "bytes_up": 0,
                    "bytes_down": 0,
                }
            )
        if len(set(self.client_ids)) != len(self.client_ids):
            raise RuntimeError(f"two SuperNodes report the same client id: {self.client_ids}.")
        self._end_round(-1, records, {}, {})

    # ------------------------------------------------------------------ messaging

    def _exchange(
        self, grid: Grid, sent: list[_Sent], timeout: float | None
    ) -> tuple[dict[str, Message], dict[str, str]]:
        """Send the messages of `sent` (to connected nodes only) and collect the replies by client id.

        Returns:
            `(replies, failed)`: the successful replies and, for every other client, why it failed.
        """
        online = set(grid.get_node_ids())
        failed = {
            s.client_id: "its SuperNode is not connected (offline)"
            for s in sent
            if s.message.metadata.dst_node_id not in online
        }
        live = [s for s in sent if s.client_id not in failed]
        replies = send_and_receive(grid, [s.message for s in live], timeout, self.options.poll_interval)
        got, failed_more = self._match(live, replies)
        failed.update(failed_more)
        return got, failed

    @staticmethod
    def _match(sent: list[_Sent], replies: Iterable[Message]) -> tuple[dict[str, Message], dict[str, str]]:
        """Pair replies with the messages of `sent` (by the message id they reply to, else by their source node);
        a sent message without a reply failed."""
        by_id = {s.message.metadata.message_id: s.client_id for s in sent if s.message.metadata.message_id}
        by_node = {s.message.metadata.dst_node_id: s.client_id for s in sent}
        got: dict[str, Message] = {}
        failed: dict[str, str] = {}
        for reply in replies:
            cid = by_id.get(reply.metadata.reply_to_message_id) or by_node.get(reply.metadata.src_node_id)
            if cid is None:
                continue
            if reply.has_error():
                failed[cid] = describe_error(reply)
            else:
                got[cid] = reply
        for s in sent:
            if s.client_id not in got and s.client_id not in failed:
                failed[s.client_id] = "no reply within the phase's timeout"
        return got, failed

    def _fail(self, r: int, phase: str, failed: Mapping[str, str], into: dict[str, str]) -> None:
        for cid, why in failed.items():
            logger.warning("round %d: client %s failed in %s: %s", r, cid, phase, why)
            self.failures.append({"round": r, "client": cid, "phase": phase, "reason": why})
            into[cid] = f"{phase}: {why}" if cid not in into else f"{into[cid]}; {phase}: {why}"

    def _adopt(self, arrays: ArrayRecord | None) -> None:
        """Make `arrays` the strategy's global adapter when they differ from it (a wrapper changed them: Flower's DP
        wrappers add noise to the aggregate), keeping every other part of the server state."""
        if arrays is None or len(arrays) == 0:
            return
        new = arrays_to_tensors(arrays)
        old = self.strategy.global_tensors
        if set(new) != set(old) or any(tuple(new[k].shape) != tuple(old[k].shape) for k in old):
            raise ValueError(
                "the arrays passed to this strategy do not fit its global adapter (keys or shapes differ)."
            )
        if all(torch.equal(new[k].to(old[k].dtype), old[k]) for k in old):
            return
        logger.info("adopting the arrays a wrapping strategy released as the global adapter")
        tensors, meta = self.strategy.state_dict()
        tensors.update({GLOBAL_PREFIX + k: new[k].to(torch.float32) for k in old})
        self.strategy.load_state_dict(tensors, meta)

    # ------------------------------------------------------------------ Flower's Strategy interface

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample this round's clients and build their `train` messages (see the module docstring)."""
        self.setup(grid, arrays)
        self._adopt(arrays)
        r = self._round_idx(server_round)
        cfg = self.config
        t0 = time.perf_counter()
        rng = random.Random(cfg.seed * 1000 + r)  # the in-process simulation's sampling
        k = max(1, round(cfg.fraction_clients * len(self.client_ids)))
        sampled = sorted(rng.sample(range(len(self.client_ids)), k))
        ids = [self.client_ids[i] for i in sampled]
        self.strategy.configure_round(r, ids)
        instructions = {
            self.client_ids[i]: (i, self.strategy.configure_client(self.client_ids[i], r)) for i in sampled
        }
        sent = []
        for cid, (index, instruction) in instructions.items():
            content = self._train_payload(r, index, cid, instruction, config)
            sent.append(
                _Sent(
                    cid, Message(content, dst_node_id=self.nodes[cid], message_type=MessageType.TRAIN, group_id=str(r))
                )
            )
        online = set(grid.get_node_ids())
        self._round = {
            "round": r,
            "t0": t0,
            "ids": ids,
            "instructions": {cid: instr for cid, (_, instr) in instructions.items()},
            "sent": sent,
            "offline": [s.client_id for s in sent if self.nodes[s.client_id] not in online],
            "failed": {},
            "comm": {},
            "metrics": None,
        }
        self.report("running", phase="train", round=r, clients=ids)
        return [s.message for s in sent if s.client_id not in self._round["offline"]]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode the updates, aggregate them with the hf_perfit strategy; returns `θ_g` and the round metrics.

        Raises:
            RuntimeError: no sampled client returned an update.
        """
        r = self._check_round(server_round)
        state = self._round
        replies = list(replies)
        failed = {cid: "its SuperNode is not connected (offline)" for cid in state["offline"]}
        live = [s for s in state["sent"] if s.client_id not in failed]
        got, failed_more = self._match(live, replies)
        failed.update(failed_more)
        payloads = {s.client_id: s.message.content for s in state["sent"]}
        updates: list[ClientUpdate] = []
        for cid in state["ids"]:  # the simulation's order
            if cid not in got:
                continue
            reply = got[cid]
            try:
                update = decode_update(reply.content, self.shapes, state["instructions"][cid].mask)
                if update.client_id != cid:
                    raise ValueError(f"the reply comes from client {update.client_id!r}, not {cid!r}.")
            except (KeyError, ValueError, TypeError) as err:
                failed[cid] = f"malformed upload: {err}"
                continue
            m = reply.content[METRICS]
            updates.append(update)
            state["comm"][cid] = {
                "bytes_up": int(m["bytes-up"]),
                "bytes_down": int(m["bytes-down"]),
                "train_loss": float(m["train-loss"]),
                "trained": True,
                "density": float(m["density"]),
                "wire_bytes_up": array_bytes(reply.content),
                "wire_bytes_down": array_bytes(payloads[cid]),
            }
        self._fail(r, "train", failed, state["failed"])
        if not updates:
            raise RuntimeError(
                f"round {r}: none of the {len(state['ids'])} sampled clients returned an update "
                f"({'; '.join(f'{c}: {w}' for c, w in state['failed'].items())})."
            )
        state["metrics"] = self.strategy.aggregate(r, updates)
        for u in updates:
            self.accepted[u.client_id] = _Cached(r, u.tensors, u.masks)
        return tensors_to_arrays(self.strategy.global_tensors), MetricRecord(
            {k: float(v) for k, v in state["metrics"].items()}
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One `evaluate` message per client: the adapter the strategy personalizes for it (`own` when that is
        exactly the client's own last upload, which it holds)."""
        r = self._check_round(server_round)
        state = self._round
        if state["metrics"] is None:  # a wrapper skipped aggregation (e.g. Flower's DP wrappers on an error reply)
            skipped = {cid: "the wrapping strategy skipped this round's aggregation" for cid in state["ids"]}
            self._fail(r, "train", {c: w for c, w in skipped.items() if c not in state["failed"]}, state["failed"])
            state["metrics"] = {}
            state["comm"] = {}
        self._adopt(arrays)
        final = r == self.config.num_rounds - 1
        self.report("running", phase="evaluate", round=r)
        sent = []
        for cid in self.client_ids:
            content = self._eval_payload(r, cid, final, config)
            sent.append(
                _Sent(
                    cid,
                    Message(content, dst_node_id=self.nodes[cid], message_type=MessageType.EVALUATE, group_id=str(r)),
                )
            )
        online = set(grid.get_node_ids())
        state["eval_sent"] = sent
        state["eval_offline"] = [s.client_id for s in sent if self.nodes[s.client_id] not in online]
        return [s.message for s in sent if s.client_id not in state["eval_offline"]]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The round's per-client records (written to `metrics.jsonl`); returns the mean personalized perplexity."""
        r = self._check_round(server_round)
        state = self._round
        failed = {cid: "its SuperNode is not connected (offline)" for cid in state["eval_offline"]}
        live = [s for s in state["eval_sent"] if s.client_id not in failed]
        got, failed_more = self._match(live, list(replies))
        failed.update(failed_more)
        self._fail(r, "evaluate", failed, state["failed"])
        records = []
        for idx, cid in enumerate(self.client_ids):
            if cid not in got:
                continue
            m = got[cid].content[METRICS]
            rec: dict[str, Any] = {
                "round": r,
                "client": cid,
                "strategy": self.config.strategy,
                "eval_loss": float(m["eval_loss"]),
                "perplexity": float(m["perplexity"]),
                "num_examples": int(m["num-examples"]),
                "train_loss": None,
                "bytes_up": 0,
                "bytes_down": 0,
            }
            if self.strategy.uses_masks:
                rec["density"] = float(m["density"])
            rec.update(state["comm"].get(cid, {"bytes_up": 0, "bytes_down": 0, "trained": False}))
            rec["budget_multiplier"] = self._budget(idx)
            if cid in state["failed"]:
                rec["failed"] = state["failed"][cid]
            records.append(rec)
        self.wall.append(time.perf_counter() - state["t0"])
        summary = self._end_round(r, records, state["metrics"], state["failed"])
        if r == self.config.num_rounds - 1:
            self.finish()
        return MetricRecord(
            {"mean_perplexity": summary["mean_perplexity"], "num_evaluated": len(records)}
            if records
            else {"num_evaluated": 0}
        )

    def summary(self) -> None:
        """Log the configuration: the hf_perfit strategy, its options and the run's size."""
        logger.info("\t├──> hf_perfit strategy %r, options %s", self.strategy.name, json.dumps(self.strategy.options))
        logger.info(
            "\t└──> %d clients, fraction_clients=%s, %d rounds, output in %s",
            self.config.num_clients,
            self.config.fraction_clients,
            self.config.num_rounds,
            self.out,
        )

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int | None = None,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run every round (Flower's `Strategy.start` loop, with hf_perfit's defaults).

        Args:
            grid (`flwr.serverapp.Grid`): the grid the `ServerApp` was given.
            initial_arrays (`ArrayRecord`, *optional*): the initial global adapter; default (or empty): the clients'
                own initial adapter (every node builds the same one).
            num_rounds (`int`, *optional*): must equal `config.num_rounds` when given.
            timeout (`float`, *optional*): seconds to wait for one phase's replies (default:
                `options.round_timeout`, i.e. until every client replied or Flower reported it unavailable).
            train_config / evaluate_config (`ConfigRecord`, *optional*): extra entries for every message's config.
            evaluate_fn (*optional*): a server-side evaluation of the global adapter, as in Flower.

        Returns:
            `flwr.serverapp.strategy.Result`: the final global adapter and the per-round metrics. The hf_perfit
            records are in `self.records` (and `metrics.jsonl`), the last round's summary in `self.final_summary`.

        Raises:
            RuntimeError: the SuperNodes do not match the config, or a round gets no update at all.
        """
        if num_rounds is not None and num_rounds != self.config.num_rounds:
            raise ValueError(
                f"num_rounds={num_rounds} differs from config.num_rounds={self.config.num_rounds}; "
                "set the rounds in the config (the last round exports the clients' adapters)."
            )
        timeout = self.options.round_timeout if timeout is None else timeout
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = Result()
        try:
            self.summary()
            self.setup(grid, initial_arrays)
            arrays = tensors_to_arrays(self.strategy.global_tensors)
            if evaluate_fn is not None and (res := evaluate_fn(0, arrays)) is not None:
                result.evaluate_metrics_serverapp[0] = res
            for server_round in range(1, self.config.num_rounds + 1):
                replies = send_and_receive(
                    grid,
                    self.configure_train(server_round, arrays, train_config, grid),
                    timeout,
                    self.options.poll_interval,
                )
                new_arrays, train_metrics = self.aggregate_train(server_round, replies)
                if new_arrays is not None:
                    arrays = result.arrays = new_arrays
                if train_metrics is not None:
                    result.train_metrics_clientapp[server_round] = train_metrics
                replies = send_and_receive(
                    grid,
                    self.configure_evaluate(server_round, arrays, evaluate_config, grid),
                    timeout,
                    self.options.poll_interval,
                )
                eval_metrics = self.aggregate_evaluate(server_round, replies)
                if eval_metrics is not None:
                    result.evaluate_metrics_clientapp[server_round] = eval_metrics
                if evaluate_fn is not None and (res := evaluate_fn(server_round, arrays)) is not None:
                    result.evaluate_metrics_serverapp[server_round] = res
        except BaseException as err:
            self.report("failed", error=f"{type(err).__name__}: {err}")
            logger.error("Flower run failed: %s", err)
            raise
        return result

    # ------------------------------------------------------------------ rounds

    def _round_idx(self, server_round: int) -> int:
        r = int(server_round) - 1
        if not 0 <= r < self.config.num_rounds:
            raise ValueError(
                f"server_round={server_round} is outside 1..{self.config.num_rounds} (config.num_rounds); set the "
                "rounds in the config and pass the same num_rounds to start()."
            )
        return r

    def _check_round(self, server_round: int) -> int:
        r = self._round_idx(server_round)
        if self._round.get("round") != r:
            raise RuntimeError(f"round {server_round} was not configured: call configure_train first.")
        return r

    def _train_payload(
        self, r: int, index: int, cid: str, instruction: ClientInstruction, config: ConfigRecord
    ) -> RecordDict:
        accepted = self.accepted.get(cid)
        return encode_instruction(
            instruction,
            {
                **dict(config),
                "federated-config": self.config_json,
                "round": r,
                "state-round": accepted.round_idx if accepted else -1,
                "seed": self.config.seed * 100003 + r * 1009 + index,  # the in-process simulation's seed
                "budget-multiplier": self._budget(index),
                "uses-masks": self.strategy.uses_masks,
            },
        )

    def _eval_payload(self, r: int, cid: str, final: bool, config: ConfigRecord) -> RecordDict:
        accepted = self.accepted.get(cid)
        local = accepted.tensors if accepted else self.strategy.global_tensors
        tensors = self.strategy.personalized_tensors(cid, local)
        content = RecordDict()
        meta = self._meta(
            **dict(config),
            **{
                "round": r,
                "state-round": accepted.round_idx if accepted else -1,
                "uses-masks": self.strategy.uses_masks,
                "final": final,
            },
        )
        if (
            accepted is not None
            and set(tensors) == set(accepted.tensors)
            and all(torch.equal(tensors[k], accepted.tensors[k]) for k in tensors)
        ):
            meta["tensors-mode"] = OWN  # e.g. `local`: the client's own adapter; nothing to send
        else:
            encode_tensors(content, meta, tensors, accepted.masks if accepted else None)
        content[META] = meta
        return content

    def _end_round(
        self, r: int, records: list[dict[str, Any]], metrics: Mapping[str, float], failed: Mapping[str, str]
    ) -> dict[str, Any]:
        ppl = [x["perplexity"] for x in records]
        summary = {
            "round": r,
            "summary": True,
            "strategy": "base" if r < 0 else self.config.strategy,
            "mean_perplexity": float(np.mean(ppl)) if ppl else math.nan,
            "bytes_up": sum(x.get("bytes_up", 0) for x in records),
            **{k: float(v) for k, v in metrics.items()},
            "failed_clients": dict(failed),
        }
        self.records += records + [summary]
        self.final_summary = summary
        if self.write_outputs:
            atomic_write_text(self.out / "metrics.jsonl", "".join(json.dumps(x) + "\n" for x in self.records))
        for callback in self.round_callbacks:
            callback(r, records + [summary])
        return summary

    # ------------------------------------------------------------------ outputs

    def report(self, status: str, **extra: Any) -> None:
        """Write `flower_run.json`: the run's status, its clients and nodes, failures and round wall times."""
        if not self.write_outputs:
            return
        atomic_write_json(
            self.out / REPORT_NAME,
            {
                "status": status,
                "strategy": self.config.strategy,
                "num_rounds": self.config.num_rounds,
                "clients": {cid: self.nodes[cid] for cid in self.client_ids},
                "failures": self.failures,
                "round_wall_seconds": self.wall,
                **extra,
            },
        )

    def finish(self) -> None:
        """After the last round: `results.md` (with plots) and the final `flower_run.json`."""
        summary = self.final_summary or {}
        if self.write_outputs:
            self._results_md()
        status = "completed_with_failures" if self.failures else "completed"
        self.report(status, final_summary=summary)
        if self.failures:
            failed = sorted({f["client"] for f in self.failures})
            logger.warning(
                "Flower run finished with %d failure(s) (clients %s); see %s.", len(self.failures), failed, REPORT_NAME
            )
        logger.info(
            "Flower run finished: %d rounds of %s, mean personalized perplexity %.3f; results in %s",
            self.config.num_rounds,
            self.config.strategy,
            summary.get("mean_perplexity", math.nan),
            self.out,
        )

    def _results_md(self) -> None:
        last = self.config.num_rounds - 1
        base = {x["client"]: x["perplexity"] for x in self.records if x["round"] == -1 and "client" in x}
        final = {x["client"]: x for x in self.records if x["round"] == last and "client" in x}
        rows = []
        for cid in self.client_ids:
            f = final.get(cid)
            if f is None:
                rows.append(f"| {cid} | {base[cid]:.3f} | failed | - |")
            else:
                density = f"{f['density']:.3f}" if "density" in f else "-"
                rows.append(f"| {cid} | {base[cid]:.3f} | {f['perplexity']:.3f} | {density} |")
        mean = float(np.mean([f["perplexity"] for f in final.values()])) if final else math.nan
        text = (
            f"# {self.config.strategy} on Flower: {self.config.num_rounds} rounds, {len(self.client_ids)} clients\n\n"
            "| client | base perplexity | personalized perplexity | density |\n|---|---:|---:|---:|\n"
            + "\n".join(rows)
            + f"\n\nMean personalized perplexity: {mean:.3f}\n"
        )
        if self.failures:
            text += "\n## Failures\n\n| round | client | phase | reason |\n|---:|---|---|---|\n"
            text += "".join(
                f"| {f['round']} | {f['client']} | {f['phase']} | {f['reason'][:200].replace('|', '/')} |\n"
                for f in self.failures
            )
        try:
            plots = plot_run(self.out)
            text += "\n" + "".join(f"![{p.stem}]({p.name})\n" for p in plots)
        except Exception as err:  # a plot is a convenience; never fail a finished run on it
            logger.warning("could not draw the run's plots: %s", err)
        atomic_write_text(self.out / "results.md", text)
