"""In-process federated simulation: many clients, one process, one shared base model, real rounds.

The base model is loaded once and wrapped once in a `PerFITModel`; clients are swapped in and out by loading their
adapter state (`set_adapter_state`), and every client's state lives on disk between rounds, versioned by round, so
memory does not grow with the number of clients and a killed run resumes from its last completed round exactly.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .._io import atomic_write_json, atomic_write_text
from ..config import PerFITLoraConfig
from ..model import PerFITModel
from .client import LocalTrainingArgs, client_update, evaluate_perplexity, tokenize_for_completion_loss
from .messages import ClientUpdate
from .plots import plot_run
from .strategies import STRATEGIES, get_strategy

CHECKPOINT_NAME = "checkpoint.json"
STATE_DIR = "state"


@dataclass
class FederatedConfig:
    """A federated run. YAML keys and command-line flags are these field names."""

    model_name_or_path: str = "smollm2-135m-instruct"
    dataset_name: str = ""
    strategy: str = "perfit"
    num_clients: int = 8
    num_rounds: int = 3
    fraction_clients: float = 1.0
    local_steps: int = 10
    learning_rate: float = 2e-4
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 512
    output_dir: str = "outputs/federated"
    seed: int = 0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    expansion_factor: int = 4
    search_steps: int = 10
    prune_iterations: int = 4
    importance: str = "taylor1"
    budget_multipliers: list[float] | None = None
    research_every: int = 0
    proximal_mu: float = 0.01
    partition: str = "category"
    partition_column: str = "category"
    dirichlet_alpha: float = 0.5
    test_fraction: float = 0.1
    max_eval_examples: int | None = None
    eval_batch_size: int = 8
    strategy_options: dict[str, Any] = field(default_factory=dict)
    trust_remote_code: bool = False
    push_to_hub: bool = False
    hub_repo_prefix: str | None = None
    hub_private: bool = False
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} is unknown; allowed values: {sorted(STRATEGIES)}.")
        for name in ("num_clients", "num_rounds", "local_steps", "max_length", "per_device_train_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1.")
        if not 0.0 < self.fraction_clients <= 1.0:
            raise ValueError(f"fraction_clients={self.fraction_clients} must be in (0, 1].")
        if self.partition not in ("category", "dirichlet", "iid"):
            raise ValueError(f"partition={self.partition!r} is unknown; allowed values: category, dirichlet, iid.")
        if self.budget_multipliers is not None and len(self.budget_multipliers) != self.num_clients:
            raise ValueError(
                f"budget_multipliers has {len(self.budget_multipliers)} entries for num_clients={self.num_clients}; "
                "give one per client."
            )
        if STRATEGIES[self.strategy].uses_masks and self.search_steps > self.local_steps:
            raise ValueError(
                f"search_steps={self.search_steps} > local_steps={self.local_steps}: PerFIT's search must finish "
                "within a client's first round; set search_steps <= local_steps."
            )
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other; choose one.")
        if isinstance(self.strategy_options, str):  # from the command line: --strategy_options '{"mu": 0.1}'
            try:
                self.strategy_options = json.loads(self.strategy_options or "{}")
            except json.JSONDecodeError as err:
                raise ValueError(f"strategy_options={self.strategy_options!r} is not valid JSON: {err}.") from None
        if not isinstance(self.strategy_options, dict):
            raise ValueError(f"strategy_options must be a mapping of option -> value, got {self.strategy_options!r}.")
        if self.push_to_hub and not self.hub_repo_prefix:
            raise ValueError("push_to_hub=True needs hub_repo_prefix (e.g. 'my-org/perfit-flan8').")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FederatedConfig:
        """Build from a dict (e.g. a YAML file); an unknown key is a ValueError naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}.")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def adapter_config(self) -> PerFITLoraConfig:
        """PerFIT's expanded adapter for `perfit`; for every other method a vanilla rank-r LoRA (γ = 1, PEFT init)."""
        common = dict(r=self.lora_r, lora_alpha=self.lora_alpha, target_modules=list(self.lora_target_modules))
        if STRATEGIES[self.strategy].uses_masks:
            return PerFITLoraConfig(
                **common,
                expansion_factor=self.expansion_factor,
                search_steps=self.search_steps,
                prune_iterations=min(self.prune_iterations, self.search_steps),
                importance=self.importance,
                research_every=self.research_every,
            )
        return PerFITLoraConfig(
            **common, expansion_factor=1, init_lora_weights=True, search_steps=1, prune_iterations=1
        )

    def resolved_strategy_options(self) -> dict[str, Any]:
        """The options the strategy is built with: those of the named config keys (`research_every` for perfit,
        `proximal_mu` for fedprox), overridden by `strategy_options` (any option the strategy defines)."""
        named = {"perfit": {"research_every": self.research_every}, "fedprox": {"proximal_mu": self.proximal_mu}}
        return {**named.get(self.strategy, {}), **self.strategy_options}


# ---------------------------------------------------------------------- client state on disk


def _client_dir(out: Path, cid: str) -> Path:
    return out / STATE_DIR / "clients" / cid


def _save_client_state(out: Path, cid: str, round_idx: int, tensors, masks, meta) -> None:
    d = _client_dir(out, cid)
    blob = {f"t/{k}": v.contiguous() for k, v in tensors.items()}
    blob.update({f"m/{k}": m.to(torch.uint8).contiguous() for k, m in masks.items()})
    tmp = d / f".round_{round_idx}.tmp"
    d.mkdir(parents=True, exist_ok=True)
    save_file(blob, str(tmp), metadata={"meta": json.dumps(meta)})
    tmp.replace(d / f"round_{round_idx}.safetensors")
    for old in sorted(d.glob("round_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))[:-2]:
        old.unlink()  # keep the last two versions: enough to resume from the last completed round


def _load_client_state(out: Path, cid: str, upto_round: int):
    d = _client_dir(out, cid)
    versions = [(int(p.stem.split("_")[1]), p) for p in d.glob("round_*.safetensors")] if d.is_dir() else []
    versions = [v for v in versions if v[0] <= upto_round]
    if not versions:
        return None
    path = max(versions)[1]
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    blob = load_file(str(path))
    tensors = {k[2:]: v for k, v in blob.items() if k.startswith("t/")}
    masks = {k[2:]: v.bool() for k, v in blob.items() if k.startswith("m/")}
    return tensors, masks, meta


# ---------------------------------------------------------------------- the run


class FederatedSimulation:
    """Runs a [`FederatedConfig`] in one process.

    Args:
        config: the run.
        model: a base model to use instead of loading `config.model_name_or_path` (tests pass tiny ones).
        tokenizer: its tokenizer.
        clients: a list of [`hf_perfit.data.ClientData`] instead of loading `config.dataset_name`.
    """

    def __init__(self, config: FederatedConfig, model=None, tokenizer=None, clients=None) -> None:
        self.config = config
        self.out = Path(config.output_dir)
        self._check_output_dir()
        if model is None or tokenizer is None:
            model, tokenizer = _load_model(config)
        self.tokenizer = tokenizer
        if clients is None:
            clients = _load_clients(config)
        if len(clients) != config.num_clients:
            raise ValueError(f"the data gives {len(clients)} clients but num_clients={config.num_clients}.")
        self.clients = clients
        self.train_sets, self.test_sets = {}, {}
        from ..data import format_for_tokenizer

        for c in clients:
            if len(c.train) == 0:
                raise ValueError(f"client {c.client_id} has no training examples; remove it or repartition.")
            if len(c.test) == 0:
                raise ValueError(f"client {c.client_id} has no test examples; raise test_fraction or repartition.")
            test = (
                c.test
                if config.max_eval_examples is None
                else c.test.select(range(min(len(c.test), config.max_eval_examples)))
            )
            self.train_sets[c.client_id] = tokenize_for_completion_loss(
                format_for_tokenizer(c.train, tokenizer), tokenizer, config.max_length
            )
            self.test_sets[c.client_id] = tokenize_for_completion_loss(
                format_for_tokenizer(test, tokenizer), tokenizer, config.max_length
            )
        torch.manual_seed(config.seed)
        self.model = PerFITModel(model, config.adapter_config())
        self.strategy = get_strategy(config.strategy, **config.resolved_strategy_options())
        self.args = LocalTrainingArgs(
            local_steps=config.local_steps,
            learning_rate=config.learning_rate,
            per_device_train_batch_size=config.per_device_train_batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            max_length=config.max_length,
            eval_batch_size=config.eval_batch_size,
            seed=config.seed,
        )
        self.init_tensors = self.model.get_adapter_state()[0]  # the seeded initial adapter, identical on resume
        self.completed_rounds, self.records = 0, []
        if config.resume:
            self._restore()

    def _restore(self) -> None:
        """Load the last completed round's server state and metrics (for `resume`)."""
        ckpt = json.loads((self.out / STATE_DIR / CHECKPOINT_NAME).read_text())
        self.completed_rounds = int(ckpt["completed_rounds"])
        tensors = load_file(str(self.out / STATE_DIR / "strategy.safetensors"))
        self.strategy.load_state_dict(tensors, ckpt["strategy_meta"])
        records = [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines() if line]
        self.records = [r for r in records if r["round"] < self.completed_rounds]

    def _check_output_dir(self) -> None:
        ckpt = self.out / STATE_DIR / CHECKPOINT_NAME
        if self.config.overwrite and self.out.exists():
            shutil.rmtree(self.out)
        elif ckpt.exists() and not self.config.resume:
            raise FileExistsError(
                f"{self.out} holds another run's state; pass --resume to continue it or --overwrite to replace it."
            )
        elif self.config.resume and not ckpt.exists():
            raise FileNotFoundError(f"--resume: {ckpt} does not exist; start the run without --resume.")

    def _budget(self, index: int) -> float:
        return 1.0 if self.config.budget_multipliers is None else float(self.config.budget_multipliers[index])

    def run(self) -> dict[str, Any]:
        """Run (or resume) all rounds; returns the final round summary."""
        cfg = self.config
        start_round, records = self.completed_rounds, self.records
        init_tensors = self.init_tensors
        if not cfg.resume:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.out / "config.json", cfg.to_dict())
            self.strategy.initialize(init_tensors)
            records = [self._eval_record(-1, c.client_id, base=True) for c in self.clients]
            records.append(self._summary(-1, records, {}))
        summary = records[-1]
        bar = tqdm(total=cfg.num_rounds * len(self.clients), initial=start_round * len(self.clients), desc="rounds")
        for r in range(start_round, cfg.num_rounds):
            rng = random.Random(cfg.seed * 1000 + r)
            k = max(1, round(cfg.fraction_clients * len(self.clients)))
            sampled = sorted(rng.sample(range(len(self.clients)), k))
            ids = [self.clients[i].client_id for i in sampled]
            self.strategy.configure_round(r, ids)
            updates, comm = [], {}
            for i in sampled:
                cid = self.clients[i].client_id
                bar.set_postfix_str(f"round {r} client {cid}")
                updates.append(self._client_round(r, i, cid, init_tensors, comm))
                bar.update(1)
            round_metrics = self.strategy.aggregate(r, updates)
            round_records = []
            for idx, c in enumerate(self.clients):
                rec = self._eval_record(r, c.client_id)
                rec.update(comm.get(c.client_id, {"bytes_up": 0, "bytes_down": 0, "trained": False}))
                rec["budget_multiplier"] = self._budget(idx)
                round_records.append(rec)
            summary = self._summary(r, round_records, round_metrics)
            records += round_records + [summary]
            bar.update(len(self.clients) - len(sampled))
            self._checkpoint(r + 1, records)
        bar.close()
        self._export()
        if cfg.push_to_hub:
            from ..hub import push_run

            push_run(self.out, cfg.hub_repo_prefix, private=cfg.hub_private)
        return summary

    def _client_round(self, r: int, index: int, cid: str, init_tensors, comm: dict) -> ClientUpdate:
        instr = self.strategy.configure_client(cid, r)
        result = client_update(
            self.model,
            self.tokenizer,
            self.train_sets[cid],
            instr,
            _load_client_state(self.out, cid, r - 1),
            self.args,
            client_id=cid,
            initial_tensors=init_tensors,
            uses_masks=self.strategy.uses_masks,
            budget_multiplier=self._budget(index),
            seed=self.config.seed * 100003 + r * 1009 + index,
        )
        _save_client_state(self.out, cid, r, *result.state)
        comm[cid] = {
            "bytes_up": result.bytes_up,
            "bytes_down": result.bytes_down,
            "train_loss": result.train_loss,
            "trained": True,
            "density": result.density,
        }
        return result.update

    def _personalize(self, cid: str, r: int) -> None:
        state = _load_client_state(self.out, cid, r)
        local_tensors, masks, meta = state if state else (self.strategy.global_tensors, None, {})
        tensors = self.strategy.personalized_tensors(cid, local_tensors)
        if not self.strategy.uses_masks:
            masks = None
        self.model.set_adapter_state(tensors, masks, meta)

    def _eval_record(self, r: int, cid: str, base: bool = False) -> dict[str, Any]:
        if base:
            with self.model.disable_adapter():
                ev = evaluate_perplexity(self.model, self.tokenizer, self.test_sets[cid], self.config.eval_batch_size)
        else:
            self._personalize(cid, r)
            ev = evaluate_perplexity(self.model, self.tokenizer, self.test_sets[cid], self.config.eval_batch_size)
        rec = {
            "round": r,
            "client": cid,
            "strategy": "base" if base else self.config.strategy,
            "eval_loss": ev["eval_loss"],
            "perplexity": ev["perplexity"],
            "num_examples": len(self.train_sets[cid]),
            "train_loss": None,
            "bytes_up": 0,
            "bytes_down": 0,
        }
        if not base and self.strategy.uses_masks:
            rec["density"] = self.model.density()
        return rec

    def _summary(self, r: int, recs: list[dict], round_metrics: dict) -> dict[str, Any]:
        ppl = [x["perplexity"] for x in recs if x["round"] == r and "client" in x]
        return {
            "round": r,
            "summary": True,
            "strategy": "base" if r < 0 else self.config.strategy,
            "mean_perplexity": float(np.mean(ppl)),
            "bytes_up": sum(x.get("bytes_up", 0) for x in recs if x["round"] == r and "client" in x),
            **{k: float(v) for k, v in round_metrics.items()},
        }

    def _checkpoint(self, completed: int, records: list[dict]) -> None:
        tensors, meta = self.strategy.state_dict()
        tmp = self.out / STATE_DIR / ".strategy.tmp"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(self.out / STATE_DIR / "strategy.safetensors")
        atomic_write_text(self.out / "metrics.jsonl", "".join(json.dumps(x) + "\n" for x in records))
        # Written last: it is what --resume trusts.
        atomic_write_json(
            self.out / STATE_DIR / CHECKPOINT_NAME,
            {"completed_rounds": completed, "strategy_meta": meta, "config": self.config.to_dict()},
        )

    def _export(self) -> None:
        """Each client's final personalized adapter, loadable with plain `PeftModel.from_pretrained`."""
        last = self.config.num_rounds - 1
        rows = []
        records = [json.loads(x) for x in (self.out / "metrics.jsonl").read_text().splitlines() if x]
        base = {x["client"]: x["perplexity"] for x in records if x["round"] == -1 and "client" in x}
        final = {x["client"]: x for x in records if x["round"] == last and "client" in x}
        for c in self.clients:
            self._personalize(c.client_id, last)
            self.model.save_pretrained(self.out / "clients" / c.client_id / "adapter")
            f = final[c.client_id]
            rows.append(
                f"| {c.client_id} | {base[c.client_id]:.3f} | {f['perplexity']:.3f} | "
                + (f"{f['density']:.3f} |" if "density" in f else "- |")
            )
        mean = float(np.mean([final[c.client_id]["perplexity"] for c in self.clients]))
        text = (
            f"# {self.config.strategy}: {self.config.num_rounds} rounds, {len(self.clients)} clients\n\n"
            "| client | base perplexity | personalized perplexity | density |\n|---|---:|---:|---:|\n"
            + "\n".join(rows)
            + f"\n\nMean personalized perplexity: {mean:.3f}\n"
        )
        plots = plot_run(self.out)
        text += "\n" + "".join(f"![{p.stem}]({p.name})\n" for p in plots)
        atomic_write_text(self.out / "results.md", text)


def run_federated(config: FederatedConfig, **kwargs: Any) -> dict[str, Any]:
    """Run a federated job from Python (recipes and notebooks): `run_federated(FederatedConfig(...))`."""
    return FederatedSimulation(config, **kwargs).run()


def _load_model(config: FederatedConfig):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..presets import resolve_model_path

    path = resolve_model_path(config.model_name_or_path)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=config.trust_remote_code, use_safetensors=True
    )
    return model, tok


def _load_clients(config: FederatedConfig):
    from ..data import detect_client_folder, load_client_folder, load_instruction_dataset, partition_dataset

    if not config.dataset_name:
        raise ValueError("dataset_name is empty; give a Hub id, a json/jsonl/parquet file or a per-client folder.")
    if detect_client_folder(config.dataset_name):
        return load_client_folder(config.dataset_name)
    ds = load_instruction_dataset(config.dataset_name)
    return partition_dataset(
        ds,
        config.num_clients,
        method=config.partition,
        column=config.partition_column,
        alpha=config.dirichlet_alpha,
        seed=config.seed,
        test_fraction=config.test_fraction,
    )


__all__ = ["FederatedConfig", "FederatedSimulation", "run_federated"]
