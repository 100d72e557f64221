"""Running a [`FederatedConfig`] in Flower's simulation runtime from Python (Ray workers on this machine)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from ..federated.config import FederatedConfig
from .server_app import FlowerRunOptions, make_server_app

__all__ = ["SIMULATION_POLL_INTERVAL", "fast_simulation_dispatch", "run_flower_simulation"]

SIMULATION_POLL_INTERVAL = 0.005
"""The ServerApp's longest wait between two pulls of replies in Flower's simulation (`FlowerRunOptions.poll_interval`;
0.05 s in a deployment). A pull there is one call into the in-memory LinkState (a lock and a dict look-up per pending
message), and the last reply of a phase is seen within 5 ms instead of up to 50 ms (measured: 25-30 ms a phase with
0.05 s, 1-3 ms with 5 ms; `docs/flower.md`, section 1)."""


@contextlib.contextmanager
def fast_simulation_dispatch() -> Iterator[bool]:
    """Within the block, Flower 1.41's simulation runtime hands a message pushed by the ServerApp to its Ray workers at
    once instead of at its next 0.1 s tick; restored on exit.

    Flower's simulation moves new messages from the LinkState to the workers' queue in a thread that looks every
    0.1 s (`flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue`, a fixed private `f_stop.wait(0.1)`), so
    each phase of a round (train, then evaluate) waited 0-100 ms before its first message reached a worker
    (measured: 30-60 ms a phase, `docs/flower.md`, section 1). Within this block that function is the same loop (one message per node and
    look, in the same order) whose wait also ends when the in-memory grid (`InMemoryGrid.push_messages`) stored new
    messages; the 0.1 s wait remains the longest, so a stop is still seen within 0.1 s. Nothing else changes, and only
    for Flower 1.41 (other versions run unchanged; `flwr` is pinned `<1.42`).

    Yields:
        `bool`: whether the fast dispatch is on (Flower 1.41).
    """
    import flwr

    try:
        import flwr.server.superlink.fleet.vce.vce_api as vce_api
        from flwr.superlink.grid.inmemory_grid import InMemoryGrid
    except ImportError:  # pragma: no cover - another Flower layout
        yield False
        return
    if not flwr.__version__.startswith("1.41.") or getattr(vce_api.add_messages_to_queue, "_hf_perfit_fast", False):
        yield False  # another version, or already inside such a block
        return
    wake = threading.Event()
    original_add, original_push = vce_api.add_messages_to_queue, InMemoryGrid.push_messages

    def add_messages_to_queue(state: Any, queue: Any, nodes_mapping: Any, f_stop: threading.Event) -> None:
        """Flower 1.41's loop, waking on a push as well as every 0.1 s."""
        while not f_stop.is_set():
            wake.clear()  # before the look: a push during it sets it again, so the wait below ends at once
            for node_id in nodes_mapping.keys():
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            wake.wait(0.1)

    def push_messages(self: Any, messages: Any) -> Any:
        ids = original_push(self, messages)
        wake.set()
        return ids

    add_messages_to_queue._hf_perfit_fast = True  # type: ignore[attr-defined]
    add_messages_to_queue._hf_perfit_wake = wake  # type: ignore[attr-defined]
    vce_api.add_messages_to_queue = add_messages_to_queue
    InMemoryGrid.push_messages = push_messages  # type: ignore[method-assign]
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue = original_add
        InMemoryGrid.push_messages = original_push  # type: ignore[method-assign]


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
    `results.md`, `flower_run.json`, and each client's `clients/<client_id>/adapter`). Flower 1.41's simulation
    dispatches each message as soon as it is pushed ([`fast_simulation_dispatch`]), and the ServerApp pulls replies
    every [`SIMULATION_POLL_INTERVAL`] at most.

    Args:
        config ([`FederatedConfig`]): the run.
        num_cpus (`int`, *optional*): CPUs Ray may use (default: all of this machine's).
        client_num_cpus (`float`, defaults to 1.0): CPUs per `ClientApp` worker; Ray runs
            `num_cpus // client_num_cpus` clients at a time.
        client_num_gpus (`float`, defaults to 0.0): GPUs per `ClientApp` worker (e.g. 0.5 to share one GPU by two).
        options ([`FlowerRunOptions`], *optional*): timeouts (default: `poll_interval=SIMULATION_POLL_INTERVAL`).
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
    options = options or FlowerRunOptions(poll_interval=SIMULATION_POLL_INTERVAL)
    with fast_simulation_dispatch():
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
