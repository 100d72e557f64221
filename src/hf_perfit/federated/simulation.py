"""In-process federated simulation: many clients, one process, one shared base model, real rounds.

The base model is loaded once and wrapped once in a `PerFITModel`; clients are swapped in and out by loading their
adapter state (`set_adapter_state`), and every client's state lives on disk between rounds, versioned by round, so
memory does not grow with the number of clients and a killed run resumes from its last completed round exactly.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .._io import atomic_write_json, atomic_write_text
from .client import client_update, evaluate_perplexity
from .config import FederatedConfig
from .messages import ClientUpdate
from .plots import plot_run
from .runtime import build_client_model, load_clients, load_model, local_training_args, tokenize_clients
from .strategies import get_strategy

CHECKPOINT_NAME = "checkpoint.json"
STATE_DIR = "state"


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
        # Under `accelerate launch --num_processes N` every process runs this coordinator in lockstep (same seed, same
        # sampling, DDP keeps the adapters identical) and each client's training is data-parallel; only the main
        # process writes files, and the others wait for it wherever they read what it wrote.
        from ..distributed import process_state

        self._processes = process_state()
        self._check_output_dir()
        if model is None or tokenizer is None:
            model, tokenizer = load_model(config)
        self.tokenizer = tokenizer
        if clients is None:
            clients = load_clients(config)
        if len(clients) != config.num_clients:
            raise ValueError(f"the data gives {len(clients)} clients but num_clients={config.num_clients}.")
        self.clients = clients
        self.train_sets, self.test_sets = tokenize_clients(clients, tokenizer, config)
        self.model = build_client_model(model, config)
        self.strategy = get_strategy(config.strategy, **config.resolved_strategy_options())
        self.args = local_training_args(config)
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

    @property
    def is_main_process(self) -> bool:
        """Whether this process writes the run's files (always, unless launched with several processes)."""
        return self._processes.is_main_process

    def _barrier(self) -> None:
        self._processes.wait_for_everyone()

    def _check_output_dir(self) -> None:
        ckpt = self.out / STATE_DIR / CHECKPOINT_NAME
        if self.config.overwrite:
            if self.is_main_process and self.out.exists():
                shutil.rmtree(self.out)
            self._barrier()
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
        if not cfg.resume and self.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.out / "config.json", cfg.to_dict())
        if not cfg.resume:
            self.strategy.initialize(init_tensors)
            records = [self._eval_record(-1, c.client_id, base=True) for c in self.clients]
            records.append(self._summary(-1, records, {}))
        summary = records[-1]
        bar = tqdm(
            total=cfg.num_rounds * len(self.clients),
            initial=start_round * len(self.clients),
            desc="rounds",
            disable=not self.is_main_process,
        )
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
        if cfg.push_to_hub and self.is_main_process:
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
            round_idx=r,
        )
        if self.is_main_process:
            _save_client_state(self.out, cid, r, *result.state)
        self._barrier()
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
        if self.is_main_process:
            self._write_checkpoint(completed, records)
        self._barrier()

    def _write_checkpoint(self, completed: int, records: list[dict]) -> None:
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
        if self.is_main_process:
            self._write_export()
        self._barrier()

    def _write_export(self) -> None:
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


__all__ = ["FederatedConfig", "FederatedSimulation", "run_federated"]
