"""The Flower `ServerApp`: the coordinator of a federated run whose clients are Flower SuperNodes.

It runs [`HFPerFITStrategy`] ([`hf_perfit.flower.strategy`]): a strategy from hf_perfit's registry as a Flower
`Strategy`, driven exactly as the in-process [`FederatedSimulation`] drives it (same client sampling, same seeds,
`configure_round` / `configure_client` / `aggregate`, personalized evaluation of every client after every round
through `Strategy.personalized_tensors`), writing the same `metrics.jsonl` records, so the two engines can be
compared line by line. The client side is [`hf_perfit.flower.client_app`]. A user's own `ServerApp` can use
[`HFPerFITStrategy`] directly (e.g. inside Flower's DP wrappers).

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..federated.config import FederatedConfig
from .strategy import REPORT_NAME, FlowerRunOptions, HFPerFITStrategy

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
    """Runs a [`FederatedConfig`] over a Flower `Grid` with [`HFPerFITStrategy`]: what the `ServerApp` does.

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
        self.strategy = HFPerFITStrategy(config, options=options)

    def run(self) -> dict[str, Any]:
        """Run every round; returns the last round's summary record.

        Raises:
            RuntimeError: the SuperNodes do not match the config, or a round gets no update at all.
        """
        self.strategy.start(self.grid)
        return dict(self.strategy.final_summary or {})


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
