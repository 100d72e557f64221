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

The algorithm stays in the hf_perfit strategy object ([`hf_perfit.federated.strategies`]) and the round's
bookkeeping in the federated [`Coordinator`] (sampling, seeds, evaluation plan, records, checkpoints, `results.md`,
export, Hub push: the same code as the stock ServerApp and the in-process engine); the messages are the
[`FlowerTransport`]'s. This class only splits the coordinator's round into Flower's four calls, through the
coordinator's public round steps (the calls `Coordinator.run` makes itself).

Mapping onto Flower's round (`server_round` counts from 1 in Flower, hf_perfit's `round_idx = server_round - 1`):

- `configure_train`: on the first call, meet the clients (`FlowerTransport.start`: a `query` message each) and
  prepare the coordinator (`Coordinator.prepare`: output folder, base-model records, checkpoint 0); then
  `Coordinator.plan_round` (sampling, seeds, `strategy.configure_round` / `configure_client`), one `train` message
  per sampled client. Entries of Flower's `config` (e.g. the DP wrapper's clipping norm) join each message's one
  `ConfigRecord`.
- `aggregate_train`: decode the replies, `Coordinator.save_result` for each, then `Coordinator.aggregate_round`
  (`strategy.aggregate`, the accepted states); returns the new global adapter (`ArrayRecord`) and the round metrics.
- `configure_evaluate` / `aggregate_evaluate`: `Coordinator.eval_jobs` (the evaluation plan,
  `strategy.personalized_tensors`), then `Coordinator.finish_round` (records, summary) and `commit_round`
  (checkpoint, callbacks); returns the mean personalized perplexity. After the last round `Coordinator.finish_run`:
  export (the clients exported in the final evaluation), `results.md`, Hub push.

Messages carry one `Array` per tensor by default (`pack_arrays=False`): that is what Flower's mods and wrappers read.

Arrays changed between the phases by a wrapper (Flower's DP wrappers add noise to the aggregate it returned) are
adopted as the strategy's global adapter `θ_g` before the next message is built, so the clients train from and are
evaluated on what the wrapper released.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result
from flwr.serverapp.strategy import Strategy as FlowerStrategy

from ..federated.config import FederatedConfig
from ..federated.coordinator import Coordinator
from ..federated.strategies import Strategy, get_strategy
from ..federated.strategies.base import GLOBAL_PREFIX
from .records import arrays_to_tensors, tensors_to_arrays
from .transport import FlowerRunOptions, FlowerTransport, send_and_receive

__all__ = ["HFPerFITStrategy"]

logger = logging.getLogger(__name__)


class HFPerFITStrategy(FlowerStrategy):
    """A registered hf_perfit strategy as a Flower `Strategy` (see the module docstring).

    Args:
        config ([`FederatedConfig`]): the run. Every message carries it: the clients build their model, data and
            local training from it. `config.num_rounds` is the number of rounds (the last one exports the clients'
            adapters); `config.output_dir` receives the run folder (metrics, checkpoints, `results.md`).
        strategy (`str` or [`~hf_perfit.federated.strategies.Strategy`], *optional*): the algorithm: a registry name
            or a strategy object (not yet initialized; its `name` must be `config.strategy`, since the clients build
            their adapter for it). Default: `get_strategy(config.strategy, **config.resolved_strategy_options())`.
        options ([`FlowerRunOptions`], *optional*): timeouts.
        pack_arrays (`bool`, defaults to `False`): send each message's tensors as one packed array
            ([`FlowerRunOptions.pack_arrays`], what the stock ServerApp does). Off by default because Flower's mods
            and strategy wrappers (`fixedclipping_mod`, the DP wrappers) read a message's arrays key by key; turn it
            on when nothing around this strategy reads the arrays (fewer HTTP requests per message in a deployment).

    Raises:
        ValueError: a strategy whose name differs from `config.strategy`, one already initialized, or
            `config.resume` (resume a Flower run with the stock ServerApp, `hf_perfit.flower.server_app:app`).
    """

    def __init__(
        self,
        config: FederatedConfig,
        strategy: str | Strategy | None = None,
        *,
        options: FlowerRunOptions | None = None,
        pack_arrays: bool = False,
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
        if config.resume:
            raise ValueError(
                "HFPerFITStrategy starts new runs only; resume a Flower run with the stock ServerApp "
                "(hf_perfit.flower.server_app:app, or make_server_app(config))."
            )
        self.config = config
        self.strategy: Strategy = strategy
        self.options = dataclasses.replace(options or FlowerRunOptions(), pack_arrays=bool(pack_arrays))
        self.transport: FlowerTransport | None = None
        self.coordinator: Coordinator | None = None
        self._phase: dict[str, Any] = {}

    # ------------------------------------------------------------------ set-up

    @property
    def records(self) -> list[dict[str, Any]]:
        """The run's `metrics.jsonl` records so far."""
        return [] if self.coordinator is None else self.coordinator.records

    @property
    def final_summary(self) -> dict[str, Any] | None:
        """The last round's summary record (after the last round), else `None`."""
        done = self.coordinator is not None and self.coordinator.completed_rounds == self.config.num_rounds
        return self.records[-1] if done else None

    def setup(self, grid: Grid, initial_arrays: ArrayRecord | None = None) -> None:
        """Meet the clients and prepare the coordinator (once; the first `configure_train` calls it). The strategy
        starts from `initial_arrays` when given (non-empty, with the adapter's keys and shapes), else from the
        clients' initial adapter."""
        if self.coordinator is not None:
            return
        initial = None
        if initial_arrays is not None and len(initial_arrays) > 0:
            initial = arrays_to_tensors(initial_arrays)
        self.transport = FlowerTransport(grid, self.config, self.options, initial_tensors=initial)
        self.coordinator = Coordinator(self.config, self.transport, strategy=self.strategy)
        self.coordinator.prepare()

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

    def _round_idx(self, server_round: int, check: bool = True) -> int:
        r = int(server_round) - 1
        if not 0 <= r < self.config.num_rounds:
            raise ValueError(
                f"server_round={server_round} is outside 1..{self.config.num_rounds} (config.num_rounds); set the "
                "rounds in the config and pass the same num_rounds to start()."
            )
        if check and self._phase.get("round") != r:
            raise RuntimeError(f"round {server_round} was not configured: call configure_train first.")
        return r

    # ------------------------------------------------------------------ Flower's Strategy interface

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample this round's clients and build their `train` messages (see the module docstring)."""
        self.setup(grid, arrays)
        self._adopt(arrays)
        r = self._round_idx(server_round, check=False)
        transport = self.transport
        sampled, ids, jobs = self.coordinator.plan_round(r)  # sampling, seeds and instructions as in-process
        outbox = transport.train_messages(r, jobs, extra=config)
        self._phase = {"round": r, "sampled": sampled, "ids": ids, "jobs": jobs, "outbox": outbox, "metrics": None}
        return outbox.sendable()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode the updates, aggregate them with the hf_perfit strategy; returns `θ_g` and the round metrics.

        Raises:
            RuntimeError: no sampled client returned an update.
        """
        r = self._round_idx(server_round)
        phase, coord = self._phase, self.coordinator
        results, failures = self.transport.read_train_replies(r, phase["jobs"], phase["outbox"], replies)
        for cid, result in results.items():  # persisted like the coordinator's own rounds
            coord.save_result(r, cid, result)
        metrics = coord.aggregate_round(r, phase["ids"], results, failures)
        phase.update(results=results, failures=failures, metrics=metrics)
        return tensors_to_arrays(self.strategy.global_tensors), MetricRecord({k: float(v) for k, v in metrics.items()})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The coordinator's evaluation plan: one `evaluate` message per evaluated client."""
        r = self._round_idx(server_round)
        phase, coord = self._phase, self.coordinator
        if phase["metrics"] is None:  # a wrapper skipped aggregation (Flower's DP wrappers do on an error reply)
            skipped = {cid: "the wrapping strategy skipped this round's aggregation" for cid in phase["ids"]}
            self.transport.record_failures(r, "train", skipped)
            self.transport.accept(r, [], phase["ids"])
            phase.update(results={}, failures=skipped, metrics={})
        self._adopt(arrays)
        jobs = coord.eval_jobs(r, phase["sampled"])
        outbox = self.transport.eval_messages(r, jobs, extra=config)
        phase.update(eval_jobs=jobs, eval_outbox=outbox)
        return outbox.sendable()

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The round's records, summary and checkpoint (the coordinator's); returns the mean personalized perplexity.
        After the last round: export, `results.md`, Hub push."""
        r = self._round_idx(server_round)
        phase, coord = self._phase, self.coordinator
        self.transport.prefetched = self.transport.read_eval_replies(
            r, phase["eval_jobs"], phase["eval_outbox"], replies
        )
        summary = coord.finish_round(r, phase["eval_jobs"], phase["results"], phase["failures"], phase["metrics"])
        coord.commit_round(r, summary)
        if r == self.config.num_rounds - 1:
            coord.finish_run(summary)
        evaluated = len([x for x in coord.records if x.get("round") == r and "client" in x])
        return MetricRecord({"mean_perplexity": float(summary["mean_perplexity"]), "num_evaluated": evaluated})

    def summary(self) -> None:
        """Log the configuration: the hf_perfit strategy, its options and the run's size."""
        logger.info("\t├──> hf_perfit strategy %r, options %s", self.strategy.name, json.dumps(self.strategy.options))
        logger.info(
            "\t└──> %d clients, fraction_clients=%s, %d rounds, output in %s",
            self.config.num_clients,
            self.config.fraction_clients,
            self.config.num_rounds,
            self.config.output_dir,
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
        """Run every round: Flower's `Strategy.start` loop (with a faster reply poll, see [`send_and_receive`]).

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
            `flwr.serverapp.strategy.Result`: the final global adapter and the per-round metrics; the hf_perfit
            records are in `config.output_dir` (and `self.records`).

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
        self.summary()
        self.setup(grid, initial_arrays)
        arrays = tensors_to_arrays(self.strategy.global_tensors)
        if evaluate_fn is not None and (res := evaluate_fn(0, arrays)) is not None:
            result.evaluate_metrics_serverapp[0] = res
        for server_round in range(1, self.config.num_rounds + 1):
            messages = self.configure_train(server_round, arrays, train_config, grid)
            replies = send_and_receive(grid, messages, timeout, self.options.poll_interval)
            new_arrays, train_metrics = self.aggregate_train(server_round, replies)
            if new_arrays is not None:
                arrays = result.arrays = new_arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics
            messages = self.configure_evaluate(server_round, arrays, evaluate_config, grid)
            replies = send_and_receive(grid, messages, timeout, self.options.poll_interval)
            eval_metrics = self.aggregate_evaluate(server_round, replies)
            if eval_metrics is not None:
                result.evaluate_metrics_clientapp[server_round] = eval_metrics
            if evaluate_fn is not None and (res := evaluate_fn(server_round, arrays)) is not None:
                result.evaluate_metrics_serverapp[server_round] = res
        return result
