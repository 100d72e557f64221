"""Reading finished runs back: each client's base and final personalized perplexity, and a side-by-side table of
several runs on the same clients (`perfit compare --runs outputs/demo/fedit outputs/demo/perfit`); a finished run
with its exported adapters for `perfit push` ([`load_finished_run`]).

Client ids read back from `metrics.jsonl` become paths (`clients/<id>/adapter/`) and Hub repo names, so each is
checked first ([`check_client_id`]): a hand-edited id such as `../../outside` would otherwise make `perfit push`
package files from outside the run folder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .run import RunFolder, read_metrics
from .run import check_client_id as run_check_client_id


def run_summary(run_dir: str | os.PathLike) -> dict:
    """`{"strategy", "rounds", "base": {client: ppl}, "final": {client: ppl}, "mean_final", "mean_base"}` of a run.

    Raises:
        FileNotFoundError: no `metrics.jsonl` in `run_dir`.
        ValueError: the run has not completed a round yet.
    """
    records = read_metrics(run_dir)
    clients = [r for r in records if "client" in r]
    trained = [r for r in clients if r["round"] >= 0]
    if not trained:
        raise ValueError(f"{run_dir} has no completed round yet; finish it (or --resume it) first.")
    last = max(r["round"] for r in trained)
    base = {r["client"]: float(r["perplexity"]) for r in clients if r["round"] == -1}
    final = {r["client"]: float(r["perplexity"]) for r in trained if r["round"] == last}
    config = RunFolder(run_dir).read_config()
    return {
        "strategy": trained[0]["strategy"],
        "rounds": last + 1,
        "config": config,
        "base": base,
        "final": final,
        "mean_base": sum(base.values()) / max(len(base), 1),
        "mean_final": sum(final.values()) / max(len(final), 1),
    }


def comparison_table(run_dirs: list[str | os.PathLike]) -> str:
    """A markdown table: one row per client, the base model's perplexity, then each run's final personalized
    perplexity; a mean row, and each run's mean relative to the first run's."""
    if not run_dirs:
        raise ValueError("give at least one run folder.")
    runs = [run_summary(d) for d in run_dirs]
    clients = sorted(runs[0]["final"], key=lambda c: (len(c), c))
    for d, run in zip(run_dirs, runs, strict=True):
        if set(run["final"]) != set(clients):
            raise ValueError(f"{d} has other clients than {run_dirs[0]}; compare runs on the same clients.")
    names = [f"{r['strategy']}" for r in runs]
    lines = [
        "| client | base model | " + " | ".join(names) + " |",
        "|---|---:|" + "---:|" * len(runs),
    ]
    for c in clients:
        lines.append(f"| {c} | {runs[0]['base'][c]:.2f} | " + " | ".join(f"{r['final'][c]:.2f}" for r in runs) + " |")
    lines.append(
        f"| **mean** | **{runs[0]['mean_base']:.2f}** | "
        + " | ".join(f"**{r['mean_final']:.2f}**" for r in runs)
        + " |"
    )
    ref = runs[0]["mean_final"]
    lines.append("| mean / " + names[0] + " | | " + " | ".join(f"{r['mean_final'] / ref:.3f}" for r in runs) + " |")
    return "\n".join(lines) + "\n"


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
"""The files plain PEFT needs; pushed exactly as the run wrote them."""
PERFIT_FILES = ("perfit_config.json", "perfit_masks.safetensors")
"""PerFIT's extras (ignored by PEFT): `perfit push` publishes them so `PerFITModel.from_pretrained` can continue."""
COMPARABLE_KEYS = tuple(
    "model_name_or_path dataset_name num_clients partition partition_column dirichlet_alpha test_fraction "
    "max_eval_examples max_length seed".split()
)
"""Keys two runs must share for their perplexities to be measured on the same clients and test splits."""


@dataclass
class FinishedRun:
    """A finished run: `ppl[client][round]` is the personalized perplexity, round -1 the base model's."""

    path: Path
    config: dict[str, Any]
    strategy: str
    num_rounds: int
    client_ids: list[str]
    ppl: dict[str, dict[int, float]]
    records: list[dict[str, Any]]

    @property
    def mean_ppl(self) -> dict[int, float]:
        return {int(r["round"]): float(r["mean_perplexity"]) for r in self.records if r.get("summary")}

    @property
    def final_round(self) -> int:
        """The round of the exported adapters: `num_rounds - 1`, or `num_rounds` when the run ended with
        `finetune_steps` of local fine-tuning (those records carry `"finetune": true`)."""
        tuned = any(r.get("finetune") for r in self.records if "client" in r)
        return self.num_rounds if tuned else self.num_rounds - 1

    def final_ppl(self, client_id: str) -> float | None:
        return self.ppl.get(client_id, {}).get(self.final_round)

    def adapter_dir(self, client_id: str) -> Path:
        return self.path / "clients" / client_id / "adapter"


def check_client_id(client_id: Any, source: Path) -> str:
    """Return `client_id` if it is one safe path component (the rule of [`hf_perfit.federated.run.check_client_id`]),
    else raise a `ValueError` naming the file it came from."""
    try:
        return run_check_client_id(client_id)
    except ValueError as err:
        raise ValueError(
            f"{source} names the client {client_id!r}, which is not a valid client id: {err} The file was edited or is not from `perfit federate`. "
            "Restore the run's metrics.jsonl; nothing was read or pushed."
        ) from None


def load_finished_run(run_dir: str | Path) -> FinishedRun:
    """Read a finished run; raises `FileNotFoundError` (with the fix) for a missing or unfinished one and
    `ValueError` for a client id that is not a safe path component."""
    path = Path(run_dir)
    if not str(run_dir) or not path.is_dir():
        raise FileNotFoundError(
            f"run folder {str(run_dir)!r} does not exist; pass the output_dir of a finished federated run "
            "(`perfit federate --output_dir DIR ...`)."
        )
    for name in ("config.json", "metrics.jsonl"):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path} is not a federated run folder: {name} is missing. Pass the output_dir "
                "that `perfit federate` wrote."
            )
    config = RunFolder(path).read_config()
    records = read_metrics(path)
    ppl: dict[str, dict[int, float]] = {}
    for rec in records:
        if "client" in rec and not rec.get("summary"):
            cid = check_client_id(rec["client"], path / "metrics.jsonl")
            ppl.setdefault(cid, {})[int(rec["round"])] = float(rec["perplexity"])
    client_ids = [cid for cid, rounds in ppl.items() if -1 in rounds]
    if not client_ids:
        raise FileNotFoundError(f"{path / 'metrics.jsonl'} holds no client records; the run has not started.")
    strategy, num_rounds = str(config.get("strategy", "unknown")), int(config.get("num_rounds", 0))
    run = FinishedRun(path, config, strategy, num_rounds, client_ids, ppl, records)
    unfinished = [cid for cid in client_ids if run.final_ppl(cid) is None]
    missing = {c: [f for f in ADAPTER_FILES if not (run.adapter_dir(c) / f).is_file()] for c in client_ids}
    missing = {c: files for c, files in missing.items() if files}
    if unfinished or missing:
        first = next(iter(missing), None)
        what = (
            f"no metrics for round {run.final_round} (clients {unfinished})"
            if unfinished
            else f"no exported adapter for {sorted(missing)} ({run.adapter_dir(first)} lacks {missing[first]})"
        )
        raise FileNotFoundError(
            f"{path} is not a finished run: {what}. Adapters are exported after the last round; finish the run "
            "(`perfit federate --config ... --resume`) and push again."
        )
    return run


def check_comparable(run: FinishedRun, other: FinishedRun) -> None:
    """Refuse a compare run that was not evaluated on the same clients and test splits."""
    differ = [k for k in COMPARABLE_KEYS if run.config.get(k) != other.config.get(k)]
    if differ:
        detail = ", ".join(f"{k}: {run.config.get(k)!r} vs {other.config.get(k)!r}" for k in differ)
        raise ValueError(
            f"compare run {other.path} was not evaluated on the same clients and test splits as {run.path} ({detail}); "
            "compare only runs that share the model, data, partition and seed."
        )
    if other.client_ids != run.client_ids:
        raise ValueError(f"compare run {other.path} has clients {other.client_ids}, this run {run.client_ids}.")


__all__ = [
    "FinishedRun",
    "check_client_id",
    "check_comparable",
    "comparison_table",
    "load_finished_run",
    "run_summary",
]
