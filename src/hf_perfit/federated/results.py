"""Reading finished runs back: each client's base and final personalized perplexity, and a side-by-side table of
several runs on the same clients (`perfit compare --runs outputs/demo/fedit outputs/demo/perfit`)."""

from __future__ import annotations

import os

from .run import RunFolder


def run_summary(run_dir: str | os.PathLike) -> dict:
    """`{"strategy", "rounds", "base": {client: ppl}, "final": {client: ppl}, "mean_final", "mean_base"}` of a run.

    Raises:
        FileNotFoundError: no `metrics.jsonl` in `run_dir`.
        ValueError: the run has not completed a round yet.
    """
    run = RunFolder(run_dir)
    records = run.read_metrics()
    clients = [r for r in records if "client" in r]
    trained = [r for r in clients if r["round"] >= 0]
    if not trained:
        raise ValueError(f"{run_dir} has no completed round yet; finish it (or --resume it) first.")
    last = max(r["round"] for r in trained)
    base = {r["client"]: float(r["perplexity"]) for r in clients if r["round"] == -1}
    final = {r["client"]: float(r["perplexity"]) for r in trained if r["round"] == last}
    config = run.read_config()
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


__all__ = ["comparison_table", "run_summary"]
