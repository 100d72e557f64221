"""Where a phase of a Flower deployment's round goes, step by step: the `flower_deployment_warm_fastpoll` and
`flower_deployment_in_node` arms of `flower_overhead.py` (the same tiny work: 3 clients, PerFIT, 2 rounds of 4 local
steps; a `flower-superlink` and 3 SuperNodes started with `python -m hf_perfit.flower.supernode` on 127.0.0.1, each
with a warm ClientApp process next to it, or with `--in_node` the ClientApp inside it: `--clientapp`).

Every HTTP request of every process of the federation (the ServerApp, the SuperNodes, the ClientApp processes) is
time-stamped: the benchmark puts a `sitecustomize` on the processes' `PYTHONPATH` that wraps Flower's
protobuf-over-HTTP client (`flwr.supercore.protobuf.client.ProtobufClient._unary_unary`, through which every request
of Flower 1.41 goes) and appends `(process, path, start, end, response bytes)` to a file per process. From these
timelines it prints, per phase of a round (train, then evaluate), when each step of a message's way ended, in ms
from the start of the ServerApp's push (the mean over clients and phases, and the mean of the last client's), see
[`MILESTONES`]: the ServerApp pushed; the SuperNode got the message (its poll of the SuperLink) and its objects; the
ClientApp process got the task, has the message, answered (its work), pushed the reply (not timed with `--in_node`:
no HTTP between the node and its ClientApp); the SuperNode pushed the reply; the ServerApp got it (its poll) and has
it. Then the requests each process made in the phase, by path. The phase runs from the start of the ServerApp's
push to the end of its last reply's confirmation.

    python benchmarks/flower_deploy_phases.py --num_rounds 3            # warm ClientApp processes
    python benchmarks/flower_deploy_phases.py --num_rounds 3 --in_node  # the ClientApp inside each SuperNode
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import flower_overhead  # noqa: E402

TRACE_ENV = "HF_PERFIT_HTTP_TRACE_DIR"

SITECUSTOMIZE = f'''
"""Time-stamps every protobuf-over-HTTP request of Flower 1.41 in this process (benchmarks/flower_deploy_phases.py)."""
import importlib.abc
import importlib.util
import json
import os
import sys
import threading
import time

_DIR = os.environ.get("{TRACE_ENV}")
_TARGET = "flwr.supercore.protobuf.client"


def _role():
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return " ".join(a.decode() for a in f.read().split(b"\\0") if a)
    except OSError:
        return " ".join(sys.argv)


def _patch(module):
    lock = threading.Lock()
    path = os.path.join(_DIR, f"{{os.getpid()}}.jsonl")
    role = _role()
    original = module.ProtobufClient._unary_unary

    def traced(self, *, path, **kwargs):
        t0 = time.time()
        out = original(self, path=path, **kwargs)
        t1 = time.time()
        size = out.ByteSize()
        with lock, open(_trace_path, "a") as f:
            f.write(json.dumps({{"pid": os.getpid(), "role": role, "path": path, "t0": t0, "t1": t1, "n": size}}) + "\\n")
        return out

    _trace_path = path
    module.ProtobufClient._unary_unary = traced


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        loader.exec_module = exec_and_patch
        return spec


if _DIR:
    sys.meta_path.insert(0, _Finder())
'''


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=1, help="deployment runs (each a fresh federation)")
    p.add_argument("--num_rounds", type=int, default=2)
    p.add_argument("--local_steps", type=int, default=4)
    p.add_argument("--node_poll_interval", type=float, default=0.1, help="hf_perfit.flower.supernode --poll-interval")
    p.add_argument(
        "--in_node", action="store_true", help="the ClientApp inside each SuperNode (--clientapp), no warm processes"
    )
    p.add_argument("--keep", type=Path, default=None, help="copy the traces into this folder")
    return p.parse_args(argv)


def load_trace(folder: Path) -> list[dict[str, Any]]:
    """Every traced request of every process, sorted by start, with `proc`: `serverapp`, `node<k>` or `warm<k>`."""
    rows = []
    for file in folder.glob("*.jsonl"):
        for line in file.read_text().splitlines():
            row = json.loads(line)
            role = row["role"]
            if "flwr-serverapp" in role:
                row["proc"] = "serverapp"
            elif "hf_perfit.flower.supernode" in role or "flower-supernode" in role:
                row["proc"] = "node:" + role.split("partition-id=")[1].split()[0]
            elif "hf_perfit.flower.warm" in role:
                row["proc"] = "warm:" + role.split("--runtime-api-address")[1].split()[0]
            else:
                row["proc"] = "other"
            rows.append(row)
    # a warm process is named by its SuperNode's Runtime API port: map it to the node's partition
    ports = {}
    for file in folder.glob("*.jsonl"):
        for line in file.read_text().splitlines()[:1]:
            row = json.loads(line)
            if "hf_perfit.flower.supernode" in row["role"] or "flower-supernode" in row["role"]:
                args = row["role"].split()
                port = args[args.index("--port") + 1]
                ports[f"127.0.0.1:{port}"] = row["role"].split("partition-id=")[1].split()[0]
    for row in rows:
        if row["proc"].startswith("warm:"):
            row["proc"] = "warm:" + ports.get(row["proc"][5:], row["proc"][5:])
    return sorted(rows, key=lambda r: r["t0"])


MILESTONES = [
    ("ServerApp pushed", "the end of the ServerApp's push of the phase's messages and objects to the SuperLink"),
    ("SuperNode got the message", "the end of the SuperNode's `pull-messages` that returned it"),
    ("SuperNode has its objects", "the end of its `confirm-message-received` (after its `pull-object`s)"),
    ("ClientApp process got the task", "the end of its `acquire-task` that returned the task"),
    (
        "ClientApp has the message",
        "the end of its `confirm-message-received` (after `pull-task-input`, `pull-messages`, `pull-object`s)",
    ),
    ("ClientApp answered", "the start of its reply's `push-messages` (the ClientApp's work before it)"),
    ("ClientApp pushed the reply", "the end of its `push-task-output` (after the reply's `push-object`s)"),
    ("SuperNode pushed the reply", "the end of its last `push-object` of the reply to the SuperLink"),
    ("ServerApp got the reply", "the end of the ServerApp's `pull-messages` that returned it"),
    ("ServerApp has the reply", "the end of its `confirm-message-received` (after its `pull-object`s)"),
]


def _first(rows: list[dict], proc: str, path: str, after: float, nonempty: bool = False, by: str = "t0") -> dict:
    """The first request of `proc` to `path` whose `by` time is after `after` (and whose answer is not empty)."""
    for r in rows:
        if r["proc"] == proc and r["path"].endswith(path) and r[by] >= after and (not nonempty or r["n"] > 0):
            return r
    raise LookupError(f"no {path} of {proc} after {after}")


def phases(rows: list[dict]) -> list[dict[str, Any]]:
    """Per phase (a ServerApp `push-messages`): per client, the time of each milestone of [`MILESTONES`] from the
    phase's start; the phase's span; the requests per process and path within it."""
    pushes = [r for r in rows if r["proc"] == "serverapp" and r["path"].endswith("/runtime/push-messages")]
    out = []
    for i, push in enumerate(pushes):
        t0 = push["t0"]
        bound = pushes[i + 1]["t0"] if i + 1 < len(pushes) else float("inf")
        server = [r for r in rows if r["proc"] == "serverapp" and t0 <= r["t0"] < bound]
        first_pull = next((r["t0"] for r in server if r["path"].endswith("/runtime/pull-messages")), bound)
        pushed = max(r["t1"] for r in server if r["t0"] < first_pull and r["path"].endswith(("-object", "-messages")))
        nodes = sorted({r["proc"][5:] for r in rows if r["proc"].startswith("node:")})
        per_client: dict[str, list[float]] = {}
        end = pushed
        for k in nodes:
            node, warm = f"node:{k}", f"warm:{k}"
            try:
                got = _first(rows, node, "/fleet/pull-messages", t0, nonempty=True, by="t1")
                if got["t1"] >= bound:
                    continue  # this node has no message in this phase
                conf = _first(rows, node, "/fleet/confirm-message-received", got["t1"])
                if any(r["proc"] == warm for r in rows):
                    task = _first(rows, warm, "/runtime/acquire-task", t0, nonempty=True, by="t1")
                    w_conf = _first(rows, warm, "/runtime/confirm-message-received", task["t1"])
                    w_push = _first(rows, warm, "/runtime/push-messages", w_conf["t1"])
                    w_out = _first(rows, warm, "/runtime/push-task-output", w_push["t1"])
                    n_push = _first(rows, node, "/fleet/push-messages", w_push["t0"])
                    warm_times = [task["t1"], w_conf["t1"], w_push["t0"], w_out["t1"]]
                else:  # the ClientApp runs inside the SuperNode (--clientapp): no HTTP to time between them
                    n_push = _first(rows, node, "/fleet/push-messages", conf["t1"])
                    warm_times = [float("nan")] * 4
                n_next = _first(rows, node, "/fleet/pull-messages", n_push["t1"])["t0"]
                n_done = max(
                    [n_push["t1"]]
                    + [
                        r["t1"]
                        for r in rows
                        if r["proc"] == node
                        and r["path"].endswith("/fleet/push-object")
                        and n_push["t1"] <= r["t0"] < n_next
                    ]
                )
                s_got = _first(server, "serverapp", "/runtime/pull-messages", n_push["t1"], nonempty=True, by="t1")
                s_conf = _first(server, "serverapp", "/runtime/confirm-message-received", s_got["t1"])
            except LookupError:
                continue
            times = [
                pushed,
                got["t1"],
                conf["t1"],
                *warm_times,
                n_done,
                s_got["t1"],
                s_conf["t1"],
            ]
            per_client[k] = [t - t0 for t in times]
            end = max(end, s_conf["t1"])
        within = [r for r in rows if t0 <= r["t0"] < end]
        paths = collections.Counter(f"{r['proc'].split(':')[0]} {r['path'].rsplit('/', 1)[1]}" for r in within)
        out.append({"span": end - t0, "clients": per_client, "paths": paths})
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    from hf_perfit.flower.localhost import LocalFederation

    with tempfile.TemporaryDirectory(prefix="flower_deploy_phases_") as tmp:
        root = Path(tmp)
        flower_overhead.make_assets(root)
        site = root / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        cfg_args = argparse.Namespace(num_rounds=args.num_rounds, local_steps=args.local_steps)
        all_phases = []
        walls = []
        for run in range(args.runs):
            trace = root / f"trace{run}"
            trace.mkdir()
            os.environ[TRACE_ENV] = str(trace)
            os.environ["PYTHONPATH"] = os.pathsep.join(
                [str(site), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])]
            )
            config = flower_overhead.make_config(cfg_args, root, root / f"out{run}")
            fed = LocalFederation(
                root / f"fed{run}",
                num_nodes=3,
                threads_per_node=1,
                node_poll_interval=args.node_poll_interval,
                in_node=args.in_node,
            )
            with fed:
                run_id = fed.run(config, flower_overhead.APP_DIR)
                report = fed.wait(config.output_dir, run_id, alive=tuple(fed.procs))
            walls += report["round_wall_seconds"]
            rows = load_trace(trace)
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                (args.keep / f"trace{run}.json").write_text(json.dumps(rows))
            ph = phases(rows)
            # phase 0 is the hello (query); then train, evaluate per round
            for i, p in enumerate(ph[1:]):
                p["name"] = "train" if i % 2 == 0 else "evaluate"
                all_phases.append(p)
        print(f"round wall (s): {[round(w, 3) for w in walls]}, median {statistics.median(walls):.3f}")
        for name in ("train", "evaluate"):
            sel = [p for p in all_phases if p["name"] == name and p["clients"]]
            if not sel:
                continue
            print(
                f"\n{name}: {len(sel)} phase(s), span median {statistics.median(p['span'] for p in sel) * 1e3:.0f} ms"
            )
            print("  milestone (ms from the phase's start: mean over clients and phases; the last client's mean)")
            for j, (label, _) in enumerate(MILESTONES):
                vals = [c[j] for p in sel for c in p["clients"].values()]
                last = [max(c[j] for c in p["clients"].values()) for p in sel]
                if vals and vals[0] == vals[0]:  # NaN: not timed (the ClientApp inside the SuperNode)
                    print(f"  {label:34s} {statistics.mean(vals) * 1e3:7.1f} {statistics.mean(last) * 1e3:7.1f}")
            req = collections.Counter()
            for p in sel:
                req.update(p["paths"])
            print(f"  requests per phase: {sum(req.values()) / len(sel):.0f}")
            for k, v in sorted(req.items()):
                print(f"    {k:45s} {v / len(sel):6.1f}")


if __name__ == "__main__":
    main()
