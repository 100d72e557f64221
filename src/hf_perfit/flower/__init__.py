"""Flower (`flwr`) as the engine for federations that span machines.

The same strategies and the same client update as the in-process simulation, as a Flower `ServerApp`
([`hf_perfit.flower.server_app`]) and `ClientApp` ([`hf_perfit.flower.client_app`]); the strategies also as Flower
`Strategy` objects for a user's own `ServerApp` ([`HFPerFITStrategy`]). They run in Flower's simulation
runtime ([`run_flower_simulation`], or `flwr run` against a SuperLink started with `--simulation`) and in a real
deployment (a SuperLink on the server, one SuperNode per data owner). See `docs/flower.md`.

Needs the `flower` extra: `pip install "hf_perfit[flower]"`.
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("flwr") is None:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'hf_perfit.flower needs Flower: install the extra with `pip install "hf_perfit[flower]"` '
        "(flwr[simulation]>=1.41,<1.42)."
    )

from .localhost import LocalFederation  # noqa: E402
from .server_app import FlowerCoordinator, FlowerRunOptions, load_run_config, make_server_app  # noqa: E402
from .simulation import run_flower_simulation  # noqa: E402
from .strategy import HFPerFITStrategy  # noqa: E402

__all__ = [
    "FlowerCoordinator",
    "FlowerRunOptions",
    "HFPerFITStrategy",
    "LocalFederation",
    "load_run_config",
    "make_server_app",
    "run_flower_simulation",
]
