"""Running a [`FederatedConfig`] in Flower's simulation runtime from Python, on this machine: the `ClientApp` in Ray
workers (Flower's backend) or in this process ([`InProcessBackend`]).

Which backend:

- `"ray"` (the default, Flower's own): each `ClientApp` runs in a Ray worker process with its share of the CPUs and
  GPUs (`client_num_cpus`, `client_num_gpus`), so several clients train at once and a GPU can be split between
  workers; every message costs a Ray actor call (some 6 ms on a 2-core machine) and the run starts and stops Ray
  and its workers (the benchmark's tiny run takes 15.4 s with Ray, 1.6 s without: `docs/benchmarks.md`, "Flower
  overhead"). A worker with `client_num_gpus=0` sees no GPU.
- `"inprocess"` ([`InProcessBackend`]): one worker, the `ClientApp` called in this process (one client at a time,
  this process's devices and torch threads, like `perfit federate`); no Ray at all, not even imported. For one
  client at a time, on one device, short rounds, tests and debugging (a breakpoint in the ClientApp works).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from collections.abc import Callable, Iterator
from queue import Empty
from typing import Any

from ..federated.config import FederatedConfig
from .server_app import FlowerRunOptions, make_server_app

__all__ = [
    "BACKENDS",
    "SIMULATION_POLL_INTERVAL",
    "SIMULATION_DISPATCH_WAIT",
    "SIMULATION_REPLY_WAIT",
    "InProcessBackend",
    "fast_simulation_dispatch",
    "inprocess_backend",
    "run_flower_simulation",
]

logger = logging.getLogger(__name__)

BACKENDS = ("ray", "inprocess")
"""The simulation backends [`run_flower_simulation`] knows (see the module docstring)."""

SIMULATION_POLL_INTERVAL = 0.005
"""The ServerApp's longest wait between two pulls of replies in Flower's simulation (`FlowerRunOptions.poll_interval`;
0.05 s in a deployment). A pull there is one call into the in-memory LinkState (a lock and a dict look-up per pending
message); within [`fast_simulation_dispatch`] a pull that finds nothing also waits for the next stored reply, so this
is only the pause after a pull that found some replies (measured without that wait: 25-30 ms a phase with 0.05 s,
1-3 ms with 5 ms; `docs/flower.md`, section 1)."""

SIMULATION_REPLY_WAIT = 1.0
"""The longest a pull of replies in Flower's simulation waits for a reply to be stored ([`fast_simulation_dispatch`])
before it returns empty; a phase's `round_timeout` is overrun by at most that (Flower's own workers and reply store
look for work every 1 s too). Long, because the wait ends on the signal of a stored reply anyway: each time-out wakes
the ServerApp's thread, which on a loaded machine takes the interpreter lock from the thread that trains."""

SIMULATION_DISPATCH_WAIT = 1.0
"""The longest Flower's dispatcher loop waits between two looks for new messages within [`fast_simulation_dispatch`]
(Flower 1.41: a fixed 0.1 s), where the push itself takes the look; a safety net that wakes once a second."""


@contextlib.contextmanager
def fast_simulation_dispatch() -> Iterator[bool]:
    """Within the block, Flower 1.41's simulation runtime hands a message pushed by the ServerApp to its workers at
    once instead of at its next 0.1 s tick, and a stored reply to the ServerApp at once instead of at its next poll;
    restored on exit.

    Flower's simulation moves new messages from the LinkState to the workers' queue in a thread that looks every
    0.1 s (`flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue`, a fixed private `f_stop.wait(0.1)`), so
    each phase of a round (train, then evaluate) waited 0-100 ms before its first message reached a worker
    (measured: 30-60 ms a phase, `docs/flower.md`, section 1). Within this block that function is the same loop (one
    message per node and look, in the same order, one look at a time) whose wait also ends when the in-memory grid
    (`InMemoryGrid.push_messages`) stored new messages, and the push itself takes that look right away, so the
    workers get the messages from the pushing thread without a hand-over to the loop's thread; the loop itself then
    looks every [`SIMULATION_DISPATCH_WAIT`] (1 s, as Flower's workers look for work), so a stop is seen within 1 s.

    The way back likewise: Flower's workers put their replies into a queue that another thread
    (`vce_api.put_message_into_state`) stores into the LinkState, where the ServerApp's next pull (every
    `FlowerRunOptions.poll_interval`) finds them. Within this block the queue's `put` stores the reply at once (that
    loop only stores what was queued before), each stored reply is signalled, and a pull of replies
    (`InMemoryGrid.pull_messages`) that finds none of its messages answered waits for that signal (at most
    [`SIMULATION_REPLY_WAIT`]) and pulls once more. Each thread-to-thread hand-over saved costs a scheduler wake-up:
    well under a millisecond on an idle machine, several on a loaded one; so does each time-out of a thread that
    waits, which is why both waits are long (1 s) and end on their signal. Nothing else changes, and only for Flower
    1.41 (other versions run unchanged; `flwr` is pinned `<1.42`).

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
    replied = threading.Condition()
    stored = [0]  # replies stored so far (under `replied`)
    looking = threading.Lock()  # one look at a time: Flower marks a message delivered after its look returned it
    running: list[tuple[Any, Any, Any]] = []  # (state, workers' queue, nodes) of the simulations running now
    original_add, original_push = vce_api.add_messages_to_queue, InMemoryGrid.push_messages
    original_store, original_pull = vce_api.put_message_into_state, InMemoryGrid.pull_messages

    def look(state: Any, queue: Any, nodes_mapping: Any) -> None:
        """One look of Flower 1.41's loop: at most one new message per node, in the nodes' order."""
        with looking:
            for node_id in nodes_mapping.keys():
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)

    def add_messages_to_queue(state: Any, queue: Any, nodes_mapping: Any, f_stop: threading.Event) -> None:
        """Flower 1.41's loop, waking on a push as well as every `SIMULATION_DISPATCH_WAIT`."""
        entry = (state, queue, nodes_mapping)
        running.append(entry)
        try:
            while not f_stop.is_set():
                wake.clear()  # before the look: a push during it sets it again, so the wait below ends at once
                look(*entry)
                wake.wait(SIMULATION_DISPATCH_WAIT)
        finally:
            running.remove(entry)

    def push_messages(self: Any, messages: Any) -> Any:
        ids = original_push(self, messages)
        for entry in list(running):  # the look, done at once by the pushing thread (no hand-over to the loop)
            if entry[0] is getattr(self, "state", None):
                look(*entry)
        wake.set()
        return ids

    def store(state: Any, reply: Any) -> None:
        try:
            state.store_message_res(reply)
        except Exception:  # as in Flower's loop, a reply that cannot be stored is lost, not the simulation
            logger.exception("a ClientApp reply could not be stored in the LinkState")
        with replied:
            stored[0] += 1
            replied.notify_all()

    def put_message_into_state(state: Any, queue: Any, f_stop: threading.Event) -> None:
        """Flower 1.41's loop, signalling each stored reply; the workers store their replies themselves (the
        queue's `put` stores), this loop only what they queued before."""

        def put(reply: Any, *args: Any, **kwargs: Any) -> None:
            store(state, reply)

        queue.put = put  # this simulation's reply queue only (an attribute of the instance)
        while not f_stop.is_set():
            try:
                reply = queue.get(timeout=1.0)
            except Empty:
                continue
            store(state, reply)

    def pull_messages(self: Any, message_ids: Any) -> Any:
        ids = list(message_ids)
        with replied:
            seen = stored[0]
        got = original_pull(self, ids)
        if got or not ids:
            return got
        with replied:  # a reply stored since the pull above ends the wait at once
            replied.wait_for(lambda: stored[0] != seen, timeout=SIMULATION_REPLY_WAIT)
        return original_pull(self, ids)

    add_messages_to_queue._hf_perfit_fast = True  # type: ignore[attr-defined]
    add_messages_to_queue._hf_perfit_wake = wake  # type: ignore[attr-defined]
    vce_api.add_messages_to_queue = add_messages_to_queue
    vce_api.put_message_into_state = put_message_into_state
    InMemoryGrid.push_messages = push_messages  # type: ignore[method-assign]
    InMemoryGrid.pull_messages = pull_messages  # type: ignore[method-assign]
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue = original_add
        vce_api.put_message_into_state = original_store
        InMemoryGrid.push_messages = original_push  # type: ignore[method-assign]
        InMemoryGrid.pull_messages = original_pull  # type: ignore[method-assign]


def _flower_141() -> bool:
    import flwr

    return flwr.__version__.startswith("1.41.")


try:  # Flower 1.41's simulation backend interface (flwr is pinned <1.42)
    from flwr.server.superlink.fleet.vce.backend import Backend as _Backend
except ImportError:  # pragma: no cover - another Flower layout
    _Backend = object  # type: ignore[assignment,misc]


class InProcessBackend(_Backend):  # type: ignore[misc,valid-type]
    """A Flower 1.41 simulation backend (`flwr.server.superlink.fleet.vce.backend.Backend`) that runs the `ClientApp`
    in this process: one worker, one message at a time, no Ray.

    It does what Flower's `RayBackend` asks of a Ray actor (`flwr.simulation.ray_transport.ray_actor`,
    `VirtualClientEngineActor.run`) without the actor: the `ClientApp` is loaded once in [`build`], and
    [`process_message`] calls it with a copy of the message and of the node's context (a Ray actor gets pickled
    copies too, so the ClientApp cannot change the LinkState's message or, when it raises, the stored context) and
    returns the reply and the updated context; an exception becomes Flower's `ClientAppException`, which the
    simulation's worker turns into an error reply, as with Ray.

    Args:
        backend_config (`dict`, *optional*): Flower's backend config; nothing in it applies here (no resources to
            share out), so it is kept only for Flower's interface.
    """

    def __init__(self, backend_config: dict[str, Any] | None = None) -> None:
        self.backend_config = dict(backend_config or {})
        self.app: Any = None
        self.lock = threading.Lock()

    def build(self, app_fn: Callable[[], Any]) -> None:
        """Load the `ClientApp` (Flower's `app_fn`; a load failure is Flower's `LoadClientAppError`)."""
        self.app = app_fn()

    @property
    def num_workers(self) -> int:
        """One: the `ClientApp` runs in this process, one message at a time."""
        return 1

    def is_worker_idle(self) -> bool:
        """Whether no message is being processed."""
        return not self.lock.locked()

    def process_message(self, message: Any, context: Any) -> tuple[Any, Any]:
        """Run the `ClientApp` on `message` in this thread; returns `(reply, updated context)`.

        Raises:
            ValueError: [`build`] was not called.
            ClientAppException: the `ClientApp` raised (Flower's simulation replies with an error message).
        """
        from flwr.clientapp.client_app import ClientAppException, LoadClientAppError

        if self.app is None:
            raise ValueError("InProcessBackend.process_message before build(): no ClientApp loaded.")
        # Copies, as a Ray actor gets: arrays are immutable bytes, so this copies records, not tensor data.
        message, context = copy.deepcopy(message), copy.deepcopy(context)
        with self.lock:
            try:
                reply = self.app(message=message, context=context)
            except LoadClientAppError:
                raise
            except Exception as err:
                raise ClientAppException(str(err)) from err
        return reply, context

    def terminate(self) -> None:
        """Nothing to stop (the `ClientApp`'s module-level state stays, as in a Ray worker until it exits)."""
        self.app = None


@contextlib.contextmanager
def inprocess_backend() -> Iterator[None]:
    """Within the block, Flower 1.41's simulation runtime runs its `ClientApp`s with [`InProcessBackend`] instead of
    Ray; restored on exit.

    Flower 1.41 has no setting for it: `flwr.server.superlink.fleet.vce.vce_api.start_vce` builds its backend in a
    local `backend_fn` that always imports and returns `RayBackend` (its `backend_name` argument is not read). Within
    this block `vce_api.run_api` (which `start_vce` calls with that `backend_fn`) is the same function called with a
    `backend_fn` that returns an [`InProcessBackend`]; Ray is then neither imported nor started. Process-wide: a
    Flower simulation started in another thread meanwhile runs in-process too.

    Raises:
        RuntimeError: another Flower version than 1.41 (`flwr` is pinned `<1.42`), or already inside this block.
    """
    if not _flower_141():
        import flwr

        raise RuntimeError(
            f"backend='inprocess' needs Flower 1.41 (installed: flwr {flwr.__version__}); use backend='ray' or "
            'install the pinned version: pip install "hf_perfit[flower]".'
        )
    import flwr.server.superlink.fleet.vce.vce_api as vce_api

    if getattr(vce_api.run_api, "_hf_perfit_inprocess", False):
        raise RuntimeError(
            "inprocess_backend() is already active in this process: one in-process simulation at a time."
        )
    original = vce_api.run_api

    def run_api(app_fn: Any, backend_fn: Any, *args: Any, **kwargs: Any) -> Any:
        return original(app_fn, InProcessBackend, *args, **kwargs)

    run_api._hf_perfit_inprocess = True  # type: ignore[attr-defined]
    vce_api.run_api = run_api
    try:
        yield
    finally:
        vce_api.run_api = original


def run_flower_simulation(
    config: FederatedConfig,
    *,
    backend: str = "ray",
    num_cpus: int | None = None,
    client_num_cpus: float | None = None,
    client_num_gpus: float | None = None,
    options: FlowerRunOptions | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run `config` with `flwr.simulation.run_simulation`: the hf_perfit `ServerApp` and `ClientApp`, one virtual
    SuperNode per client (`partition-id` = client index), the ClientApps in Ray workers or in this process.

    The Flower equivalent of [`run_federated`]; the outputs land in `config.output_dir` (`metrics.jsonl`,
    `results.md`, `flower_run.json`, and each client's `clients/<client_id>/adapter`), the same numbers with either
    backend. Flower 1.41's simulation dispatches each message as soon as it is pushed ([`fast_simulation_dispatch`]),
    and the ServerApp pulls replies every [`SIMULATION_POLL_INTERVAL`] at most.

    Args:
        config ([`FederatedConfig`]): the run.
        backend (`str`, defaults to `"ray"`): `"ray"` (Flower's: ClientApps in Ray workers, several at a time, with
            their own share of CPUs and GPUs) or `"inprocess"` ([`InProcessBackend`]: the ClientApp in this process,
            one client at a time, this process's devices and torch threads, no Ray); see the module docstring.
        num_cpus (`int`, *optional*): CPUs Ray may use (default: all of this machine's). Ray only.
        client_num_cpus (`float`, *optional*): CPUs per `ClientApp` worker (default 1); Ray runs
            `num_cpus // client_num_cpus` clients at a time. Ray only.
        client_num_gpus (`float`, *optional*): GPUs per `ClientApp` worker (default 0: the workers see no GPU; e.g.
            0.5 to share one GPU by two). Ray only.
        options ([`FlowerRunOptions`], *optional*): timeouts (default: `poll_interval=SIMULATION_POLL_INTERVAL`).
        verbose (`bool`, defaults to `False`): Flower's debug logs.

    Returns:
        `dict`: the last round's summary record.

    Raises:
        ValueError: an unknown `backend`, or Ray's resource arguments with `backend="inprocess"`.
        RuntimeError: `backend="inprocess"` with another Flower version than 1.41.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown Flower simulation backend {backend!r}; choose one of {list(BACKENDS)}.")
    given = {"num_cpus": num_cpus, "client_num_cpus": client_num_cpus, "client_num_gpus": client_num_gpus}
    if backend == "inprocess" and any(v is not None for v in given.values()):
        names = ", ".join(k for k, v in given.items() if v is not None)
        raise ValueError(
            f"{names}: Ray's resources, which backend='inprocess' does not use (its ClientApp runs in this process, "
            "one client at a time, with this process's devices and torch threads); drop them or use backend='ray'."
        )
    from flwr.simulation import run_simulation

    from .client_app import app as client_app

    init_args: dict[str, Any] = {"include_dashboard": False}
    if num_cpus is not None:
        init_args["num_cpus"] = int(num_cpus)
    backend_config = {
        "client_resources": {
            "num_cpus": float(1.0 if client_num_cpus is None else client_num_cpus),
            "num_gpus": float(client_num_gpus or 0.0),
        },
        "init_args": init_args,
    }
    result: list[dict[str, Any]] = []
    options = options or FlowerRunOptions(poll_interval=SIMULATION_POLL_INTERVAL)
    runtime = inprocess_backend() if backend == "inprocess" else contextlib.nullcontext()
    with runtime, fast_simulation_dispatch():
        run_simulation(
            server_app=make_server_app(config, options, result),
            client_app=client_app,
            num_supernodes=config.num_clients,
            backend_name=backend,
            backend_config=backend_config,
            verbose_logging=verbose,
        )
    if not result:
        raise RuntimeError(f"the Flower simulation ended without a result; see {config.output_dir}/flower_run.json.")
    return result[0]
