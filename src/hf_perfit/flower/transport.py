"""Flower as a transport of the federated [`Coordinator`]: the clients are Flower SuperNodes reached over a `Grid`.

The coordinator ([`hf_perfit.federated.coordinator`]) owns the round (sampling, seeds, strategy calls, records,
checkpoint/resume, export, Hub push) for both engines; [`FlowerTransport`] carries its jobs as Flower messages to
the hf_perfit `ClientApp` ([`hf_perfit.flower.client_app`]) and its replies back, with the encoders of
[`hf_perfit.flower.records`]:

- `start()`: a `query` message per node (partition id, sizes, the initial adapter's digest, the base model's
  perplexity, and from one node the initial adapter); on `--resume` the clients keep their stored states;
- `fit()`: one `train` message per [`FitJob`] (the strategy's instruction, seed, budget multiplier and the round of
  the client's last accepted state); a client's state stays on its node, so `Roster.state_with_coordinator=False`;
- `evaluate()`: one `evaluate` message per [`EvalJob`] (`own` when the adapter is exactly the client's last accepted
  upload, which it holds); the base-model evaluation (round -1) is the hello's; the final evaluation also exports
  each client's adapter on its node;
- `write_state()` / `restore_state()`: the server's copy of every accepted upload (what the strategy personalizes
  from), so `--resume` restarts a Flower run from its last committed round.

The phases are also available one message batch at a time (`train_messages` / `read_train_replies`,
`eval_messages` / `read_eval_replies`) for [`HFPerFITStrategy`], which runs them inside Flower's own strategy loop.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from safetensors.torch import load_file, save_file

from .._io import atomic_write_json
from ..federated.config import FederatedConfig
from ..federated.coordinator import EvalJob, FitJob, FitResult, Roster
from ..federated.messages import selection_metrics
from .records import (
    META,
    METRICS,
    OWN,
    PACK_FLAG,
    TENSORS,
    array_bytes,
    decode_update,
    encode_instruction,
    encode_tensors,
    get_arrays,
)

__all__ = [
    "REPORT_NAME",
    "FlowerRunOptions",
    "FlowerTransport",
    "describe_error",
    "fast_reply_pulls",
    "send_and_receive",
]

logger = logging.getLogger(__name__)

REPORT_NAME = "flower_run.json"
UPLOADS_FILE = "flower_uploads.safetensors"
"""The transport's part of a checkpoint: every accepted upload (tensors `t/<client>/<key>`, masks `m/<client>/<key>`)."""

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
OFFLINE = "its SuperNode is not connected (offline)"


@dataclass
class FlowerRunOptions:
    """How the `ServerApp` talks to the SuperNodes (not part of the algorithm, so not in [`FederatedConfig`]).

    Args:
        round_timeout (`float`, *optional*): seconds to wait for the replies of one phase of a round (training, then
            evaluation); `None` waits until every client replied or Flower reported it unavailable.
        node_wait_timeout (`float`, defaults to 300): seconds to wait at the start for `num_clients` SuperNodes.
        poll_interval (`float`, defaults to 0.05): the longest wait between two pulls of replies (the wait starts at
            10 ms and doubles up to it). The last reply of a phase is seen at most this late; a pull is one cheap
            call in Flower's simulation and one small HTTP request to the SuperLink in a deployment.
        pack_arrays (`bool`, defaults to `True`): send every message's tensors as one packed `uint8` array (a
            safetensors blob, bit-exact; [`hf_perfit.flower.records.pack_arrays`]) and ask the clients to answer
            packed. Flower moves every array of a message, and each of its chunks, as its own object (one HTTP
            request per object and hop in a deployment), so packing turns an 8-tensor adapter's ~20 objects per
            message into 5. `False`: one array per tensor, for Flower mods and wrappers that read the arrays key by
            key (`fixedclipping_mod`, the DP wrappers).
    """

    round_timeout: float | None = None
    node_wait_timeout: float = 300.0
    poll_interval: float = 0.05
    pack_arrays: bool = True


def fast_reply_pulls(grid: Grid, first_retry: float = 0.01, cap: float = 0.5) -> bool:
    """Make a deployment's `Grid.pull_messages` retry a reply's not-yet-uploaded arrays after `first_retry` seconds
    (doubling up to `cap`) instead of Flower 1.41's fixed first retry of 1 s.

    A SuperNode sends a reply's message before its arrays, and the SuperLink hands the message out at once; Flower's
    HTTP grid (`flwr.superlink.grid.http_grid`, the ServerApp's in a deployment) then pulls the arrays with
    `pull_objects`' defaults and, finding one missing, waits 1 s (then 2 s, ... up to 10 s) although it arrives
    milliseconds later: measured, about 1 s on each phase of a round (`docs/benchmarks.md`, "Flower overhead"). This
    rebinds that module's `pull_objects` to the same function with a shorter first retry and no cap on the number of
    tries (Flower's overall `PULL_MAX_TIME` deadline still applies). It changes nothing else, and only for Flower
    1.41's `HttpGrid` (Flower's simulation grid pulls nothing).

    Returns:
        `bool`: whether `grid` is a Flower 1.41 HTTP grid whose pulls are now fast.
    """
    import flwr

    try:
        import flwr.superlink.grid.http_grid as http_grid
    except ImportError:  # pragma: no cover - another Flower layout
        return False
    if not isinstance(grid, http_grid.HttpGrid) or not flwr.__version__.startswith("1.41."):
        return False
    if not getattr(http_grid.pull_objects, "_hf_perfit_fast", False):
        fast = functools.partial(
            http_grid.pull_objects, initial_backoff=first_retry, backoff_cap=cap, max_tries_per_object=None
        )
        fast._hf_perfit_fast = True  # type: ignore[attr-defined]
        http_grid.pull_objects = fast
    return True


def describe_error(message: Message) -> str:
    """A readable reason for an error reply (Flower's error code, named, and its reason)."""
    err = message.error
    name = _ERROR_NAMES.get(int(err.code), f"error code {err.code}")
    reason = (err.reason or "").strip()
    return f"{name}: {reason}" if reason else name


def send_and_receive(
    grid: Grid, messages: Iterable[Message], timeout: float | None = None, poll_interval: float = 0.05
) -> list[Message]:
    """`Grid.send_and_receive` with a short first poll: push `messages`, then pull until every one has a reply or
    `timeout` seconds passed.

    Same contract as Flower's, but the wait between pulls starts at 10 ms (again after each pull that brought a
    reply) and doubles up to `poll_interval`: Flower's HTTP grid (deployment) waits a fixed 3 s between pulls, which
    would add up to 3 s to each phase of a round whose clients answer in milliseconds.
    """
    messages = list(messages)
    pending = set(grid.push_messages(messages)) if messages else set()
    replies: list[Message] = []
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = min(0.01, poll_interval)
    while pending:
        got = list(grid.pull_messages(list(pending)))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or (deadline is not None and time.monotonic() > deadline):
            break
        time.sleep(delay)
        # after a reply the others usually follow within milliseconds (the clients run the same work): short again
        delay = min(0.01, poll_interval) if got else min(2 * delay, poll_interval)
    return replies


@dataclass
class _Upload:
    """The server's copy of a client's upload (it already left the client): the `local_tensors` that
    `Strategy.personalized_tensors` personalizes from, and the masks its kept values belong to."""

    round_idx: int
    tensors: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor] | None


@dataclass
class Outbox:
    """The messages of one phase, by client id, and the clients left out because their node is offline."""

    messages: dict[str, Message]
    offline: list[str]

    def sendable(self) -> list[Message]:
        return [m for cid, m in self.messages.items() if cid not in self.offline]


class FlowerTransport:
    """The [`Transport`] of a [`Coordinator`] whose clients are Flower SuperNodes (see the module docstring).

    Args:
        grid (`flwr.serverapp.Grid`): the grid the `ServerApp` was given.
        config ([`FederatedConfig`]): the run (sent to every client with each message).
        options ([`FlowerRunOptions`], *optional*): timeouts.
        initial_tensors (`Mapping[str, Tensor]`, *optional*): the initial global adapter instead of the clients' own
            (checked against their adapter's keys and shapes).

    Raises:
        ValueError: a config the Flower clients cannot run (`finetune_steps > 0`, `eval_local_model`).
    """

    is_main_process = True

    def __init__(
        self,
        grid: Grid,
        config: FederatedConfig,
        options: FlowerRunOptions | None = None,
        initial_tensors: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        if config.finetune_steps > 0:
            raise ValueError(
                "finetune_steps > 0 is not supported by the Flower engine (the ClientApp trains config.local_steps); "
                "set finetune_steps: 0 or use the in-process engine."
            )
        if config.eval_local_model:
            raise ValueError("eval_local_model is not supported by the Flower engine; set it to false.")
        self.grid = grid
        fast_reply_pulls(grid)
        self.config = config
        self.options = options or FlowerRunOptions()
        self.config_json = json.dumps(config.to_dict(), sort_keys=True)
        self.client_ids: list[str] = []  # by partition id
        self.nodes: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.base_metrics: dict[str, dict[str, Any]] = {}
        self.accepted: dict[str, _Upload] = {}
        self.pending: dict[str, _Upload] = {}
        self.failures: list[dict[str, Any]] = []
        self.exported = False
        self.initial_tensors = None if initial_tensors is None else dict(initial_tensors)
        self.prefetched: tuple[dict[str, dict[str, Any]], dict[str, str]] | None = None
        """Evaluation replies already read ([`HFPerFITStrategy`] runs the phases in Flower's loop): the next
        `evaluate()` returns them instead of sending messages."""

    # ------------------------------------------------------------------ helpers

    def barrier(self) -> None:
        """One coordinator process: nothing to wait for."""
        return None

    def _meta(self, **extra: Any) -> ConfigRecord:
        return ConfigRecord({"federated-config": self.config_json, PACK_FLAG: self.options.pack_arrays, **extra})

    def _wait_for_nodes(self) -> list[int]:
        want = self.config.num_clients
        deadline = time.monotonic() + self.options.node_wait_timeout
        nodes = sorted(self.grid.get_node_ids())
        while len(nodes) < want and time.monotonic() < deadline:
            time.sleep(min(0.5, self.options.poll_interval) or 0.01)
            nodes = sorted(self.grid.get_node_ids())
        if len(nodes) < want:
            raise RuntimeError(
                f"only {len(nodes)} SuperNode(s) connected within node-wait-timeout={self.options.node_wait_timeout}s, "
                f"but the config has num_clients={want}: start one SuperNode per client "
                "(--node-config 'partition-id=<k> num-partitions=<K>')."
            )
        return nodes

    def _outbox(self, messages: dict[str, Message]) -> Outbox:
        online = set(self.grid.get_node_ids())
        return Outbox(messages, [cid for cid, m in messages.items() if m.metadata.dst_node_id not in online])

    @staticmethod
    def match(outbox: Outbox, replies: Iterable[Message]) -> tuple[dict[str, Message], dict[str, str]]:
        """Pair replies with the messages of `outbox` (by the message id they reply to, else by their source node).

        Returns:
            `(replies, failed)`: the successful replies by client id and, for every other client, why it failed.
        """
        failed = {cid: OFFLINE for cid in outbox.offline}
        live = {cid: m for cid, m in outbox.messages.items() if cid not in failed}
        by_id = {m.metadata.message_id: cid for cid, m in live.items() if m.metadata.message_id}
        by_node = {m.metadata.dst_node_id: cid for cid, m in live.items()}
        got: dict[str, Message] = {}
        for reply in replies:
            cid = by_id.get(reply.metadata.reply_to_message_id) or by_node.get(reply.metadata.src_node_id)
            if cid is None:
                continue
            if reply.has_error():
                failed[cid] = describe_error(reply)
            else:
                got[cid] = reply
        for cid in live:
            if cid not in got and cid not in failed:
                failed[cid] = "no reply within the phase's timeout"
        return got, failed

    def _exchange(self, outbox: Outbox) -> tuple[dict[str, Message], dict[str, str]]:
        replies = send_and_receive(
            self.grid, outbox.sendable(), self.options.round_timeout, self.options.poll_interval
        )
        return self.match(outbox, replies)

    def record_failures(self, round_idx: int, phase: str, failed: Mapping[str, str]) -> None:
        """Log failures and keep them for the run report (`flower_run.json`)."""
        for cid, why in failed.items():
            logger.warning("round %d: client %s failed in %s: %s", round_idx, cid, phase, why)
            self.failures.append({"round": round_idx, "client": cid, "phase": phase, "reason": why})

    # ------------------------------------------------------------------ start

    def start(self) -> Roster:
        """Meet the clients (see the module docstring); on `config.resume` they keep their stored states.

        Raises:
            RuntimeError: a node failed to set up, partition ids missing or duplicated, different initial adapters.
        """
        nodes = self._wait_for_nodes()
        messages = {
            str(node): Message(
                RecordDict({META: self._meta(**{"send-initial-adapter": i == 0, "resume": bool(self.config.resume)})}),
                dst_node_id=node,
                message_type=MessageType.QUERY,
                group_id="-1",
            )
            for i, node in enumerate(nodes)
        }
        replies, failed = self._exchange(self._outbox(messages))
        if failed:
            detail = "; ".join(f"node {n}: {why}" for n, why in failed.items())
            raise RuntimeError(f"the run cannot start, {len(failed)} SuperNode(s) failed to set up: {detail}")
        by_partition: dict[int, tuple[int, Message]] = {}
        for key, reply in replies.items():
            node, pid = int(key), int(reply.content[META]["partition-id"])
            if pid in by_partition:
                raise RuntimeError(
                    f"SuperNodes {by_partition[pid][0]} and {node} both have partition-id={pid}; give each its own."
                )
            by_partition[pid] = (node, reply)
        missing = sorted(set(range(self.config.num_clients)) - set(by_partition))
        if missing:
            raise RuntimeError(f"no SuperNode has partition-id {missing} (num_clients={self.config.num_clients}).")
        if len({str(r.content[META]["adapter-digest"]) for _, r in by_partition.values()}) != 1:
            raise RuntimeError(
                "the SuperNodes built different initial adapters: every node needs the same base model, the same "
                "hf_perfit version and the same config."
            )
        initial = get_arrays(replies[str(nodes[0])].content)[TENSORS]
        self.shapes = {k: tuple(t.shape) for k, t in initial.items()}
        if self.initial_tensors is not None:
            if {k: tuple(t.shape) for k, t in self.initial_tensors.items()} != self.shapes:
                raise ValueError(
                    "the initial arrays do not fit the clients' adapter (keys or shapes differ); pass an empty "
                    "ArrayRecord() to start from the clients' initial adapter."
                )
            initial = self.initial_tensors
        self.client_ids, self.nodes = [], {}
        for pid in sorted(by_partition):
            node, reply = by_partition[pid]
            cid = str(reply.content[META]["client-id"])
            m = reply.content[METRICS]
            self.client_ids.append(cid)
            self.nodes[cid] = node
            self.base_metrics[cid] = {
                "eval_loss": float(m["eval_loss"]),
                "perplexity": float(m["perplexity"]),
                "num_examples": int(m["num-examples"]),
            }
        if len(set(self.client_ids)) != len(self.client_ids):
            raise RuntimeError(f"two SuperNodes report the same client id: {self.client_ids}.")
        return Roster(self.client_ids, initial, state_with_coordinator=False)

    # ------------------------------------------------------------------ train

    def train_messages(self, round_idx: int, jobs: Sequence[FitJob], extra: Mapping[str, Any] | None = None) -> Outbox:
        """One `train` message per job; `extra` entries (e.g. a Flower DP wrapper's clipping norm) join each
        message's config record."""
        messages = {}
        for job in jobs:
            if job.local_steps is not None or job.evaluate_local:
                raise ValueError(
                    f"client {job.client_id}: the Flower ClientApp trains config.local_steps and does not evaluate "
                    "the local model before aggregation (local_steps / evaluate_local jobs are not supported)."
                )
            content = encode_instruction(
                job.instruction,
                {
                    **dict(extra or {}),
                    "federated-config": self.config_json,
                    "round": round_idx,
                    "state-round": -1 if job.state_round is None else int(job.state_round),
                    "seed": int(job.seed),
                    "budget-multiplier": float(job.budget_multiplier),
                    "uses-masks": bool(job.uses_masks),
                },
                pack=self.options.pack_arrays,
            )
            messages[job.client_id] = Message(
                content, dst_node_id=self.nodes[job.client_id], message_type=MessageType.TRAIN, group_id=str(round_idx)
            )
        return self._outbox(messages)

    def read_train_replies(
        self, round_idx: int, jobs: Sequence[FitJob], outbox: Outbox, replies: Iterable[Message]
    ) -> tuple[dict[str, FitResult], dict[str, str]]:
        """Decode the `train` replies into [`FitResult`]s (kept as pending uploads until [`accept`]).

        Returns:
            `(results, failed)`: by client id, in the jobs' order.
        """
        got, failed = self.match(outbox, replies)
        results: dict[str, FitResult] = {}
        for job in jobs:
            cid = job.client_id
            if cid not in got:
                continue
            reply = got[cid]
            try:
                update = decode_update(reply.content, self.shapes, job.instruction.mask)
                if update.client_id != cid:
                    raise ValueError(f"the reply comes from client {update.client_id!r}, not {cid!r}.")
            except (KeyError, ValueError, TypeError) as err:
                failed[cid] = f"malformed upload: {err}"
                continue
            m = reply.content[METRICS]
            results[cid] = FitResult(
                update=update,
                metrics={
                    "bytes_up": int(m["bytes-up"]),
                    "bytes_down": int(m["bytes-down"]),
                    "train_loss": float(m["train-loss"]),
                    "density": float(m["density"]),
                    "wire_bytes_up": array_bytes(reply.content),
                    "wire_bytes_down": array_bytes(outbox.messages[cid].content),
                    # perfit_bsel: which B the client trained from, and the losses it chose by
                    **selection_metrics(update),
                },
                state=None,
            )
            self.pending[cid] = _Upload(round_idx, update.tensors, update.masks)
        self.record_failures(round_idx, "train", failed)
        return results, failed

    def fit(
        self, round_idx: int, jobs: Sequence[FitJob], on_result: Callable[[str, FitResult], None]
    ) -> dict[str, str]:
        """Train every job on its node; `on_result` for each upload, in the jobs' order; returns the failures."""
        outbox = self.train_messages(round_idx, jobs)
        replies = send_and_receive(
            self.grid, outbox.sendable(), self.options.round_timeout, self.options.poll_interval
        )
        results, failed = self.read_train_replies(round_idx, jobs, outbox, replies)
        for cid, result in results.items():
            on_result(cid, result)
        return failed

    # ------------------------------------------------------------------ evaluate

    def eval_messages(self, round_idx: int, jobs: Sequence[EvalJob], extra: Mapping[str, Any] | None = None) -> Outbox:
        """One `evaluate` message per (non-base) job: the job's tensors, or `own` when they are exactly the client's
        last accepted upload."""
        messages = {}
        for job in jobs:
            if job.base:
                continue
            upload = self.accepted.get(job.client_id)
            tensors = job.tensors
            content = RecordDict()
            meta = self._meta(
                **dict(extra or {}),
                **{
                    "round": round_idx,
                    "state-round": -1 if job.state_round is None else int(job.state_round),
                    "uses-masks": bool(job.uses_masks),
                    "final": bool(job.final),
                },
            )
            if (
                upload is not None
                and tensors is not None
                and set(tensors) == set(upload.tensors)
                and all(torch.equal(tensors[k], upload.tensors[k]) for k in tensors)
            ):
                meta["tensors-mode"] = OWN  # e.g. `local`: the client's own adapter; nothing to send
            else:
                encode_tensors(content, meta, tensors, upload.masks if upload else None, pack=self.options.pack_arrays)
            content[META] = meta
            messages[job.client_id] = Message(
                content,
                dst_node_id=self.nodes[job.client_id],
                message_type=MessageType.EVALUATE,
                group_id=str(round_idx),
            )
        return self._outbox(messages)

    def read_eval_replies(
        self, round_idx: int, jobs: Sequence[EvalJob], outbox: Outbox, replies: Iterable[Message]
    ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """The evaluation metrics by client id (base jobs: the hello's), and the failures."""
        got, failed = self.match(outbox, replies)
        metrics: dict[str, dict[str, Any]] = {}
        for job in jobs:
            cid = job.client_id
            if job.base:
                metrics[cid] = dict(self.base_metrics[cid])
                continue
            if cid not in got:
                continue
            m = got[cid].content[METRICS]
            metrics[cid] = {
                "eval_loss": float(m["eval_loss"]),
                "perplexity": float(m["perplexity"]),
                "num_examples": int(m["num-examples"]),
            }
            if job.uses_masks:
                metrics[cid]["density"] = float(m["density"])
        if any(job.final for job in jobs):
            self.exported = True
        self.record_failures(round_idx, "evaluate", failed)
        return metrics, failed

    def evaluate(self, round_idx: int, jobs: Sequence[EvalJob]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """Evaluate every job on its node (the final evaluation also exports the clients' adapters there)."""
        if self.prefetched is not None:
            out, self.prefetched = self.prefetched, None
            return out
        outbox = self.eval_messages(round_idx, jobs)
        replies = send_and_receive(
            self.grid, outbox.sendable(), self.options.round_timeout, self.options.poll_interval
        )
        return self.read_eval_replies(round_idx, jobs, outbox, replies)

    def export(self, jobs: Sequence[EvalJob]) -> None:
        """The clients exported their adapters in the final evaluation; a run resumed after it asks them again."""
        if self.exported:
            return
        jobs = [dataclasses.replace(j, final=True) for j in jobs]
        _, failed = self.evaluate(jobs[0].round_idx if jobs else -1, jobs)
        if failed:
            logger.warning("%d client(s) could not export their adapter: %s", len(failed), failed)

    # ------------------------------------------------------------------ client state (the server's copy)

    def local_tensors(self, client_id: str) -> dict[str, torch.Tensor] | None:
        """The client's last accepted upload (`None` before it trained)."""
        upload = self.accepted.get(client_id)
        return None if upload is None else upload.tensors

    def accept(self, round_idx: int, accepted: Sequence[str], rejected: Sequence[str]) -> None:
        """Accepted uploads become the clients' states (the next messages say so: `state-round`, and the clients
        roll back a rejected round themselves)."""
        for cid in accepted:
            self.accepted[cid] = self.pending.pop(cid)
        for cid in rejected:
            self.pending.pop(cid, None)

    def adopt(self, round_idx: int, job: FitJob, result: FitResult) -> None:
        """A result of round `round_idx` reused after a restart (its state is on the client's node)."""
        self.pending[job.client_id] = _Upload(round_idx, result.update.tensors, result.update.masks)

    def write_state(self, folder: Path, previous: Path | None) -> None:
        """Every accepted upload into `folder/flower_uploads.safetensors`."""
        blob: dict[str, torch.Tensor] = {}
        rounds = {}
        for cid, upload in sorted(self.accepted.items()):
            rounds[cid] = upload.round_idx
            blob.update({f"t/{cid}/{k}": v.detach().to("cpu").contiguous() for k, v in upload.tensors.items()})
            for k, m in (upload.masks or {}).items():
                blob[f"m/{cid}/{k}"] = m.detach().to("cpu", torch.uint8).contiguous()
        save_file(blob, str(folder / UPLOADS_FILE), metadata={"rounds": json.dumps(rounds)})

    def restore_state(self, folder: Path) -> None:
        """Read back what [`write_state`] wrote."""
        from safetensors import safe_open

        path = folder / UPLOADS_FILE
        with safe_open(str(path), "pt") as f:
            rounds = json.loads(f.metadata()["rounds"])
        blob = load_file(str(path))
        self.accepted = {}
        for cid, r in rounds.items():
            tensors = {k[len(cid) + 3 :]: v for k, v in blob.items() if k.startswith(f"t/{cid}/")}
            masks = {k[len(cid) + 3 :]: v.bool() for k, v in blob.items() if k.startswith(f"m/{cid}/")}
            self.accepted[cid] = _Upload(int(r), tensors, masks or None)

    def committed(self, folder: Path) -> None:
        """Nothing to do after a commit (the uploads are in the checkpoint)."""
        return None

    # ------------------------------------------------------------------ report

    def report(self, out: Path, status: str, durable: bool = True, **extra: Any) -> None:
        """Write `flower_run.json`: the run's status, its clients and nodes, failures and more (`extra`);
        `durable=False` for the per-round progress writes (no `fsync`, see [`hf_perfit._io.atomic_write_bytes`])."""
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            out / REPORT_NAME,
            {
                "status": status,
                "strategy": self.config.strategy,
                "num_rounds": self.config.num_rounds,
                "clients": {cid: self.nodes[cid] for cid in self.client_ids},
                "failures": self.failures,
                **extra,
            },
            durable=durable,
        )
