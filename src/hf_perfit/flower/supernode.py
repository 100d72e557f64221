"""`flower-supernode` without its fixed waits, optionally with the ClientApp in its own process:
`python -m hf_perfit.flower.supernode [--poll-interval S] [--clientapp MODULE:ATTR] [flower-supernode args]`.

Flower 1.41's SuperNode asks the SuperLink for a new message, and when there is none waits a fixed **3 s** before
asking again; while its ClientApp works it checks for the reply every **0.5 s**, and again every 0.5 s for each of
the reply's objects the ClientApp has not finished uploading; and when it downloads a message's arrays before the
server finished uploading them, it retries after **1 s** (doubling). All are fixed in
`flwr.supernode.start_client_internal` (`time.sleep(3)`, `time.sleep(0.5)`, `pull_objects`' default first backoff),
with no option to change them. Each phase of a round (train, then evaluate) therefore waits on every node, however
fast the ClientApp answers: with a small model those waits, not the work, are the round time (`docs/benchmarks.md`,
"Flower overhead").

This launcher runs Flower's own `flower-supernode` entry point with:

- the waits for the node's own ClientApp (its reply and the reply's objects, both stored in this process by the
  SuperNode's Runtime API) woken as soon as the node's state changes: the in-memory message store and object store
  notify a condition the waits sleep on (at most `--poll-interval` seconds, should a notification be missed);
- the idle wait between two asks to the SuperLink capped at `--poll-interval` seconds (default 0.1) while the node
  is active (it stored a message or an object within the last minute; after that it asks every 3 s again, as
  Flower does): the SuperLink cannot notify a node, so this one stays a poll;
- the first retry of a download of arrays not yet on the SuperLink after 20 ms (doubling up to the cap);
- its Runtime API's answers to the node's ClientApp process **held** while there is nothing to give: an
  `AcquireTask` with no task waits until the node stores a message (at most [`HOLD`] seconds), a `PullObject` of an
  object the node is still downloading from the SuperLink until it arrives. A long-running ClientApp process
  ([`hf_perfit.flower.warm`], which asks again at once after a held answer) thus gets a message's task and objects
  as soon as the node has them, instead of at its next poll (it polled every 5-200 ms, one request each; measured,
  some 100 ms of each phase of a round, `docs/flower.md`, section 2). Flower's own SuperExec (`--isolation
  subprocess`) gets its tasks sooner the same way.

With `--clientapp MODULE:ATTR` (e.g. `hf_perfit.flower.client_app:app`) the node runs with `--isolation process` and
a thread of this process serves its ClientApp tasks ([`serve_in_node`]): a [`hf_perfit.flower.warm`] runner whose
Runtime API calls go straight to the node's handlers (`hf_perfit.flower.warm.InProcessRuntimeClient`), the same
functions Flower's Runtime API server runs per request. One process per node, the model loaded once per run, and no
HTTP request between the node and its ClientApp (some 13 per client and phase with a separate process; measured,
a round 1.51 s -> 1.17 s, `docs/flower.md`, section 2). The price is isolation: a crash of the process (not a Python
exception of the ClientApp, which is its error reply) stops the node.

Everything else is Flower's SuperNode, unchanged. The cost: during a run a node asks the SuperLink for messages
`1 / cap` times a second instead of once every 3 s (one small HTTP request each); with hundreds of nodes on one
SuperLink, raise the cap. It patches private details of Flower 1.41 (the pinned `flwr>=1.41,<1.42`) and refuses any
other version.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

__all__ = [
    "ACTIVE_WINDOW",
    "DEFAULT_CAP",
    "HOLD",
    "NODE_ACTIVITY",
    "NodeActivity",
    "capped_time",
    "held",
    "main",
    "notify_after",
    "serve_in_node",
]

DEFAULT_CAP = 0.1
IDLE_WAIT = 3.0
"""Flower 1.41's wait after an empty ask to the SuperLink; its shorter waits are for this node's own state."""
ACTIVE_WINDOW = 60.0
"""Seconds after the node's last stored message or object during which an empty ask is repeated after the cap;
after that the node is idle and asks every 3 s again, as Flower does (a run's first message then waits up to 3 s)."""
HOLD = 1.0
"""The longest the node's Runtime API holds an empty `AcquireTask` or a `PullObject` of an object still on its way
(see [`held`]): an idle ClientApp process then asks about once a second, like Flower's SuperExec."""


class NodeActivity:
    """When the SuperNode last stored a message or an object, with a condition notified each time."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.last = time.monotonic()
        self.count = 0
        """Changes so far: a wait that read it before looking at the state misses no change made after."""

    def touch(self) -> None:
        """Record a change and wake every wait on it."""
        with self.changed:
            self.last = time.monotonic()
            self.count += 1
            self.changed.notify_all()

    def wait_change(self, since: int, timeout: float) -> bool:
        """Wait until a change after the `since`-th ([`count`] read earlier), at most `timeout` seconds; whether one
        came."""
        with self.changed:
            return self.changed.wait_for(lambda: self.count != since, max(timeout, 0.0))


NODE_ACTIVITY = NodeActivity()
"""The launched SuperNode's activity (its stores call [`NodeActivity.touch`], see [`notify_after`])."""


def capped_time(
    cap: float, activity: NodeActivity | None = None, active_window: float = ACTIVE_WINDOW
) -> SimpleNamespace:
    """A stand-in for the `time` module of Flower's SuperNode loop; every attribute but `sleep` is `time`'s.

    `sleep(s)` with `s` shorter than Flower's idle wait (3 s: the waits for this node's own ClientApp) returns as
    soon as `activity` changes, after at most `min(s, cap)`. The idle wait (no message from the SuperLink, a remote
    wait nothing can wake) sleeps `cap` while the node was active within `active_window` seconds, else Flower's 3 s.
    Without `activity`, every wait is `min(s, cap)`.
    """

    def own(seconds: float) -> None:
        seconds = min(float(seconds), cap)
        if activity is None or seconds <= 0:
            time.sleep(max(seconds, 0.0))
            return
        with activity.changed:
            activity.changed.wait(seconds)

    def sleep(seconds: float) -> None:
        if float(seconds) < IDLE_WAIT:
            own(seconds)
        elif activity is None or time.monotonic() - activity.last < active_window:
            time.sleep(min(float(seconds), cap))
        else:
            time.sleep(float(seconds))

    class _Time(SimpleNamespace):
        def __getattr__(self, name: str):
            return getattr(time, name)

    return _Time(sleep=sleep)


def notify_after(method: Callable[..., Any], activity: NodeActivity) -> Callable[..., Any]:
    """`method`, then `activity.touch()` (even when it raised)."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        finally:
            activity.touch()

    return wrapper


def held(
    handler: Callable[..., Any], ready: Callable[[Any], bool], activity: NodeActivity, hold: float = HOLD
) -> Callable[..., Any]:
    """`handler` (a Runtime API handler of the SuperNode), whose answer is held while it is not `ready`: asked again
    after each change of `activity`, until it is ready or `hold` seconds passed (then the last answer, as Flower
    would give it at once). Runtime API handlers are plain functions that Flower's HTTP server runs in its thread
    pool, so a held answer blocks one of those threads, not the server."""

    @functools.wraps(handler)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        deadline = time.monotonic() + hold
        while True:
            since = activity.count
            answer = handler(*args, **kwargs)
            left = deadline - time.monotonic()
            if ready(answer) or left <= 0:
                return answer
            activity.wait_change(since, left)

    return wrapper


def _option(args: list[str], name: str) -> str | None:
    """Remove `name VALUE` from `args`; the value (`None` when absent)."""
    if name not in args:
        return None
    i = args.index(name)
    if i + 1 >= len(args):
        raise SystemExit(f"{name} needs a value.")
    value = args[i + 1]
    del args[i : i + 2]
    return value


def serve_in_node(app: str, factory: Any, cap: float) -> threading.Thread:
    """Start a daemon thread that runs the node's ClientApp tasks in this process (`--clientapp`): a
    [`WarmClientAppRunner`] whose Runtime API calls go straight to the node's handlers. Should the runner itself
    fail (not the ClientApp: its exceptions are its error replies), the SuperNode is stopped, so that the failure is
    seen, not a node that never answers."""
    import os
    import signal

    from .warm import WarmClientAppRunner

    def run() -> None:
        try:
            while factory.state_instance is None:  # Flower creates the node state when the node starts
                time.sleep(0.05)
            runner = WarmClientAppRunner("in-process", app=app, poll_interval=cap, node_state=factory.state_instance)
            runner.serve()
        except BaseException:  # pragma: no cover - reported, then the node stops
            import logging

            logging.getLogger(__name__).exception("the in-node ClientApp runner failed; stopping the SuperNode")
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=run, name="hf_perfit-clientapp", daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> None:
    """Run `flower-supernode` with the arguments given (minus `--poll-interval SECONDS` and `--clientapp
    MODULE:ATTR`) and capped polls."""
    import flwr
    import flwr.supernode.servicer.runtime.runtime_handlers as handlers
    import flwr.supernode.start_client_internal as internal
    from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
    from flwr.supernode.cli.flower_supernode import flower_supernode
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState
    from flwr.supernode.nodestate.nodestate_factory import NodeStateFactory

    if not flwr.__version__.startswith("1.41."):
        raise SystemExit(
            f"hf_perfit.flower.supernode patches Flower 1.41's SuperNode, but flwr {flwr.__version__} is installed; "
            "use plain `flower-supernode` (or install flwr>=1.41,<1.42)."
        )
    args = list(sys.argv[1:] if argv is None else argv)
    cap = DEFAULT_CAP
    if "--poll-interval" in args:
        i = args.index("--poll-interval")
        try:
            cap = float(args[i + 1])
        except (IndexError, ValueError):
            raise SystemExit("--poll-interval needs a number of seconds, e.g. --poll-interval 0.1.") from None
        if not 0 < cap <= 3:
            raise SystemExit(f"--poll-interval {cap} must be in (0, 3] seconds.")
        del args[i : i + 2]
    app = _option(args, "--clientapp")
    if app is not None:
        isolation = _option(args, "--isolation")
        if isolation not in (None, "process"):
            raise SystemExit(
                f"--clientapp runs the ClientApp in the SuperNode's process; --isolation {isolation} would start "
                "another one: leave --isolation out (or give --isolation process)."
            )
        from .warm import load_app

        try:
            load_app(app)  # a bad reference fails here, before the node connects
        except (ImportError, AttributeError, ValueError, TypeError) as err:
            raise SystemExit(f"--clientapp {app}: {err}") from None
        args += ["--isolation", "process"]  # Flower starts no SuperExec: the tasks are this process's
    InMemoryNodeState.store_message = notify_after(InMemoryNodeState.store_message, NODE_ACTIVITY)
    InMemoryObjectStore.put = notify_after(InMemoryObjectStore.put, NODE_ACTIVITY)
    internal.time = capped_time(cap, NODE_ACTIVITY)
    # the Runtime API router calls `handlers.<name>` at each request, so these take effect for every request
    handlers.acquire_task = held(handlers.acquire_task, lambda r: r.HasField("task"), NODE_ACTIVITY)
    handlers.pull_object = held(  # not found: not this node's (Flower's answer at once); found: wait until there
        handlers.pull_object, lambda r: r.object_available or not r.object_found, NODE_ACTIVITY
    )
    internal.pull_objects = functools.partial(  # Flower's overall deadline (PULL_MAX_TIME) still applies
        internal.pull_objects, initial_backoff=min(0.02, cap), backoff_cap=cap, max_tries_per_object=None
    )
    if app is not None:
        factories: list[Any] = []
        init = NodeStateFactory.__init__

        @functools.wraps(init)
        def remembered(self: Any, *a: Any, **k: Any) -> None:
            init(self, *a, **k)
            factories.append(self)

        NodeStateFactory.__init__ = remembered  # type: ignore[method-assign]
        _Pending(factories, app, cap).start()
    sys.argv = ["flower-supernode", *args]
    flower_supernode()


class _Pending(threading.Thread):
    """Waits for Flower to create the node's state factory, then [`serve_in_node`] on it."""

    def __init__(self, factories: list[Any], app: str, cap: float) -> None:
        super().__init__(name="hf_perfit-clientapp-start", daemon=True)
        self.factories, self.app, self.cap = factories, app, cap

    def run(self) -> None:
        while not self.factories:
            time.sleep(0.05)
        serve_in_node(self.app, self.factories[0], self.cap)


if __name__ == "__main__":
    main()
