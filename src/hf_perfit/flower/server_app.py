"""The Flower `ServerApp`: the coordinator of a federated run whose clients are Flower SuperNodes.

It drives a [`Strategy`] from hf_perfit's registry exactly as the in-process [`FederatedSimulation`] does (same
client sampling, same seeds, `configure_round` / `configure_client` / `aggregate`, personalized evaluation of every
client after every round through `Strategy.personalized_tensors`) and writes the same `metrics.jsonl` records, so
the two engines can be compared line by line. The client side is [`hf_perfit.flower.client_app`].

Run config (`[tool.flwr.app.config]` of the Flower app, overridable with `flwr run --run-config`):

- `config`: path, on the SuperLink's machine, of a `perfit` YAML/JSON config ([`FederatedConfig`] keys);
- `overrides`: a JSON object of [`FederatedConfig`] keys that override the file (e.g. `'{"num_rounds": 5}'`);
- `round-timeout`: seconds to wait for the replies of one phase of a round; `0` waits until every client replied
  or Flower reported it unavailable (a SuperNode that stops sending heartbeats is reported after about a minute);
- `node-wait-timeout`: seconds to wait at the start for `num_clients` SuperNodes to connect.

Failures: a client whose reply is an error, that is unavailable or that does not reply in time is left out of the
round (the strategy aggregates the replies it has), its state rolls back to its last accepted round, and the
failure is recorded (`failed_clients` in the round's summary record, `failures` in `flower_run.json`). A round in
which no sampled client replied stops the run with a clear error.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from .._io import atomic_write_json, atomic_write_text
from ..federated.config import FederatedConfig
from ..federated.messages import ClientInstruction, ClientUpdate
from ..federated.plots import plot_run
from ..federated.strategies import Strategy, get_strategy
from .records import (
    META,
    METRICS,
    OWN,
    array_bytes,
    arrays_to_tensors,
    decode_update,
    encode_instruction,
    encode_tensors,
)

__all__ = ["FlowerCoordinator", "FlowerRunOptions", "app", "load_run_config", "make_server_app"]

logger = logging.getLogger(__name__)

REPORT_NAME = "flower_run.json"
_ERROR_NAMES = {
    0: "unknown error",
    1: "the ClientApp could not be loaded",
    2: "the ClientApp raised an exception",
    3: "the message is unavailable",
    4: "the reply expired",
    5: "the SuperNode is unavailable (missed heartbeats)",
    6: "a mod refused the message",
    7: "invalid app bundle",
    8: "the ClientApp crashed",
}


@dataclass
class FlowerRunOptions:
    """How the `ServerApp` talks to the SuperNodes (not part of the algorithm, so not in [`FederatedConfig`]).

    Args:
        round_timeout (`float`, *optional*): seconds to wait for the replies of one phase of a round (training, then
            evaluation); `None` waits until every client replied or Flower reported it unavailable.
        node_wait_timeout (`float`, defaults to 300): seconds to wait at the start for `num_clients` SuperNodes.
        poll_interval (`float`, defaults to 0.5): the longest wait between two pulls of replies (the wait starts at
            10 ms and doubles up to it).
    """

    round_timeout: float | None = None
    node_wait_timeout: float = 300.0
    poll_interval: float = 0.5


def load_run_config(run_config: Mapping[str, Any]) -> tuple[FederatedConfig, FlowerRunOptions]:
    """The [`FederatedConfig`] and [`FlowerRunOptions`] of a Flower run config (see the module docstring).

    Raises:
        ValueError: no config at all, an unreadable file, bad JSON overrides or unknown config keys.
    """
    path = str(run_config.get("config", "") or "")
    data: dict[str, Any] = {}
    if path:
        file = Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"run config 'config' = {path!r}: no such file on the SuperLink's machine.")
        data = yaml.safe_load(file.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping of FederatedConfig keys.")
    raw = str(run_config.get("overrides", "") or "").strip()
    if raw:
        try:
            overrides = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"run config 'overrides' is not valid JSON: {err}.") from None
        if not isinstance(overrides, dict):
            raise ValueError("run config 'overrides' must be a JSON object of FederatedConfig keys.")
        data.update(overrides)
    if not data:
        raise ValueError("the run config names no federated config: set 'config' (a YAML/JSON path) or 'overrides'.")
    timeout = float(run_config.get("round-timeout", 0.0) or 0.0)
    options = FlowerRunOptions(
        round_timeout=timeout if timeout > 0 else None,
        node_wait_timeout=float(run_config.get("node-wait-timeout", 300.0)),
    )
    return FederatedConfig.from_dict(data), options


def _describe_error(message: Message) -> str:
    err = message.error
    name = _ERROR_NAMES.get(int(err.code), f"error code {err.code}")
    reason = (err.reason or "").strip()
    return f"{name}: {reason}" if reason else name


@dataclass
class _Cached:
    """The server's copy of a client's last accepted upload (it already left the client): the `local_tensors` that
    `Strategy.personalized_tensors` personalizes from, exactly as the simulation reads them from the client state."""

    round_idx: int
    tensors: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor] | None


class FlowerCoordinator:
    """Runs a [`FederatedConfig`] over a Flower `Grid`: the server half of [`FederatedSimulation`]'s loop.

    Args:
        grid (`flwr.serverapp.Grid`): the grid the `ServerApp` was given.
        config ([`FederatedConfig`]): the run (sent to every client with each message).
        options ([`FlowerRunOptions`], *optional*): timeouts.
    """

    def __init__(self, grid: Grid, config: FederatedConfig, options: FlowerRunOptions | None = None) -> None:
        if config.resume:
            raise ValueError("resume is not supported by the Flower engine; start a new run (overwrite=True).")
        if config.push_to_hub:
            raise ValueError(
                "push_to_hub is not supported by the Flower engine: the personalized adapters stay on the clients "
                "(<output_dir>/clients/<client_id>/adapter on each node); push them from there with `perfit push`."
            )
        self.grid = grid
        self.config = config
        self.options = options or FlowerRunOptions()
        self.out = Path(config.output_dir)
        self.config_json = json.dumps(config.to_dict(), sort_keys=True)
        self.strategy: Strategy = get_strategy(config.strategy, **config.resolved_strategy_options())
        self.client_ids: list[str] = []  # by partition id, like FederatedSimulation.clients
        self.nodes: dict[str, int] = {}
        self.accepted: dict[str, _Cached] = {}
        self.failures: list[dict[str, Any]] = []
        self.records: list[dict[str, Any]] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.wall: list[float] = []

    # ------------------------------------------------------------------ setup

    def _prepare_output(self) -> None:
        marker = self.out / REPORT_NAME
        if self.config.overwrite and self.out.exists():
            shutil.rmtree(self.out)
        elif marker.exists() or (self.out / "metrics.jsonl").exists():
            raise FileExistsError(f"{self.out} holds another run's results; set overwrite=True to replace them.")
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / "config.json", self.config.to_dict())

    def _budget(self, index: int) -> float:
        mult = self.config.budget_multipliers
        return 1.0 if mult is None else float(mult[index])

    def _meta(self, **extra: Any) -> ConfigRecord:
        return ConfigRecord({"federated-config": self.config_json, **extra})

    def _wait_for_nodes(self) -> list[int]:
        want = self.config.num_clients
        deadline = time.monotonic() + self.options.node_wait_timeout
        nodes = sorted(self.grid.get_node_ids())
        while len(nodes) < want and time.monotonic() < deadline:
            time.sleep(self.options.poll_interval)
            nodes = sorted(self.grid.get_node_ids())
        if len(nodes) < want:
            raise RuntimeError(
                f"only {len(nodes)} SuperNode(s) connected within node-wait-timeout={self.options.node_wait_timeout}s, "
                f"but the config has num_clients={want}: start one SuperNode per client "
                "(--node-config 'partition-id=<k> num-partitions=<K>')."
            )
        return nodes

    def _hello(self) -> list[dict[str, Any]]:
        """Meet the clients: partition ids, sizes, the initial adapter (checked identical on every node) and the
        base model's perplexity (round -1)."""
        nodes = self._wait_for_nodes()
        self._report("running", phase="hello")
        payloads = {
            node: RecordDict({META: self._meta(**{"send-initial-adapter": i == 0})}) for i, node in enumerate(nodes)
        }
        replies, failed = self._exchange(MessageType.QUERY, -1, payloads)
        if failed:
            detail = "; ".join(f"node {n}: {why}" for n, why in failed.items())
            raise RuntimeError(f"the run cannot start, {len(failed)} SuperNode(s) failed to set up: {detail}")
        by_partition: dict[int, tuple[int, Message]] = {}
        for node, reply in replies.items():
            pid = int(reply.content[META]["partition-id"])
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
        init = arrays_to_tensors(replies[nodes[0]].content["tensors"])
        self.strategy.initialize(init)
        self.shapes = {k: tuple(t.shape) for k, t in init.items()}
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
        return records

    # ------------------------------------------------------------------ messaging

    def _exchange(
        self, kind: str, round_idx: int, payloads: Mapping[Any, RecordDict]
    ) -> tuple[dict[Any, Message], dict[Any, str]]:
        """Send one message per key (a client id, or a node id during hello) and collect the replies.

        Returns:
            `(replies, failed)`: the successful replies and, for every other key, why it failed.
        """
        online = set(self.grid.get_node_ids())
        failed: dict[Any, str] = {}
        messages: dict[Any, Message] = {}
        for key, content in payloads.items():
            node = self.nodes.get(key, key)
            if node not in online:
                failed[key] = "its SuperNode is not connected (offline)"
                continue
            messages[key] = Message(content, dst_node_id=node, message_type=kind, group_id=str(round_idx))
        pushed = set(self.grid.push_messages(list(messages.values()))) if messages else set()
        pending: dict[str, Any] = {}
        for key, msg in messages.items():
            if msg.metadata.message_id in pushed:
                pending[msg.metadata.message_id] = key
            else:
                failed[key] = "the message could not be pushed to the SuperLink"
        replies: dict[Any, Message] = {}
        timeout = self.options.round_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = min(0.01, self.options.poll_interval)  # quick replies are seen quickly, long waits poll lightly
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                key = pending.pop(reply.metadata.reply_to_message_id, None)
                if key is None:
                    continue
                if reply.has_error():
                    failed[key] = _describe_error(reply)
                else:
                    replies[key] = reply
            if not pending:
                break
            if deadline is not None and time.monotonic() > deadline:
                for key in pending.values():
                    failed[key] = f"no reply within round-timeout={timeout}s"
                break
            time.sleep(delay)
            delay = min(2 * delay, self.options.poll_interval)
        return replies, failed

    # ------------------------------------------------------------------ rounds

    def _train_payload(self, r: int, index: int, cid: str, instruction: ClientInstruction) -> RecordDict:
        accepted = self.accepted.get(cid)
        return encode_instruction(
            instruction,
            {
                "federated-config": self.config_json,
                "round": r,
                "state-round": accepted.round_idx if accepted else -1,
                "seed": self.config.seed * 100003 + r * 1009 + index,
                "budget-multiplier": self._budget(index),
                "uses-masks": self.strategy.uses_masks,
            },
        )

    def _eval_payload(self, r: int, cid: str, final: bool) -> RecordDict:
        accepted = self.accepted.get(cid)
        local = accepted.tensors if accepted else self.strategy.global_tensors
        tensors = self.strategy.personalized_tensors(cid, local)
        content = RecordDict()
        meta = self._meta(
            **{
                "round": r,
                "state-round": accepted.round_idx if accepted else -1,
                "uses-masks": self.strategy.uses_masks,
                "final": final,
            }
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

    def _fail(self, r: int, phase: str, failed: Mapping[str, str], into: dict[str, str]) -> None:
        for cid, why in failed.items():
            logger.warning("round %d: client %s failed in %s: %s", r, cid, phase, why)
            self.failures.append({"round": r, "client": cid, "phase": phase, "reason": why})
            into[cid] = f"{phase}: {why}" if cid not in into else f"{into[cid]}; {phase}: {why}"

    def _round(self, r: int) -> dict[str, Any]:
        cfg = self.config
        t0 = time.perf_counter()
        rng = random.Random(cfg.seed * 1000 + r)
        k = max(1, round(cfg.fraction_clients * len(self.client_ids)))
        sampled = sorted(rng.sample(range(len(self.client_ids)), k))
        ids = [self.client_ids[i] for i in sampled]
        self.strategy.configure_round(r, ids)
        instructions = {
            self.client_ids[i]: (i, self.strategy.configure_client(self.client_ids[i], r)) for i in sampled
        }
        self._report("running", phase="train", round=r, clients=ids)
        payloads = {cid: self._train_payload(r, i, cid, instr) for cid, (i, instr) in instructions.items()}
        replies, failed = self._exchange(MessageType.TRAIN, r, payloads)
        round_failed: dict[str, str] = {}
        updates: list[ClientUpdate] = []
        comm: dict[str, dict[str, Any]] = {}
        for cid in ids:  # the simulation's order
            if cid not in replies:
                continue
            reply = replies[cid]
            try:
                update = decode_update(reply.content, self.shapes, instructions[cid][1].mask)
                if update.client_id != cid:
                    raise ValueError(f"the reply comes from client {update.client_id!r}, not {cid!r}.")
            except (KeyError, ValueError, TypeError) as err:
                failed[cid] = f"malformed upload: {err}"
                continue
            m = reply.content[METRICS]
            updates.append(update)
            comm[cid] = {
                "bytes_up": int(m["bytes-up"]),
                "bytes_down": int(m["bytes-down"]),
                "train_loss": float(m["train-loss"]),
                "trained": True,
                "density": float(m["density"]),
                "wire_bytes_up": array_bytes(reply.content),
                "wire_bytes_down": array_bytes(payloads[cid]),
            }
        self._fail(r, "train", failed, round_failed)
        if not updates:
            raise RuntimeError(
                f"round {r}: none of the {len(ids)} sampled clients returned an update "
                f"({'; '.join(f'{c}: {w}' for c, w in round_failed.items())})."
            )
        round_metrics = self.strategy.aggregate(r, updates)
        for u in updates:
            self.accepted[u.client_id] = _Cached(r, u.tensors, u.masks)

        final = r == cfg.num_rounds - 1
        self._report("running", phase="evaluate", round=r)
        eval_payloads = {cid: self._eval_payload(r, cid, final) for cid in self.client_ids}
        eval_replies, eval_failed = self._exchange(MessageType.EVALUATE, r, eval_payloads)
        self._fail(r, "evaluate", eval_failed, round_failed)
        round_records = []
        for idx, cid in enumerate(self.client_ids):
            if cid not in eval_replies:
                continue
            m = eval_replies[cid].content[METRICS]
            rec: dict[str, Any] = {
                "round": r,
                "client": cid,
                "strategy": cfg.strategy,
                "eval_loss": float(m["eval_loss"]),
                "perplexity": float(m["perplexity"]),
                "num_examples": int(m["num-examples"]),
                "train_loss": None,
                "bytes_up": 0,
                "bytes_down": 0,
            }
            if self.strategy.uses_masks:
                rec["density"] = float(m["density"])
            rec.update(comm.get(cid, {"bytes_up": 0, "bytes_down": 0, "trained": False}))
            rec["budget_multiplier"] = self._budget(idx)
            if cid in round_failed:
                rec["failed"] = round_failed[cid]
            round_records.append(rec)
        self.wall.append(time.perf_counter() - t0)
        return {"records": round_records, "metrics": round_metrics, "failed": round_failed}

    def _summary(self, r: int, recs: list[dict], round_metrics: Mapping[str, float], failed: Mapping[str, str]):
        ppl = [x["perplexity"] for x in recs if x["round"] == r and "client" in x]
        return {
            "round": r,
            "summary": True,
            "strategy": "base" if r < 0 else self.config.strategy,
            "mean_perplexity": float(np.mean(ppl)) if ppl else math.nan,
            "bytes_up": sum(x.get("bytes_up", 0) for x in recs if x["round"] == r and "client" in x),
            **{k: float(v) for k, v in round_metrics.items()},
            "failed_clients": dict(failed),
        }

    # ------------------------------------------------------------------ outputs

    def _write_metrics(self) -> None:
        atomic_write_text(self.out / "metrics.jsonl", "".join(json.dumps(x) + "\n" for x in self.records))

    def _report(self, status: str, **extra: Any) -> None:
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

    # ------------------------------------------------------------------ run

    def run(self) -> dict[str, Any]:
        """Run every round; returns the last round's summary record.

        Raises:
            RuntimeError: the SuperNodes do not match the config, or a round gets no update at all.
        """
        self._prepare_output()
        try:
            base = self._hello()
            self.records = base + [self._summary(-1, base, {}, {})]
            self._write_metrics()
            summary = self.records[-1]
            for r in range(self.config.num_rounds):
                out = self._round(r)
                summary = self._summary(r, out["records"], out["metrics"], out["failed"])
                self.records += out["records"] + [summary]
                self._write_metrics()
        except BaseException as err:
            self._report("failed", error=f"{type(err).__name__}: {err}")
            logger.error("Flower run failed: %s", err)
            raise
        self._results_md()
        status = "completed_with_failures" if self.failures else "completed"
        self._report(status, final_summary=summary)
        if self.failures:
            failed = sorted({f["client"] for f in self.failures})
            logger.warning(
                "Flower run finished with %d failure(s) (clients %s); see %s.", len(self.failures), failed, REPORT_NAME
            )
        logger.info(
            "Flower run finished: %d rounds of %s, mean personalized perplexity %.3f; results in %s",
            self.config.num_rounds,
            self.config.strategy,
            summary["mean_perplexity"],
            self.out,
        )
        return summary


# ---------------------------------------------------------------------- the apps


def make_server_app(
    config: FederatedConfig | None = None, options: FlowerRunOptions | None = None, result: list | None = None
) -> ServerApp:
    """A `ServerApp` that runs `config` (for `flwr.simulation.run_simulation` from Python), or, with
    `config=None`, reads it from the run config (what `flwr run` uses; see the module docstring).

    Args:
        config ([`FederatedConfig`], *optional*): the run.
        options ([`FlowerRunOptions`], *optional*): timeouts (with `config`).
        result (`list`, *optional*): the last round's summary is appended to it.
    """
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        if config is None:
            cfg, opts = load_run_config(context.run_config)
        else:
            cfg, opts = config, options or FlowerRunOptions()
        summary = FlowerCoordinator(grid, cfg, opts).run()
        if result is not None:
            result.append(summary)

    return server


app = make_server_app()
"""The `ServerApp` (`serverapp = "hf_perfit.flower.server_app:app"` in a Flower app's `pyproject.toml`)."""
