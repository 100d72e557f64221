"""Question: at the recipe horizon, is the gap between the lowest rows of the quality table larger than the noise of
the last round?

Issue 18's goal ranks rows by the geometric-mean personalized perplexity after the last round. On FLAN-8 at the recipe
scale (10 rounds × 10 local steps, constant learning rate) the lowest rows (local, `perfit_pb`, `perfit_pb_ft`,
`perfit_bsel`, ...) end within ~2% of each other, while every row's geometric mean still moves by 1-2% from one round
to the next (a client's perplexity by up to ~7%). This script reads the per-client perplexities the report writes
(`docs/results/quality.json`: `[base, after round 1, ..., after round T]`, plus one entry after the fine-tuning of a
`*_ft` row) and prints, per row and seed:

- `final`: the geometric mean over clients of each client's last value (what the report ranks);
- `window`: the mean of the geometric means after the last `--window` training rounds (a `*_ft` row's training rounds
  are its source row's, so its window is the source's; its `final` is after the fine-tuning);
- `|Δ|`: the mean absolute relative change of the geometric mean from one round to the next over that window;

and which row is the lowest on each seed by `final` and by `window`. Reading only: nothing is trained or written
unless `--json` is given. Usage:

    python benchmarks/quality_noise.py [--results docs/results/quality.json] [--setting flan8_recipe]
        [--methods local perfit_pb ...] [--window 3] [--json noise.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "quality.json"


def load_results(path: Path) -> dict:
    """The results file the report writes (`{setting: {row: {seed: {client: [...]}}}}`), or a message saying how to get
    it."""
    if not path.is_file():
        raise SystemExit(f"{path}: no such file; run `python benchmarks/quality_scale.py report` first.")
    return json.loads(path.read_text())


def setting_table(results: dict, setting: str) -> dict[str, Any]:
    """`results[setting]`, or a message naming the settings there are."""
    table = results.get(setting)
    if not table:
        raise SystemExit(f"no setting {setting!r} in the results; there are: {', '.join(results) or 'none'}.")
    return table


def training_rounds(table: dict[str, Any]) -> int:
    """The number of training rounds of a setting: the longest list of a row without fine-tuning, minus the base
    entry."""
    return max(len(v) - 1 for m in table if not m.endswith("_ft") for s in table[m].values() for v in s.values())


def check_window(window: int, rounds: int) -> None:
    if window < 1 or window > rounds:
        raise ValueError(f"window={window} must be between 1 and the number of rounds ({rounds}).")


def final_value(values: list) -> float:
    """A client's last evaluated perplexity (after the fine-tuning for a `*_ft` row)."""
    return [x for x in values if x is not None][-1]


def _geo(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _geo_at(clients: dict[str, list], i: int) -> float | None:
    values = [v[i] for v in clients.values() if i < len(v) and v[i] is not None]
    return _geo(values) if values else None


def row_noise(clients: dict[str, list], rounds: int, window: int) -> dict[str, Any]:
    """`final`, `window`, `abs_change` and `client_change` (the mean over clients and the window of a client's own
    absolute relative change from one round to the next) of one row's seed: `clients` maps a client id to its list
    `[base, after round 1, ..., after round rounds(, after fine-tuning)]`. A row with the fine-tuning entry gets
    `None` for the last three: its training rounds are its source row's."""
    check_window(window, rounds)
    final = _geo([final_value(v) for v in clients.values()])
    if any(len(v) > rounds + 1 for v in clients.values()):
        return {"final": final, "window": None, "abs_change": None, "client_change": None}
    points = [_geo_at(clients, i) for i in range(rounds - window, rounds + 1)]  # one before the window, for Δ
    if any(p is None for p in points):
        raise ValueError("a round of the window has no client evaluated: use a smaller --window.")
    changes = [abs(points[i] / points[i - 1] - 1) for i in range(1, len(points))]
    mine = [
        abs(v[i] / v[i - 1] - 1)
        for v in clients.values()
        for i in range(rounds - window + 1, rounds + 1)
        if v[i] is not None and v[i - 1] is not None
    ]
    return {
        "final": final,
        "window": statistics.mean(points[1:]),
        "abs_change": statistics.mean(changes),
        "client_change": statistics.mean(mine) if mine else None,
    }


def noise_table(results: dict, setting: str, methods: list[str] | None, window: int) -> dict[str, Any]:
    """Every row of `results[setting]` (or `methods`) with at least one seed: per seed [`row_noise`], and the lowest
    row per seed by `final` and by `window` among the rows that have that seed."""
    table = setting_table(results, setting)
    names = methods or sorted(table)
    missing = [m for m in names if m not in table]
    if missing:
        raise SystemExit(f"--methods {' '.join(missing)}: no results in {setting!r}; there are: {', '.join(table)}.")
    rounds = training_rounds(table)
    rows = {m: {seed: row_noise(c, rounds, window) for seed, c in sorted(table[m].items())} for m in names}
    lowest: dict[str, dict[str, str]] = {}
    for seed in sorted({s for r in rows.values() for s in r}):
        here = {m: r[seed] for m, r in rows.items() if seed in r}
        lowest[seed] = {
            key: min((m for m in here if here[m][key] is not None), key=lambda m, k=key: here[m][k])
            for key in ("final", "window")
        }
    return {"setting": setting, "rounds": rounds, "window": window, "rows": rows, "lowest": lowest}


def markdown(out: dict[str, Any]) -> str:
    """The table: per row and seed `final / window / |Δ| / client |Δ|`, the mean `final` over its seeds (and their
    count), then the lowest row per seed."""

    def cell(x: dict[str, Any]) -> str:
        if x["window"] is None:
            return f"{x['final']:.4f} / - / - / -"
        return f"{x['final']:.4f} / {x['window']:.4f} / {100 * x['abs_change']:.2f}% / {100 * x['client_change']:.1f}%"

    seeds = sorted(out["lowest"])
    head = " | ".join(f"seed {s}: final / window / Δ / client Δ" for s in seeds)
    lines = [f"| row | {head} | mean final (seeds) |", "|---|" + "---|" * (len(seeds) + 1)]
    for m, r in out["rows"].items():
        cells = [cell(r[s]) if s in r else "-" for s in seeds]
        mean = statistics.mean(x["final"] for x in r.values())
        lines.append(f"| {m} | {' | '.join(cells)} | {mean:.4f} ({len(r)}) |")
    lines.append("")
    for s in seeds:
        low = out["lowest"][s]
        w = out["window"]
        lines.append(f"seed {s}: lowest by final {low['final']}, by the mean of the last {w} rounds {low['window']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--setting", default="flan8_recipe")
    parser.add_argument("--methods", nargs="+")
    parser.add_argument("--window", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    out = noise_table(load_results(args.results), args.setting, args.methods, args.window)
    print(markdown(out))
    if args.json:
        from hf_perfit._io import atomic_write_json

        atomic_write_json(args.json, out)


if __name__ == "__main__":
    main()
