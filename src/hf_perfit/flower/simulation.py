"""Running a [`FederatedConfig`] in Flower's simulation runtime from Python (Ray workers on this machine)."""

from __future__ import annotations

from typing import Any

from ..federated.config import FederatedConfig
from .server_app import FlowerRunOptions, make_server_app

__all__ = ["run_flower_simulation"]


def run_flower_simulation(
    config: FederatedConfig,
    *,
    num_cpus: int | None = None,
    client_num_cpus: float = 1.0,
    client_num_gpus: float = 0.0,
    options: FlowerRunOptions | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run `config` with `flwr.simulation.run_simulation`: the hf_perfit `ServerApp` and `ClientApp`, one virtual
    SuperNode per client (`partition-id` = client index), the Ray backend.

    The Flower equivalent of [`run_federated`]; the outputs land in `config.output_dir` (`metrics.jsonl`,
    `results.md`, `flower_run.json`, and each client's `clients/<client_id>/adapter`).

    Args:
        config ([`FederatedConfig`]): the run.
        num_cpus (`int`, *optional*): CPUs Ray may use (default: all of this machine's).
        client_num_cpus (`float`, defaults to 1.0): CPUs per `ClientApp` worker; Ray runs
            `num_cpus // client_num_cpus` clients at a time.
        client_num_gpus (`float`, defaults to 0.0): GPUs per `ClientApp` worker (e.g. 0.5 to share one GPU by two).
        options ([`FlowerRunOptions`], *optional*): timeouts.
        verbose (`bool`, defaults to `False`): Flower's debug logs.

    Returns:
        `dict`: the last round's summary record.
    """
    from flwr.simulation import run_simulation

    from .client_app import app as client_app

    init_args: dict[str, Any] = {"include_dashboard": False}
    if num_cpus is not None:
        init_args["num_cpus"] = int(num_cpus)
    backend_config = {
        "client_resources": {"num_cpus": float(client_num_cpus), "num_gpus": float(client_num_gpus)},
        "init_args": init_args,
    }
    result: list[dict[str, Any]] = []
    run_simulation(
        server_app=make_server_app(config, options, result),
        client_app=client_app,
        num_supernodes=config.num_clients,
        backend_config=backend_config,
        verbose_logging=verbose,
    )
    if not result:
        raise RuntimeError(f"the Flower simulation ended without a result; see {config.output_dir}/flower_run.json.")
    return result[0]
