"""The report of benchmarks/quality_scale.py: it reads the cached cells (disk only, nothing trains), and rebuilds
docs/results/quality.json, its section of docs/benchmarks.md (tables per setting, the standing against the goal,
mask overlap) and the plots of perplexity per round with seed bands."""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_run as qrun  # noqa: E402
import quality_setup as qset  # noqa: E402
import quality_table as qtab  # noqa: E402
from _report import DOC_PATH, REPO_ROOT, command_line, machine_lines, update_doc  # noqa: E402
from quality_grid import (  # noqa: E402
    DEFAULT_ROOT,
    HETERO_CYCLE,
    METHODS,
    SEC_PER_EVAL,
    SEC_PER_STEP,
    SETTINGS,
    TINY_ROOT,
    VARIANTS,
    Setting,
    cell_dir,
    completed_rounds,
    config_path,
    schedule,
    storage,
    table_cost_h,
)
from quality_partition import PARTITION_FILE  # noqa: E402

SECTION = "## Personalized quality at scale (benchmarks/quality_scale.py)"
RESULTS_PATH = REPO_ROOT / "docs" / "results" / "quality.json"
# The records of every finished cell (what the report reads, no tensors: quality_transfer.save), committed: the cells'
# folders under outputs/ are scratch that a fresh checkout lacks, so the report restores cells from here.
RECORDS_DIR = REPO_ROOT / "docs" / "results" / "cells"
# The human reading of the tables, kept in its own file so that rebuilding the generated section never loses it.
ANALYSIS_PATH = REPO_ROOT / "docs" / "quality_scale_analysis.md"
MASK_OVERLAP_FILE = (
    "mask_overlap.json"  # [`mask_overlap`] kept in a cell packed without its state (quality_transfer.py)
)
KEPT_MARK = "†"
KEPT_NOTE = (
    "records lost: quality.json keeps this seed's perplexities, its records are on no machine (docs/"
    'quality_scale_analysis.md, "Where the cells\' records live"). Its ROUGE-L, bytes, wall time and mask overlap '
    "are those the report built from its records before (docs/results/kept_columns.json), where they were of this "
    "seed alone or of exactly this row's seeds; otherwise missing, and a column says over how many seeds it is."
)
# What the report built from the lost cells' records, kept from the docs of the last report that had them.
KEPT_COLUMNS_PATH = REPO_ROOT / "docs" / "results" / "kept_columns.json"
GOAL_RATIO = qtab.GOAL_RATIO  # PerFIT's geometric mean at most 0.77 x FedIT's
TIE = 0.01  # a client's perplexities within 1% of each other are a tie


# ---------------------------------------------------------------------------------------------------- reading


def read_cell(folder: Path) -> dict[str, Any] | None:
    """What the report needs from one cell's folder (disk only), or `None` when it has no records yet."""
    from hf_perfit.federated.run import RunFolder

    run = RunFolder(folder)
    if not run.metrics.is_file() or not run.config.is_file():
        return None
    config = run.read_config()
    records = run.read_metrics()
    clients = run.client_ids(records)
    finetune = int(config.get("finetune_steps") or 0) > 0
    total = int(config["num_rounds"]) + (1 if finetune else 0)
    length = total + 1
    ppl: dict[str, list[float | None]] = {c: [None] * length for c in clients}
    loss: dict[str, list[float | None]] = {c: [None] * length for c in clients}
    up = down = 0
    for r in records:
        if "client" not in r:
            continue
        i = int(r["round"]) + 1
        if i >= length:
            continue
        ppl[r["client"]][i] = float(r["perplexity"])
        loss[r["client"]][i] = float(r["eval_loss"])
        if int(r["round"]) >= 0:
            up += int(r.get("bytes_up") or 0)
            down += int(r.get("bytes_down") or 0)
    done = completed_rounds(folder)
    finished = done >= total and run.results.is_file()
    wall = json.loads((folder / qrun.WALL_FILE).read_text()) if (folder / qrun.WALL_FILE).is_file() else {}
    rouge = json.loads((folder / qrun.ROUGE_FILE).read_text()) if (folder / qrun.ROUGE_FILE).is_file() else None
    budget = json.loads((folder / qrun.BUDGET_FILE).read_text()) if (folder / qrun.BUDGET_FILE).is_file() else None
    return {
        "config": config,
        "finished": finished,
        "done": done,
        "total": total,
        "ppl": ppl,
        "loss": loss,
        "summaries": {int(r["round"]): r for r in records if r.get("summary")},
        "bytes_up": up,
        "bytes_down": down,
        "wall_s": qrun.wall_seconds(wall) if wall else None,
        "sessions": wall.get("sessions", []),
        "rouge": rouge,
        "budget": budget,
        "folder": folder,
    }


def final_of(cell: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """Per client: the last perplexity and eval loss of a finished cell (every client is evaluated last)."""
    return (
        {c: v[-1] for c, v in cell["ppl"].items() if v[-1] is not None},
        {c: v[-1] for c, v in cell["loss"].items() if v[-1] is not None},
    )


def seeds_on_disk(root: Path, setting: Setting) -> list[int]:
    folder = root / storage(setting).name
    return sorted(int(p.name[4:]) for p in folder.glob("seed*") if p.name[4:].isdigit()) if folder.is_dir() else []


def collect_all(root: Path, names: list[str]) -> dict[str, dict[str, dict[int, dict]]]:
    """`{setting: {method: {seed: cell}}}` of every cell on disk (finished or not) of the named settings."""
    out: dict[str, dict[str, dict[int, dict]]] = {}
    for name in names:
        setting = SETTINGS[name]
        cells: dict[str, dict[int, dict]] = {}
        for seed in seeds_on_disk(root, setting):
            for method in METHODS:
                try:
                    cell = read_cell(cell_dir(root, setting, seed, method))
                except (OSError, ValueError) as err:  # a running cell rewrote a file meanwhile
                    print(f"{cell_dir(root, setting, seed, method)}: not read ({err}); rerun the report")
                    cell = None
                if cell is not None:
                    cells.setdefault(method, {})[seed] = cell
        out[name] = cells
    return out


def results_json(collected: dict[str, dict[str, dict[int, dict]]]) -> dict[str, Any]:
    """quality.json: `{setting: {method: {seed: {client: [perplexity per round index]}}}}`, finished cells only."""
    out: dict[str, Any] = {}
    for name, methods in collected.items():
        block = {
            m: {str(seed): cell["ppl"] for seed, cell in sorted(seeds.items()) if cell["finished"]}
            for m, seeds in methods.items()
        }
        block = {m: v for m, v in block.items() if v}
        if block:
            out[name] = block
    return out


def merge_results(previous: dict[str, Any], new: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """quality.json after a report: `new` (the finished cells whose records are here), plus every finished cell of
    `previous` (the file as it was) that `new` lacks, so that a report never drops numbers because their records are
    not on this machine (to drop a cell, delete it from quality.json by hand). Returns the merged content and the
    kept part, shaped alike."""
    merged = json.loads(json.dumps(new))
    kept: dict[str, Any] = {}
    for name, methods in previous.items():
        for method, seeds in methods.items():
            for seed, clients in seeds.items():
                if seed not in merged.get(name, {}).get(method, {}):
                    merged.setdefault(name, {}).setdefault(method, {})[seed] = clients
                    kept.setdefault(name, {}).setdefault(method, {})[seed] = clients
    return merged, kept


def kept_cell(clients: dict[str, list[float | None]], known: dict[str, Any] | None = None) -> dict[str, Any]:
    """A finished cell rebuilt from its quality.json entry alone, for a cell whose records are on no machine
    ([`merge_results`]): per client and round index its perplexity and, as eval loss, its log (the engine's
    perplexity is exp of the eval loss, so the geometric mean is the same); `known` ([`kept_columns`]): what an
    earlier report built from its records. No device (`kept`: the tables mark its seed)."""
    known = known or {}
    n = len(next(iter(clients.values())))
    return {
        "config": {},
        "finished": True,
        "done": n - 1,
        "total": n - 1,
        "ppl": {c: list(v) for c, v in clients.items()},
        "loss": {c: [math.log(x) if x is not None else None for x in v] for c, v in clients.items()},
        "summaries": {},
        "bytes_up": known.get("bytes_up"),
        "bytes_down": known.get("bytes_down"),
        "wall_s": known.get("wall_s"),
        "sessions": [],
        "rouge": None,
        "rouge_mean": known.get("rouge"),
        "mask_overlap": known.get("mask_overlap"),
        "kept_row": known.get("row"),
        "budget": None,
        "folder": None,
        "kept": True,
    }


def _number(text: str, scale: float = 1.0) -> float | None:
    """A table cell's number (`1,343.2`, `0.517`) times `scale`; `None` for `–` or a mean ± sd."""
    try:
        return float(text.replace(",", "")) * scale
    except ValueError:
        return None


def kept_columns(extra: dict[str, Any], setting: str, method: str, seed: int) -> dict[str, Any]:
    """What the report built from a lost cell's records before they were lost (`KEPT_COLUMNS_PATH`), for one seed:
    its ROUGE-L, bytes and wall time where its table row was of that seed alone, its mask overlap row, and the row
    (`row`: the table uses its columns where a row's seeds are exactly that row's)."""
    block = extra.get(setting, {})
    row = block.get("rows", {}).get(method)
    out: dict[str, Any] = {"row": row, "mask_overlap": block.get("mask_overlap", {}).get(method, {}).get(str(seed))}
    if row and row["seeds"] == [seed]:
        out["rouge"] = _number(row["rouge"])
        out["bytes_up"] = _number(row["mb_up"], 1e6)
        out["bytes_down"] = _number(row["mb_down"], 1e6)
        out["wall_s"] = _number(row["wall_min"], 60.0)
    return out


# ---------------------------------------------------------------------------------------------------- report


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def _sd(xs) -> float | None:
    xs = list(xs)
    if len(xs) < 2:
        return None
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _pm(xs: list[float], fmt: str = "{:.3f}") -> str:
    sd = _sd(xs)
    return fmt.format(_mean(xs)) + (f" ± {fmt.format(sd)}" if sd is not None else "")


def cell_precision(cell: dict[str, Any]) -> str | None:
    """The arithmetic a cell trained and evaluated in, from its sessions' devices and its config's `bf16`: `bf16`
    (CUDA with `bf16: auto` or `true`), `fp32` (the CPU, or `bf16: false`), `bf16+fp32` (a cell resumed on the other
    kind of machine), `None` where no session recorded its device (cells of before 2026-11-29's device field)."""
    bf16 = str(cell.get("config", {}).get("bf16", "auto")).lower() in ("auto", "true", "1")
    kinds = set()
    for session in cell.get("sessions", []):
        device = session.get("device")
        if device is not None:
            kinds.add("bf16" if device.startswith("cuda") and bf16 else "fp32")
    return "+".join(sorted(kinds)) or None


def seed_stats(cell: dict[str, Any]) -> dict[str, Any]:
    """Arithmetic and geometric mean personalized perplexity over clients (geometric: `exp` of the mean eval loss)
    of a finished cell, its ROUGE-L mean when every client has one, and its `precision` ([`cell_precision`])."""
    ppl, loss = final_of(cell)
    out = {"arith": _mean(ppl.values()), "geo": math.exp(_mean(loss.values())), "precision": cell_precision(cell)}
    rouge = cell.get("rouge")
    if rouge and all(c in rouge["clients"] for c in ppl):
        out["rouge"] = _mean(rouge["clients"][c]["rouge_l"] for c in ppl)
    elif cell.get("rouge_mean") is not None:  # a cell kept without records ([`kept_cell`])
        out["rouge"] = cell["rouge_mean"]
    return out


def wins(perfit: dict[int, dict], other: dict[int, dict]) -> tuple[int, int, int] | None:
    """PerFIT's per-client wins / ties / losses against another method over the seeds both finished (a tie:
    perplexities within `TIE` = 1% of each other)."""
    seeds = [s for s in perfit if s in other and perfit[s]["finished"] and other[s]["finished"]]
    if not seeds:
        return None
    w = t = lo = 0
    for s in seeds:
        p, o = final_of(perfit[s])[0], final_of(other[s])[0]
        for c in p:
            if c not in o:
                continue
            if abs(p[c] / o[c] - 1.0) <= TIE:
                t += 1
            elif p[c] < o[c]:
                w += 1
            else:
                lo += 1
    return w, t, lo


def mask_overlap(cell: dict[str, Any]) -> dict[str, Any] | None:
    """Mask overlap among the clients of a PerFIT-family cell, from the masks the server holds after the last
    committed round (the strategy state): `shared` (elements kept by >= 2 clients / all elements), `exclusive` (kept
    by exactly 1), `none` (by no client), `own_exclusive` (mean over clients of the share of its kept elements no
    other client keeps), `jaccard` (mean pairwise), `clients` (how many masks)."""
    import torch
    from safetensors.torch import load_file

    if cell.get("folder") is None:  # a cell kept from quality.json alone ([`kept_cell`])
        return cell.get("mask_overlap")
    state = cell["folder"] / "state"
    ckpt = state / "checkpoint.json"
    if not ckpt.is_file():
        return None
    pointer = json.loads(ckpt.read_text())
    path = state / pointer["folder"] / "strategy.safetensors"
    kept = cell["folder"] / MASK_OVERLAP_FILE
    if not path.is_file() and kept.is_file():  # packed on another machine without its state (quality_transfer.py)
        return json.loads(kept.read_text())
    meta = pointer.get("strategy_meta", {})
    clients = meta.get("mask_clients") or []
    if len(clients) < 1 or not path.is_file():
        return None
    tensors = load_file(str(path))
    # perfit_pb's server holds the A part of each mask only (B never leaves the client): overlap over those elements
    keys = [k for k in meta["keys"] if f"mask/{clients[0]}/{k}" in tensors]
    flat = torch.stack([torch.cat([tensors[f"mask/{c}/{k}"].flatten() for k in keys]) for c in clients])
    count = flat.sum(0)
    total = flat.shape[1]
    kept = flat.sum(1).double()
    only = (count == 1).unsqueeze(0) & flat
    f32 = flat.float()
    gram = (f32 @ f32.T).double()
    jac = []
    for i in range(len(clients)):
        for j in range(i + 1, len(clients)):
            union = gram[i, i] + gram[j, j] - gram[i, j]
            jac.append(float(gram[i, j] / union) if union > 0 else 1.0)
    return {
        "clients": len(clients),
        "round": int(pointer["completed_rounds"]),
        "shared": float((count >= 2).sum()) / total,
        "exclusive": float((count == 1).sum()) / total,
        "none": float((count == 0).sum()) / total,
        "own_exclusive": float((only.sum(1).double() / kept.clamp_min(1)).mean()),
        "jaccard": _mean(jac) if jac else 1.0,
        "density": float(kept.mean()) / total,
    }


def _walls(walls: list[float], seeds: int) -> str:
    """The wall time column (minutes per seed): the mean, or each seed's where they are more than 2x apart (cells of
    different machines: a FLAN-8 cell is ~1 h on the 2-core CPU and ~6 min on an H200; they do not average)."""
    if not walls:
        return "–"
    if max(walls) > 2 * min(walls):
        return " / ".join(f"{w / 60:.0f}" for w in walls) + _of(len(walls), seeds)
    return f"{_mean(walls) / 60:.0f}{_of(len(walls), seeds)}"


def _of(n: int, total: int) -> str:
    """` (n of total seeds)` where a column's mean is over fewer seeds than the row's (cells kept without records)."""
    return "" if n == total else f" ({n} of {total} seeds)"


def _fmt_mb(n: float) -> str:
    return f"{n / 1e6:,.1f}" if n >= 1e5 else f"{n / 1e6:.3f}"


def commands(setting: Setting, tiny: bool, root: Path) -> list[str]:
    extra = ["--tiny"] if tiny else []
    canonical = root.parent.name == "outputs" and root.name == (TINY_ROOT if tiny else DEFAULT_ROOT).name
    # a checkout's own outputs/quality (e.g. the main checkout's, reported from a worktree) is the default root
    if not canonical:
        extra += ["--root", qset._rel(root)]
    base = ["python", "benchmarks/quality_scale.py", "run", "--setting", setting.name, "--seeds", "0", "1", "2"]
    out = [shlex.join(base + extra)]
    if setting.ablations:
        out.append(shlex.join([*base, "--methods", "ablations", *extra]))
    return out


def common_settings() -> str:
    """What every setting's YAML sets alike (checked), in words: the budget, batch, length, lr and PerFIT's search."""
    keys = ("lora_r", "lora_alpha", "lora_target_modules", "per_device_train_batch_size", "max_length")
    keys += ("learning_rate", "expansion_factor", "prune_iterations", "search_mode", "search_batches")
    plans = [schedule(s).to_dict() for s in SETTINGS.values()]
    differ = [k for k in keys if any(p[k] != plans[0][k] for p in plans)]
    if differ:
        raise ValueError(f"the settings YAMLs differ in {differ}: state them per setting, not as common settings.")
    c = schedule(SETTINGS["flan8_recipe"])
    lr = f"{c.learning_rate:.0e}".replace("e-0", "e-")  # 2e-4, as the docs write it
    return (
        f"rank-{c.lora_r} LoRA budget on {'/'.join(m.removesuffix('_proj') for m in c.lora_target_modules)} "
        f"(lora_alpha {c.lora_alpha}), batch {c.per_device_train_batch_size}, max_length {c.max_length}, AdamW lr "
        f"{lr} constant, PerFIT γ = {c.expansion_factor} with {c.prune_iterations} pruning iterations of "
        f"{c.search_mode} search on {c.search_batches} batches (every setting's YAML, "
        f"`{qset._rel(qset.SETTINGS_DIR)}/<setting>.yaml`)"
    )


def render_setting(setting: Setting, cells: dict[str, dict[int, dict]], plot: str | None, tiny: bool, root: Path):
    """The markdown of one setting: table(s), PerFIT's standing, mask overlap."""
    c = schedule(setting)
    lines = [
        f"### {setting.name}",
        "",
        f"{setting.about}. Federated settings: `{qset._rel(config_path(setting))}` ({c.num_rounds} rounds x "
        f"{c.local_steps} local steps, {c.fraction_clients:.0%} of the clients per round, {c.max_eval_examples} test "
        "examples per client).",
        "",
    ]
    if setting.same_as:
        lines += [f"Its cells are those of `{setting.same_as}` (same data and schedule).", ""]
    lines += ["```bash", *commands(setting, tiny, root), "```", ""]
    if not setting.same_as:
        main_h = table_cost_h(setting, setting.methods)
        abl = tuple(m for m in setting.ablations if m not in setting.methods)
        lines += [
            f"Cost from scratch, 3 seeds (rough, at the rates measured on this 2-core machine under load: "
            f"{SEC_PER_STEP} s per step, {SEC_PER_EVAL:.0f} s per client evaluation): ~{main_h:.0f} CPU h for the "
            f"{len(setting.methods)} methods"
            + (
                f", ~{table_cost_h(setting, abl, computed=setting.methods):.0f} CPU h more for the {len(abl)} ablations"
                if abl
                else ""
            )
            + "; `plan` prints what is left.",
            "",
        ]
    data = root / storage(setting).name / "data" / PARTITION_FILE
    if data.is_file():
        part = json.loads(data.read_text())
        rows = part["rows"]
        ntr = [sum(v["train"].values()) for v in rows.values()]
        nte = [sum(v["test"].values()) for v in rows.values()]
        cats = [sum(1 for x in v["train"].values() if x) for v in rows.values()]
        lines += [
            f"Partition (seed 0, the same for every run seed; {part['draws']} draw(s) to give every client >= "
            f"{part['spec']['min_train']} training and >= {part['spec']['min_test']} test rows): training rows per "
            f"client {min(ntr)}–{max(ntr)} (median {sorted(ntr)[len(ntr) // 2]}), test rows {min(nte)}–{max(nte)}, "
            f"categories per client {min(cats)}–{max(cats)}; each client is evaluated on the first "
            f"{schedule(setting).max_eval_examples} of its own test rows.",
            "",
        ]
    tables = [("main", setting.methods)] + ([("ablations", setting.ablations)] if setting.ablations else [])
    stats = {m: {s: seed_stats(c) for s, c in seeds.items() if c["finished"]} for m, seeds in cells.items()}
    geo = {m: _mean(v["geo"] for v in st.values()) for m, st in stats.items() if st}
    mixed = len({v["precision"] for st in stats.values() for v in st.values()} - {None}) > 1
    for title, methods in tables:
        lines += [
            f"{'Methods' if title == 'main' else 'Ablations of PerFIT'} (final round; mean ± sd over the finished "
            "seeds; geometric mean = exp of the mean eval loss over clients; W/T/L: PerFIT's clients with lower / "
            f"within {TIE:.0%} / higher perplexity, over clients × seeds):",
            "",
            "| method | seeds done | geometric mean ppl | / FedIT | arithmetic mean ppl | ROUGE-L | PerFIT W/T/L | "
            "MB up | MB down | wall min/seed |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        if title == "main":
            lines.append(_base_row(setting, cells, root))
        for m in methods:
            seeds = cells.get(m, {})
            fin = sorted(s for s, c in seeds.items() if c["finished"])
            part = [f"seed{s} {c['done']}/{c['total']}" for s, c in sorted(seeds.items()) if not c["finished"]]
            marked = {s: f"{s}{KEPT_MARK if seeds[s].get('kept') else ''}" for s in fin}  # † perplexities only
            if mixed:  # each seed's arithmetic, where the table has more than one
                done_s = ", ".join(f"{marked[s]} {stats[m][s]['precision'] or 'fp32?'}" for s in fin) or "–"
            else:
                done_s = ", ".join(marked[s] for s in fin) or "–"
            if part:
                done_s += f" (partial: {', '.join(part)})"
            if not fin:
                lines.append(f"| {m} | {done_s} | pending | | | | | | | |")
                continue
            st = [stats[m][s] for s in fin]
            ratio = "–"
            if "fedit" in stats and _paired_seeds(stats, m):
                ratio = f"{_ratio_to_fedit(stats, m)[0]:.3f}"  # paired: the seeds both rows finished, one precision
            rouge = [x["rouge"] for x in st if "rouge" in x]
            wtl = "–" if m == "perfit" or "perfit" not in cells else wins(cells["perfit"], seeds)
            wtl = "/".join(map(str, wtl)) if isinstance(wtl, tuple) else ("–" if wtl in ("–", None) else wtl)
            walls = [seeds[s]["wall_s"] for s in fin if seeds[s]["wall_s"] is not None]
            ups = [seeds[s]["bytes_up"] for s in fin if seeds[s]["bytes_up"] is not None]
            downs = [seeds[s]["bytes_down"] for s in fin if seeds[s]["bytes_down"] is not None]
            row = next((seeds[s]["kept_row"] for s in fin if seeds[s].get("kept_row")), None)
            # every seed kept without records, and an earlier report's row of exactly these seeds: its columns
            earlier = row if row and all(seeds[s].get("kept") for s in fin) and fin == sorted(row["seeds"]) else None
            bold = "**" if m == "perfit" else ""
            lines.append(
                "| "
                + " | ".join(
                    [
                        m,
                        done_s,
                        f"{bold}{_pm([x['geo'] for x in st])}{bold}",
                        ratio,
                        _pm([x["arith"] for x in st]),
                        earlier["rouge"] if earlier else (_pm(rouge) + _of(len(rouge), len(st)) if rouge else "–"),
                        wtl,
                        earlier["mb_up"] if earlier else (_fmt_mb(_mean(ups)) if ups else "–"),
                        earlier["mb_down"] if earlier else (_fmt_mb(_mean(downs)) if downs else "–"),
                        earlier["wall_min"] if earlier else _walls(walls, len(st)),
                    ]
                )
                + " |"
            )
        lines.append("")
        if any(c.get("kept") for m in methods for c in cells.get(m, {}).values()):
            lines += [f"{KEPT_MARK} {KEPT_NOTE}", ""]
    devices: dict[str, int] = {}
    for seeds in cells.values():
        for c in seeds.values():
            for d in {x.get("device", "cpu (not recorded)") for x in c["sessions"]}:
                if d.startswith("cuda"):  # a GPU cell's arithmetic: its config's `bf16` ([`cell_precision`])
                    d += " " + cell_precision({**c, "sessions": [{"device": d}]})
                devices[d] = devices.get(d, 0) + 1
    if devices:
        lines += [
            "Cells by device (`device: auto`: on CUDA bf16 unless the cell sets `bf16: false`, on the CPU fp32; fp32 "
            "on an H200 equalled the CPU's cell to 8e-6 per client, docs/quality_scale_analysis.md; a cell resumed "
            "on another device counts for both): " + ", ".join(f"{d} {n}" for d, n in sorted(devices.items())) + ".",
            "",
        ]
    if mixed:
        lines += [
            "**Mixed precision.** This table's finished cells were not all computed in one arithmetic (each seed's "
            "is in its row): bf16 (a GPU, `bf16: auto`) and fp32 (the CPU) differ by 0.2-4% on the same seed after "
            "the first rounds (docs/quality_scale_analysis.md), as much as some rows differ. The ratios to FedIT pair "
            "only seeds of the same precision; the means, the order and the goal's verdict mix them and are "
            "provisional until every row is in one precision.",
            "",
        ]
    lines += _standing(setting, cells, stats, geo, mixed)
    fa = next((c for c in cells.get("fedamole", {}).values() if c.get("budget")), None)
    if fa:
        b = fa["budget"]
        lines += [
            f"FedAMoLE runs the authors' pool (rank-{b['rank']} experts, E = {b['num_experts']} per module, each to "
            f"{b['clients_per_expert']} clients, {b['experts_min']}–{b['experts_max']} per client): "
            f"{b['params_mean']:,.0f} trainable parameters per client on average, {b['ratio']:.2f}× the rank-r "
            f"budget ({b['budget']:,}) every other method has.",
            "",
        ]
    lines += _overlap_lines(cells)
    if plot:
        alt = (
            f"{setting.name}: geometric mean personalized perplexity per round, and relative to FedIT of the same seed"
        )
        lines += [f"![{alt}]({plot})", ""]
    return lines


def _base_row(setting: Setting, cells, root: Path) -> str:
    """The base model's row: its perplexity from any cell's round-0 entry (evaluation is deterministic), its ROUGE-L
    from `<root>/<setting>/base/rouge.json`."""
    cell = next((c for seeds in cells.values() for c in seeds.values()), None)
    if cell is None:
        return "| base model | | pending | | | | | | | |"
    loss = [v[0] for v in cell["loss"].values() if v[0] is not None]
    ppl = [v[0] for v in cell["ppl"].values() if v[0] is not None]
    path = root / storage(setting).name / "base" / qrun.ROUGE_FILE
    rouge = "–"
    if path.is_file():
        clients = json.loads(path.read_text())["clients"]
        if set(clients) >= set(cell["ppl"]):
            rouge = f"{_mean(clients[c]['rouge_l'] for c in cell['ppl']):.3f}"
    return f"| base model | – | {math.exp(_mean(loss)):.3f} | | {_mean(ppl):.3f} | {rouge} | | 0 | 0 | – |"


def _same_precision(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two seeds' stats may be paired: the same arithmetic, or one not recorded (all such cells are fp32 CPU
    cells of before the device field)."""
    pa, pb = a.get("precision"), b.get("precision")
    return pa is None or pb is None or pa == pb


def _paired_seeds(stats, method: str) -> list[int]:
    """The seeds `method` and FedIT both finished in the same precision ([`_same_precision`])."""
    return [s for s in stats[method] if s in stats["fedit"] and _same_precision(stats[method][s], stats["fedit"][s])]


def _ratio_to_fedit(stats, method: str) -> tuple[float, str]:
    """`method`'s mean geometric perplexity over FedIT's, over the seeds both finished in the same precision
    (paired; bf16 on a GPU and fp32 on the CPU differ by 0.2-4% on the same seed, as much as rows differ); where they
    share no such seed, over each one's finished seeds (unpaired, said so). Returns the ratio and the words saying
    over what."""
    common = _paired_seeds(stats, method)
    mixed = [s for s in stats[method] if s in stats["fedit"] and s not in common]
    if common:
        ratio = _mean(stats[method][s]["geo"] for s in common) / _mean(stats["fedit"][s]["geo"] for s in common)
        words = f"over seed(s) {', '.join(map(str, common))}"
        if mixed:
            words += f" (not seed(s) {', '.join(map(str, mixed))}: bf16 in one row, fp32 in the other)"
        return ratio, words
    ratio = _mean(v["geo"] for v in stats[method].values()) / _mean(v["geo"] for v in stats["fedit"].values())
    mine, theirs = (", ".join(map(str, stats[m])) for m in (method, "fedit"))
    if mixed:
        return ratio, f"over seeds of different precisions ({method}: {mine}; fedit: {theirs}; unpaired)"
    return ratio, f"over different seeds ({method}: {mine}; fedit: {theirs}; unpaired)"


def _order(rows: list[str], stats, geo) -> str:
    """The rows by their mean geometric perplexity. Where they finished different seeds, each mean says over how
    many, and the order over the seeds every row finished follows (a one-seed row's mean is not comparable with the
    three-seed means around it: on flan8_recipe local's seed 0 is 1.550, its 3-seed mean 1.563)."""
    seeds = {m: sorted(stats[m]) for m in rows}
    if len({tuple(s) for s in seeds.values()}) == 1:
        return " < ".join(f"{m} {geo[m]:.3f}" for m in sorted(rows, key=geo.get))
    text = " < ".join(f"{m} {geo[m]:.3f} ({len(seeds[m])})" for m in sorted(rows, key=geo.get))
    text += " (in parentheses: seeds finished)"
    common = sorted(set.intersection(*(set(s) for s in seeds.values())))
    if common:
        paired = {m: _mean(stats[m][s]["geo"] for s in common) for m in rows}
        text += f"; over seed(s) {', '.join(map(str, common))}, which every row finished: "
        text += " < ".join(f"{m} {paired[m]:.3f}" for m in sorted(rows, key=paired.get))
    return text


def _standing(setting: Setting, cells, stats, geo, mixed: bool = False) -> list[str]:
    """PerFIT against FedIT and the other rows; the goal's verdict where the issue sets one (flan8_recipe: the lowest
    geometric mean and <= 0.77x FedIT's over 3 seeds; iid: no worse than FedIT), marked provisional where the
    table's cells mix bf16 and fp32 (`mixed`)."""
    provisional = " (provisional: the rows mix bf16 and fp32 cells)" if mixed else ""
    if "perfit" not in geo or "fedit" not in geo:
        return ["PerFIT against FedIT: pending (PerFIT and FedIT must both have a finished seed).", ""]
    ratio, over = _ratio_to_fedit(stats, "perfit")
    rows = [m for m in setting.methods if m in geo]
    lowest = min(rows, key=geo.get)
    text = f"PerFIT / FedIT geometric mean: **{ratio:.3f}** {over}; lowest geometric mean: {lowest}. Order: "
    text += f"{_order(rows, stats, geo)}."
    pending = [f"{3 - len(stats['perfit'])} PerFIT seed(s)"] if len(stats["perfit"]) < 3 else []
    pending += [m for m in setting.methods if m not in geo]
    so_far = f" so far (pending: {', '.join(pending)})" if pending else ""
    if setting.name == "flan8_recipe":
        met = ratio <= GOAL_RATIO and lowest == "perfit"
        text += f" Goal (≤ {GOAL_RATIO}× FedIT and the lowest of all): **{'met' if met else 'missed'}**{so_far}"
        text += f"{provisional}."
    elif setting.partition == "iid":
        met = ratio <= 1.0 + TIE
        text += (
            f" Goal (no worse than FedIT, within {TIE:.0%}): **{'met' if met else 'missed'}**{so_far}{provisional}."
        )
    lines = [text, ""]
    for v in VARIANTS:  # each variant in place of perfit among the main rows (the faithful rows stay as they are)
        if v not in geo:
            continue
        ratio, over = _ratio_to_fedit(stats, v)
        rival = [m for m in setting.methods if m in geo and m != "perfit"]
        lowest = min([*rival, v], key=geo.get)
        text = (
            f"Variant {v} / FedIT geometric mean: **{ratio:.3f}** {over}; lowest geometric mean of the main rows "
            f"with {v} in place of perfit: {lowest}."
        )
        pending = [f"{3 - len(stats[v])} {v} seed(s)"] if len(stats[v]) < 3 else []
        pending += [m for m in setting.methods if m not in geo]
        so_far = f" so far (pending: {', '.join(pending)})" if pending else ""
        if setting.name == "flan8_recipe":
            met = ratio <= GOAL_RATIO and lowest == v
            text += f" Goal for {v}: **{'met' if met else 'missed'}**{so_far}{provisional}."
        lines += [text, ""]
    return lines


def _overlap_lines(cells) -> list[str]:
    rows = []
    for m, seeds in cells.items():
        if not (m == "perfit" or m.startswith("perfit_")):
            continue
        for seed, cell in sorted(seeds.items()):
            try:
                ov = mask_overlap(cell)
            except (OSError, KeyError, ValueError) as err:  # a running cell replaced its checkpoint meanwhile
                print(f"mask overlap of {cell['folder']}: not read ({err}); rerun the report")
                ov = None
            if ov is None:
                continue
            rows.append(
                f"| {m} | {seed} | {ov['round']} | {ov['clients']} | {ov['density']:.3f} | {ov['shared']:.3f} | "
                f"{ov['exclusive']:.3f} | {ov['none']:.3f} | {ov['own_exclusive']:.3f} | {ov['jaccard']:.3f} |"
            )
    if not rows:
        return ["Mask overlap: pending (no PerFIT cell has aggregated a round yet).", ""]
    return [
        "Mask overlap after the search (the masks the server holds after the last committed round; fractions of all "
        "expanded elements, of the A elements for perfit_pb, whose server never sees B's masks; own exclusive: mean share of a client's kept elements no other client keeps; Jaccard: "
        "mean over client pairs):",
        "",
        "| method | seed | rounds | masks | density | kept by ≥ 2 | kept by 1 | kept by none | own exclusive | "
        "Jaccard |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]


def round_curves(cell: dict) -> list[float | None]:
    """One cell's geometric mean personalized perplexity per round index (0: base model; `None` where no client
    has a value)."""
    length = len(next(iter(cell["loss"].values())))
    curve: list[float | None] = []
    for i in range(length):
        vals = [v[i] for v in cell["loss"].values() if v[i] is not None]
        curve.append(math.exp(_mean(vals)) if vals else None)
    return curve


def ratio_curve(curve: list[float | None], reference: list[float | None]) -> list[float | None]:
    """`curve / reference` per round index, paired by seed; past the reference's last round (a fine-tuned row's
    last point) against its last value, as the table's "/ FedIT" column compares a `*_ft` row."""
    out: list[float | None] = []
    for i, value in enumerate(curve):
        ref = reference[min(i, len(reference) - 1)] if reference else None
        out.append(value / ref if value is not None and ref else None)
    return out


def method_colors(setting: Setting) -> dict[str, Any]:
    """One color per row of `setting`, PerFIT black: both panels of the plot draw a row in the same color whatever
    rows have cells yet (matplotlib's own cycle follows the order drawn, which differs between the panels). The
    palette is tab10, Dark2, then navy, maroon, lime, indigo and salmon (23 colors, all told apart; tab20's light
    halves were not; FLAN-8's table has 22 rows besides PerFIT), in the order methods, PerFIT's variants, other
    ablations, so the rows a reader compares most get tab10's."""
    import matplotlib
    from matplotlib.colors import to_rgb

    order = [*setting.methods, *(v for v in VARIANTS if v in setting.ablations), *setting.ablations]
    rows = [m for m in dict.fromkeys(order) if m != "perfit"]
    palette = [
        *matplotlib.colormaps["tab10"].colors,
        *matplotlib.colormaps["Dark2"].colors,
        to_rgb("navy"),
        to_rgb("maroon"),
        to_rgb("lime"),
        to_rgb("indigo"),
        to_rgb("salmon"),
    ]
    colors: dict[str, Any] = {m: palette[i % len(palette)] for i, m in enumerate(rows)}
    colors["perfit"] = "black"
    return colors


def plot_setting(setting: Setting, cells: dict[str, dict[int, dict]], paths: list[Path], tiny: bool) -> bool:
    """Left: geometric mean personalized perplexity per round index (0: base model), mean over seeds with a
    min–max band over seeds (finished cells; a method with only partial cells as a dashed line; markers: circles
    for the methods, squares for PerFIT's variants, triangles for the other ablations). Right, when FedIT
    has finished cells: each row / FedIT of the same seed per round (the late rounds' few-percent differences that
    the left panel's scale hides), over the seeds both finished, with the goal the issue sets for the setting
    (flan8_recipe: 0.77x, dotted; IID: at most 1). Returns False when nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator

    rows: dict[str, tuple[dict[int, list[float | None]], bool]] = {}  # row -> (curves per seed, partial)
    for m in [*setting.methods, *(a for a in setting.ablations if a not in setting.methods)]:
        seeds = cells.get(m, {})
        fin = {s: c for s, c in seeds.items() if c["finished"]}
        use, partial = (fin, False) if fin else (seeds, True)
        if use:
            rows[m] = ({s: round_curves(c) for s, c in use.items()}, partial)
    if not rows:
        return False
    fedit = rows["fedit"][0] if "fedit" in rows and not rows["fedit"][1] else {}  # every setting has a FedIT row
    fig, axes = plt.subplots(1, 2 if fedit else 1, figsize=(13 if fedit else 8, 4.6), squeeze=False)
    ax, rax = axes[0][0], (axes[0][1] if fedit else None)
    colors = method_colors(setting)

    def band(ax, curves: list[list[float | None]], m: str, partial: bool, n: int) -> list[float]:
        length = max(len(c) for c in curves)
        xs, mean, lo, hi = [], [], [], []
        for i in range(length):
            vals = [c[i] for c in curves if i < len(c) and c[i] is not None]
            if vals:
                xs.append(i)
                mean.append(_mean(vals))
                lo.append(min(vals))
                hi.append(max(vals))
        style = {"lw": 2.6, "zorder": 3} if m == "perfit" else {"lw": 1.3}
        label = f"{m} ({n} seed{'s' if n > 1 else ''}{', partial' if partial else ''})"
        color = colors.get(m)  # a row outside the setting's declaration (none today): matplotlib's cycle
        # the marker says the row's kind, since with 12+ rows two hues can be close (tab10's and Dark2's greens)
        marker = "o" if m in setting.methods else ("s" if m in VARIANTS else "^")
        (line,) = ax.plot(
            xs, mean, ls="--" if partial else "-", marker=marker, ms=3, label=label, color=color, **style
        )
        if n > 1:
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
        return lo + hi

    drawn_values: list[float] = []
    for m, (curves, partial) in rows.items():
        drawn_values += band(ax, list(curves.values()), m, partial, len(curves))
        paired = [ratio_curve(curves[s], fedit[s]) for s in curves if s in fedit]
        if rax is not None and paired and not partial:
            band(rax, paired, m, False, len(paired))
    if drawn_values and max(drawn_values) > 3 * min(drawn_values):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))  # within a decade the minor ticks carry the labels
    tuned = any(METHODS.get(m) and METHODS[m].fork_of for m in cells)
    xlabel = (
        "training rounds done (0 = base model" + ("; *_ft rows: last point after fine-tuning" if tuned else "") + ")"
    )
    sampled = schedule(setting).fraction_clients < 1
    ax.set_ylabel("geometric mean personalized perplexity" + (" (evaluated clients)" if sampled else ""))
    ax.set_title(f"{setting.name}" + (" (tiny smoke test)" if tiny else "") + ": mean over seeds, band min–max")
    for a in axes[0]:
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.set_xlabel(xlabel)
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=7, ncol=2)
    if rax is not None:
        rax.axhline(1.0, color="gray", lw=0.8)
        if setting.name == "flan8_recipe":  # the goals: 0.77x here, "no worse than FedIT" on IID
            rax.axhline(GOAL_RATIO, color="gray", lw=0.8, ls=":")
            rax.set_ylabel(f"/ FedIT, same seed (dotted: the goal, {GOAL_RATIO}x)")
        elif setting.partition == "iid":
            rax.set_ylabel("/ FedIT, same seed (the goal: at most 1)")
        else:
            rax.set_ylabel("/ FedIT, same seed")
        rax.set_title("relative to FedIT: mean over paired seeds, band min–max")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        os.replace(tmp, path)
    plt.close(fig)
    return True


def records_store(args) -> Path | None:
    """Where the committed records of finished cells are (`--store`, else docs/results/cells); None for `--tiny`
    cells and for `run` / `plan` with `--key value` overrides, whose cells are none of the stored ones (`report`
    refuses overrides)."""
    return args.store or (None if args.tiny or args.overrides else RECORDS_DIR)


def restore_cells(store: Path | None, root: Path) -> None:
    """The finished cells kept in `store` (cells finished on another machine or in an earlier checkout: records only)
    that `root` lacks, copied into `root` (benchmarks/quality_transfer.py's `restore`); nothing when `store` is None."""
    import quality_transfer as qt

    if store is not None:
        restored = qt.restore(store, root)["imported"]
        if restored:
            print(f"restored {len(restored)} finished cells from {qset._rel(store)}")


def report(args, root: Path) -> dict[str, Any]:
    """Rebuild quality.json, the docs section and the plots from the cached runs; returns quality.json's content."""
    import quality_transfer as qt

    names = list(SETTINGS)
    store = records_store(args)
    restore_cells(store, root)
    collected = collect_all(root, names)
    if store is not None:
        saved = qt.save(root, store)["saved"]
        if saved:
            print(f"kept the records of {len(saved)} finished cells in {qset._rel(store)}: commit them")
    results_path = args.results or (root / "quality.json" if args.tiny else RESULTS_PATH)
    previous = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results, kept = merge_results(previous, results_json(collected))
    extra = {}  # the tiny smoke test's cells are none of those
    if not args.tiny and KEPT_COLUMNS_PATH.is_file():
        extra = json.loads(KEPT_COLUMNS_PATH.read_text())["settings"]
    for name, methods in kept.items():  # the tables and plots show them too, marked (records on no machine)
        for method, seeds in methods.items():
            if name in collected and method in METHODS:
                for seed, clients in seeds.items():
                    known = kept_columns(extra, name, method, int(seed))
                    collected[name].setdefault(method, {})[int(seed)] = kept_cell(clients, known)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    from hf_perfit._io import atomic_write_json

    atomic_write_json(results_path, results)
    doc_dir = root if args.tiny or args.no_write else DOC_PATH.parent  # --no-write: the plots beside the section
    lines = [
        SECTION,
        "",
        "Personalized quality at the scale users run (issue 18): FLAN-8 at the recipes' scale over 3 seeds, the "
        "paper's regime (40 Dirichlet clients, 20% and 5% sampled), a heterogeneity sweep and PerFIT's ablations. "
        f"Goal: PerFIT's geometric mean personalized perplexity the lowest of all methods and ≤ {GOAL_RATIO}× FedIT's "
        "at the recipe scale, and no worse than FedIT in the IID setting.",
        "",
        "Every cell (setting, seed, method) is a cached, resumable run in `outputs/quality/<setting>/seed<k>/<method>`"
        " (benchmarks/quality.py's machinery); `run` computes the missing ones, `report` rebuilds this section, "
        f"`{qset._rel(RESULTS_PATH)}` and the plots from the cache only. A cell not finished is *pending*; partial "
        "cells are listed with their rounds but enter no number. quality.json holds finished cells only: per client "
        "`[base model, after round 1, ..., after round T]` (+ one entry after fine-tuning for the `*_ft` rows; `null` "
        "where a sampled setting did not evaluate the client).",
        "",
        f"Common settings: SmolLM2-135M-Instruct (fp32, CPU unless the run had a GPU), {common_settings()}, "
        "completion-only loss. Methods: " + "; ".join(f"`{m}`: {spec.about}" for m, spec in METHODS.items()) + ".",
        "",
        "Decisions:",
        "",
        "- **Paper's regime.** FLAN-8's 2,400 training rows are pooled and dealt to 40 clients by a Dirichlet(α) "
        "draw per category (benchmarks/quality_partition.py); each category's 200 test rows are dealt with the *same* "
        "proportions, so a client is tested on its own share of each category's test split and its test label mix "
        "follows its training mix, without evaluating every client on all 1,600 test rows (40× the cost). The "
        "partition is drawn once (seed 0) for every run seed, so per-client comparisons stay paired across seeds; a "
        "draw is repeated until every client has ≥ 4 training and ≥ 2 test rows (α = 0.1 took 51 draws; α = 0.5, 1.0 "
        "and IID the first). 20% sampled: 20 rounds; 5%: 80 rounds: both 160 client-rounds, each client training in "
        "~4 rounds (40 steps of batch 4, ~2.7 epochs of its ~60 rows), so the two differ in how many clients one "
        "aggregation sees (8 or 2), not in how much a client trains. Only the round's sampled clients are evaluated "
        "(every client before training and after the last round), which keeps a round's cost proportional to the "
        "sampled clients; the per-round curves of these settings are over the evaluated clients.",
        "- **Concurrency**: `run` holds a lock per cell against other `run` calls, skips a partial cell written to "
        "in the last 15 minutes (`--force` takes it) and the cells a running `benchmarks/quality.py` process of the "
        "same machine computes (its `--output-root` and `--methods`, read from /proc; e.g. flan8_recipe seed 0's "
        "local, fedit, perfit).",
        '- **On a GPU** (docs/quality_scale_analysis.md, "Running the cells on a GPU"): `benchmarks/gpu_quality.sh` '
        "runs several `run` workers over one plan (the cell locks make them a queue; a `fedit_ft` waits for the "
        "`fedit` it forks from), and `benchmarks/quality_transfer.py` brings the finished cells back as records only "
        "(a FLAN-8 cell's 38 MB are nearly all tensors the report does not read; the GPU machine returns files of "
        "≤ 16 MiB); an imported cell is marked `imported.json`, never overwrites a local one, and is never resumed "
        "or forked from.",
        "- **Heterogeneity sweep** (α = 0.1, 0.5, 1.0, IID; local, FedIT, PerFIT): the 40-client, 20% schedule; "
        "`alpha0.5` is `dirichlet40_f20` itself.",
        "- **FedIT-FT**: FedIT's run, then every client fine-tunes the final global adapter for one round's local "
        "steps (10; `finetune_steps`), which is evaluated and exported. Its first rounds are FedIT's exactly, so "
        "`run` starts it as a copy of the same seed's finished `fedit` cell and runs only the fine-tuning "
        "(`--no-fork`: from scratch; a test checks that both give the same records and adapters). `perfit_ft` is the "
        "same for PerFIT: forked from the same seed's `perfit` cell, each client fine-tunes its masked personalized "
        "adapter (pruned elements stay exactly 0), `perfit_pb_ft` forks from `perfit_pb` and `perfit_bsel_ft` from "
        "`perfit_bsel` (its clients choose their B once more on their held-out rows before they fine-tune).",
        '- **PerFIT\'s variants** (docs/perfit.md, "Variants"; the faithful `perfit` rows stay): `perfit_pb` aggregates '
        "and sends only the LoRA A matrices and every client keeps its own B (so its bytes are A's kept values only); "
        "it differs from `perfit` in that alone, as `perfit_ft` differs from `perfit` only in the final fine-tuning "
        "(and `perfit_pb_ft` from `perfit_pb`, `perfit_bsel_ft` from `perfit_bsel`), and `perfit_bsel` from "
        "`perfit` only in each client's choice, at a "
        "round's start, between the server's B and its own by the loss on 6 held-out training rows: each pair is "
        "the ablation that isolates what the change buys. Why they exist: the clients' masks overlap far "
        "more than chance (the mask overlap table below), so PerFIT's per-element averaging shares most of what a client "
        "trains.",
        f"- **Ties**: a client's perplexities within {TIE:.0%} of each other. **Heterogeneous budgets**: client k "
        f"gets b_k = {', '.join(f'{b:g}' for b in HETERO_CYCLE)} (k mod 4), mean 1.",
        "",
        f"This section was written by `{command_line()}`.",
        "",
        "Machine (where the report was built; each run's wall time is its own):",
        "",
        machine_lines(),
    ]
    for name in names:
        setting = SETTINGS[name]
        cells = collected[name]
        plot_name = f"quality_scale_{name}.png"
        drawn = plot_setting(setting, cells, [doc_dir / plot_name], args.tiny)
        lines += render_setting(setting, cells, plot_name if drawn else None, args.tiny, root)
    lines += ["### Reading", ""]
    if ANALYSIS_PATH.is_file() and not args.tiny:
        text = ANALYSIS_PATH.read_text().splitlines()
        lines += [x for x in text if not x.startswith("<!--")] + [""]
    else:
        lines += [
            "_Where PerFIT wins, where not, and why (mask overlap, shared vs exclusive elements): written by hand in "
            f"`{qset._rel(ANALYSIS_PATH)}` once the cells above are finished, and included here verbatim._",
            "",
        ]
    section = "\n".join(lines)
    if args.tiny or args.no_write:
        from hf_perfit._io import atomic_write_text

        out = root / "benchmarks_section.md"
        atomic_write_text(out, section + "\n")
        print(f"wrote {results_path} and {out} (the docs are left alone with --tiny / --no-write)")
    else:
        update_doc(DOC_PATH, SECTION, section)
        print(f"wrote {results_path}, {DOC_PATH} and docs/quality_scale_*.png")
    return results
