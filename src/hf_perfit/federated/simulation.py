"""In-process federated simulation: many clients, one process, one shared base model, real rounds.

The base model is loaded once and wrapped once in a `PerFITModel`; clients are swapped in and out by loading their
adapter state (`set_adapter_state`). The round itself (sampling, seeds, strategy, records, checkpoint) is the
[`Coordinator`]'s; this module is its in-process transport, [`InProcessTransport`], and [`FederatedSimulation`], the
coordinator wired to it. Client states stay in memory up to `client_state_memory_mb` and on disk in the run's
checkpoint (each trained client's state is written once, as its round result; checkpoints hard-link it).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .client import client_update, evaluate_perplexity
from .config import FederatedConfig
from .coordinator import Coordinator, EvalJob, FitJob, FitResult, Roster, RoundCallback, check_output_dir
from .messages import selection_metrics
from .run import CLIENTS_DIR, RunFolder, StateCache, load_client_state
from .runtime import build_client_model, load_clients, load_model, local_training_args, tokenize_clients


class InProcessTransport:
    """The clients of a [`FederatedSimulation`]: one shared adapter model, client states swapped in and out.

    Args:
        config ([`FederatedConfig`]): the run.
        model: the base model (wrapped here with the strategy's adapter).
        tokenizer: its tokenizer.
        clients (`list[ClientData]`): the clients' data, in partition order.
    """

    def __init__(self, config: FederatedConfig, model, tokenizer, clients: list) -> None:
        from ..distributed import process_state

        self.config = config
        self.run_folder = RunFolder(config.output_dir)
        # Under `accelerate launch --num_processes N` every process runs the coordinator in lockstep (same seed, same
        # sampling, DDP keeps the adapters identical) and each client's training is data-parallel; only the main
        # process writes files, and the others wait for it wherever they read what it wrote.
        self._processes = process_state()
        if len(clients) != config.num_clients:
            raise ValueError(f"the data gives {len(clients)} clients but num_clients={config.num_clients}.")
        self.clients = clients
        self.tokenizer = tokenizer
        self.train_sets, self.test_sets = tokenize_clients(clients, tokenizer, config)
        self.model = build_client_model(model, config)
        self.args = local_training_args(config)
        self.init_tensors = self.model.get_adapter_state()[0]  # the seeded initial adapter, identical on resume
        self._index = {c.client_id: i for i, c in enumerate(clients)}
        self._cache = StateCache(config.client_state_memory_mb)  # client -> its accepted state
        self._disk: dict[str, Path] = {}  # client -> its accepted state's file
        self._new: dict[str, tuple[Any, Path]] = {}  # this round's results, not accepted yet

    # ------------------------------------------------------------------ Transport

    @property
    def is_main_process(self) -> bool:
        return self._processes.is_main_process

    def barrier(self) -> None:
        self._processes.wait_for_everyone()

    def start(self) -> Roster:
        return Roster([c.client_id for c in self.clients], self.init_tensors, state_with_coordinator=True)

    def fit(self, round_idx: int, jobs: Sequence[FitJob], on_result: Callable[[str, FitResult], None]):
        for job in jobs:
            args = (
                self.args if job.local_steps is None else dataclasses.replace(self.args, local_steps=job.local_steps)
            )
            result = client_update(
                self.model,
                self.tokenizer,
                self.train_sets[job.client_id],
                job.instruction,
                self.state(job.client_id),
                args,
                client_id=job.client_id,
                initial_tensors=self.init_tensors,
                uses_masks=job.uses_masks,
                budget_multiplier=job.budget_multiplier,
                seed=job.seed,
                round_idx=job.round_idx,
            )
            metrics: dict[str, Any] = {
                "bytes_up": result.bytes_up,
                "bytes_down": result.bytes_down,
                "train_loss": result.train_loss,
                "density": result.density,
                **selection_metrics(result.update),  # perfit_bsel: which B it trained from, the losses it chose by
            }
            if job.evaluate_local:  # the adapter exactly as trained, before the server folds it in
                ev = evaluate_perplexity(
                    self.model, self.tokenizer, self.test_sets[job.client_id], self.config.eval_batch_size
                )
                metrics["local_eval_loss"] = ev["eval_loss"]
                metrics["local_perplexity"] = ev["perplexity"]
            fit = FitResult(update=result.update, metrics=metrics, state=result.state)
            self._new[job.client_id] = (result.state, self._pending_file(round_idx, job.client_id))
            on_result(job.client_id, fit)
        return {}

    def adopt(self, round_idx: int, job: FitJob, result: FitResult) -> None:
        self._new[job.client_id] = (result.state, self._pending_file(round_idx, job.client_id))

    def accept(self, round_idx: int, accepted: Sequence[str], rejected: Sequence[str]) -> None:
        for cid in accepted:
            state, path = self._new.pop(cid)
            self._disk[cid] = path
            self._remember(cid, state)
        for cid in rejected:
            self._new.pop(cid, None)
        self._new.clear()

    def local_tensors(self, client_id: str) -> dict[str, torch.Tensor] | None:
        state = self.state(client_id)
        return None if state is None else state[0]

    def evaluate(self, round_idx: int, jobs: Sequence[EvalJob]):
        out = {}
        for job in jobs:
            cid = job.client_id
            if job.base:
                with self.model.disable_adapter():
                    ev = evaluate_perplexity(
                        self.model, self.tokenizer, self.test_sets[cid], self.config.eval_batch_size
                    )
            else:
                self.load_adapter(cid, job.tensors, job.uses_masks)
                ev = evaluate_perplexity(self.model, self.tokenizer, self.test_sets[cid], self.config.eval_batch_size)
            metrics = {
                "eval_loss": ev["eval_loss"],
                "perplexity": ev["perplexity"],
                "num_examples": len(self.train_sets[cid]),
            }
            if not job.base and job.uses_masks:
                metrics["density"] = self.model.density()
            out[cid] = metrics
        return out, {}

    def export(self, jobs: Sequence[EvalJob]) -> None:
        from .run import crash_point

        if self.is_main_process:
            for job in jobs:
                self.load_adapter(job.client_id, job.tensors, job.uses_masks)
                self.model.save_pretrained(self.run_folder.adapter_dir(job.client_id))
                crash_point(f"export.client{job.index}")

    def write_state(self, folder: Path, previous: Path | None) -> None:
        """Every accepted client state into `folder/clients/`, hard-linked from where it already is on disk (its
        round result, or the previous checkpoint), so a checkpoint never rewrites a state."""
        for cid, src in sorted(self._disk.items()):
            dst = folder / CLIENTS_DIR / f"{cid}.safetensors"
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:  # a file system without hard links
                shutil.copyfile(src, dst)

    def committed(self, folder: Path) -> None:
        for cid in self._disk:
            self._disk[cid] = folder / CLIENTS_DIR / f"{cid}.safetensors"

    def restore_state(self, folder: Path) -> None:
        self._cache.clear()
        self._new.clear()
        clients = folder / CLIENTS_DIR
        self._disk = {c.client_id: clients / f"{c.client_id}.safetensors" for c in self.clients}
        self._disk = {cid: p for cid, p in self._disk.items() if p.is_file()}

    # ------------------------------------------------------------------ client states

    def state(self, client_id: str):
        """The client's accepted state `(tensors, masks, meta)`, or `None` before its first round."""
        state = self._cache.get(client_id)
        if state is not None:
            return state
        path = self._disk.get(client_id)
        if path is None:
            return None
        state = load_client_state(path)
        self._remember(client_id, state)
        return state

    def _remember(self, client_id: str, state) -> None:
        self._cache.put(client_id, state)

    def _pending_file(self, round_idx: int, client_id: str) -> Path:
        return self.run_folder.pending_dir(round_idx) / f"{client_id}.safetensors"

    def load_adapter(self, client_id: str, tensors: dict[str, torch.Tensor] | None, uses_masks: bool) -> None:
        """Load `tensors` into the shared model with the client's own masks and search progress."""
        state = self.state(client_id)
        _, masks, meta = state if state else (None, None, {})
        if tensors is None:
            raise ValueError(f"no adapter to load for client {client_id!r}.")
        self.model.set_adapter_state(tensors, masks if uses_masks else None, meta)


class FederatedSimulation(Coordinator):
    """Runs a [`FederatedConfig`] in one process: the [`Coordinator`] over an [`InProcessTransport`].

    Every check (output folder, model, data, config, resume compatibility) runs before anything is written or
    deleted.

    Args:
        config: the run.
        model: a base model to use instead of loading `config.model_name_or_path` (tests pass tiny ones).
        tokenizer: its tokenizer.
        clients: a list of [`hf_perfit.data.ClientData`] instead of loading `config.dataset_name`.
        callbacks (`list[RoundCallback]`, *optional*): round hooks.
    """

    def __init__(
        self,
        config: FederatedConfig,
        model=None,
        tokenizer=None,
        clients=None,
        callbacks: Sequence[RoundCallback] = (),
    ) -> None:
        check_output_dir(config)  # before loading anything: the cheap refusals first
        if model is None or tokenizer is None:
            model, tokenizer = load_model(config)
        if clients is None:
            clients = load_clients(config)
        transport = InProcessTransport(config, model, tokenizer, clients)
        super().__init__(config, transport, callbacks=callbacks, check=False)
        self.prepare()

    # the in-process pieces, as before
    @property
    def model(self):
        return self.transport.model

    @property
    def tokenizer(self):
        return self.transport.tokenizer

    @property
    def clients(self) -> list:
        return self.transport.clients

    @property
    def train_sets(self):
        return self.transport.train_sets

    @property
    def test_sets(self):
        return self.transport.test_sets

    @property
    def args(self):
        return self.transport.args

    @property
    def init_tensors(self):
        return self.transport.init_tensors

    def _personalize(self, cid: str, r: int | None = None) -> None:
        """Load client `cid`'s personalized adapter of the last completed round into `self.model`."""
        self.transport.load_adapter(cid, self._personalized(cid), self.strategy.uses_masks)


def run_federated(config: FederatedConfig, **kwargs: Any) -> dict[str, Any]:
    """Run a federated job from Python (recipes and notebooks): `run_federated(FederatedConfig(...))`."""
    return FederatedSimulation(config, **kwargs).run()


__all__ = ["FederatedConfig", "FederatedSimulation", "InProcessTransport", "run_federated"]
