"""The report of benchmarks/quality.py: what the table needs read from each row's run folder (disk only), the plot
of mean personalized perplexity per round, and the markdown section of docs/benchmarks.md (the table, per-client
tables, the settings and the analysis)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import DOC_PATH, REPO_ROOT, command_line, machine_lines  # noqa: E402
from quality_run import BUDGET_FILE, ROUGE_FILE, WALL_FILE, wall_seconds  # noqa: E402
from quality_setup import HETERO, METHODS, PER_METHOD_KEYS, Settings, _comparable, _rel, available_methods  # noqa: E402

SECTION = "## Personalized quality on FLAN-8 (benchmarks/quality.py)"
PLOT_NAME = "quality_perplexity.png"
PLOT_PATH = DOC_PATH.parent / PLOT_NAME
# The human reading of the table (where PerFIT wins, where not, why): kept in its own file so that rebuilding the
# generated section never loses it; included verbatim under "Analysis" for the real benchmark (not --tiny).
ANALYSIS_PATH = DOC_PATH.parent / "quality_analysis.md"
GOAL_RATIO = 0.77


def _adapter_trainable(folder: Path) -> int:
    """Trainable elements of an exported client adapter: PerFIT's kept elements (its masks), otherwise every
    stored element (a rank-r LoRA; a MoLE adapter stores exactly its shared expert, `P` and assigned experts)."""
    from safetensors.torch import load_file

    masks = folder / "perfit_masks.safetensors"
    if masks.is_file():
        return int(sum(int(m.bool().sum()) for m in load_file(str(masks)).values()))
    return int(sum(t.numel() for t in load_file(str(folder / "adapter_model.safetensors")).values()))


def collect(root: Path, row: str) -> dict[str, Any] | None:
    """What the table needs from `<root>/<row>` (read from disk only), or `None` when nothing is there."""
    out = root / row
    rouge = json.loads((out / ROUGE_FILE).read_text()) if (out / ROUGE_FILE).is_file() else None
    if row == "base":
        return {"rouge": rouge} if rouge else None
    from hf_perfit.federated.run import RunFolder

    run = RunFolder(out)
    if not run.metrics.is_file() or not run.config.is_file():
        return None
    config = run.read_config()
    records = run.read_metrics()
    clients = [r for r in records if "client" in r]
    rounds = sorted({int(r["round"]) for r in clients})
    last = rounds[-1]
    finished = (out / "results.md").is_file() and last == int(config["num_rounds"]) - 1
    wall = json.loads((out / WALL_FILE).read_text()) if (out / WALL_FILE).is_file() else {}
    trainable = []
    if finished:
        for folder in sorted((out / "clients").glob("*/adapter")):
            trainable.append(_adapter_trainable(folder))
    budget = json.loads((out / BUDGET_FILE).read_text()) if (out / BUDGET_FILE).is_file() else None
    return {
        "config": config,
        "finished": finished,
        "last_round": last,
        "mean_per_round": {int(r["round"]): float(r["mean_perplexity"]) for r in records if r.get("summary")},
        "base": {r["client"]: float(r["perplexity"]) for r in clients if r["round"] == -1},
        "final": {r["client"]: float(r["perplexity"]) for r in clients if r["round"] == last},
        "bytes_up": sum(int(r.get("bytes_up") or 0) for r in clients if r["round"] >= 0),
        "bytes_down": sum(int(r.get("bytes_down") or 0) for r in clients if r["round"] >= 0),
        "trainable": trainable,
        "wall_s": wall_seconds(wall) if wall else None,
        "sessions": wall.get("sessions", []),
        "rouge": rouge,
        "budget": budget,
    }


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _client_order(ids) -> list[str]:
    return sorted(ids, key=lambda c: (len(c), c))


def _rouge_mean(rouge: dict | None, client_ids: list[str]) -> float | None:
    if not rouge or any(c not in rouge["clients"] for c in client_ids):
        return None
    return _mean(rouge["clients"][c]["rouge_l"] for c in client_ids)


def plot_rounds(results: dict[str, dict], paths: list[Path], title: str) -> None:
    """Mean personalized perplexity per round (round -1: the base model), one line per method (PerFIT thick and
    black); log scale when the values span more than 3×. Written atomically to every path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    values = []
    for method in METHODS:
        res = results.get(method)
        if not res:
            continue
        rounds = sorted(res["mean_per_round"])
        values += [res["mean_per_round"][r] for r in rounds]
        style = {"lw": 2.6, "color": "black", "zorder": 3} if method == "perfit" else {"lw": 1.4}
        label = method if res["finished"] else f"{method} (partial)"
        ax.plot(rounds, [res["mean_per_round"][r] for r in rounds], marker="o", ms=3.5, label=label, **style)
    if values and max(values) > 3 * min(values):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (-1 = base model)")
    ax.set_ylabel("mean personalized perplexity")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    plt.close(fig)


def _fmt_mb(n: float) -> str:
    return f"{n / 1e6:,.1f}" if n >= 1e6 else f"{n / 1e6:.4f}"


def _fmt_int(n: float) -> str:
    return f"{n:,.0f}"


def _settings_lines(ref: dict, results: dict[str, dict], rouge_settings: dict | None, s: Settings) -> list[str]:
    c = ref["config"]
    tiny = s.tiny
    common = s.federated()
    r = common.lora_r  # the budget's rank from the settings, not `ref`: a FedAMoLE run's own lora_r is its expert rank
    model = "tiny random Llama (hidden 16, 2 layers; smoke test)" if tiny else "SmolLM2-135M-Instruct (fp32)"
    n = len(ref["final"])
    lines = [
        f"- model: {model}; data: `{_show_path(c['dataset_name'])}`, {n} clients, "
        + (
            "each evaluated on held-out examples of its own training file (`--split validation`, not the test split)"
            if Path(c["dataset_name"]).name == "validation_data"
            else "each evaluated on its own test split"
        ),
        f"- every method: {c['num_rounds']} rounds, all {n} clients every round, {c['local_steps']} local steps of "
        f"batch {c['per_device_train_batch_size']} (max_length {c['max_length']}), AdamW lr {c['learning_rate']:g} "
        f"constant, completion-only loss, seed {c['seed']}",
        f"- budget: a rank-{r} LoRA (lora_alpha {common.lora_alpha}) on "
        f"{', '.join(c['lora_target_modules'])}; local, fedit, fedprox, fedmut, fedqp train exactly that",
    ]
    p = results.get("perfit")
    if p:
        pc = p["config"]
        lines.append(
            f"- perfit: expansion_factor {pc['expansion_factor']} (rank {pc['expansion_factor'] * pc['lora_r']}), "
            f"symmetric init, {pc['importance']} importance, "
            + (
                f"searched over the first {pc['search_steps']} local steps"
                if pc.get("search_mode") == "train"
                else f"foresight search on {pc.get('search_batches', 8)} local batches before training"
            )
            + f" in {pc['prune_iterations']} pruning iterations back to the rank-{pc['lora_r']} budget, mask fixed after"
        )
    h = results.get(HETERO)
    if h:
        lines.append(
            f"- {HETERO}: perfit with per-client budget multipliers {h['config'].get('budget_multipliers')} "
            "(client k keeps round(b_k · budget) elements, capped at the expanded size)"
        )
    fa = results.get("fedamole")
    if fa:
        fc, b = fa["config"], fa.get("budget") or {}
        extra = (
            f"; the authors' pool, not shrunk to the budget: {b['params_mean']:,.0f} trainable per client on average "
            f"= {b['ratio']:.2f}× the rank-{r} budget"
            if b
            else ""
        )
        lines.append(
            f"- fedamole: rank-{fc['lora_r']} experts (lora_alpha {fc['lora_alpha']}, the same scale), "
            f"E={fc['num_experts']} per module, each to {fc['clients_per_expert']} clients, "
            f"{fc['experts_per_client_min']}–{fc['experts_per_client_max']} per client and module, "
            f"top-{fc['mole_top_k']} routing, balance loss {fc['balance_loss_coef']:g}{extra}"
        )
    if results.get("fedprox"):
        lines.append(f"- fedprox: μ = {results['fedprox']['config']['proximal_mu']:g}")
    for m in ("fedmut", "fedqp"):
        if results.get(m):
            opts = results[m]["config"]["strategy_options"]
            lines.append(f"- {m}: " + ", ".join(f"{k} {v}" for k, v in sorted(opts.items())))
    lines.append(
        f"- personalized perplexity: the first {c['max_eval_examples']} test examples of each client's own split, "
        "after every round (round -1: the base model)"
    )
    if rouge_settings:
        lines.append(
            f"- ROUGE-L: greedy answers (≤ {rouge_settings['max_new_tokens']} new tokens, chat template as in "
            f"training) to the first {rouge_settings['examples']} test examples of each client, LCS F-measure on "
            "lowercased word tokens with punctuation removed (`hf_perfit.evaluation.rouge_l`), mean over examples, "
            "then over clients"
        )
    common = _comparable(c)
    for m, res in results.items():
        if m == "base" or not res:
            continue
        diff = [k for k, v in _comparable(res["config"]).items() if k not in PER_METHOD_KEYS and common.get(k) != v]
        if diff:
            lines.append(f"- **{m} ran with other settings**: " + ", ".join(f"{k}={res['config'][k]!r}" for k in diff))
    return lines


def render(results: dict[str, dict | None], s: Settings, root: Path, commands: list[str]) -> str:
    """The markdown section (table, per-client tables, plot, computed facts)."""
    unavailable = available_methods()
    done = {m: r for m, r in results.items() if m != "base" and r and r["finished"]}
    ref = done.get("fedit") or next(iter(done.values()), None)
    lines = [
        SECTION,
        "",
        "Personalized quality of every method on FLAN-8 at the same rounds, local steps, seed and trainable budget "
        "per client: mean personalized perplexity (final round, mean over clients), its ratio to FedIT, ROUGE-L of "
        "greedy answers, wall time and bytes sent. Goal: PerFIT at most "
        f"{GOAL_RATIO}× FedIT's mean personalized perplexity and the lowest of all methods.",
        "",
        "Commands (one method per call, 10-18 min each on 2 cores, see the table; every run is cached in "
        f"`{_rel(root)}/<method>` and resumes where it stopped; the last call rebuilds this section):",
        "",
        "```bash",
        *commands,
        "```",
        "",
        f"This section was written by `{command_line()}`.",
        "",
        "Machine (where the report was built; the runs' wall times and load averages are below):",
        "",
        machine_lines(),
    ]
    if ref is None:
        lines += ["No finished run yet.", ""]
        return "\n".join(lines)
    client_ids = _client_order(ref["final"])
    base_res = results.get("base")
    rouge_settings = next((r["rouge"]["settings"] for r in [base_res, *done.values()] if r and r.get("rouge")), None)
    lines += ["Settings:", "", *_settings_lines(ref, done, rouge_settings, s), ""]
    fedit_mean = _mean(done["fedit"]["final"][c] for c in client_ids) if "fedit" in done else None
    budget = None
    for m in ("fedit", "local", "fedprox", "fedmut", "fedqp"):
        if m in done and done[m]["trainable"]:
            budget = done[m]["trainable"][0]
            break
    header = (
        "| method | mean personalized perplexity | / FedIT | ROUGE-L | trainable per client | × budget | "
        "run wall (min) | ROUGE-L wall (min) | MB up | MB down |"
    )
    lines += [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base_ppl = ref["base"]
    base_mean = _mean(base_ppl[c] for c in client_ids)
    base_rouge = _rouge_mean(base_res["rouge"] if base_res else None, client_ids)
    base_rouge_s = sum(v["seconds"] for v in base_res["rouge"]["clients"].values()) if base_rouge is not None else None
    base_cells = [
        "base model",
        f"{base_mean:.3f}",
        f"{base_mean / fedit_mean:.3f}" if fedit_mean else "–",
        f"{base_rouge:.3f}" if base_rouge is not None else "not run",
        "0",
        "–",
        "–",
        f"{base_rouge_s / 60:.1f}" if base_rouge_s is not None else "–",
        "0",
        "0",
    ]
    lines.append("| " + " | ".join(base_cells) + " |")
    means: dict[str, float] = {}
    rouges: dict[str, float] = {}
    for m in METHODS:
        res = results.get(m)
        if unavailable.get(m):
            lines.append(f"| {m} | not available ({unavailable[m]}) | | | | | | | | |")
            continue
        if not res:
            lines.append(f"| {m} | not run yet | | | | | | | | |")
            continue
        if not res["finished"]:
            lines.append(
                f"| {m} | partial: {res['last_round'] + 1} of {res['config']['num_rounds']} rounds | | | | | | | | |"
            )
            continue
        mean = _mean(res["final"][c] for c in client_ids)
        means[m] = mean
        rl = _rouge_mean(res["rouge"], client_ids)
        if rl is not None:
            rouges[m] = rl
        tr = res["trainable"]
        tr_s = _fmt_int(_mean(tr)) + (f" ({_fmt_int(min(tr))}–{_fmt_int(max(tr))})" if min(tr) != max(tr) else "")
        rouge_s = sum(v["seconds"] for v in res["rouge"]["clients"].values()) if rl is not None else None
        lines.append(_method_row(m, res, mean, fedit_mean, rl, tr_s, budget, rouge_s))
    lines += [
        "",
        "Trainable per client: elements of the exported client adapter (PerFIT: the kept elements of its mask; "
        "FedAMoLE: shared expert, `P` and its assigned experts; mean and range over clients); the budget is the "
        "rank-r LoRA's. Run wall: setup + rounds + export over all sessions of the (resumed) run, round 0 "
        "including the base model's evaluation. MB: total over the run and all clients (float32 values, "
        "`docs/federated.md`).",
        "",
    ]
    lines += _per_client_tables(results, done, client_ids, base_ppl)
    lines += [f"![mean personalized perplexity per round per method]({PLOT_NAME})", ""]
    loads = []
    for m in METHODS:
        res = done.get(m)
        if res and res["sessions"]:
            starts = [x["load_start"] for x in res["sessions"]]
            ends = [x["load_end"] for x in res["sessions"] if x.get("load_end") is not None]
            threads = sorted({x["threads"] for x in res["sessions"] if "threads" in x})
            loads.append(
                f"{m} {len(res['sessions'])} session(s)"
                + (f", load {max(starts + ends):.1f} max" if ends else "")
                + (f", {'/'.join(map(str, threads))} thread(s)" if threads else "")
            )
    if loads:
        lines += [
            "Load average (1 min) seen by the runs (2 cores: above 2 the wall times are inflated): "
            + "; ".join(loads)
            + ".",
            "",
        ]
    prose = None
    if ANALYSIS_PATH.is_file() and not s.tiny and s.split == "test":
        text = ANALYSIS_PATH.read_text().splitlines()
        prose = "\n".join(x for x in text if not x.startswith("<!--")).strip()  # the file's own header comment
    lines += _analysis(done, means, rouges, client_ids, base_mean, prose)
    return "\n".join(lines)


def _method_row(m, res, mean, fedit_mean, rl, tr_s, budget, rouge_s) -> str:
    bold = "**" if m == "perfit" else ""
    cells = [
        m,
        f"{bold}{mean:.3f}{bold}",
        f"{mean / fedit_mean:.3f}" if fedit_mean else "–",
        f"{rl:.3f}" if rl is not None else "not run",
        tr_s,
        f"{_mean(res['trainable']) / budget:.3f}" if budget else "–",
        f"{res['wall_s'] / 60:.1f}" if res["wall_s"] is not None else "–",
        f"{rouge_s / 60:.1f}" if rouge_s is not None else "–",
        _fmt_mb(res["bytes_up"]),
        _fmt_mb(res["bytes_down"]),
    ]
    return "| " + " | ".join(cells) + " |"


def _unique_best(values: dict[str, float], pick) -> str | None:
    """The key of the best value (`pick` is `min` or `max`) when no other key ties with it at 3 decimals."""
    if not values:
        return None
    best = pick(values, key=values.get)
    ties = [k for k, v in values.items() if f"{v:.3f}" == f"{values[best]:.3f}"]
    return best if len(ties) == 1 else None


def _per_client_tables(results, done, client_ids, base_ppl) -> list[str]:
    cats = {}
    for res in [results.get("base"), *done.values()]:
        if res and res.get("rouge"):
            cats.update({c: v.get("category", "") for c, v in res["rouge"]["clients"].items()})
    names = [m for m in METHODS if m in done]
    label = {c: f"{c} ({cats[c]})" if cats.get(c) else c for c in client_ids}
    lines = [
        "Per-client personalized perplexity (final round; lowest method per client in bold):",
        "",
        "| client | base | " + " | ".join(names) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for c in client_ids:
        vals = {m: done[m]["final"][c] for m in names}
        best = _unique_best(vals, min)
        cells = [f"**{v:.3f}**" if m == best else f"{v:.3f}" for m, v in vals.items()]
        lines.append(f"| {label[c]} | {base_ppl[c]:.3f} | " + " | ".join(cells) + " |")
    rouge_rows = [
        m for m in ["base", *names] if _rouge_mean((results.get(m) or {}).get("rouge"), client_ids) is not None
    ]
    if rouge_rows:
        lines += [
            "",
            "Per-client ROUGE-L (highest method per client in bold):",
            "",
            "| client | " + " | ".join(rouge_rows) + " |",
            "|---|" + "---:|" * len(rouge_rows),
        ]
        for c in client_ids:
            vals = {m: results[m]["rouge"]["clients"][c]["rouge_l"] for m in rouge_rows}
            best = _unique_best(vals, max)
            cells = [f"**{v:.3f}**" if m == best else f"{v:.3f}" for m, v in vals.items()]
            lines.append(f"| {label[c]} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _analysis(done, means, rouges, client_ids, base_mean, prose: str | None = None) -> list[str]:
    lines = ["### Analysis", "", "Computed by the script from the runs above:", ""]
    if means:
        lowest = min(means, key=means.get)
        lines.append(
            f"- Lowest mean personalized perplexity: {lowest} ({means[lowest]:.3f}; base model {base_mean:.3f}). "
            "Order: " + " < ".join(f"{m} {means[m]:.3f}" for m in sorted(means, key=means.get)) + "."
        )
    if "perfit" in means and "fedit" in means:
        ratio = means["perfit"] / means["fedit"]
        lowest = min(means, key=means.get)
        met = ratio <= GOAL_RATIO and lowest == "perfit"
        why = []
        if ratio > GOAL_RATIO:
            why.append(f"ratio {ratio:.3f} > {GOAL_RATIO}")
        if lowest != "perfit":
            why.append(f"{lowest} is lower ({means[lowest]:.3f})")
        lines.append(
            f"- PerFIT / FedIT mean personalized perplexity: **{ratio:.3f}**; goal (≤ {GOAL_RATIO} and the lowest of "
            f"all methods): **{'met' if met else 'missed'}**" + (f" ({'; '.join(why)})" if why else "") + "."
        )
        p, f = done["perfit"]["final"], done["fedit"]["final"]
        wins = [c for c in client_ids if p[c] < f[c]]
        best = [c for c in client_ids if all(p[c] <= done[m]["final"][c] for m in done)]
        lines.append(
            f"- PerFIT below FedIT on {len(wins)} of {len(client_ids)} clients"
            + (f" ({', '.join(wins)})" if wins else "")
            + f"; the lowest of all methods on {len(best)}"
            + (f" ({', '.join(best)})" if best else "")
            + "."
        )
    else:
        lines.append("- PerFIT / FedIT: not measured yet (both runs must be finished).")
    if rouges:
        top = _unique_best(rouges, max) or "tie of " + ", ".join(
            m for m in rouges if f"{rouges[m]:.3f}" == f"{max(rouges.values()):.3f}"
        )
        lines.append(
            f"- Highest mean ROUGE-L: {top} ({max(rouges.values()):.3f})"
            + (
                f"; PerFIT {rouges['perfit']:.3f}, FedIT {rouges['fedit']:.3f}"
                if {"perfit", "fedit"} <= set(rouges)
                else ""
            )
            + "."
        )
    placeholder = (
        "_Prose analysis (where PerFIT wins, where it does not, and why): to be written after the full runs._"
    )
    lines += ["", prose or placeholder, ""]
    return lines


def _show_path(path: str) -> str:
    """A data path as the docs show it: relative to the repository (`outputs/...`) or to its parent folder
    (`../shared/data/flan8`) when under them."""
    resolved = Path(path).resolve()
    for anchor, prefix in ((REPO_ROOT, Path()), (REPO_ROOT.parent, Path(".."))):
        if resolved.is_relative_to(anchor):
            return str(prefix / resolved.relative_to(anchor))
    return path
