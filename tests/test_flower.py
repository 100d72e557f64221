"""hf_perfit on Flower: the wire format, failure handling, Flower's simulation runtime against the in-process
simulation, and a real deployment on 127.0.0.1 (SuperLink + two SuperNodes, one of them killed mid-round)."""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no network here; Flower would try to send usage events
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from hf_perfit.federated.comm import downlink_bytes, uplink_bytes  # noqa: E402
from hf_perfit.federated.config import FederatedConfig  # noqa: E402
from hf_perfit.federated.messages import ClientInstruction, ClientUpdate  # noqa: E402
from hf_perfit.federated.simulation import run_federated  # noqa: E402
from hf_perfit.flower import FlowerCoordinator, FlowerRunOptions, run_flower_simulation  # noqa: E402
from hf_perfit.flower.client_app import app as client_app  # noqa: E402
from hf_perfit.flower.localhost import LocalFederation  # noqa: E402
from hf_perfit.flower.records import (  # noqa: E402
    PACKED_ENTRY,
    decode_instruction,
    decode_update,
    encode_instruction,
    encode_update,
    payload_bytes,
    unpack_blob,
)

from .conftest import CPU_FP32, save_run_assets, tiny_llama  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "recipes" / "flower"
CLIENTS = ("client_0", "client_1", "client_2")
REPORT = "flower_run.json"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Like a 1-CPU Ray worker: on 2 shared cores a second torch thread only waits (the results do not change)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny Llama + tokenizer saved like a Hub checkpoint, and a 3-category instruction file."""
    return save_run_assets(tmp_path_factory.mktemp("flower_assets"), per_category=12)


def _config(assets: Path, out: Path, **overrides) -> FederatedConfig:
    values = {
        "model_name_or_path": str(assets / "model"),
        "dataset_name": str(assets / "data.jsonl"),
        "strategy": "perfit",
        "num_clients": 3,
        "num_rounds": 2,
        "local_steps": 4,
        "search_steps": 4,
        "prune_iterations": 2,
        "learning_rate": 5e-3,
        "per_device_train_batch_size": 2,
        "max_length": 48,
        "lora_r": 2,
        "lora_alpha": 4,
        "test_fraction": 0.25,
        "output_dir": str(out),
        # Flower runs are compared with in-process runs bit for bit: fp32 on the CPU (conftest.CPU_FP32)
        **CPU_FP32,
        **overrides,
    }
    return FederatedConfig.from_dict(values)


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]


def _assert_same_run(reference: Path, flower: Path, clients, exact: bool = False) -> None:
    """Same records (up to Flower's extra keys) and the same exported adapters (`exact`: bit for bit)."""
    ref, got = _records(reference), _records(flower)
    assert len(ref) == len(got)
    for a, b in zip(ref, got, strict=True):
        assert (a["round"], a.get("client"), a["strategy"]) == (b["round"], b.get("client"), b["strategy"])
        assert b.get("failed_clients", {}) == {}
        for key, value in a.items():
            if isinstance(value, float) and not exact:
                assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (a["round"], a.get("client"), key)
            else:
                assert b[key] == value, (a["round"], a.get("client"), key)
    for cid in clients:
        x = load_file(str(reference / "clients" / cid / "adapter" / "adapter_model.safetensors"))
        y = load_file(str(flower / "clients" / cid / "adapter" / "adapter_model.safetensors"))
        assert x.keys() == y.keys()
        for key in x:
            if exact:
                assert torch.equal(y[key], x[key]), (cid, key)
            else:
                torch.testing.assert_close(y[key], x[key], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------- the wire format


def test_records_round_trip_and_match_the_byte_accounting():
    g = torch.Generator().manual_seed(0)
    dense = {"a.lora_A.weight": torch.randn(4, 6, generator=g), "a.lora_B.weight": torch.randn(6, 4, generator=g)}
    masks = {k: torch.rand(t.shape, generator=g) > 0.6 for k, t in dense.items()}
    kept = {k: torch.where(masks[k], t, 0.0).to(torch.bfloat16) for k, t in dense.items()}  # a bf16 client
    shapes = {k: tuple(t.shape) for k, t in dense.items()}

    for changed in (True, False):
        update = ClientUpdate("client_0", 7, kept, masks, mask_changed=changed, metrics={"train_loss": 1.5})
        content = encode_update(update)
        assert payload_bytes(content) == uplink_bytes(update)  # kept values (+ packed mask bits) only
        back = decode_update(content, shapes, None if changed else masks)
        assert back.num_examples == 7 and back.mask_changed is changed and back.metrics == {"train_loss": 1.5}
        for k in dense:
            assert back.tensors[k].dtype == torch.float32  # bf16 travels as float32, exactly
            assert torch.equal(back.tensors[k], kept[k].float()) and torch.equal(back.masks[k], masks[k])

    instruction = ClientInstruction({k: t.float() for k, t in kept.items()}, masks, {"proximal_mu": 0.1})
    content = encode_instruction(instruction, {"round": 3})
    assert payload_bytes(content) == downlink_bytes(instruction)
    got = decode_instruction(content, masks)
    assert got.config == {"proximal_mu": 0.1} and all(torch.equal(got.tensors[k], kept[k].float()) for k in kept)
    with pytest.raises(ValueError, match="disagree on this client's PerFIT mask"):
        decode_instruction(content, {k: ~m for k, m in masks.items()})
    with pytest.raises(ValueError, match="do not fit the adapter"):
        decode_update(encode_update(ClientUpdate("client_0", 7, {"x": torch.ones(2)})), shapes, None)


def test_packed_messages_round_trip_bit_for_bit(monkeypatch):
    """A packed message (one safetensors blob: inside `meta` when small, else one uint8 array) decodes to exactly
    what the unpacked one does: same keys in the same order, dtypes, shapes and bits (NaN payloads, -0.0,
    subnormals, bf16 cast up exactly), mask bits, extra tensors, and an empty adapter; the byte accounting is the
    same."""
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    from hf_perfit.flower import records
    from hf_perfit.flower.records import (
        PACKED,
        array_bytes,
        get_arrays,
        pack_arrays,
        put_arrays,
        unpack_arrays,
    )

    g = torch.Generator().manual_seed(1)
    special = torch.tensor([float("nan"), -0.0, 1e-45, float("inf"), -float("inf"), 3.0])
    nan_payload = torch.tensor([0x7FC00001], dtype=torch.int32).view(torch.float32)  # a NaN with payload bits
    dense = {
        "z.lora_B.weight": torch.randn(6, 4, generator=g).to(torch.bfloat16),  # key order is not sorted order
        "a.lora_A.weight": torch.cat([special, nan_payload, torch.randn(17, generator=g)]).reshape(4, 6),
    }
    masks = {k: torch.rand(t.shape, generator=g) > 0.5 for k, t in dense.items()}
    kept = {k: torch.where(masks[k], t.float(), 0.0) for k, t in dense.items()}
    extra = {"router.counts": torch.arange(5, dtype=torch.int32), "router.mean": torch.randn(3, generator=g)}
    shapes = {k: tuple(t.shape) for k, t in dense.items()}

    def same(a: dict, b: dict) -> None:
        assert list(a) == list(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
            assert a[k].contiguous().view(torch.uint8).equal(b[k].contiguous().view(torch.uint8)), k  # bits

    groups = {"tensors": dense, "masks": {}, "extra": extra}
    back = unpack_arrays(pack_arrays(groups))
    assert list(back) == ["tensors", "masks", "extra"] and back["masks"] == {}
    same(back["tensors"], {k: t.float() for k, t in dense.items()})
    same(back["extra"], extra)
    assert unpack_arrays(pack_arrays({})) == {} and unpack_arrays(pack_arrays({"tensors": {}})) == {"tensors": {}}

    for update in (
        ClientUpdate("client_0", 7, dense, metrics={"loss": 0.5}, extra_tensors=extra),  # dense bf16 + extra
        ClientUpdate("client_0", 7, kept, masks, mask_changed=True),  # kept values + mask bits
        ClientUpdate("client_0", 7, kept, masks, mask_changed=False),  # kept values of a mask the server holds
        ClientUpdate("client_0", 0, {}),  # an empty adapter
    ):
        plain, packed = encode_update(update), encode_update(update, pack=True)
        # a small blob travels inside `meta` (no object of its own); a large one as one uint8 array
        assert list(packed.array_records) == [] and isinstance(packed["meta"][PACKED_ENTRY], bytes)
        monkeypatch.setattr(records, "INLINE_LIMIT", 0)
        large = encode_update(update, pack=True)
        monkeypatch.undo()
        assert list(large.array_records) == [PACKED] and PACKED_ENTRY not in large["meta"]
        assert len(large[PACKED]) == 1 and large[PACKED][PACKED].dtype == "uint8"
        blob = packed["meta"][PACKED_ENTRY]
        assert large[PACKED][PACKED].numpy().tobytes() == blob  # the same blob either way
        assert array_bytes(packed) == len(blob) + len(PACKED_ENTRY)
        assert payload_bytes(packed) == payload_bytes(large) == payload_bytes(plain) == uplink_bytes(update)
        a = decode_update(plain, shapes, masks)
        for b in (decode_update(packed, shapes, masks), decode_update(large, shapes, masks)):
            same(a.tensors, b.tensors)
            same(a.extra_tensors, b.extra_tensors)
            assert (a.masks is None) == (b.masks is None)
            assert a.masks is None or all(a.masks[k].equal(b.masks[k]) for k in a.masks)
            assert (a.metrics, a.num_examples, a.mask_changed) == (b.metrics, b.num_examples, b.mask_changed)
            if update.masks is None:
                same(b.tensors, {k: t.float() for k, t in update.tensors.items()})
    old_reply = encode_update(ClientUpdate("client_0", 7, dense, metrics={"loss": 0.5}))  # hf_perfit before:
    old_reply["metrics"] = MetricRecord({k: v for k, v in old_reply["metrics"].items() if not k.startswith("update/")})
    old_reply["update-metrics"] = MetricRecord({"loss": 0.5})  # the update's metrics in a record of their own
    assert decode_update(old_reply, shapes, None).metrics == {"loss": 0.5}
    alone = RecordDict()  # no meta record to hold the blob: a ConfigRecord of its own
    put_arrays(alone, {"tensors": dense}, pack=True)
    assert list(alone.config_records) == [PACKED] and list(alone.array_records) == []
    same(get_arrays(alone)["tensors"], {k: t.float() for k, t in dense.items()})

    instruction = ClientInstruction(kept, masks, {"proximal_mu": 0.1})
    content = encode_instruction(instruction, {"round": 1}, pack=True)
    assert content["meta"]["pack-arrays"] is True and list(content.array_records) == []
    assert list(content.config_records) == ["meta"] and PACKED_ENTRY in content["meta"]
    assert payload_bytes(content) == downlink_bytes(instruction)
    same(
        decode_instruction(content, masks).tensors, decode_instruction(encode_instruction(instruction), masks).tensors
    )
    assert list(get_arrays(encode_instruction(ClientInstruction(None), pack=True)).keys()) == []

    bad = ArrayRecord()
    bad[PACKED] = Array(np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="must be 1-D uint8"):
        unpack_arrays(bad)
    bad[PACKED] = Array(np.frombuffer(b"\x02\x00\x00\x00\x00\x00\x00\x00{}", dtype=np.uint8).copy())
    with pytest.raises(ValueError, match="does not hold hf_perfit's tensor layout"):
        unpack_arrays(bad)


def test_supernode_launcher_waits_wake_on_the_nodes_state_and_cap_the_idle_poll(monkeypatch):
    """The launcher's stand-in `time.sleep` for Flower's SuperNode loop: a wait for the node's own ClientApp (Flower
    sleeps 0.5 s) returns once the node stores a message or an object; the idle poll of the SuperLink (Flower
    sleeps 3 s) sleeps the cap while the node was active within the window, Flower's 3 s after it."""
    import threading

    from hf_perfit.flower import supernode

    activity = supernode.NodeActivity()
    stand_in = supernode.capped_time(3600.0, activity)  # a missed wake-up would hang here, not pass
    store = {"messages": []}
    stored = supernode.notify_after(lambda m: store["messages"].append(m), activity)
    threading.Timer(0.05, stored, args=("reply",)).start()
    while not store["messages"]:  # how Flower's loop waits for the ClientApp's reply
        stand_in.sleep(0.5)
    assert store["messages"] == ["reply"]

    slept = []
    monkeypatch.setattr(supernode.time, "sleep", slept.append)
    supernode.capped_time(0.1, activity, active_window=3600.0).sleep(3)  # active: no message from the SuperLink yet
    supernode.capped_time(0.1, activity, active_window=0.0).sleep(3)  # idle for longer than the window
    supernode.capped_time(0.1).sleep(3)  # no activity tracking: always the cap
    assert slept == [0.1, 3.0, 0.1]
    assert supernode.capped_time(0.1).monotonic is time.monotonic  # every other attribute is time's


def test_supernode_launcher_holds_empty_runtime_answers_until_the_node_changes():
    """The launcher's Runtime API handlers: an answer that is not ready (no task yet, an object still downloading)
    is asked again after each change of the node's state and returned once ready, or as it is after the hold."""
    import threading

    from hf_perfit.flower import supernode

    activity = supernode.NodeActivity()
    tasks: list[str] = []
    calls: list[int] = []

    def acquire(request: str) -> str | None:  # Flower's handler: the oldest task, or nothing
        calls.append(1)
        return tasks.pop(0) if tasks else None

    held = supernode.held(acquire, lambda answer: answer is not None, activity, hold=3600.0)
    store = supernode.notify_after(tasks.append, activity)  # how the node stores a message: a change
    threading.Timer(0.05, store, args=("task-1",)).start()
    assert held("request") == "task-1"  # a missed wake-up would hang here for an hour, not pass
    assert len(calls) == 2  # asked once, then again after the one change
    tasks.append("task-2")
    assert held("request") == "task-2" and len(calls) == 3  # ready at once: no wait
    start = time.monotonic()
    assert supernode.held(acquire, lambda a: a is not None, activity, hold=0.05)("request") is None
    assert 0.05 <= time.monotonic() - start < 5  # nothing came: Flower's empty answer after the hold
    before = activity.count
    assert activity.wait_change(before, 0.0) is False
    activity.touch()
    assert activity.wait_change(before, 0.0) is True  # a change made before the wait is not missed


def test_fast_reply_pulls_only_touch_a_deployments_http_grid(monkeypatch):
    """The ServerApp's HTTP grid retries a reply's missing arrays after 10 ms (Flower's first retry: 1 s), with
    Flower's overall deadline and no try count; any other grid is left alone."""
    import flwr.superlink.grid.http_grid as http_grid

    from hf_perfit.flower.transport import fast_reply_pulls

    original = http_grid.pull_objects
    monkeypatch.setattr(http_grid, "pull_objects", original)  # restored after the test
    assert fast_reply_pulls(_LocalGrid(1)) is False and http_grid.pull_objects is original
    grid = http_grid.HttpGrid.__new__(http_grid.HttpGrid)  # no connection needed to be one
    assert fast_reply_pulls(grid) is True and fast_reply_pulls(grid) is True
    fast = http_grid.pull_objects
    assert fast.func is original  # patched once, not wrapped twice
    assert fast.keywords == {"initial_backoff": 0.01, "backoff_cap": 0.5, "max_tries_per_object": None}


def test_node_settings_own_data_and_refusals(tmp_path, assets):
    from hf_perfit.flower.client_app import NodeSettings, _load_own_client, _node_config

    cfg = _config(assets, tmp_path / "run", trust_remote_code=True)
    with pytest.raises(ValueError, match="no partition-id"):
        NodeSettings.from_node_config({})
    node = NodeSettings.from_node_config({"partition-id": 2, "num-partitions": 3, "output-dir": str(tmp_path / "n")})
    with pytest.raises(PermissionError, match="trust-remote-code=true"):
        _node_config(cfg, node)
    with pytest.raises(ValueError, match="num-partitions=2 but the server's config has num_clients=3"):
        _node_config(_config(assets, tmp_path / "run"), NodeSettings(partition_id=0, num_partitions=2))
    trusting = NodeSettings.from_node_config({"partition-id": 2, "trust-remote-code": "true"})
    assert _node_config(cfg, trusting).trust_remote_code
    own = tmp_path / "mine.jsonl"  # a data owner's own file: all of it is this client's
    own.write_text("".join(json.dumps({"instruction": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(8)))
    mine = NodeSettings.from_node_config({"partition-id": 2, "dataset-name": str(own)})
    client = _load_own_client(_node_config(_config(assets, tmp_path / "run"), mine), mine)
    assert client.client_id == "client_2" and len(client.train) + len(client.test) == 8 and len(client.test) >= 1


def test_strategy_warm_process_and_supernode_launcher_refuse_what_they_cannot_serve(tmp_path, assets):
    import io
    import zipfile

    from hf_perfit.federated.strategies import get_strategy
    from hf_perfit.flower.strategy import HFPerFITStrategy
    from hf_perfit.flower.supernode import main as supernode_main
    from hf_perfit.flower.warm import DEFAULT_APP, fab_clientapp, load_app

    cfg = _config(assets, tmp_path / "run", strategy="fedit")
    assert HFPerFITStrategy(cfg).strategy.name == "fedit"
    with pytest.raises(ValueError, match="differs from the config's strategy 'fedit'"):
        HFPerFITStrategy(cfg, "perfit")
    with pytest.raises(ValueError, match="the strategy object is 'fedprox' but config.strategy is 'fedit'"):
        HFPerFITStrategy(cfg, get_strategy("fedprox"))
    with pytest.raises(ValueError, match="resume a Flower run with the stock ServerApp"):
        HFPerFITStrategy(_config(assets, tmp_path / "run", strategy="fedit", resume=True))

    bundle = io.BytesIO()  # a Flower app bundle names its ClientApp in its pyproject.toml
    with zipfile.ZipFile(bundle, "w") as z:
        z.writestr("pyproject.toml", (APP_DIR / "pyproject.toml").read_text())
    assert fab_clientapp(bundle.getvalue()) == DEFAULT_APP == "hf_perfit.flower.client_app:app"
    assert fab_clientapp(b"not a zip") is None
    assert load_app(DEFAULT_APP) is client_app
    with pytest.raises(ValueError, match="must be 'module:attribute'"):
        load_app("hf_perfit.flower.client_app")
    with pytest.raises(SystemExit, match="must be in \\(0, 3\\] seconds"):
        supernode_main(["--poll-interval", "5"])
    with pytest.raises(SystemExit, match="needs a number of seconds"):
        supernode_main(["--poll-interval"])
    with pytest.raises(SystemExit, match="--isolation subprocess would start another one"):
        supernode_main(["--clientapp", DEFAULT_APP, "--isolation", "subprocess"])
    with pytest.raises(SystemExit, match="--clientapp hf_perfit.flower.client_app: .*must be 'module:attribute'"):
        supernode_main(["--clientapp", "hf_perfit.flower.client_app"])
    with pytest.raises(SystemExit, match="--clientapp needs a value"):
        supernode_main(["--clientapp"])
    with pytest.raises(ValueError, match="in_node=True runs the ClientApp inside hf_perfit's SuperNode launcher"):
        LocalFederation(tmp_path / "fed", num_nodes=1, node_poll_interval=None, in_node=True)

    from hf_perfit.flower.warm import WarmClientAppRunner

    runner = WarmClientAppRunner("127.0.0.1:9", insecure=True, poll_interval=0.2, idle_after=3600.0)  # no SuperNode
    try:
        assert runner.next_poll_cap() == 0.2  # during a run: fast task polls
        runner._last_task -= 7200.0  # no task for two hours: poll like Flower's SuperExec, once a second
        assert runner.next_poll_cap() == 1.0
    finally:
        runner.close()


# ---------------------------------------------------------------------- failures, with an in-process grid


class _LocalGrid:
    """A Flower `Grid` whose SuperNodes are the hf_perfit `ClientApp` called in this process. `errors` maps a
    (message type, partition id) to an error reason that replaces the client's reply; the nodes of `leave_after_hello` (partition ids) disconnect
    once they answered the first message."""

    def __init__(self, num_nodes: int, errors=None, leave_after_hello=()):
        self.nodes = {1000 + k: k for k in range(num_nodes)}
        self.errors, self.leaving, self.offline = dict(errors or {}), set(leave_after_hello), set()
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": k, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for node, k in self.nodes.items()
        }
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []
        self.answered: list[Message] = []

    def get_node_ids(self):
        return [n for n, k in self.nodes.items() if k not in self.offline]

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{len(self.sent)}-{i}"
            self.sent.append(msg)
            ids.append(msg.metadata.message_id)
            kind, pid = msg.metadata.message_type, self.nodes[msg.metadata.dst_node_id]
            reply = client_app(msg, self.contexts[msg.metadata.dst_node_id])
            self.answered.append(reply)
            if (kind, pid) in self.errors:  # the client did the work, but its reply never arrives
                reply = Message(Error(code=2, reason=self.errors[kind, pid]), reply_to=msg)
            if kind == "query" and pid in self.leaving:
                self.offline.add(pid)
            self.replies[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


@pytest.fixture
def task_identity():
    """Flower stamps messages with the running task's identity; outside a Flower runtime the test sets one."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None


def test_failed_client_is_left_out_and_reported(tmp_path, assets, task_identity):
    grid = _LocalGrid(3, errors={("train", 1): "ValueError: disk full"})
    cfg = _config(assets, tmp_path / "run", num_rounds=1)
    summary = FlowerCoordinator(grid, cfg, FlowerRunOptions(poll_interval=0.0)).run()
    records = _records(tmp_path / "run")
    round0 = {r["client"]: r for r in records if r["round"] == 0 and "client" in r}
    assert round0["client_1"]["trained"] is False and "disk full" in round0["client_1"]["failed"]
    assert round0["client_0"]["trained"] and round0["client_2"]["trained"]
    summary0 = next(r for r in records if r["round"] == 0 and r.get("summary"))
    assert summary0["num_clients"] == 2.0 and "client_1" in summary0["failed_clients"]
    assert summary["failed_clients"].keys() == {"client_1"}
    report = json.loads((tmp_path / "run" / REPORT).read_text())
    assert report["status"] == "completed_with_failures"
    assert [(f["round"], f["client"], f["phase"]) for f in report["failures"]] == [(0, "client_1", "train")]
    assert "## Failures" in (tmp_path / "run" / "results.md").read_text()
    # client_1 trained and saved its round-0 state (mask searched), but the server never accepted it: the client is
    # evaluated from its last accepted state (none: the initial adapter, unpruned), so the lost round left no trace
    assert (tmp_path / "run" / "flower_state" / "client_1" / "round_0.safetensors").is_file()
    assert round0["client_1"]["density"] == 1.0 and round0["client_0"]["density"] == pytest.approx(0.25)
    # what left the clients: float32 values, packed mask bits, counts, metrics, ids and digests; no text
    allowed = {"client-id", "adapter-digest", "partition-id", "mask-changed", "tensors-mode", "mask-digest"}
    for reply in grid.answered:
        for record in reply.content.config_records.values():
            assert set(record) <= allowed | {PACKED_ENTRY}
            assert not any("echo" in str(v) or "Task" in str(v) for k, v in record.items() if k != PACKED_ENTRY)
            if PACKED_ENTRY in record:  # the packed tensors: float32 values and mask bits only
                groups = unpack_blob(record[PACKED_ENTRY])
                assert {t.dtype for g in groups.values() for t in g.values()} <= {torch.float32, torch.uint8}
        for record in reply.content.array_records.values():
            assert {a.dtype for a in record.values()} <= {"float32", "uint8"}
        for record in reply.content.metric_records.values():
            assert all(isinstance(v, int | float) for v in record.values())


def test_zero_replies_stop_the_run_with_a_clear_error(tmp_path, assets, task_identity):
    grid = _LocalGrid(2, errors={("train", 0): "boom"}, leave_after_hello=[1])  # one fails, the other is gone
    cfg = _config(assets, tmp_path / "run", num_clients=2, num_rounds=1)
    with pytest.raises(RuntimeError, match="round 0: none of the 2 sampled clients returned an update"):
        FlowerCoordinator(grid, cfg, FlowerRunOptions(poll_interval=0.0)).run()
    report = json.loads((tmp_path / "run" / REPORT).read_text())
    assert report["status"] == "failed" and "none of the 2 sampled clients" in report["error"]
    reasons = {f["client"]: f["reason"] for f in report["failures"]}
    assert "boom" in reasons["client_0"] and "offline" in reasons["client_1"]


class _Stop(Exception):
    pass


def test_a_flower_run_resumes_from_its_last_checkpoint(tmp_path, assets, task_identity):
    """The Flower engine runs under the federated coordinator: a run stopped after round 0 (its checkpoint
    committed) resumes with `resume=True` (the nodes keep their states and only round 1 is trained again) and ends
    exactly like an uninterrupted run."""
    from hf_perfit.federated.coordinator import RoundCallback

    full = _config(assets, tmp_path / "full")
    FlowerCoordinator(_LocalGrid(3), full, FlowerRunOptions(poll_interval=0.0)).run()

    class StopAfterRound0(RoundCallback):
        def on_round_end(self, coordinator, round_idx, summary):
            if round_idx == 0:
                raise _Stop

    stopped = FlowerCoordinator(
        _LocalGrid(3), _config(assets, tmp_path / "resumed"), FlowerRunOptions(poll_interval=0.0)
    )
    stopped.coordinator.callbacks.append(StopAfterRound0())
    with pytest.raises(_Stop):
        stopped.run()
    assert json.loads((tmp_path / "resumed" / REPORT).read_text())["status"] == "failed"
    assert max(r["round"] for r in _records(tmp_path / "resumed")) == 0

    grid = _LocalGrid(3)  # new SuperNodes, same disks
    resumed = _config(assets, tmp_path / "resumed", resume=True)
    FlowerCoordinator(grid, resumed, FlowerRunOptions(poll_interval=0.0)).run()
    trained = [m.metadata.group_id for m in grid.sent if m.metadata.message_type == "train"]
    assert trained == ["1", "1", "1"]  # only round 1 ran again
    _assert_same_run(tmp_path / "full", tmp_path / "resumed", CLIENTS)
    with pytest.raises(FileExistsError, match="--resume to continue it or --overwrite"):
        FlowerCoordinator(_LocalGrid(3), _config(assets, tmp_path / "full"), FlowerRunOptions(poll_interval=0.0))


# ---------------------------------------------------------------------- Flower's simulation runtime


def test_flower_simulation_matches_the_in_process_simulation(tmp_path, assets, monkeypatch):
    """3 clients, 2 rounds of perfit: Ray workers run the same client code as the in-process loop, so the metrics and
    the exported adapters agree (to float32 rounding; in practice bit for bit). The in-process backend runs that code
    in this process, with this process's one torch thread: bit for bit, and without Ray (not even importable)."""
    run_federated(_config(assets, tmp_path / "in_process"))
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
        m.setitem(sys.modules, "flwr.server.superlink.fleet.vce.backend.raybackend", None)  # so does Flower's backend
        summary = run_flower_simulation(_config(assets, tmp_path / "inprocess"), backend="inprocess")
    assert summary["round"] == 1 and "failed_clients" not in summary
    _assert_same_run(tmp_path / "in_process", tmp_path / "inprocess", CLIENTS, exact=True)
    assert json.loads((tmp_path / "inprocess" / REPORT).read_text())["status"] == "completed"

    summary = run_flower_simulation(_config(assets, tmp_path / "flower"), num_cpus=2, client_num_cpus=1.0)
    assert summary["round"] == 1 and "failed_clients" not in summary  # only rounds with a failure have it
    _assert_same_run(tmp_path / "in_process", tmp_path / "flower", CLIENTS)
    report = json.loads((tmp_path / "flower" / REPORT).read_text())
    assert report["status"] == "completed" and report["failures"] == []
    # after the search a PerFIT upload is its kept values only: the accounted bytes plus numpy headers and keys
    for r in _records(tmp_path / "flower"):
        if r.get("client") and r["round"] == 1:
            assert r["bytes_up"] <= r["wire_bytes_up"] <= r["bytes_up"] + 8 * 256


def test_run_flower_simulation_refuses_an_unknown_backend_and_ray_settings_without_ray(tmp_path, assets):
    config = _config(assets, tmp_path / "x")
    with pytest.raises(
        ValueError, match=r"unknown Flower simulation backend 'dask'; choose one of \['ray', 'inprocess'\]"
    ):
        run_flower_simulation(config, backend="dask")
    with pytest.raises(ValueError, match=r"num_cpus, client_num_gpus: Ray's resources, which backend='inprocess'"):
        run_flower_simulation(config, backend="inprocess", num_cpus=2, client_num_gpus=0.5)
    assert not (tmp_path / "x").exists()  # refused before anything ran


def test_inprocess_backend_runs_the_client_app_on_copies_and_reports_its_errors(monkeypatch, task_identity):
    """What a Ray actor does, in this thread: the ClientApp gets copies of the message and context (the LinkState's
    message and the stored context stay as they were), its exception becomes Flower's ClientAppException; the swap of
    Flower's backend is undone on exit, refused when nested or on another Flower version."""
    import flwr
    import flwr.server.superlink.fleet.vce.vce_api as vce_api
    from flwr.app import ConfigRecord
    from flwr.clientapp import ClientApp
    from flwr.clientapp.client_app import ClientAppException

    from hf_perfit.flower.simulation import InProcessBackend, inprocess_backend

    app = ClientApp()

    @app.query()
    def query(message, context):
        message.content["meta"]["seen"] = True  # a ClientApp that scribbles on what it got
        context.state["calls"] = ConfigRecord({"n": 1})
        if message.content["meta"]["fail"]:
            raise KeyError("no such partition")
        return Message(RecordDict({"meta": ConfigRecord({"ok": True})}), reply_to=message)

    def message(fail: bool) -> Message:
        m = Message(RecordDict({"meta": ConfigRecord({"fail": fail})}), dst_node_id=1, message_type="query")
        m.metadata.__dict__["_message_id"] = f"id-{fail}"
        return m

    backend = InProcessBackend()
    with pytest.raises(ValueError, match="before build"):
        backend.process_message(message(False), Context(1, 1, {}, RecordDict(), {}))
    backend.build(lambda: app)
    assert backend.num_workers == 1 and backend.is_worker_idle()
    sent, context = message(False), Context(1, 1, {}, RecordDict(), {})
    reply, updated = backend.process_message(sent, context)
    assert reply.content["meta"]["ok"] is True and reply.metadata.reply_to_message_id == "id-False"
    assert "seen" not in sent.content["meta"] and "calls" not in context.state  # the originals are untouched
    assert updated.state["calls"]["n"] == 1
    with pytest.raises(ClientAppException, match="no such partition"):
        backend.process_message(message(True), context)
    assert backend.is_worker_idle()

    original = vce_api.run_api
    with inprocess_backend():
        swapped = vce_api.run_api
        assert swapped is not original
        with pytest.raises(RuntimeError, match="already active"):
            with inprocess_backend():
                pass
        assert vce_api.run_api is swapped
    assert vce_api.run_api is original
    monkeypatch.setattr(flwr, "__version__", "1.42.0")
    with pytest.raises(RuntimeError, match=r"backend='inprocess' needs Flower 1.41 \(installed: flwr 1.42.0\)"):
        with inprocess_backend():
            pass
    assert vce_api.run_api is original


def test_a_users_server_app_wraps_fedit_in_flowers_client_side_dp(tmp_path, assets):
    """A user's own ServerApp: HFPerFITStrategy (FedIT) inside Flower's DifferentialPrivacyClientSideFixedClipping,
    the ClientApp with Flower's fixedclipping_mod, in Flower's simulation runtime (Flower's own `Strategy.start`
    loop and `Grid.send_and_receive`). Every client's update is clipped to the norm, so each round moves θ_g by at
    most that norm; the noised aggregate the wrapper releases is what the clients are evaluated on and export."""
    from flwr.app import ArrayRecord
    from flwr.clientapp.mod import fixedclipping_mod
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping
    from flwr.simulation import run_simulation

    from hf_perfit.flower.client_app import make_client_app
    from hf_perfit.flower.records import arrays_to_tensors
    from hf_perfit.flower.strategy import HFPerFITStrategy

    clip = 1e-5  # far below an unclipped update of 4 steps at lr 5e-3
    config = _config(assets, tmp_path / "dp", strategy="fedit", num_clients=2, num_rounds=2)
    out: dict = {}
    server = ServerApp()

    @server.main()
    def main(grid, context):
        ours = HFPerFITStrategy(config)
        dp = DifferentialPrivacyClientSideFixedClipping(
            ours, noise_multiplier=1.0, clipping_norm=clip, num_sampled_clients=config.num_clients
        )
        out["result"] = dp.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=config.num_rounds)
        out["strategy"] = ours

    run_simulation(
        server_app=server,
        client_app=make_client_app(train_mods=[fixedclipping_mod]),
        num_supernodes=config.num_clients,
        backend_config={
            "client_resources": {"num_cpus": 1.0},
            "init_args": {"num_cpus": 2, "include_dashboard": False},
        },
    )
    ours, result = out["strategy"], out["result"]
    summaries = [r for r in _records(tmp_path / "dp") if r.get("summary") and r["round"] >= 0]
    assert [s["round"] for s in summaries] == [0, 1]
    for s in summaries:
        assert "failed_clients" not in s and s["num_clients"] == 2.0
        assert 0 < s["update_norm"] <= clip * (1 + 1e-4)  # the mean of clipped updates
    released = arrays_to_tensors(result.arrays)  # the wrapper's noised aggregate
    adopted = ours.strategy.global_tensors
    assert released.keys() == adopted.keys() and all(torch.equal(released[k], adopted[k]) for k in adopted)
    for cid in ("client_0", "client_1"):  # fedit: every client exports θ_g, the released one
        exported = load_file(str(tmp_path / "dp" / "clients" / cid / "adapter" / "adapter_model.safetensors"))
        for key, value in released.items():
            torch.testing.assert_close(exported[key], value, rtol=0, atol=0)


# ---------------------------------------------------------------------- a real deployment on 127.0.0.1


def _received(log: Path, offset: int) -> int:
    return log.read_bytes()[offset:].count(b"Received successfully") if log.is_file() else 0


def test_deployment_on_localhost_then_a_supernode_killed_mid_round(tmp_path, assets):
    fed = LocalFederation(tmp_path, num_nodes=2, threads_per_node=1)  # flower-superlink + 2 flower-supernodes
    try:
        fed.start()

        # A complete run: each client exports its own adapter.
        config = _config(assets, tmp_path / "deployed", num_clients=2, num_rounds=1)
        run_id = fed.run(config, APP_DIR)  # flwr run recipes/flower localhost --run-config 'config="..."'
        report = fed.wait(tmp_path / "deployed", run_id, alive=("superlink", "node0", "node1"))
        assert report["status"] == "completed" and report["flwr_status"] == "finished:completed", report

        # The same federation again; SuperNode 1 is SIGKILLed while it trains round 0. 300 local steps (seconds
        # even on an idle machine) so that the kill lands in its training: with 4 steps the node could train and
        # reply within the 0.2 s between two looks at its log, and only its evaluation failed.
        config = _config(assets, tmp_path / "killed", num_clients=2, num_rounds=1, local_steps=300)
        offset = fed.log("node1").stat().st_size
        run_id = fed.run(config, APP_DIR)
        deadline = time.monotonic() + 300
        while _received(fed.log("node1"), offset) < 2:  # the hello, then the round-0 training message
            fed.check_alive()
            assert time.monotonic() < deadline, "SuperNode 1 never received its round-0 training message"
            time.sleep(0.2)
        fed.kill("node1")

        # While the SuperLink waits for the dead node's heartbeat: the first run's adapters are the in-process
        # simulation's, and load with plain PEFT.
        run_federated(_config(assets, tmp_path / "reference", num_clients=2, num_rounds=1))
        _assert_same_run(tmp_path / "reference", tmp_path / "deployed", ("client_0", "client_1"))
        for cid in ("client_0", "client_1"):
            adapter = PeftModel.from_pretrained(tiny_llama(), tmp_path / "deployed" / "clients" / cid / "adapter")
            assert adapter.peft_config["default"].r == 2 * 4  # PerFIT's expanded rank R = γ·r

        report = fed.wait(tmp_path / "killed", run_id, alive=("superlink", "node0"))
        assert report["status"] == "completed_with_failures" and report["flwr_status"] == "finished:completed"
        failures = {(f["client"], f["phase"]): f["reason"] for f in report["failures"]}
        assert set(failures) == {("client_1", "train"), ("client_1", "evaluate")}, failures
        assert "unavailable" in failures["client_1", "train"], failures  # Flower's verdict: missed heartbeats
        records = _records(tmp_path / "killed")
        round0 = [r for r in records if r["round"] == 0]
        assert [r["client"] for r in round0 if "client" in r] == ["client_0"]
        summary = round0[-1]
        assert summary["num_clients"] == 1.0 and set(summary["failed_clients"]) == {"client_1"}
        assert (tmp_path / "killed" / "clients" / "client_0" / "adapter" / "adapter_model.safetensors").is_file()
        assert not (tmp_path / "killed" / "clients" / "client_1").exists()
        assert "## Failures" in (tmp_path / "killed" / "results.md").read_text()
    finally:
        fed.close()


def test_deployment_with_the_clientapp_inside_each_supernode_matches_the_in_process_run(tmp_path, assets):
    """`python -m hf_perfit.flower.supernode --clientapp hf_perfit.flower.client_app:app`: one process per node, the
    ClientApp's Runtime API calls answered in that process. Same adapters and metrics as the in-process engine."""
    fed = LocalFederation(tmp_path, num_nodes=2, threads_per_node=1, in_node=True)
    try:
        fed.start()
        assert set(fed.procs) == {"superlink", "node0", "node1"}  # no ClientApp process next to the nodes
        config = _config(assets, tmp_path / "deployed", num_clients=2, num_rounds=1)
        run_id = fed.run(config, APP_DIR)
        report = fed.wait(tmp_path / "deployed", run_id, alive=tuple(fed.procs))
        assert report["status"] == "completed" and report["flwr_status"] == "finished:completed", report
        run_federated(_config(assets, tmp_path / "reference", num_clients=2, num_rounds=1))
        _assert_same_run(tmp_path / "reference", tmp_path / "deployed", ("client_0", "client_1"))
    finally:
        fed.close()


def test_fast_simulation_dispatch_wakes_flowers_dispatcher_on_a_push_and_restores_it(monkeypatch):
    """Within the block, Flower 1.41's simulation dispatcher is the same loop (one message per node and look, in
    order) whose wait ends when the in-memory grid pushed messages; on exit Flower's functions are back; nested
    blocks and other Flower versions change nothing."""
    import flwr
    import flwr.server.superlink.fleet.vce.vce_api as vce_api
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    from hf_perfit.flower.simulation import fast_simulation_dispatch

    original_add, original_push = vce_api.add_messages_to_queue, InMemoryGrid.push_messages

    class Stop:
        """Stops the loop after `looks` looks; the loop must not wait on it (Flower's fixed 0.1 s wait)."""

        def __init__(self, state, looks):
            self.state, self.looks = state, looks

        def is_set(self):
            return self.state.looks >= self.looks

        def wait(self, timeout=None):
            raise AssertionError("the fast loop waits on its wake event, not on f_stop")

    class State:
        def __init__(self, inbox):
            self.inbox, self.looks, self.asked = inbox, 0, []

        def get_message_ins(self, node_id, limit):
            self.asked.append((node_id, limit))
            if node_id == 2:  # the last node of a look
                self.looks += 1
                InMemoryGrid.push_messages(object(), [])  # a push during the look: the wait after it ends at once
            return [self.inbox[node_id].pop(0)] if self.inbox[node_id] else []

    with fast_simulation_dispatch() as on:
        assert on is True
        fast = vce_api.add_messages_to_queue
        assert fast is not original_add and InMemoryGrid.push_messages is not original_push
        with fast_simulation_dispatch() as nested:
            assert nested is False and vce_api.add_messages_to_queue is fast
        wake = fast._hf_perfit_wake
        assert not wake.is_set()
        assert InMemoryGrid.push_messages(object(), []) == [] and wake.is_set()  # Flower's push, then the wake
        state, queue = State({1: ["a1", "a2"], 2: ["b1"]}), []

        class Queue:
            put = staticmethod(queue.append)

        fast(state, Queue(), {1: 0, 2: 1}, Stop(state, 2))
        assert queue == ["a1", "b1", "a2"]  # one message per node and look, as Flower's loop
        assert state.asked == [(1, 1), (2, 1), (1, 1), (2, 1)]
    assert vce_api.add_messages_to_queue is original_add and InMemoryGrid.push_messages is original_push

    monkeypatch.setattr(flwr, "__version__", "1.42.0")
    with fast_simulation_dispatch() as on:
        assert on is False and vce_api.add_messages_to_queue is original_add


def test_fast_simulation_dispatch_wakes_a_reply_pull_when_a_reply_is_stored(monkeypatch):
    """Within the block, a worker's put of a reply stores it into the LinkState and signals it, and a pull of replies
    that found none waits for that signal and pulls again (instead of returning empty to a ServerApp that then
    sleeps)."""
    import queue
    import threading

    import flwr.server.superlink.fleet.vce.vce_api as vce_api
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    import hf_perfit.flower.simulation as simulation

    replies: queue.Queue = queue.Queue()
    stored, pulls = [], []

    workers = []

    def pull(self, ids):
        pulls.append(list(ids))
        out, stored[:] = list(stored), []
        if len(pulls) == 2:  # a worker replies right after the first look of the second pull
            workers.append(threading.Thread(target=replies.put, args=("reply to m1",)))
            workers[-1].start()
        return out

    storers = []

    class State:
        def store_message_res(self, message):
            storers.append(threading.current_thread())
            stored.append(message)

    monkeypatch.setattr(InMemoryGrid, "pull_messages", pull)
    monkeypatch.setattr(simulation, "SIMULATION_REPLY_WAIT", 600.0)  # only the signal ends the wait in time
    original_store = vce_api.put_message_into_state
    with simulation.fast_simulation_dispatch():
        stop = threading.Event()
        store = threading.Thread(target=vce_api.put_message_into_state, args=(State(), replies, stop))
        store.start()
        while "put" not in vars(replies):  # the loop's first act: the queue's put now stores
            time.sleep(0.001)
        try:
            assert InMemoryGrid.pull_messages(object(), []) == [] and pulls == [[]]  # nothing asked: no wait
            assert InMemoryGrid.pull_messages(object(), ["m1"]) == ["reply to m1"]
            assert pulls == [[], ["m1"], ["m1"]]  # found nothing, waited for the store, pulled again
            assert storers == workers  # the worker's put stored the reply itself (no hand-over to the store loop)
        finally:
            stop.set()
            store.join()
            for worker in workers:
                worker.join()
    assert InMemoryGrid.pull_messages is pull and vce_api.put_message_into_state is original_store


def test_fast_simulation_dispatch_hands_a_push_to_the_workers_from_the_pushing_thread(monkeypatch):
    """Within the block, a push into a running simulation's LinkState takes the dispatcher's look itself: the
    message reaches the workers' queue before the push returns, without waiting for the dispatcher's thread."""
    import queue
    import threading

    import flwr.server.superlink.fleet.vce.vce_api as vce_api
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    import hf_perfit.flower.simulation as simulation

    class State:
        def __init__(self):
            self.inbox, self.looks, self.takers = [], 0, []

        def get_message_ins(self, node_id, limit):
            self.looks += 1
            if not self.inbox:
                return []
            self.takers.append(threading.current_thread())
            return [self.inbox.pop(0)]

    state = State()

    def push(self, messages):
        state.inbox.extend(messages)
        return [f"id-{m}" for m in messages]

    class Grid:
        pass

    grid = Grid()
    grid.state = state
    monkeypatch.setattr(InMemoryGrid, "push_messages", push)
    monkeypatch.setattr(simulation, "SIMULATION_DISPATCH_WAIT", 600.0)  # the loop looks at its start, then on a wake
    workers: queue.Queue = queue.Queue()
    with simulation.fast_simulation_dispatch():
        stop = threading.Event()
        loop = threading.Thread(target=vce_api.add_messages_to_queue, args=(state, workers, {7: 0}, stop))
        loop.start()
        while state.looks == 0:  # its first look (nothing yet); now it waits for a wake
            time.sleep(0.001)
        try:
            assert InMemoryGrid.push_messages(grid, ["m1"]) == ["id-m1"]
            assert workers.get_nowait() == "m1"  # already queued when the push returned
            assert state.takers == [threading.current_thread()]  # taken by the pushing thread
        finally:
            stop.set()
            InMemoryGrid.push_messages(grid, [])  # wakes the loop, which sees the stop
            loop.join()


def test_perfit_pb_on_flower_equals_in_process_and_b_stays_on_the_nodes(tmp_path, assets, task_identity):
    """perfit_pb (tests/test_perfit_variants.py) through Flower: the same run as in-process, and no B on the wire."""
    from hf_perfit.flower.records import get_arrays

    run_federated(_config(assets, tmp_path / "in_process", strategy_options={"personal_b": True}))
    grid = _LocalGrid(3)
    FlowerCoordinator(
        grid,
        _config(assets, tmp_path / "flower", strategy_options={"personal_b": True}),
        FlowerRunOptions(poll_interval=0.0),
    ).run()
    _assert_same_run(tmp_path / "in_process", tmp_path / "flower", CLIENTS)  # records (bytes too) and adapters
    moved = [m for m in grid.sent + grid.answered if m.metadata.message_type in ("train", "evaluate")]
    assert moved
    for message in moved:  # B's values and masks stay on the nodes, both ways
        assert not [k for group in get_arrays(message.content).values() for k in group if ".lora_B." in k]


def test_perfit_bsel_on_flower_equals_in_process(tmp_path, assets, task_identity):
    """perfit_bsel (tests/test_perfit_variants.py) through Flower: each node chooses its B from its own state and
    held-out rows, the server learns the choice from the upload's metrics: the same records (choices and held-out
    losses included) and exported adapters as in-process."""
    bsel = {"strategy_options": {"select_b_rows": 3}}
    run_federated(_config(assets, tmp_path / "in_process", **bsel))
    FlowerCoordinator(
        _LocalGrid(3), _config(assets, tmp_path / "flower", **bsel), FlowerRunOptions(poll_interval=0.0)
    ).run()
    _assert_same_run(tmp_path / "in_process", tmp_path / "flower", CLIENTS)
    chosen = [x for x in _records(tmp_path / "flower") if x.get("client") and x["round"] == 1]
    assert len(chosen) == 3 and all("own_b" in x and "select_loss_own" in x for x in chosen)
