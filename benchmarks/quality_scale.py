"""Personalized quality at the scale users run (issue 18): every table is one resumable command over cached runs.

Each table is a *setting* (a data partition and its rows, declared once in benchmarks/quality_grid.py's `SETTINGS`,
and its federated settings, declared once in benchmarks/settings/<setting>.yaml: a recipe-style YAML of
`FederatedConfig` keys) × *methods* (strategies and PerFIT variants, declared once in `METHODS` as changes of
`FederatedConfig` keys) × *seeds* (`seed`). A
cell (setting, seed, method) is one federated run of benchmarks/quality.py's machinery (quality_setup's `method_config`,
quality_run's `run_config`: resumable, wall-timed, refused when a cached run has other settings) in

    <root>/<setting>/seed<k>/<method>/        (root: outputs/quality)

so the cells of a table can be computed over many sessions, a killed one losing at most the round in progress. The
base model's evaluation (round -1) is computed once per setting and read by the setting's other cells from
`<root>/<setting>/base_eval.json` (benchmarks/base_eval_cache.py: keyed on the base weights, their precision, the
tokenized test rows and the eval batch; ~11-15 min of a 40-client cell's ~5 h on one CPU thread, ~2 min of a
FLAN-8 cell's).
This script is the command line: `plan` and `run` (here) walk the grid's cells (benchmarks/quality_grid.py: the
declarations, each cell's folder, config, fork and lock); `report` (benchmarks/quality_scale_report.py) reads them.
`run`, `plan` and `report` first restore the finished cells kept in docs/results/cells (records only: see
benchmarks/quality_transfer.py) that the root lacks, so a fresh checkout computes only the cells nobody finished.
`run` computes the missing cells, partial ones first, then smallest first; `report` rebuilds
`docs/results/quality.json`, the section of docs/benchmarks.md and the plots from the cached runs only (nothing
trains, nothing is invented: a cell not finished is shown as pending).

    python benchmarks/quality_scale.py run --setting flan8_recipe --seeds 0 1 2                # table 1
    python benchmarks/quality_scale.py run --setting flan8_recipe --seeds 0 1 2 --methods ablations
    python benchmarks/quality_scale.py run --setting flan8_recipe --seeds 0 1 2 --methods perfit perfit_pb perfit_ft
    python benchmarks/quality_scale.py run --setting dirichlet40_f20 dirichlet40_f05 --seeds 0 1 2
    python benchmarks/quality_scale.py run --setting alpha0.1 alpha0.5 alpha1.0 iid --seeds 0 1 2
    python benchmarks/quality_scale.py plan --setting flan8_recipe --seeds 0 1 2              # status + estimate
    python benchmarks/quality_scale.py report                                                 # docs from cache
    python benchmarks/quality_scale.py run --tiny --setting flan8_recipe --seeds 0 1          # smoke test
    python benchmarks/quality_scale.py run --setting flan8_recipe --seeds 0 --learning_rate 1e-4 --root outputs/q-lr

Any other `--key value` overrides a `FederatedConfig` key of every cell (read as benchmarks/quality.py reads its
overrides, with `hf_perfit.federated.federated_parser`); such cells go into a `--root` of their own. `--tiny` applies
benchmarks/settings/tiny.yaml over each setting's YAML (its sampled fraction stays).

PerFIT's named variants (docs/perfit.md, "Variants"; rows of the ablation group, the faithful `perfit` rows stay):
`perfit_pb` (personal B: only the LoRA A matrices are aggregated and sent, every client keeps its own B) differs from
`perfit` only in B's aggregation, `perfit_ft` (then one round's local steps of fine-tuning, forked from the same
seed's `perfit` cell) only in the fine-tuning after the last round, and `perfit_pb_ft` (both: `perfit_pb`, then the
fine-tuning, forked from `perfit_pb`) from `perfit_pb` only in the fine-tuning, and `perfit_bsel` (each client holds
6 training rows out and starts each round from the B, the server's or its own, with the lower loss on them) from
`perfit` only in that choice, and `perfit_bsel_ft` (then the fine-tuning, forked from `perfit_bsel`: each client
chooses its B once more and fine-tunes from it) from `perfit_bsel` only in the fine-tuning; the report states the
goal for each in place of `perfit`.

Per-client numbers: the list of a client is `[perplexity of the base model, after round 1, ..., after round T]`
(index t = after t training rounds; the run records call these rounds -1, 0, ..., T-1), plus, for the fine-tuned rows
(`fedit_ft`, `perfit_ft`, `perfit_pb_ft`, `perfit_bsel_ft`), one more entry after their fine-tuning steps. In the sampled settings (fraction < 1) a client is evaluated only in the
rounds it trains and in the last one (the engine's `eval_clients: auto`), so its other entries are `null`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402
import quality_run as qrun  # noqa: E402
import quality_setup as qset  # noqa: E402
from base_eval_cache import BASE_EVAL_FILE  # noqa: E402
from quality_grid import (  # noqa: E402
    BUSY_S,
    DEFAULT_ROOT,
    IMPORTED_FILE,
    METHODS,
    SEC_PER_EVAL,
    SEC_PER_STEP,
    SETTINGS,
    TINY_ROOT,
    CellLock,
    Setting,
    base_settings,
    cell_config,
    cell_dir,
    completed_rounds,
    data_for,
    estimate_s,
    fork_finetune,
    fork_source,
    methods_of,
    newest_write,
    quality_py_jobs,
    total_rounds,
)
from quality_scale_report import records_store, report, restore_cells  # noqa: E402

# ---------------------------------------------------------------------------------------------------- run


def plan(args, settings: list[Setting], root: Path) -> list[dict[str, Any]]:
    """Every asked-for cell with its status (`finished`, `partial`, `missing`, or why it cannot run) and the rough
    CPU seconds it still needs."""
    cells = []
    seen: set[Path] = set()  # alpha0.5's cells are dirichlet40_f20's: plan each folder once
    for setting in settings:
        data = data_for(setting, root, args.flan8, args.tiny)
        from hf_perfit.data import load_client_folder

        client_ids = [c.client_id for c in load_client_folder(data)]
        for seed in args.seeds:
            for order, method in enumerate(methods_of(setting, args.methods)):
                folder = cell_dir(root, setting, seed, method)
                if folder in seen:
                    continue
                seen.add(folder)
                # finished elsewhere (quality_transfer.py): records only, so never resumed or scored again
                imported = (folder / IMPORTED_FILE).is_file()
                cell = {
                    "setting": setting,
                    "seed": seed,
                    "method": method,
                    "folder": folder,
                    "order": order,
                    "imported": imported,
                }
                try:
                    config, s, budget = cell_config(setting, method, seed, root, data, args.tiny, args.overrides)
                    cell.update(config=config, settings=s, budget=budget, client_ids=client_ids, data=data)
                    # an imported cell's data path may differ from this machine's: not compared
                    status = "finished" if imported else qrun.run_status(folder, config, client_ids)
                except (SystemExit, ValueError) as err:  # other settings cached there, or no config for it
                    cell.update(status="refused", why=str(err), left_s=0.0)
                    cells.append(cell)
                    continue
                done = completed_rounds(folder)
                if status == "missing" and not args.no_fork and fork_source(folder, config):
                    done = config.num_rounds  # only the fine-tuning is left (see `fork_finetune`)
                cell.update(status=status, done=done, left_s=0.0 if status == "finished" else estimate_s(config, done))
                cells.append(cell)
    # partial cells first (their work is half done), then the cheapest, then by seed and the table's order
    return sorted(cells, key=lambda c: (c["status"] != "partial", c["left_s"], c["seed"], c["order"]))


def _describe(cell: dict[str, Any]) -> str:
    name = f"{cell['setting'].name} seed{cell['seed']} {cell['method']}"
    if cell["status"] == "refused":
        return f"{name}: cannot run: {cell['why']}"
    extra = ""
    if cell["status"] == "partial":
        extra = f" ({cell['done']} of {total_rounds(cell['config'])} rounds)"
    if cell["status"] != "finished":
        extra += f", ~{cell['left_s'] / 3600:.1f} CPU h left"
    elif cell["imported"]:
        extra = " (imported: records only)"
    return f"{name}: {cell['status']}{extra}"


def run_cells(args, cells: list[dict[str, Any]]) -> dict[str, int]:
    """Compute the cells in order (each resumable); returns counts of `trained`, `reused`, `skipped`, `failed` and
    `refused` (a cached run with other settings in the cell's folder: see the plan's line)."""
    todo = [c for c in cells if c["status"] != "refused"]
    counts = {"trained": 0, "reused": 0, "skipped": 0, "failed": 0, "refused": len(cells) - len(todo)}
    base_cache: dict[str, Any] = {}
    rouge_base_done: set[str] = set()
    jobs = quality_py_jobs()
    t_start = time.perf_counter()
    for i, cell in enumerate(todo, 1):
        setting, folder = cell["setting"], cell["folder"]
        print(f"[{i}/{len(todo)}] {_describe(cell)}  ({(time.perf_counter() - t_start) / 60:.0f} min into this call)")
        if cell["status"] == "finished" and (  # an imported cell has no adapters to score ROUGE-L with
            cell["imported"] or not (cell["settings"].rouge_examples and _rouge_missing(cell))
        ):
            counts["reused"] += 1
            continue
        job = jobs.get(folder.parent.resolve())
        if job and cell["method"] in job[1]:
            print(f"  skipped: benchmarks/quality.py (pid {job[0]}) computes this run")
            counts["skipped"] += 1
            continue
        lock = CellLock(folder)
        holder = lock.acquire()
        if holder:
            print(f"  skipped: locked by {holder}")
            counts["skipped"] += 1
            continue
        try:
            age = time.time() - newest_write(folder)
            if cell["status"] == "partial" and age < BUSY_S and not args.force:
                print(f"  skipped: written to {age:.0f} s ago, apparently running elsewhere (--force to take it)")
                counts["skipped"] += 1
                continue
            if cell["status"] == "missing" and not args.no_fork and not folder.exists():  # never over a run
                waits = _fork_source_running(cell, todo)
                if waits:  # another `run` (e.g. a parallel worker on a GPU) is computing the run to fork from
                    print(f"  skipped: waits for {waits} (locked by another run); a later call forks it")
                    counts["skipped"] += 1
                    continue
                source = fork_source(folder, cell["config"])
                if source is not None:
                    fork_finetune(source, folder, cell["config"])
                    print(f"  forked the finished run {source} (its {cell['config'].num_rounds} rounds); fine-tuning")
            base_eval = folder.parent.parent / BASE_EVAL_FILE  # one per setting: its cells share it by key
            status = qrun.run_config(
                cell["method"],
                cell["config"],
                cell["settings"],
                folder,
                cell["client_ids"],
                cell["budget"],
                base_eval=base_eval,
            )
            counts["reused" if status == "finished" else "trained"] += 1
            if cell["settings"].rouge_examples:
                from hf_perfit.data import load_client_folder

                clients = load_client_folder(cell["data"])
                key = setting.name
                if key not in rouge_base_done:  # the base model's ROUGE-L once per setting (seed-independent)
                    qrun.rouge_for("base", cell["settings"], folder.parent.parent, clients, base_cache)
                    rouge_base_done.add(key)
                qrun.rouge_for(cell["method"], cell["settings"], folder.parent, clients, base_cache)
        except KeyboardInterrupt:
            raise
        except Exception:  # one broken cell must not cost the others their runs
            traceback.print_exc()
            print(f"  FAILED: {_describe(cell)}; continuing with the other cells")
            counts["failed"] += 1
        finally:
            lock.release()
    return counts


def _fork_source_running(cell: dict[str, Any], cells: list[dict[str, Any]]) -> str | None:
    """For a fine-tuning cell (`finetune_steps > 0`): the folder name of the cell of this plan it would fork from
    (the same config without fine-tuning, same seed), when another process holds that cell's lock; else `None`."""
    config = cell["config"]
    if not config.finetune_steps:
        return None
    want = {**qset._comparable(config.to_dict()), "finetune_steps": 0}
    for other in cells:
        if other is cell or other.get("config") is None or other["folder"].parent != cell["folder"].parent:
            continue
        if qset._comparable(other["config"].to_dict()) == want and CellLock(other["folder"]).holder():
            return other["folder"].name
    return None


def _rouge_missing(cell: dict[str, Any]) -> bool:
    path = cell["folder"] / qrun.ROUGE_FILE
    if not path.is_file():
        return True
    cached = json.loads(path.read_text())
    return len(cached.get("clients", {})) < len(cell["client_ids"])


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The script's flags; any other `--key value` is a `FederatedConfig` key over every cell's settings YAML
    (`args.overrides`, as benchmarks/quality.py reads them), allowed for `run` and `plan` into a `--root` of their
    own (the default root's cells are the declared settings')."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        allow_abbrev=False,
        epilog="Any other --key value sets a FederatedConfig key over every cell's benchmarks/settings/<setting>.yaml "
        "(docs/federated.md § Config keys), e.g. --learning_rate 1e-4 --root outputs/quality-lr1e-4.",
    )
    p.add_argument("command", choices=["run", "plan", "report"], help="run the cells; print the plan; rebuild docs")
    p.add_argument(
        "--setting", nargs="+", default=["flan8_recipe"], metavar="SETTING", help=f"settings: {', '.join(SETTINGS)}"
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--methods",
        nargs="+",
        metavar="METHOD",
        help=f"rows (default: the setting's main table): main, ablations, all, or names: {', '.join(METHODS)}",
    )
    p.add_argument(
        "--root", type=Path, help=f"cached runs (default: {qset._rel(DEFAULT_ROOT)}; --tiny: {qset._rel(TINY_ROOT)})"
    )
    p.add_argument("--flan8", type=Path, default=qset.FLAN8, help="the FLAN-8 client folder (../shared/data/flan8)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (1 is fastest on a loaded 2-core machine)")
    p.add_argument("--tiny", action="store_true", help="tiny random Llama + synthetic clients (smoke test)")
    p.add_argument("--force", action="store_true", help="run a cell even if it was written to in the last 15 min")
    p.add_argument("--no-report", action="store_true", help="run: do not rebuild the report afterwards")
    p.add_argument(
        "--no-fork",
        action="store_true",
        help="train the *_ft rows from scratch instead of continuing the same seed's finished run they fork from",
    )
    p.add_argument(
        "--no-write",
        action="store_true",
        help="report: leave docs/benchmarks.md and its plots alone (both go to the root)",
    )
    p.add_argument("--results", type=Path, help="quality.json path (default: docs/results/quality.json)")
    p.add_argument(
        "--store",
        type=Path,
        help="committed records of finished cells, restored before run / plan / report (default: "
        "docs/results/cells; --tiny or run / plan with --key value overrides: none)",
    )
    args, rest = p.parse_known_args(argv)
    if rest and not rest[0].startswith("--"):
        p.error(f"unexpected arguments {rest}; give every value after its --key.")
    args.overrides = q.federated_flags(rest)
    if args.overrides:
        if args.command == "report":
            p.error(f"report reads the cached runs; {rest[0]} and the other FederatedConfig keys apply to run / plan.")
        if args.root is None:
            p.error(
                f"{' '.join(rest)} changes every cell's settings: give a --root of its own (the cells under "
                f"{qset._rel(TINY_ROOT if args.tiny else DEFAULT_ROOT)} are the declared settings')."
            )
    for name in args.setting:
        if name not in SETTINGS:
            p.error(f"--setting {name}: unknown; allowed: {', '.join(SETTINGS)}")
    if any(s < 0 for s in args.seeds):
        p.error("--seeds must be integers >= 0")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    for name in args.setting:  # a bad key or value fails now, naming it, not after the first cell
        base_settings(SETTINGS[name], args.seeds[0], qset.FLAN8, args.tiny, args.overrides).federated()
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    root = (args.root or (TINY_ROOT if args.tiny else DEFAULT_ROOT)).resolve()
    root.mkdir(parents=True, exist_ok=True)
    args.flan8 = args.flan8.expanduser().resolve()
    counts = {"failed": 0}
    if args.command in ("run", "plan"):
        import datasets
        import torch

        datasets.disable_progress_bars()
        if args.threads:
            torch.set_num_threads(args.threads)
        # the committed records first, so that a fresh checkout computes only the cells nobody finished yet (and not
        # the base model's ROUGE-L again: ~9 min of a FLAN-8 setting); cells run with other FederatedConfig values
        # (`--key value`) are none of those
        restore_cells(records_store(args), root)
        cells = plan(args, [SETTINGS[n] for n in args.setting], root)
        left = sum(c["left_s"] for c in cells)
        print(
            f"{len(cells)} cells, ~{left / 3600:.1f} CPU h left (rough: {SEC_PER_STEP} s per step, "
            f"{SEC_PER_EVAL:.0f} s per client evaluation, ROUGE-L not counted; 2 cores at load 3-5):"
        )
        for c in cells:
            print("  " + _describe(c))
        if args.command == "run":
            counts = run_cells(args, cells)
            print("cells: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if args.command == "report" or (args.command == "run" and not args.no_report):
        report(args, root)
    return 1 if counts.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
