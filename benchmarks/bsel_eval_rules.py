"""Question: which B should a `perfit_bsel` client be evaluated (and exported) with after the run's last round?

The variant (docs/perfit.md, `perfit_bsel`) lets each client choose, at a round's start, between the server's LoRA B
and its own by the loss on its held-out rows; the run evaluates it with the B it last chose to train from, and a
client that chose the server's B is then evaluated with the *next* aggregate, which it never compared. This script
re-evaluates a finished run's last checkpoint, client by client, under three rules:

- `as_run`: the run's own rule (`PerFITStrategy.personalized_tensors`); it must reproduce the recorded perplexities,
  which checks that the rest of the table measures the same adapters;
- `rechosen`: the choice made again after the last aggregation, by the same rule on the same held-out rows, between
  the next round's start `θ_g ⊙ m_k` and the client's own trained B (`client.select_b`, what the client would train
  from next);
- `own`: `(A_g ⊙ m_k^A, B_k)`, the client's own trained B always (how `perfit_pb` evaluates).

It changes nothing in the run folder. Each client costs two forward passes over its held-out rows and three over its
test split. Usage (a `benchmarks/quality_scale.py` cell is a run folder):

    python benchmarks/bsel_eval_rules.py outputs/quality/flan8_recipe/seed0/perfit_bsel [--json rules.json]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from hf_perfit._io import atomic_write_json
from hf_perfit.federated.checkpoint import read_checkpoint
from hf_perfit.federated.client import evaluate_perplexity, select_b, selection_split
from hf_perfit.federated.config import FederatedConfig
from hf_perfit.federated.messages import OWN_B, SELECTED_PARTS, personal_keys
from hf_perfit.federated.run import CLIENTS_DIR, STRATEGY_FILE, RunFolder, load_client_state
from hf_perfit.federated.runtime import build_client_model, load_clients, load_model, tokenize_clients
from hf_perfit.federated.strategies import get_strategy

RULES = ("as_run", "rechosen", "own")


def evaluate_rules(run_dir: str | Path, model=None, tokenizer=None, clients=None) -> dict[str, Any]:
    """Every client of the run at `run_dir` (its last committed checkpoint) evaluated under [`RULES`].

    Args:
        run_dir: a finished (or checkpointed) `perfit` run with `select_b_rows > 0`.
        model, tokenizer, clients: the run's base model, tokenizer and client data; loaded from its `config.json`
            when `None` (a test passes the objects it ran with).

    Returns:
        `{"round": last completed round, "clients": {client_id: {...}}, "geometric": {rule: geometric mean
        perplexity}}`; per client: `recorded` (the record's perplexity), `chosen_at_start` (1.0 when its last round
        trained from its own B), `own_b` / `select_loss_server` / `select_loss_own` of the re-made choice,
        `ppl_server`, `ppl_own` and one `ppl_<rule>` per rule.

    Raises:
        ValueError: the run is not a `perfit_bsel` run, or a client has no state in the checkpoint.
    """
    run = RunFolder(run_dir)
    config = FederatedConfig.from_dict(run.read_config())
    strategy = get_strategy(config.strategy, **config.resolved_strategy_options())
    rows = getattr(strategy, "select_b_rows", 0)
    if not rows:
        raise ValueError(
            f"{run.root} is a {config.strategy!r} run without select_b_rows; this script compares the evaluation "
            "rules of perfit_bsel only (strategy perfit, strategy_options: {select_b_rows: n > 0})."
        )
    ckpt = read_checkpoint(run)
    strategy.load_state_dict(load_file(str(ckpt.folder / STRATEGY_FILE)), ckpt.pointer["strategy_meta"])
    last = ckpt.completed_rounds - 1
    recorded = {
        r["client"]: r["perplexity"] for r in run.read_metrics() if r.get("round") == last and not r.get("summary")
    }
    if model is None or tokenizer is None:
        model, tokenizer = load_model(config)
    clients = load_clients(config) if clients is None else clients
    train_sets, test_sets = tokenize_clients(clients, tokenizer, config)
    pm = build_client_model(model, config)
    out: dict[str, dict[str, float]] = {}
    for c in tqdm(clients, desc="clients"):
        cid = c.client_id
        path = ckpt.folder / CLIENTS_DIR / f"{cid}.safetensors"
        if not path.is_file():
            raise ValueError(f"client {cid!r} has no state in {ckpt.folder}: it never trained; nothing to compare.")
        own, masks, meta = load_client_state(path)
        server = strategy.configure_client(cid, ckpt.completed_rounds).tensors  # the next round's start θ_g ⊙ m_k
        own_b = {**server, **{k: own[k] for k in personal_keys(server, SELECTED_PARTS)}}
        held = selection_split(train_sets[cid], rows, cid)[1]
        _, choice = select_b(pm, tokenizer, held, server, own, masks, meta, config.eval_batch_size)
        ppl = {}
        for name, tensors in (("as_run", strategy.personalized_tensors(cid, own)), ("server", server), ("own", own_b)):
            pm.set_adapter_state(tensors, masks, meta)
            ppl[name] = evaluate_perplexity(pm, tokenizer, test_sets[cid], config.eval_batch_size)["perplexity"]
        out[cid] = {
            "recorded": recorded.get(cid, math.nan),
            "chosen_at_start": float(strategy.uses_own_b(cid)),
            **choice,
            "ppl_server": ppl["server"],
            "ppl_own": ppl["own"],
            "ppl_as_run": ppl["as_run"],
            "ppl_rechosen": ppl["own"] if choice[OWN_B] else ppl["server"],
        }
    geometric = {rule: math.exp(sum(math.log(v[f"ppl_{rule}"]) for v in out.values()) / len(out)) for rule in RULES}
    return {"round": last, "clients": out, "geometric": geometric}


def table(result: dict[str, Any]) -> str:
    """The result as a markdown table: a row per client, then the geometric means."""
    lines = [
        "| client | recorded | as run | held-out loss server / own | re-chosen | server B | own B |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for cid, v in result["clients"].items():
        pick = "own" if v[OWN_B] else "server"
        lines.append(
            f"| {cid} | {v['recorded']:.4f} | {v['ppl_as_run']:.4f} | {v['select_loss_server']:.4f} / "
            f"{v['select_loss_own']:.4f} | {pick} | {v['ppl_server']:.4f} | {v['ppl_own']:.4f} |"
        )
    g = result["geometric"]
    lines.append(
        f"\nGeometric mean after round {result['round']}: as run {g['as_run']:.4f}, re-chosen {g['rechosen']:.4f}, "
        f"own B always {g['own']:.4f}."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a perfit_bsel run folder (e.g. a quality_scale.py cell)")
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = evaluate_rules(args.run_dir)
    worst = max(abs(v["ppl_as_run"] - v["recorded"]) for v in result["clients"].values())
    print(table(result))
    print(f"as run against the records: largest difference {worst:.2e}")
    if args.json:
        atomic_write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
