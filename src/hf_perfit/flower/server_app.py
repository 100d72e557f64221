"""The Flower `ServerApp`: the coordinator of a federated run whose clients are Flower SuperNodes.

It runs the federated [`Coordinator`] ([`hf_perfit.federated.coordinator`]: the in-process engine's round, records,
checkpoint/resume, export and Hub push) over a [`FlowerTransport`] ([`hf_perfit.flower.transport`]), so the two
engines share one round loop and write the same run folder; `resume` and `push_to_hub` work on Flower runs too. The
client side is [`hf_perfit.flower.client_app`]. A user's own `ServerApp` can instead run hf_perfit's strategies as
Flower `Strategy` objects ([`hf_perfit.flower.strategy.HFPerFITStrategy`], e.g. inside Flower's DP wrappers).

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
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .._io import atomic_write_text
from ..federated.config import FederatedConfig
from ..federated.coordinator import Coordinator, RoundCallback
from .transport import REPORT_NAME, FlowerRunOptions, FlowerTransport

__all__ = ["REPORT_NAME", "FlowerCoordinator", "FlowerRunOptions", "app", "load_run_config", "make_server_app"]

logger = logging.getLogger(__name__)


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


class FlowerCoordinator:
    """Runs a [`FederatedConfig`] over a Flower `Grid`: the federated [`Coordinator`] (the same round, records,
    checkpoint/resume, export and Hub push as the in-process engine) with a [`FlowerTransport`].

    Besides the run folder of every engine, it writes `flower_run.json` (status, clients and their nodes, failures,
    round wall times) and adds a "Failures" table to `results.md` when a client failed.

    Args:
        grid (`flwr.serverapp.Grid`): the grid the `ServerApp` was given.
        config ([`FederatedConfig`]): the run (sent to every client with each message).
        options ([`FlowerRunOptions`], *optional*): timeouts.

    Raises:
        FileExistsError / ValueError / CheckpointError: the output folder checks of the coordinator (another run's
            results without `overwrite`, `resume` without a checkpoint or with a changed config).
    """

    def __init__(self, grid: Grid, config: FederatedConfig, options: FlowerRunOptions | None = None) -> None:
        self.config = config
        self.out = Path(config.output_dir)
        self.transport = FlowerTransport(grid, config, options)
        self.wall: list[float] = []
        self._clock = time.perf_counter()
        self.coordinator = Coordinator(config, self.transport, callbacks=[_Timer(self)])

    def _report(self, status: str, durable: bool = True, **extra: Any) -> None:
        self.transport.report(self.out, status, durable=durable, round_wall_seconds=self.wall, **extra)

    def run(self) -> dict[str, Any]:
        """Run (or resume) every round; returns the last round's summary record.

        Raises:
            RuntimeError: the SuperNodes do not match the config, or a round gets no update at all.
        """
        try:
            self.coordinator.prepare()
            self._report("running")
            self._clock = time.perf_counter()
            summary = self.coordinator.run()
        except BaseException as err:
            if self.out.is_dir():
                self._report("failed", error=f"{type(err).__name__}: {err}")
            logger.error("Flower run failed: %s", err)
            raise
        failures = self.transport.failures
        if failures:
            text = "\n## Failures\n\n| round | client | phase | reason |\n|---:|---|---|---|\n" + "".join(
                f"| {f['round']} | {f['client']} | {f['phase']} | {f['reason'][:200].replace('|', '/')} |\n"
                for f in failures
            )
            results = self.coordinator.run_folder.results
            atomic_write_text(results, (results.read_text() if results.is_file() else "") + text)
            logger.warning(
                "Flower run finished with %d failure(s) (clients %s); see %s.",
                len(failures),
                sorted({f["client"] for f in failures}),
                REPORT_NAME,
            )
        self._report("completed_with_failures" if failures else "completed", final_summary=summary)
        return summary


class _Timer(RoundCallback):
    """Round wall times for `flower_run.json` (from the end of the previous round, or of the set-up, to the end of
    this round's checkpoint)."""

    def __init__(self, owner: FlowerCoordinator) -> None:
        self.owner = owner

    def on_round_end(self, coordinator: Coordinator, round_idx: int, summary: dict[str, Any]) -> None:
        now = time.perf_counter()
        self.owner.wall.append(now - self.owner._clock)
        self.owner._clock = now
        # A progress report (nothing resumes from it: the checkpoint above is the run's state), rewritten every
        # round, so without an fsync: 0.7 ms instead of 7.5 ms on this repository's 2-core test machine.
        self.owner._report("running", durable=False, round=round_idx)


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
