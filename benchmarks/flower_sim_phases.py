"""Where a round of Flower's simulation runtime goes: a per-phase breakdown of the `flower_simulation_1cpu` arm of
`flower_overhead.py` (the same tiny work: 3 clients, PerFIT, 2 rounds of 4 local steps, Ray given 1 CPU), or with
`--backend inprocess` of its `flower_simulation_inprocess` arm (the ClientApp in this process, one torch thread).

Every step of a message's way is time-stamped (wall clock, shared by the driver and the Ray worker) by wrapping, for
this process only, the functions it passes through: the ServerApp's push and its last pull of a phase
(`hf_perfit.flower.transport.send_and_receive`), the simulation's queue of messages for the workers (a worker takes
a message from it), the backend's `process_message` (`RayBackend`: submit to the Ray actor, its result back;
`InProcessBackend`: the copies and the call), the `ClientApp` call inside it, and the reply's store into the
LinkState (`InMemoryLinkState.store_message_res`). Per phase (train, evaluate) it prints the mean of:

- `push -> first message taken by a worker`: the simulation's hand-over from the LinkState to its workers (Flower
  1.41 looks every 0.1 s; `run_flower_simulation` wakes it on a push);
- `Ray dispatch` / `Ray return`: from `process_message` to the ClientApp call in the actor, and from its end back
  (summed over the phase's messages);
- `between messages`: from one result to the next submit (the worker thread's queue);
- `client compute in the actor`: the ClientApp's own work (training or evaluation), summed;
- `last reply to the LinkState -> seen by the pull`: the ServerApp's reply pulls;
- and the pickled size and time of what Ray sends per message (the message and the node's context; measured after
  the run).

    python benchmarks/flower_sim_phases.py                    # as run_flower_simulation runs it
    python benchmarks/flower_sim_phases.py --flower_defaults  # Flower 1.41's 0.1 s hand-over, 50 ms pulls
    python benchmarks/flower_sim_phases.py --backend inprocess   # run_flower_simulation(backend="inprocess")
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import flower_overhead  # noqa: E402

_LOCK = threading.Lock()


def event(path: str, name: str, **fields: Any) -> None:
    """Append one time-stamped event to the JSON-lines file `path`."""
    with _LOCK, open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"t": time.time(), "ev": name, **fields}) + "\n")


class TimedApp:
    """A ClientApp wrapper that records its calls inside the Ray actor (pickled by value with `app_fn`)."""

    def __init__(self, app: Any, path: str) -> None:
        self.app, self.path = app, path

    def __call__(self, message: Any, context: Any) -> Any:
        start = time.time()
        out = self.app(message=message, context=context)
        end = time.time()
        with open(self.path, "a", encoding="utf-8") as f:  # one call at a time per actor: no lock (none pickles)
            f.write(json.dumps({"t": start, "ev": "actor_start"}) + "\n" + json.dumps({"t": end, "ev": "actor_end"}))
            f.write("\n")
        return out


class _Queue:
    """A queue that records what goes through it."""

    def __init__(self, queue: Any, path: str, on_get: str | None, on_put: str | None) -> None:
        self.queue, self.path, self.on_get, self.on_put = queue, path, on_get, on_put

    def put(self, item: Any, *args: Any, **kwargs: Any) -> None:
        if self.on_put:
            event(self.path, self.on_put)
        self.queue.put(item, *args, **kwargs)

    def get(self, *args: Any, **kwargs: Any) -> Any:
        item = self.queue.get(*args, **kwargs)
        if self.on_get:
            event(self.path, self.on_get)
        return item


@contextlib.contextmanager
def traced(path: str, backend: str = "ray") -> Any:
    """Wrap the functions a message passes through (see the module docstring); undone on exit."""
    import pickle

    import flwr.server.superlink.fleet.vce.vce_api as vce_api
    from flwr.server.superlink.linkstate import InMemoryLinkState

    import hf_perfit.flower.client_app as client_app
    import hf_perfit.flower.transport as transport
    from hf_perfit.flower.simulation import InProcessBackend

    if backend == "ray":
        import ray.cloudpickle as cloudpickle
        from flwr.server.superlink.fleet.vce.backend import raybackend

        backend_class: Any = raybackend.RayBackend
    else:
        cloudpickle, backend_class = pickle, InProcessBackend
    saved = [
        (backend_class, "process_message"),
        (vce_api, "worker"),
        (transport, "send_and_receive"),
        (client_app, "app"),
        (InMemoryLinkState, "store_message_res"),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name in saved]
    process_message, worker, send_and_receive = (s[2] for s in saved[:3])
    store_message_res = saved[4][2]
    sent: list[tuple[Any, Any]] = []

    def timed_process_message(self: Any, message: Any, context: Any) -> Any:
        event(path, "ray_submit")
        out = process_message(self, message, context)
        event(path, "ray_done")
        sent.append((message, context))  # pickled after the run, outside the timed chain
        return out

    def timed_worker(queue_in: Any, queue_out: Any, *rest: Any) -> None:
        worker(_Queue(queue_in, path, "taken", None), queue_out, *rest)

    def timed_send_and_receive(grid: Any, messages: Any, *args: Any, **kwargs: Any) -> list:
        messages = list(messages)
        event(path, "push", n=len(messages), kind=messages[0].metadata.message_type if messages else "")
        out = send_and_receive(grid, messages, *args, **kwargs)
        event(path, "pulled")
        return out

    def timed_store(self: Any, message: Any) -> Any:
        out = store_message_res(self, message)
        event(path, "stored")
        return out

    backend_class.process_message = timed_process_message
    vce_api.worker = timed_worker
    transport.send_and_receive = timed_send_and_receive
    client_app.app = TimedApp(saved[3][2], path)
    InMemoryLinkState.store_message_res = timed_store
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
        for message, context in sent:  # what Ray pickles per message besides the (same) ClientApp loader (the
            # in-process backend pickles nothing: this is only for comparison)
            t = time.perf_counter()
            blob = cloudpickle.dumps((message, context))
            event(path, "pickle", nbytes=len(blob), ms=1000 * (time.perf_counter() - t))


def breakdown(path: str) -> dict[str, dict[str, float]]:
    """Mean milliseconds per phase kind (`train`, `evaluate`) of the parts listed in the module docstring, and
    their phases' total time (`_sum`: milliseconds summed over every phase of that kind)."""
    phases, current = [], None
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        e = json.loads(line)
        if e["ev"] == "push":
            current = {"kind": e["kind"], "push": e["t"], "events": collections.defaultdict(list)}
        elif current is not None and e["ev"] == "pulled":
            current["pulled"] = e["t"]
            if current["kind"] in ("train", "evaluate") and current["events"]["taken"]:
                phases.append(current)
            current = None
        elif current is not None:
            current["events"][e["ev"]].append(e["t"])
    parts: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for ph in phases:
        ev = ph["events"]
        sub, start, end, done = ev["ray_submit"], ev["actor_start"], ev["actor_end"], ev["ray_done"]
        measured = {
            "push -> first message taken by a worker": ev["taken"][0] - ph["push"],
            "Ray dispatch (submit -> ClientApp call)": sum(a - s for s, a in zip(sub, start, strict=True)),
            "client compute in the actor": sum(b - a for a, b in zip(start, end, strict=True)),
            "Ray return (ClientApp end -> result)": sum(d - b for b, d in zip(end, done, strict=True)),
            "between messages (result -> next submit)": sum(sub[i + 1] - done[i] for i in range(len(sub) - 1)),
            "last reply to the LinkState -> seen by the pull": ph["pulled"] - ev["stored"][-1],
            "phase total (push -> all replies)": ph["pulled"] - ph["push"],
        }
        for k, v in measured.items():
            parts[ph["kind"]][k].append(1000 * v)
    out = {kind: {k: statistics.mean(v) for k, v in d.items()} for kind, d in parts.items()}
    for kind, d in parts.items():
        out[kind]["_sum"] = sum(d["phase total (push -> all replies)"])
    return out


STEPS = [
    # (module, owner, attribute, label): the steps of a round outside Flower's messaging, timed in both engines
    ("hf_perfit.federated.coordinator", "Coordinator", "plan_round", "server: plan (sampling, strategy)"),
    ("hf_perfit.federated.coordinator", "Coordinator", "save_result", "server: persist each result (pending file)"),
    ("hf_perfit.federated.coordinator", "Coordinator", "aggregate_round", "server: aggregate"),
    ("hf_perfit.federated.coordinator", "Coordinator", "_write_checkpoint", "server: checkpoint"),
    ("hf_perfit.flower.transport", "FlowerTransport", "train_messages", "server: build train messages"),
    ("hf_perfit.flower.transport", "FlowerTransport", "read_train_replies", "server: read train replies"),
    ("hf_perfit.flower.transport", "FlowerTransport", "eval_messages", "server: build evaluate messages"),
    ("hf_perfit.flower.transport", "FlowerTransport", "read_eval_replies", "server: read evaluate replies"),
    ("hf_perfit.flower.transport", "FlowerTransport", "report", "server: flower_run.json"),
    ("hf_perfit.federated.simulation", None, "client_update", "client: client_update (training)"),
    ("hf_perfit.federated.simulation", None, "evaluate_perplexity", "client: evaluation"),
    ("hf_perfit.flower.client_app", None, "client_update", "client: client_update (training)"),
    ("hf_perfit.flower.client_app", None, "evaluate_perplexity", "client: evaluation"),
    ("hf_perfit.flower.client_app", None, "decode_instruction", "client: decode the message"),
    ("hf_perfit.flower.client_app", None, "decode_tensors", "client: decode the message"),
    ("hf_perfit.flower.client_app", None, "encode_update", "client: encode the reply"),
    ("hf_perfit.federated.run", "ClientStateStore", "load", "client: load its state from its disk"),
    ("hf_perfit.federated.run", "ClientStateStore", "save", "client: save its state to its disk"),
]


@contextlib.contextmanager
def timed_steps(totals: dict[str, float]) -> Any:
    """Add each call's wall time of the [`STEPS`] to `totals[label]` (seconds); undone on exit."""
    import importlib

    saved = []
    for module, owner_name, attr, label in STEPS:
        mod = importlib.import_module(module)
        owner = getattr(mod, owner_name) if owner_name else mod
        original = getattr(owner, attr)

        def timed(*args: Any, _f: Any = original, _label: str = label, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return _f(*args, **kwargs)
            finally:
                totals[_label] = totals.get(_label, 0.0) + time.perf_counter() - t

        saved.append((owner, attr, original))
        setattr(owner, attr, timed)
    try:
        yield
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--flower_defaults", action="store_true", help="Flower 1.41's hand-over tick, 50 ms reply pulls")
    p.add_argument("--backend", choices=["ray", "inprocess"], default="ray", help="run_flower_simulation's backend")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    import hf_perfit.flower.simulation as simulation
    from hf_perfit.flower import FlowerRunOptions

    work = argparse.Namespace(num_rounds=2, local_steps=4)
    steps: dict[str, dict[str, list[float]]] = {"in-process": {}, "Flower": {}}
    with tempfile.TemporaryDirectory(prefix="flower_sim_phases_") as tmp:
        root = Path(tmp)
        path = str(root / "events.jsonl")
        flower_overhead.make_assets(root)
        flower_overhead.run_in_process(flower_overhead.make_config(work, root, root / "warm_up"))
        ratios, walls, inproc_walls = [], [], []
        for rep in range(args.repeats):
            totals: dict[str, float] = {}
            with timed_steps(totals):
                inproc, _, _ = flower_overhead.run_in_process(
                    flower_overhead.make_config(work, root, root / f"in_{rep}"), threads=1
                )
            for k, v in totals.items():
                steps["in-process"].setdefault(k, []).append(1000 * v / work.num_rounds)
            inproc_walls += inproc
            config = flower_overhead.make_config(work, root, root / f"sim_{rep}")
            dispatch = contextlib.nullcontext() if args.flower_defaults else simulation.fast_simulation_dispatch()
            options = FlowerRunOptions() if args.flower_defaults else None
            totals = {}
            with traced(path, args.backend), dispatch, timed_steps(totals), contextlib.ExitStack() as stack:
                if args.flower_defaults:  # run_flower_simulation must not switch the fast dispatch on
                    stack.enter_context(_patched(simulation, "fast_simulation_dispatch", _off))
                if args.backend == "inprocess":
                    import torch

                    before = torch.get_num_threads()
                    torch.set_num_threads(1)  # like the in-process run and a 1-CPU Ray worker
                    stack.callback(torch.set_num_threads, before)
                    simulation.run_flower_simulation(config, backend="inprocess", options=options)
                else:
                    simulation.run_flower_simulation(config, num_cpus=1, client_num_cpus=1.0, options=options)
            for k, v in totals.items():
                steps["Flower"].setdefault(k, []).append(1000 * v / work.num_rounds)
            sim = json.loads((Path(config.output_dir) / "flower_run.json").read_text())["round_wall_seconds"]
            walls += sim
            ratios.append(statistics.median(sim) / statistics.median(inproc))
            print(f"repeat {rep}: in-process rounds {inproc}, Flower simulation rounds {sim}")
        pickles = [json.loads(line) for line in Path(path).read_text().splitlines() if '"pickle"' in line]
        table = breakdown(path)
    who = "Ray" if args.backend == "ray" else "in-process backend"
    print(f"\nbackend: {args.backend}; {'(ms, mean per phase)':44s} {'train':>9s} {'evaluate':>9s}")
    for k in table["train"]:
        if not k.startswith("_"):
            name = k.replace("Ray", who).replace("in the actor", "in the ClientApp")
            print(f"{name:52s} {table['train'][k]:9.1f} {table['evaluate'][k]:9.1f}")
    rest = (1000 * sum(walls) - table["train"]["_sum"] - table["evaluate"]["_sum"]) / len(walls)
    print(
        f"rest of a round, outside the two phases (strategy, messages built and read, checkpoint): {rest:.1f} ms; "
        f"round: {1000 * statistics.mean(walls):.1f} ms (in-process engine: {1000 * statistics.mean(inproc_walls):.1f})"
    )
    print(f"\n{'steps, ms per round (mean over repeats)':52s} {'in-process':>11s} {'Flower':>9s}")
    labels = list(dict.fromkeys([*steps["in-process"], *steps["Flower"]]))
    for k in labels:
        a, b = (statistics.mean(steps[e][k]) if k in steps[e] else 0.0 for e in ("in-process", "Flower"))
        print(f"{k:52s} {a:11.1f} {b:9.1f}")
    print(
        "\nper message, its message and context pickled (what Ray sends; the in-process backend sends nothing): "
        f"{statistics.mean(x['nbytes'] for x in pickles):.0f} bytes in "
        f"{statistics.mean(x['ms'] for x in pickles):.2f} ms; Flower simulation round / in-process round (1 thread), "
        f"per repeat: {[round(r, 2) for r in ratios]}"
    )


@contextlib.contextmanager
def _off() -> Any:
    yield False


@contextlib.contextmanager
def _patched(owner: Any, name: str, value: Any) -> Any:
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


if __name__ == "__main__":
    main()
