"""Question: is one row of the quality table lower than another beyond what the clients' spread and the seeds allow?

Issue 18's goal ranks rows by the geometric-mean personalized perplexity after the last round, over three seeds. Two
rows of the same setting share the partition, the test examples and the seeds, so they can be compared *paired*: per
seed `s` and client `k`, `d = log ppl_x - log ppl_y` (the difference of the client's mean eval loss). Averaged over
everything, `exp(mean d)` is the ratio of the two rows' geometric means (over the common seeds). The unit of the
interval is the client: each client's `d` is first averaged over the common seeds (what is left of the seeds' and the
last rounds' noise stays in that mean), then a Student-t 95% interval is taken over the clients (n - 1 degrees of
freedom) and exponentiated. A row is called lower (higher) when the whole interval is below (above) 1, otherwise the
difference is not resolved by these clients and seeds. The interval is over these clients: it says how much the
ratio varies from client to client, not how it would move on a new seed alone (the per-seed ratios are listed for that).

Two read-outs: `final`, each client's value after the last round (after the fine-tuning for a `*_ft` row), which is
what the report ranks; and `window`, the mean of the client's log perplexity over the last `--window` training rounds,
which is less moved by one round's noise (`benchmarks/quality_noise.py`). A `*_ft` row has no window of its own (its
training rounds are its source row's), so its pairs get the final read-out only.

Reads `docs/results/quality.json` (`{setting: {row: {seed: {client: [base, after round 1, ..., after round T(,
after fine-tuning)]}}}}`); nothing is trained. Usage:

    python benchmarks/quality_paired.py [--results docs/results/quality.json] [--setting flan8_recipe]
        --methods perfit_bsel perfit_pb local [--against fedit local] [--window 3] [--json paired.json]

Without `--against`, every pair of `--methods` is compared; with it, each of `--methods` against each of `--against`.
`--seeds 2` pairs on those seeds only (one seed: its own interval over clients). `--per_round` adds, per pair and
seed, the course over the training rounds: after each round `r` (counted from 0, as in metrics.jsonl and the docs;
`r` is list entry `r + 1`), `exp(mean d)` over the clients both rows evaluated then (with a fraction sampled, that
round's sampled clients: the same ones in both rows of a seed), its Student-t 95% interval over them, and how many of
them are lower.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
from pathlib import Path
from typing import Any

import quality_noise as qn
from scipy import stats

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "quality.json"


def _log_readout(values: list, rounds: int, window: int | None) -> float | None:
    """A client's log perplexity by one read-out: the last value (`window` None), or the mean log over the last
    `window` training rounds (None for a list with a fine-tuning entry, or a round not evaluated)."""
    if window is None:
        return math.log(qn.final_value(values))
    if len(values) > rounds + 1:
        return None
    last = values[rounds - window + 1 : rounds + 1]
    if len(last) < window or any(x is None for x in last):
        return None
    return statistics.mean(math.log(x) for x in last)


def _interval(diffs: list[float]) -> dict[str, Any]:
    """`exp` of the mean of paired log differences, its Student-t 95% interval over them (None for one value) and
    how many are below 0."""
    mean = statistics.mean(diffs)
    half = (
        stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
        if len(diffs) > 1
        else None
    )
    return {
        "ratio": math.exp(mean),
        "low": None if half is None else math.exp(mean - half),
        "high": None if half is None else math.exp(mean + half),
        "clients_lower": sum(v < 0 for v in diffs),
        "n_clients": len(diffs),
    }


def compare(
    x: dict[str, dict[str, list]], y: dict[str, dict[str, list]], rounds: int, window: int | None
) -> dict[str, Any] | None:
    """Row `x` against row `y` (each `{seed: {client: values}}`) over their common seeds and clients, by one read-out.
    Returns `ratio` (exp of the mean paired difference), `low` / `high` (its 95% interval over clients), `per_seed`
    (each common seed's ratio), `clients_lower` / `clients_higher` (clients whose seed-mean difference is below /
    above 0), `n_clients`, `seeds` and `verdict`; None when the read-out does not apply (a `*_ft` row's window)."""
    seeds = sorted(set(x) & set(y), key=int)
    if not seeds:
        raise SystemExit("the two rows share no seed: nothing to pair.")
    clients = sorted(set.intersection(*(set(x[s]) & set(y[s]) for s in seeds)))
    if len(clients) < 2:
        raise SystemExit(f"the two rows share {len(clients)} client(s) on seeds {seeds}: an interval needs two.")
    d: dict[str, dict[str, float]] = {}
    for s in seeds:
        d[s] = {}
        for k in clients:
            a, b = _log_readout(x[s][k], rounds, window), _log_readout(y[s][k], rounds, window)
            if a is None or b is None:
                return None
            d[s][k] = a - b
    per_client = [statistics.mean(d[s][k] for s in seeds) for k in clients]
    out = _interval(per_client)
    verdict = "lower" if out["high"] < 1 else "higher" if out["low"] > 1 else "not resolved"
    return {
        **out,
        "per_seed": {s: math.exp(statistics.mean(d[s].values())) for s in seeds},
        "clients_higher": sum(v > 0 for v in per_client),
        "seeds": seeds,
        "verdict": verdict,
    }


def per_round(x: dict[str, dict[str, list]], y: dict[str, dict[str, list]], rounds: int) -> dict[str, list]:
    """Row `x` against row `y` after each training round, per common seed: `{seed: [entry of round 0, ...]}`, each
    entry [`_interval`] over the clients both rows evaluated after that round (None when there is none). A `*_ft`
    row's fine-tuning entry is not a round: only its training rounds are paired."""
    out: dict[str, list] = {}
    for s in sorted(set(x) & set(y), key=int):
        clients = sorted(set(x[s]) & set(y[s]))
        out[s] = []
        for r in range(rounds):
            diffs = [
                math.log(x[s][k][r + 1]) - math.log(y[s][k][r + 1])
                for k in clients
                if len(x[s][k]) > r + 1 and len(y[s][k]) > r + 1 and None not in (x[s][k][r + 1], y[s][k][r + 1])
            ]
            out[s].append(_interval(diffs) if diffs else None)
    return out


def paired_table(
    results: dict,
    setting: str,
    methods: list[str],
    against: list[str] | None,
    window: int,
    seeds: list[str] | None = None,
    rounds_course: bool = False,
) -> dict[str, Any]:
    """Every pair (each of `methods` against each of `against`, else every pair of `methods`) by both read-outs, on
    `seeds` only when given; with `rounds_course`, each pair's [`per_round`] course too."""
    table = qn.setting_table(results, setting)
    missing = [m for m in [*methods, *(against or [])] if m not in table]
    if missing:
        raise SystemExit(f"{' '.join(missing)}: no results in {setting!r}; there are: {', '.join(table)}.")
    if seeds:
        for m in dict.fromkeys([*methods, *(against or [])]):
            lacking = [s for s in seeds if s not in table[m]]
            if lacking:
                have = ", ".join(sorted(table[m], key=int))
                raise SystemExit(f"{m} has no seed {', '.join(lacking)} in {setting!r}; it has: {have}.")
        table = {m: {s: v for s, v in row.items() if s in seeds} for m, row in table.items()}
    rounds = qn.training_rounds(table)
    qn.check_window(window, rounds)
    pairs = (
        [(a, b) for a in methods for b in against if a != b] if against else list(itertools.combinations(methods, 2))
    )
    if not pairs:
        raise SystemExit("no pair to compare: give two --methods, or --against a row not in --methods.")
    rows = [
        {
            "x": a,
            "y": b,
            "final": compare(table[a], table[b], rounds, None),
            "window": compare(table[a], table[b], rounds, window),
            **({"per_round": per_round(table[a], table[b], rounds)} if rounds_course else {}),
        }
        for a, b in pairs
    ]
    return {"setting": setting, "rounds": rounds, "window": window, "pairs": rows}


def markdown(out: dict[str, Any]) -> str:
    """One line per pair: per-seed ratios, the paired ratio with its interval, clients lower/higher and the verdict,
    by the final read-out and by the window."""

    def cell(c: dict[str, Any] | None) -> str:
        if c is None:
            return "- | - | - | -"
        seeds = ", ".join(f"{r:.3f}" for r in c["per_seed"].values())
        interval = f"**{c['ratio']:.3f}** [{c['low']:.3f}, {c['high']:.3f}]"
        return (
            f"{seeds} | {interval} | {c['clients_lower']}/{c['clients_higher']} of {c['n_clients']} | {c['verdict']}"
        )

    w = out["window"]
    head = (
        "| x vs y | seeds | final: x/y per seed | final: paired x/y [95% over clients] | clients x lower/higher | final |"
        f" last {w} rounds: x/y per seed | last {w}: paired x/y [95%] | clients lower/higher | last {w} |"
    )
    lines = [head, "|---|---|" + "---:|" * 8]
    for p in out["pairs"]:
        seeds = ", ".join(p["final"]["seeds"])
        lines.append(f"| {p['x']} vs {p['y']} | {seeds} | {cell(p['final'])} | {cell(p['window'])} |")
    for p in out["pairs"]:
        if "per_round" in p:
            lines += ["", markdown_per_round(p)]
    return "\n".join(lines)


def markdown_per_round(pair: dict[str, Any]) -> str:
    """One pair's course: a line per round, per seed `x/y [95% over that round's clients]` and `lower of n`."""

    def cell(e: dict[str, Any] | None) -> str:
        if e is None:
            return "- | -"
        interval = "" if e["low"] is None else f" [{e['low']:.3f}, {e['high']:.3f}]"
        return f"{e['ratio']:.3f}{interval} | {e['clients_lower']} of {e['n_clients']}"

    course = pair["per_round"]
    head = f"| {pair['x']} vs {pair['y']}: after round (from 0) |" + "".join(
        f" seed {s}: x/y [95% over clients] | seed {s}: x lower |" for s in course
    )
    lines = [head, "|---:|" + "---:|---:|" * len(course)]
    for r in range(len(next(iter(course.values())))):
        lines.append(f"| {r} |" + "".join(f" {cell(course[s][r])} |" for s in course))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--setting", default="flan8_recipe")
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--against", nargs="+")
    parser.add_argument("--window", type=int, default=3)
    parser.add_argument("--seeds", nargs="+", help="pair on these seeds only (default: every seed both rows have)")
    parser.add_argument("--per_round", action="store_true", help="add each pair's course over the rounds, per seed")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = qn.load_results(args.results)
    out = paired_table(results, args.setting, args.methods, args.against, args.window, args.seeds, args.per_round)
    print(markdown(out))
    if args.json:
        from hf_perfit._io import atomic_write_json

        atomic_write_json(args.json, out)


if __name__ == "__main__":
    main()
