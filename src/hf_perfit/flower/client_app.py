"""The Flower `ClientApp`: one data owner's side of a federated run.

It runs exactly the client code of the in-process simulation: the runtime is built with
[`hf_perfit.federated.runtime`] from the [`FederatedConfig`] the server sends, a round is
[`hf_perfit.federated.client.client_update`], evaluation is [`evaluate_perplexity`]. Only tensors, counts and
metrics leave the client (see [`hf_perfit.flower.records`]); its data, its tokenized text and its state stay on its
disk.

Messages it answers (the `ServerApp` in [`hf_perfit.flower.server_app`] sends them):

- `query` (once, at the start): who am I (client id, sizes), a fingerprint of the initial adapter (every node must
  build the same one), the base model's perplexity on my test split, and, when asked, the initial adapter itself; a
  new run forgets this node's stored states, a resumed one (`resume` in the message) keeps them;
- `train`: one federated round, starting from the state of the last round the server accepted;
- `evaluate`: the personalized perplexity of the adapter the server's strategy assigns to this client; in the last
  round it also exports that adapter (plain PEFT format) to `<output_dir>/clients/<client_id>/adapter`.

Node settings (`--node-config` of `flower-supernode`; the simulation runtime sets the first two itself):

- `partition-id` (required): this client's index `k` in the federation (`client_k`: its data partition, seed and
  budget multiplier);
- `num-partitions`: checked against the config's `num_clients`;
- `dataset-name`: this node's own data (a file or a per-client folder) instead of the config's;
- `model-name-or-path`: where this node finds the base model (same weights as everyone else's);
- `output-dir`: where this node keeps its state and exports its adapter (default: the config's `output_dir`);
- `trust-remote-code`: `true` to allow a config with `trust_remote_code=True` on this node (refused otherwise).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..federated.client import LocalTrainingArgs, client_update, evaluate_perplexity
from ..federated.config import FederatedConfig
from ..federated.messages import personal_keys
from ..federated.run import StateCache
from ..federated.runtime import build_client_model, load_clients, load_model, local_training_args, tokenize_clients
from ..federated.strategies import get_strategy
from ..model import PerFITModel
from .records import (
    META,
    METRICS,
    OWN,
    PACK_FLAG,
    TENSORS,
    decode_instruction,
    decode_tensors,
    encode_update,
    put_arrays,
    tensor_digest,
)
from .state import ClientStateStore

__all__ = ["NodeSettings", "app", "make_client_app"]

STATE_DIR = "flower_state"


@dataclass(frozen=True)
class NodeSettings:
    """This node's settings, from `context.node_config` (see the module docstring)."""

    partition_id: int
    num_partitions: int | None = None
    dataset_name: str | None = None
    model_name_or_path: str | None = None
    output_dir: str | None = None
    trust_remote_code: bool = False

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any]) -> NodeSettings:
        """Parse `context.node_config`; a missing `partition-id` is a clear error."""
        if "partition-id" not in node_config:
            raise ValueError(
                "this SuperNode has no partition-id in its node config; start it with "
                "--node-config 'partition-id=<k> num-partitions=<K>'."
            )
        trust = node_config.get("trust-remote-code", False)
        return cls(
            partition_id=int(node_config["partition-id"]),
            num_partitions=int(node_config["num-partitions"]) if "num-partitions" in node_config else None,
            dataset_name=str(node_config["dataset-name"]) if node_config.get("dataset-name") else None,
            model_name_or_path=(
                str(node_config["model-name-or-path"]) if node_config.get("model-name-or-path") else None
            ),
            output_dir=str(node_config["output-dir"]) if node_config.get("output-dir") else None,
            trust_remote_code=trust is True or str(trust).lower() in ("true", "1", "yes"),
        )


@dataclass
class _Runtime:
    """What a client process builds once per config and reuses (the simulation runtime keeps its workers alive, so
    one worker serving several clients swaps them in and out of one model, as the in-process simulation does)."""

    config: FederatedConfig
    model: PerFITModel
    tokenizer: Any
    init_tensors: dict
    args: LocalTrainingArgs
    # the matrices the run's strategy keeps on the client (PerFIT's `personal_b`: ("lora_B",)); read once per
    # runtime, not per evaluate message (building the strategy object only to ask it)
    personal_parts: tuple[str, ...] = ()


@dataclass
class _ClientData:
    client_id: str
    train: datasets.Dataset
    test: datasets.Dataset


_RUNTIME: dict[str, _Runtime] = {}
_DATA: dict[tuple, _ClientData] = {}


def _node_config(config: FederatedConfig, node: NodeSettings) -> FederatedConfig:
    """The server's config with this node's own paths; refuses remote code the node did not allow."""
    if config.trust_remote_code and not node.trust_remote_code:
        raise PermissionError(
            "the server's config sets trust_remote_code=True, which runs code from the model repository on this "
            "node; allow it with --node-config 'trust-remote-code=true' if you trust that model."
        )
    if node.num_partitions is not None and node.num_partitions != config.num_clients:
        raise ValueError(
            f"this node has num-partitions={node.num_partitions} but the server's config has "
            f"num_clients={config.num_clients}."
        )
    if not 0 <= node.partition_id < config.num_clients:
        raise ValueError(f"partition-id={node.partition_id} is not in [0, num_clients={config.num_clients}).")
    changes: dict[str, Any] = {"push_to_hub": False, "resume": False, "overwrite": False}
    if node.model_name_or_path:
        changes["model_name_or_path"] = node.model_name_or_path
    if node.output_dir:
        changes["output_dir"] = node.output_dir
    return dataclasses.replace(config, **changes)


def _runtime(meta: ConfigRecord, context: Context) -> tuple[_Runtime, _ClientData, NodeSettings]:
    """The (cached) model runtime and this node's tokenized data for the config carried by `meta`."""
    node = NodeSettings.from_node_config(dict(context.node_config))
    config_json = str(meta["federated-config"])
    config = _node_config(FederatedConfig.from_dict(json.loads(config_json)), node)
    key = json.dumps([config_json, node.model_name_or_path])
    rt = _RUNTIME.get(key)
    if rt is None:
        _RUNTIME.clear()  # one model per process: a new config replaces the old one
        _DATA.clear()
        base, tokenizer = load_model(config)
        model = build_client_model(base, config)
        parts = get_strategy(config.strategy, **config.resolved_strategy_options()).personal_parts()
        rt = _Runtime(
            config, model, tokenizer, model.get_adapter_state()[0], local_training_args(config), tuple(parts)
        )
        _RUNTIME[key] = rt
    data_key = (key, node.dataset_name, node.partition_id)
    data = _DATA.get(data_key)
    if data is None:
        client = _load_own_client(config, node)
        train_sets, test_sets = tokenize_clients([client], rt.tokenizer, config)
        data = _ClientData(client.client_id, train_sets[client.client_id], test_sets[client.client_id])
        _DATA[data_key] = data
    rt.config = config
    return rt, data, node


def _load_own_client(config: FederatedConfig, node: NodeSettings):
    """This node's `ClientData`: partition `partition-id` of the config's data, or the node's own `dataset-name`."""
    from ..data import detect_client_folder, load_client_folder

    if node.dataset_name is None:
        return load_clients(config)[node.partition_id]
    if detect_client_folder(node.dataset_name):
        clients = load_client_folder(node.dataset_name)
        client = clients[0] if len(clients) == 1 else clients[node.partition_id]
    else:  # a single file: all of it is this client's, split into train/test with the config's test_fraction
        own = dataclasses.replace(
            config, dataset_name=node.dataset_name, num_clients=1, partition="iid", budget_multipliers=None
        )
        client = load_clients(own)[0]
    return dataclasses.replace(client, client_id=f"client_{node.partition_id}")


def _store(config: FederatedConfig, client_id: str) -> ClientStateStore:
    return ClientStateStore(Path(config.output_dir) / STATE_DIR / client_id)


_STATES = StateCache(0)
"""This process's copy of the newest state of each client it serves, by state folder and tagged with its round, within
the running config's `client_state_memory_mb` (as the in-process engine keeps its clients' states). A round's `train`
saves the state that the same round's `evaluate` and the next round's `train` read back (two safetensors reads per
client and round otherwise); the disk stays the truth: a copy is used only for the round the server names
(`state-round`) and while that version's file exists."""


def _states(config: FederatedConfig) -> StateCache:
    _STATES.resize(config.client_state_memory_mb)  # the running config's budget
    return _STATES


def _remember_state(config: FederatedConfig, store: ClientStateStore, round_idx: int, state: Any) -> None:
    _states(config).put(str(store.root), state, tag=int(round_idx))


def _load_state(config: FederatedConfig, store: ClientStateStore, round_idx: int) -> Any:
    """The client's state after round `round_idx` (`None` before its first), from this process's copy when it holds
    that version, else from its disk ([`ClientStateStore.load`], with its errors)."""
    if round_idx < 0:
        return None
    state = _states(config).get(str(store.root), tag=int(round_idx))
    if state is not None and store._path(round_idx).is_file():
        return state
    state = store.load(round_idx)
    _remember_state(config, store, round_idx, state)
    return state


def _reply(message: Message, content: RecordDict) -> Message:
    return Message(content, reply_to=message)


def hello(message: Message, context: Context) -> Message:
    """Start of a run: forget any earlier state, report identity and sizes, the initial adapter's fingerprint and
    the base model's perplexity on this client's test split; send the initial adapter when asked."""
    meta = message.content[META]
    rt, data, node = _runtime(meta, context)
    if not bool(meta.get("resume", False)):  # a resumed run continues from the states this node kept
        store = _store(rt.config, data.client_id)
        _states(rt.config).pop(str(store.root))
        store.reset()
    with rt.model.disable_adapter():
        ev = evaluate_perplexity(rt.model, rt.tokenizer, data.test, rt.config.eval_batch_size)
    content = RecordDict()
    reply_meta = ConfigRecord(
        {
            "client-id": data.client_id,
            "adapter-digest": tensor_digest(rt.init_tensors),
            "partition-id": node.partition_id,
        }
    )
    content[METRICS] = MetricRecord(
        {
            "num-examples": len(data.train),
            "num-test-examples": len(data.test),
            "eval_loss": float(ev["eval_loss"]),
            "perplexity": float(ev["perplexity"]),
            "eval_tokens": int(ev["eval_tokens"]),
        }
    )
    if bool(meta.get("send-initial-adapter", False)):
        put_arrays(content, {TENSORS: rt.init_tensors}, pack=bool(meta.get(PACK_FLAG, False)), meta=reply_meta)
    content[META] = reply_meta
    return _reply(message, content)


def train(message: Message, context: Context) -> Message:
    """One federated round: [`client_update`] from the last accepted state and the server's instruction."""
    meta = message.content[META]
    rt, data, _ = _runtime(meta, context)
    store = _store(rt.config, data.client_id)
    accepted = int(meta["state-round"])
    state = _load_state(rt.config, store, accepted)
    instruction = decode_instruction(message.content, state[1] if state is not None else None)
    result = client_update(
        rt.model,
        rt.tokenizer,
        data.train,
        instruction,
        state,
        rt.args,
        client_id=data.client_id,
        initial_tensors=rt.init_tensors,
        uses_masks=bool(meta["uses-masks"]),
        budget_multiplier=float(meta["budget-multiplier"]),
        seed=int(meta["seed"]),
        round_idx=int(meta["round"]),
    )
    store.save(int(meta["round"]), result.state, keep=accepted)
    _remember_state(rt.config, store, int(meta["round"]), result.state)
    content = encode_update(
        result.update,
        {
            "bytes-up": int(result.bytes_up),
            "bytes-down": int(result.bytes_down),
            "train-loss": float(result.train_loss),
            "density": float(result.density),
        },
        pack=bool(meta.get(PACK_FLAG, False)),  # answer in the format the server asked in
    )
    return _reply(message, content)


def evaluate(message: Message, context: Context) -> Message:
    """Personalized perplexity of the adapter the server assigns to this client (its own tensors when the message
    says `own`), with this client's own masks and search progress; exported in the last round."""
    meta = message.content[META]
    rt, data, _ = _runtime(meta, context)
    state = _load_state(rt.config, _store(rt.config, data.client_id), int(meta["state-round"]))
    own_tensors, masks, state_meta = state if state is not None else (None, None, {})
    if meta.get("tensors-mode") == OWN:
        if own_tensors is None:
            raise ValueError("the server asked to evaluate this client's own adapter, but it has none yet.")
        tensors = own_tensors
    else:
        tensors = decode_tensors(message.content, meta, masks, "the server's evaluation tensors")
        if tensors is None:
            raise ValueError("the server's evaluation message carries no adapter.")
        tensors = _with_personal(rt, own_tensors, tensors)
    if not bool(meta["uses-masks"]):
        masks = None
    rt.model.set_adapter_state(tensors, masks, state_meta)
    ev = evaluate_perplexity(rt.model, rt.tokenizer, data.test, rt.config.eval_batch_size)
    metrics: dict[str, float | int] = {
        "eval_loss": float(ev["eval_loss"]),
        "perplexity": float(ev["perplexity"]),
        "eval_tokens": int(ev["eval_tokens"]),
        "num-examples": len(data.train),
    }
    if bool(meta["uses-masks"]):
        metrics["density"] = float(rt.model.density())
    if bool(meta.get("final", False)):
        rt.model.save_pretrained(Path(rt.config.output_dir) / "clients" / data.client_id / "adapter")
    content = RecordDict()  # the metrics alone: the server knows whom it asked (one object less on the wire)
    content[METRICS] = MetricRecord(metrics)
    return _reply(message, content)


def _with_personal(rt: _Runtime, own: dict | None, sent: dict) -> dict:
    """`sent` plus this client's own values of the matrices its strategy keeps personal (PerFIT's `personal_b`: B,
    which the server never holds; the seeded init before the client's first round); `sent` itself otherwise."""
    base = own if own is not None else rt.init_tensors
    mine = [k for k in personal_keys(base, rt.personal_parts) if k not in sent]
    return {**sent, **{k: base[k] for k in mine}} if mine else sent


def make_client_app(train_mods: list | None = None, mods: list | None = None) -> ClientApp:
    """The hf_perfit `ClientApp`, with Flower mods.

    Args:
        train_mods (`list`, *optional*): mods around the `train` handler only, e.g. `[fixedclipping_mod]` next to
            Flower's `DifferentialPrivacyClientSideFixedClipping` on the server (see `docs/flower.md` for which
            strategies it fits).
        mods (`list`, *optional*): mods around every handler (`query`, `train`, `evaluate`).
    """
    client_app = ClientApp(mods=list(mods or []))
    client_app.query()(hello)
    client_app.train(mods=list(train_mods or []))(train)
    client_app.evaluate()(evaluate)
    return client_app


app = make_client_app()
"""The `ClientApp` (`clientapp = "hf_perfit.flower.client_app:app"` in a Flower app's `pyproject.toml`)."""
