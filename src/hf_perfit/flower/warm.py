"""A long-running ClientApp process for a Flower deployment: the base model stays loaded across messages.

Flower 1.41 runs every ClientApp task (one message) in a fresh `flwr-clientapp` process: a SuperNode's SuperExec
acquires the task from the SuperNode's Runtime API, starts `flwr-clientapp --token ...`, which pulls the message,
imports torch and hf_perfit, loads the model and the client's data, answers and exits. On a tiny model that is tens
of seconds per message (`docs/benchmarks.md`, "Flower overhead").

Flower supports running that part outside the SuperNode: `flower-supernode --isolation process` starts no
SuperExec, and a process the user starts acquires the node's tasks from its Runtime API. This module is such a
process. It acquires each `flwr-clientapp` task with the same Runtime API calls as Flower's SuperExec, and runs it
**in this process** with the calls of Flower's `flwr-clientapp` (pull the task's message and context, call the
ClientApp, push the reply and the task's output), without exiting. The ClientApp's module-level cache
([`hf_perfit.flower.client_app`]: model, tokenizer and the client's tokenized data, keyed on the run's config and
this node's settings) therefore survives from one message to the next: the model is loaded once per run.

```bash
flower-supernode --insecure --superlink <server>:9092 --isolation process --port 9094 \
    --node-config "partition-id=0 num-partitions=8"
python -m hf_perfit.flower.warm --runtime-api-address 127.0.0.1:9094 --insecure
```

It serves hf_perfit's ClientApp (`hf_perfit.flower.client_app:app`, or `--app module:attr`) and answers tasks of
runs whose Flower app names another ClientApp with an error (it does not install or load apps at run time).

The same runner also works inside the SuperNode's own process (`python -m hf_perfit.flower.supernode --clientapp
hf_perfit.flower.client_app:app`): its Runtime API calls then go straight to the node's handlers
([`InProcessRuntimeClient`]), with no HTTP request between the node and its ClientApp (`docs/flower.md`, section 2).
"""

from __future__ import annotations

import argparse
import importlib
import io
import logging
import time
import tomllib
import zipfile
from typing import Any

import httpx
from flwr.app import Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

__all__ = ["DEFAULT_APP", "InProcessRuntimeClient", "WarmClientAppRunner", "main"]

logger = logging.getLogger(__name__)

DEFAULT_APP = "hf_perfit.flower.client_app:app"
HELD_ANSWER = 0.25
"""An empty `AcquireTask` answer that took at least this long was held by the SuperNode until a task came or its hold
ran out (`hf_perfit.flower.supernode`, about 1 s): the next poll follows at once, since the SuperNode's hold is the
wait. Flower's own SuperNode answers at once (milliseconds); then the process waits 5-200 ms between polls."""


def load_app(reference: str) -> ClientApp:
    """The `ClientApp` object named `module:attribute`."""
    module, _, attr = reference.partition(":")
    if not module or not attr:
        raise ValueError(f"--app {reference!r} must be 'module:attribute', e.g. {DEFAULT_APP!r}.")
    app = getattr(importlib.import_module(module), attr)
    if not isinstance(app, ClientApp):
        raise TypeError(f"{reference} is a {type(app).__name__}, not a flwr ClientApp.")
    return app


def fab_clientapp(fab_content: bytes) -> str | None:
    """The `clientapp` component a Flower app bundle (FAB: a zip with the app's `pyproject.toml`) names."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab_content)) as bundle:
            project = tomllib.loads(bundle.read("pyproject.toml").decode())
    except (zipfile.BadZipFile, KeyError, tomllib.TOMLDecodeError):
        return None
    return project.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {}).get("clientapp")


def pull_task_input(client: RuntimeHttpClient, first_retry: float = 0.02) -> tuple[Message, Any, Any]:
    """The task's context, Flower app bundle and message, from the SuperNode's Runtime API.

    The SuperNode hands out a task as soon as it stored the message, while it still downloads the message's arrays
    from the SuperLink; a pull of an array not there yet is retried after `first_retry` seconds, doubling up to
    0.5 s (Flower's `flwr-clientapp` first waits 1 s, which a process that acquires tasks within milliseconds hits
    on every message).

    Returns:
        `(message, context, fab)`.
    """
    task = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = task.task_id  # Flower stamps the reply with the running task's identity
    TaskIdentity.run_id = task.run.run_id
    TaskIdentity.node_id = task.context.node_id
    context = context_from_proto(task.context)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode handed out a ClientApp task without a message.")
    tree = pulled.message_object_trees[0]
    node = Node(node_id=context.node_id)
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        initial_backoff=first_retry,
        backoff_cap=0.5,
        max_tries_per_object=None,  # Flower's overall deadline (PULL_MAX_TIME) still applies
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # the id is the object's; not part of its content
    return message, context, fab_from_proto(task.fab)


class InProcessRuntimeClient:
    """The calls of Flower's `RuntimeHttpClient` that [`WarmClientAppRunner`] makes, answered by the SuperNode's
    Runtime API handlers **in this process** (the SuperNode's own, see `hf_perfit.flower.supernode --clientapp`):
    the same functions Flower's Runtime API server runs for each request, on the same node state, without HTTP.

    Args:
        state: the SuperNode's `NodeState`.
        token (`str`, *optional*): the task's token (what `RuntimeTokenHttpInterceptor` sends); `None` for the
            calls that need none (`AcquireTask`).
    """

    def __init__(self, state: Any, token: str | None = None) -> None:
        import flwr.supernode.servicer.runtime.runtime_handlers as handlers
        from flwr.supercore.servicer.runtime import runtime_handlers as core_handlers

        self.state, self.token = state, token
        self._handlers, self._core = handlers, core_handlers

    def _task(self) -> Any:
        task = self.state.get_task_by_token(self.token) if self.token else None
        if task is None:  # what the Runtime API answers an unknown or expired token
            raise RuntimeError("Runtime task-token authentication failed (the task is unknown or expired).")
        return task

    def AcquireTask(self, request: Any) -> Any:  # noqa: N802 - Flower's method names
        return self._handlers.acquire_task(request, self.state)  # looked up per call: the launcher's held one

    def SendTaskHeartbeat(self, request: Any) -> Any:  # noqa: N802
        return self._core.send_task_heartbeat(request, self.state, self._task())

    def PullTaskInput(self, request: Any) -> Any:  # noqa: N802
        return self._handlers.pull_task_input(request, self.state, self._task())

    def PullMessages(self, request: Any) -> Any:  # noqa: N802
        return self._handlers.pull_messages(request, self.state, self._task())

    def PullObject(self, request: Any) -> Any:  # noqa: N802
        return self._handlers.pull_object(request, self.state, self._task())

    def ConfirmMessageReceived(self, request: Any) -> Any:  # noqa: N802
        return self._handlers.confirm_message_received(request, self.state, self._task())

    def PushMessages(self, request: Any) -> Any:  # noqa: N802
        return self._handlers.push_messages(request, self.state, self._task())

    def PushObject(self, request: Any) -> Any:  # noqa: N802
        return self._handlers.push_object(request, self.state, self._task())

    def PushTaskOutput(self, request: Any) -> Any:  # noqa: N802
        return self._handlers.push_task_output(request, self.state, self._task())

    def close(self) -> None:
        """Nothing to close."""


class WarmClientAppRunner:
    """Acquires a SuperNode's ClientApp tasks and runs each in this process (see the module docstring).

    Args:
        runtime_api_address (`str`): the SuperNode's Runtime API (`flower-supernode --port`), e.g. `127.0.0.1:9094`.
        insecure (`bool`, defaults to `False`): plaintext HTTP to the Runtime API (loopback only).
        root_certificates (`bytes`, *optional*): PEM CA certificates for a TLS Runtime API.
        app (`str`, defaults to `"hf_perfit.flower.client_app:app"`): the ClientApp to serve.
        poll_interval (`float`, defaults to 0.2): the longest wait between two task polls during a run; after a
            task the wait restarts at 5 ms and doubles up to it (the next message of a round usually follows within
            milliseconds; Flower's SuperExec polls every second, `FLWR_SUPEREXEC_TASK_POLL_INTERVAL`). A SuperNode
            started with `python -m hf_perfit.flower.supernode` holds an empty answer until a task comes (up to
            about 1 s); the process then asks again at once, without waiting.
        idle_poll_interval (`float`, defaults to 1.0): the longest wait once no task came for `idle_after` seconds
            (between runs), so an idle process asks its SuperNode about once a second, like Flower's SuperExec.
        idle_after (`float`, defaults to 60): seconds without a task after which the process counts as idle.
        node_state (*optional*): the SuperNode's `NodeState` when this runner runs inside the SuperNode's process
            (`hf_perfit.flower.supernode --clientapp`): its Runtime API handlers are called directly
            ([`InProcessRuntimeClient`]) instead of over HTTP at `runtime_api_address`.
    """

    def __init__(
        self,
        runtime_api_address: str,
        insecure: bool = False,
        root_certificates: bytes | None = None,
        app: str = DEFAULT_APP,
        poll_interval: float = 0.2,
        idle_poll_interval: float = 1.0,
        idle_after: float = 60.0,
        node_state: Any = None,
    ) -> None:
        self.address = runtime_api_address
        self.insecure = insecure
        self.root_certificates = root_certificates
        self.app_ref = app
        self.app = load_app(app)
        self.poll_interval = float(poll_interval)
        self.idle_poll_interval = max(float(idle_poll_interval), self.poll_interval)
        self.idle_after = float(idle_after)
        self.tasks_done = 0
        self._last_task = time.monotonic()
        self.node_state = node_state
        self._control: Any
        if node_state is not None:
            self._control = InProcessRuntimeClient(node_state)
        else:
            self._control = RuntimeHttpClient.from_server_address(
                server_address=runtime_api_address,
                insecure=insecure,
                root_certificates=root_certificates,
                interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
                retry_invoker=make_simple_http_retry_invoker(),
            )

    def acquire(self) -> str | None:
        """One poll: the token of a `flwr-clientapp` task the SuperNode hands out, or `None`."""
        res = self._control.AcquireTask(AcquireTaskRequest(supported_task_types=[str(TaskType.CLIENT_APP)]))
        if res.HasField("task") and res.token:
            return str(res.token)
        return None

    def run_task(self, token: str) -> None:
        """Run one task with Flower's `flwr-clientapp` calls: pull its message and context, call the ClientApp, push
        the reply (an `Error` reply when it raised) and the task's output (the updated context)."""
        client: Any
        if self.node_state is not None:
            client = InProcessRuntimeClient(self.node_state, token)
        else:
            client = RuntimeHttpClient.from_server_address(
                server_address=self.address,
                insecure=self.insecure,
                root_certificates=self.root_certificates,
                interceptors=[
                    RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                    RuntimeTokenHttpInterceptor(token),
                ],
                retry_invoker=make_simple_http_retry_invoker(),
            )
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message: Message | None = None
        context = None
        reply: Message | None = None
        status, details = SubStatus.FAILED, "the task failed before its message was pulled"
        t0 = time.perf_counter()
        t_pulled = t_answered = t0
        try:
            message, context, fab = pull_task_input(client)
            t_pulled = time.perf_counter()
            named = fab_clientapp(fab.content)
            if named is not None and named != self.app_ref:
                raise RuntimeError(
                    f"this warm ClientApp process serves {self.app_ref!r}, but the run's Flower app names "
                    f"clientapp = {named!r}; start the process with --app {named!r}."
                )
            reply = self.app(message=message, context=context)
            t_answered = time.perf_counter()
            status, details = SubStatus.COMPLETED, ""
        except Exception as err:  # the ClientApp's failure is the reply, as in flwr-clientapp
            logger.exception("the ClientApp raised an exception")
            details = f"{type(err)}:<'{err}'>"
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
                push_task_output(client, context, status, details)
            finally:
                heartbeat.stop()
                client.close()
        self.tasks_done += 1
        t_end = time.perf_counter()
        logger.info(
            "%s task done in %.3f s: pull %.3f s, ClientApp %.3f s, push %.3f s",
            message.metadata.message_type if message is not None else "a",
            t_end - t0,
            t_pulled - t0,
            max(0.0, t_answered - t_pulled),
            t_end - max(t_answered, t_pulled),
        )

    def serve(self, max_tasks: int | None = None) -> None:
        """Poll for tasks and run them, forever (or until `max_tasks` ran)."""
        logger.info("serving %s for the SuperNode at %s", self.app_ref, self.address)
        delay = 0.005
        while max_tasks is None or self.tasks_done < max_tasks:
            asked = time.monotonic()
            try:
                token = self.acquire()
            except httpx.HTTPError as err:  # the SuperNode is (re)starting: wait for its Runtime API
                logger.debug("the Runtime API at %s does not answer yet: %s", self.address, err)
                time.sleep(0.5)
                continue
            if token is None:
                if time.monotonic() - asked >= HELD_ANSWER:  # the SuperNode held the answer: it wakes us, ask again
                    delay = 0.005
                    continue
                time.sleep(delay)
                delay = min(2 * delay, self.next_poll_cap())
                continue
            self.run_task(token)
            self._last_task = time.monotonic()
            delay = 0.005

    def next_poll_cap(self) -> float:
        """The longest wait before the next task poll: `poll_interval` within `idle_after` seconds of the last task
        (or of the start), `idle_poll_interval` after that."""
        idle = time.monotonic() - self._last_task >= self.idle_after
        return self.idle_poll_interval if idle else self.poll_interval

    def close(self) -> None:
        """Close the connection to the Runtime API."""
        self._control.close()


def main(argv: list[str] | None = None) -> None:
    """`python -m hf_perfit.flower.warm --runtime-api-address HOST:PORT [--insecure | --root-certificates CA]`."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (its --port)")
    p.add_argument("--insecure", action="store_true", help="plaintext HTTP (loopback only)")
    p.add_argument("--root-certificates", default=None, help="PEM CA file of a TLS Runtime API")
    p.add_argument("--app", default=DEFAULT_APP, help=f"the ClientApp to serve (default {DEFAULT_APP})")
    p.add_argument("--poll-interval", type=float, default=0.2, help="longest wait between task polls while idle")
    args = p.parse_args(argv)
    if not args.insecure and args.root_certificates is None:
        p.error("give --insecure (loopback only) or --root-certificates <CA file>.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Runtime API request otherwise
    certificates: Any = None
    if args.root_certificates is not None:
        with open(args.root_certificates, "rb") as f:
            certificates = f.read()
    runner = WarmClientAppRunner(args.runtime_api_address, args.insecure, certificates, args.app, args.poll_interval)
    try:
        runner.serve()
    finally:
        runner.close()


if __name__ == "__main__":
    main()
