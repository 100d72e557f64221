"""What does running on Flower cost per round, next to the in-process simulation, on the same work?

The same federated run (tiny random Llama from the tests, 3 clients with one category each, PerFIT, 2 rounds) on:

1. `in_process`: [`FederatedSimulation`] (one process, one model, clients one after the other), torch's default
   number of threads;
2. `in_process_1thread`: the same with one torch thread;
3. `flower_simulation_1cpu`: Flower's simulation runtime ([`run_flower_simulation`]: the hf_perfit `ServerApp` in
   this process, the `ClientApp` in a Ray worker) with Ray given 1 CPU: one client at a time, one torch thread (Ray
   sets `OMP_NUM_THREADS=1` in a 1-CPU worker), like (2): the difference is Flower's own cost;
4. `flower_simulation`: Ray given every usable CPU, 1 per worker (clients in parallel);
5. `flower_simulation_inprocess`: Flower's simulation runtime with the in-process backend
   (`run_flower_simulation(backend="inprocess")`: the `ClientApp` in this process, no Ray), one torch thread like (2):
   the difference is Flower's messaging and the Flower transport's own work;
6. `flower_deployment_warm` (with `--deployment`): a real deployment on 127.0.0.1 ([`LocalFederation`]: a
   `flower-superlink` and 3 `flower-supernode --isolation process` processes, each with a long-running ClientApp
   process `python -m hf_perfit.flower.warm` that keeps the model loaded; `flwr run recipes/flower`);
7. `flower_deployment_warm_fastpoll` (with `--deployment`): the same with the SuperNodes started by
   `python -m hf_perfit.flower.supernode --poll-interval 0.1` (the documented command: Flower's SuperNode with its
   waits for its own ClientApp woken by the node's state, its 3 s idle poll capped at 0.1 s and its 1 s first retry
   of a download at 20 ms);
8. `flower_deployment_in_node` (with `--deployment`): SuperNodes started by `python -m hf_perfit.flower.supernode
   --poll-interval 0.1 --clientapp hf_perfit.flower.client_app:app` (the documented command): the ClientApp runs
   inside each SuperNode's process, no ClientApp process next to it;
9. `flower_deployment_cold` (with `--cold_deployment`): Flower's default, every message starts a fresh
   `flwr-clientapp` process (slow: about a minute a round here).

A round's wall time runs from the client sampling to the end of the round's checkpoint; the last round also exports
every client's final adapter (Flower's ClientApps do it in that round's evaluation, the in-process engine after its
checkpoint: its export time is added to its last round). Arms alternate within each repeat. Every arm must reach the
same mean personalized perplexity (the engines run the same code).

    python benchmarks/flower_overhead.py                  # writes its section of docs/benchmarks.md
    python benchmarks/flower_overhead.py --repeats 1 --no-write
    python benchmarks/flower_overhead.py --deployment     # also the localhost deployments (warm ClientApp processes)
    python benchmarks/flower_overhead.py --deployment --cold_deployment   # and Flower's default (a minute a round)
    python benchmarks/flower_overhead.py --deployment_only --deployment_arms warm_fastpoll in_node

A run without `--deployment` keeps the deployment results already in the section (their table rows and reading,
under the date, commit and command of the run that measured them), so the simulation arms can be re-measured alone.
`--deployment_only` is the converse: it times `in_process_1thread` and the deployment arms only, and replaces only
that kept block of deployment results (the simulation arms and their reading stay as they are).

`--real FLAN8_DIR` asks the same question at the work a user runs: SmolLM2-135M-Instruct (the preset every process
loads from its package) and FLAN-8's clients 0-2 (their first 40 rows), batch 4 of <= 128 tokens, a rank-8 budget.
It goes with `--deployment_only` and prints only (docs/benchmarks.md quotes it, with its command). Run it under
`taskset -c 0` to give the in-process run and the whole federation (SuperLink, nodes, ServerApp) the same single core:

    taskset -c 0 python benchmarks/flower_overhead.py --deployment_only --deployment_arms in_node --repeats 1 \
        --num_rounds 2 --local_steps 2 --real ../shared/data/flan8
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import DOC_PATH, REPO_ROOT, command_line, machine_lines, update_doc  # noqa: E402

SECTION = "## Flower overhead (benchmarks/flower_overhead.py)"
APP_DIR = REPO_ROOT / "recipes" / "flower"
# --real: the model every process loads from its package (hf_perfit.presets), and the training rows per client taken
# from FLAN-8 (40: 30 to train on, 10 test rows at test_fraction 0.25, enough for the local steps of a short run)
REAL_MODEL = "smollm2-135m-instruct"
REAL_ROWS = 40
KEPT_START = "<!-- deployment results kept from an earlier run (flower_overhead.py without --deployment) -->"
KEPT_END = "<!-- end of the kept deployment results -->"
_DEPLOYMENT_BULLETS = ("- Deployment", "- Before (commit", "- Flower's default deployment")
DEPLOYMENT_ARMS = {
    "warm": "flower_deployment_warm",
    "warm_fastpoll": "flower_deployment_warm_fastpoll",
    "in_node": "flower_deployment_in_node",
}
"""`--deployment_arms` choices and the arms they name."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="runs per arm (alternating arms)")
    p.add_argument("--num_rounds", type=int, default=2)
    p.add_argument("--local_steps", type=int, default=4)
    p.add_argument("--deployment", action="store_true", help="also time localhost SuperLink + SuperNodes runs")
    p.add_argument("--cold_deployment", action="store_true", help="also time Flower's default (process per message)")
    p.add_argument("--deployment_repeats", type=int, default=1)
    p.add_argument(
        "--deployment_arms",
        nargs="+",
        choices=sorted(DEPLOYMENT_ARMS),
        default=list(DEPLOYMENT_ARMS),
        help="which deployments --deployment / --deployment_only time",
    )
    p.add_argument(
        "--deployment_only",
        action="store_true",
        help="time in_process_1thread and the deployment arms only; replace only the kept deployment block",
    )
    p.add_argument("--num_cpus", type=int, default=None, help="CPUs for Ray (default: all usable)")
    p.add_argument(
        "--real",
        type=Path,
        metavar="FLAN8_DIR",
        help="the same comparison on real work: SmolLM2-135M-Instruct and 3 FLAN-8 clients (this folder), batch 4 of "
        "<= 128 tokens, rank-8 budget; prints only (with --deployment_only; docs/benchmarks.md quotes it by hand)",
    )
    p.add_argument("--no-write", dest="write", action="store_false", help="print only, leave docs/benchmarks.md")
    p.add_argument("--output", type=Path, default=DOC_PATH, help="markdown file to update")
    p.add_argument(
        "--machine_note",
        action="append",
        default=[],
        help="an extra line for the section's machine list (e.g. that a background job was paused); repeatable",
    )
    args = p.parse_args(argv)
    if args.real is not None:
        if not args.deployment_only:
            p.error("--real times in_process_1thread against the deployment arms: add --deployment_only.")
        args.write = False  # the section's text describes the tiny work
    return args


def _section_text(doc: str) -> str:
    """The "Flower overhead" section of `doc` (empty when absent)."""
    lines, out, inside, fenced = doc.splitlines(), [], False, False
    for line in lines:
        if line.strip() == SECTION:
            inside = True
        elif inside:
            if line.lstrip().startswith("```"):
                fenced = not fenced
            elif not fenced and line.startswith("## "):
                break
        if inside:
            out.append(line)
    return "\n".join(out)


def kept_deployment(doc: str) -> str:
    """The deployment results of the section in `doc`, to carry into a run without `--deployment`: an earlier kept
    block as it is, else the deployment rows of the table and the deployment bullets of the reading, under the
    date, commit and command of the run that measured them, and its `in_process_1thread` round (the rows' ratios
    are to it). Empty when the section has no deployment results."""
    section = _section_text(doc)
    if KEPT_START in section and KEPT_END in section:
        return section[section.index(KEPT_START) : section.index(KEPT_END) + len(KEPT_END)]
    lines = section.splitlines()
    header = next((i for i, line in enumerate(lines) if line.startswith("| engine |")), None)
    rows = [line for line in lines if line.startswith("| flower_deployment")]
    if header is None or not rows:
        return ""
    command = re.search(r"```bash\n(.*?)\n```", section, re.S)
    date = re.search(r"^- date: (.*)$", section, re.M)
    base = next((line.split("|")[2].strip() for line in lines if line.startswith("| in_process_1thread |")), "?")
    bullets: list[str] = []
    keep = False
    for line in lines:
        if line.startswith("- "):
            keep = line.startswith(_DEPLOYMENT_BULLETS)
        elif not line.startswith("  "):
            keep = False
        if keep:
            bullets.append(line)
    intro = (
        f"Deployment arms, not re-measured by this command: from the run of {date.group(1) if date else 'unknown date'}"
        f" (`{command.group(1).strip() if command else 'unknown command'}`), whose `in_process_1thread` round took "
        f"{base} s (the ratios are to it):"
    )
    return "\n".join([KEPT_START, intro, "", lines[header], lines[header + 1], *rows, "", *bullets, KEPT_END])


def replace_kept(section: str, block: str) -> str:
    """`section` (the "Flower overhead" section's text) with its kept deployment block replaced by `block`, or,
    without one, `block` added before the section's closing paragraph ("The machine is shared ...") or at its end."""
    if KEPT_START in section and KEPT_END in section:
        start, end = section.index(KEPT_START), section.index(KEPT_END) + len(KEPT_END)
        return section[:start] + block + section[end:]
    closing = section.rfind("\nThe machine is shared with other work")
    if closing < 0:
        return section.rstrip("\n") + "\n\n" + block + "\n"
    return section[:closing].rstrip("\n") + "\n\n" + block + "\n" + section[closing:]


def make_assets(root: Path, real: Path | None = None) -> None:
    """The tests' tiny random Llama + character tokenizer, saved like a Hub checkpoint, and 3 categories of data; with
    `real` (a FLAN-8 client folder) only the data: the first `REAL_ROWS` training rows of FLAN-8's clients 0-2, one
    category each (the model is the SmolLM2 preset, read by every process from its package)."""
    if real is not None:
        rows = []
        for k in range(3):
            path = real / f"local_training_{k}.json"
            if not path.is_file():
                raise SystemExit(f"--real {real}: no {path.name} there; give FLAN-8's client folder.")
            for r in json.loads(path.read_text())[:REAL_ROWS]:
                rows.append({"instruction": r["instruction"], "response": r["output"], "category": f"c{k}"})
    else:
        sys.path.insert(0, str(REPO_ROOT))
        from tests.conftest import build_tokenizer, tiny_llama

        tiny_llama().save_pretrained(root / "model")
        build_tokenizer().save_pretrained(root / "model")
        rows = [
            {"instruction": f"Task {k}: echo {i}", "response": f"{k}{i}{k}", "category": f"c{k}"}
            for k in range(3)
            for i in range(12)
        ]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_config(args: argparse.Namespace, assets: Path, out: Path):
    from hf_perfit.federated.config import FederatedConfig

    if args.real is not None:  # the recipes' per-step work: SmolLM2, rank-8 budget, batch 4 of <= 128 tokens
        work = dict(
            model_name_or_path=REAL_MODEL,
            learning_rate=2e-4,
            per_device_train_batch_size=4,
            max_length=128,
            lora_r=8,
            lora_alpha=16,
        )
    else:  # the tiny work: the tests' model, short rows, a rank-2 budget
        work = dict(
            model_name_or_path=str(assets / "model"),
            prune_iterations=2,
            learning_rate=5e-3,
            per_device_train_batch_size=2,
            max_length=48,
            lora_r=2,
            lora_alpha=4,
        )
    return FederatedConfig(
        dataset_name=str(assets / "data.jsonl"),
        strategy="perfit",
        num_clients=3,
        num_rounds=args.num_rounds,
        local_steps=args.local_steps,
        search_steps=min(4, args.local_steps),
        test_fraction=0.25,
        output_dir=str(out),
        overwrite=True,
        **work,
    )


def run_in_process(config, threads: int | None = None) -> tuple[list[float], float, float]:
    """(round wall times, total wall, final mean perplexity) of the in-process simulation, with `threads` torch
    threads (default: torch's)."""
    import torch

    from hf_perfit.federated.simulation import FederatedSimulation

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_in_process(FederatedSimulation, config)
    finally:
        torch.set_num_threads(before)


def _run_in_process(FederatedSimulation, config) -> tuple[list[float], float, float]:
    t0 = time.perf_counter()
    sim = FederatedSimulation(config)
    starts: dict[int, float] = {}
    ends: dict[int, float] = {}
    configure_round, checkpoint = sim.strategy.configure_round, sim._checkpoint

    def timed_configure_round(round_idx, client_ids):
        starts[round_idx] = time.perf_counter()
        return configure_round(round_idx, client_ids)

    def timed_checkpoint(completed, records):
        checkpoint(completed, records)
        ends[completed - 1] = time.perf_counter()

    # Like for like with Flower, whose ClientApps export their final adapters inside the last round's evaluation
    # (`final` evaluate messages; some 15 ms per client here): the in-process engine exports them after the last
    # checkpoint (`transport.export`), so that export's time joins its last round.
    export, exported = sim.transport.export, []

    def timed_export(jobs):
        t = time.perf_counter()
        export(jobs)
        exported.append(time.perf_counter() - t)

    sim.strategy.configure_round, sim._checkpoint = timed_configure_round, timed_checkpoint
    sim.transport.export = timed_export
    summary = sim.run()
    total = time.perf_counter() - t0
    walls = [ends[r] - starts[r] for r in sorted(starts)]
    walls[-1] += sum(exported)
    return walls, total, float(summary["mean_perplexity"])


def run_flower_sim(config, num_cpus: int | None, backend: str = "ray") -> tuple[list[float], float, float]:
    """(round wall times, total wall, final mean perplexity) of `run_flower_simulation`: with Ray given `num_cpus`
    CPUs, or with the in-process backend and one torch thread (`backend="inprocess"`)."""
    import torch

    from hf_perfit.flower import run_flower_simulation

    before = torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        if backend == "inprocess":
            torch.set_num_threads(1)  # like in_process_1thread and a 1-CPU Ray worker
            summary = run_flower_simulation(config, backend="inprocess")
        else:
            summary = run_flower_simulation(config, num_cpus=num_cpus, client_num_cpus=1.0)
    finally:
        torch.set_num_threads(before)
    total = time.perf_counter() - t0
    report = json.loads((Path(config.output_dir) / "flower_run.json").read_text())
    return [float(x) for x in report["round_wall_seconds"]], total, float(summary["mean_perplexity"])


def run_deployment(
    config, work: Path, warm: bool = True, node_poll_interval: float | None = None, in_node: bool = False
) -> tuple[list[float], float, float]:
    from hf_perfit.flower.localhost import LocalFederation

    t0 = time.perf_counter()
    fed = LocalFederation(
        work,
        num_nodes=config.num_clients,
        threads_per_node=1,
        warm=warm,
        node_poll_interval=node_poll_interval,
        in_node=in_node,
    )
    with fed:
        run_id = fed.run(config, APP_DIR)
        report = fed.wait(config.output_dir, run_id, alive=tuple(fed.procs))
    total = time.perf_counter() - t0
    if report["status"] != "completed":
        raise RuntimeError(f"the deployment run did not complete: {report}")
    return [float(x) for x in report["round_wall_seconds"]], total, float(report["final_summary"]["mean_perplexity"])


def fmt_stats(xs: list[float]) -> str:
    med = statistics.median(xs)
    return f"{med:.2f} | {min(xs):.2f} – {max(xs):.2f}"


def _ratios(ratio: dict[str, float]) -> str:
    """The deployment arms' ratios in words."""
    words = {
        "flower_deployment_in_node": "with the ClientApp inside each SuperNode (`hf_perfit.flower.supernode "
        "--clientapp`, the documented command)",
        "flower_deployment_warm_fastpoll": "with `hf_perfit.flower.supernode` and a warm ClientApp process per node",
        "flower_deployment_warm": "with Flower's own SuperNode and a warm ClientApp process per node",
    }
    return "; ".join(f"{ratio[arm]:.1f}× {text}" for arm, text in words.items() if arm in ratio)


def _ratio_lines(ratio: dict[str, float]) -> str:
    """The deployment arms' ratios, one indented line each."""
    return "\n".join(f"  {part}" for part in _ratios(ratio).split("; "))


def deployment_only_block(
    args: argparse.Namespace,
    table: str,
    ratio: dict[str, float],
    med: dict[str, float],
    same: bool,
    wall_min: float,
) -> None:
    """`--deployment_only`: the kept deployment block (its own command, machine, table and reading) into the
    section of `args.output`, leaving the rest of the section as it is."""
    notes = "".join(f"- {n}\n" for n in args.machine_note)
    block = f"""{KEPT_START}
Deployment arms, measured apart from the arms above by

```bash
{command_line()}
```

on this machine:

{machine_lines()}{notes}- total benchmark wall time: {wall_min:.1f} min; {args.repeats} repeat(s), arms alternating

Same work as above; `in_process_1thread` was timed alongside (the ratios are to it, repeat by repeat). Every run
reached the same mean personalized perplexity: {"yes" if same else "NO"}.

{table}

- Deployment (goal ≤ 1.5×), against the in-process round of {med["in_process_1thread"]:.2f} s:
{_ratio_lines(ratio)}
  Where a round goes, hop by hop: docs/flower.md, section 2 (`benchmarks/flower_deploy_phases.py`).
- Flower's default deployment (a fresh `flwr-clientapp` process per message, which imports torch and loads the
  model every time) was measured at 59.2 s per round, 41.5× `in_process_1thread`, on 2026-11-22 (commit 772c2b0, same
  machine and work); `--cold_deployment` measures it again (about a minute a round).
{KEPT_END}"""
    print(block)
    if args.write:
        doc = args.output.read_text(encoding="utf-8") if args.output.is_file() else ""
        section = _section_text(doc) or f"{SECTION}\n"
        update_doc(args.output, SECTION, replace_kept(section, block))
        print(f"updated the kept deployment block of {args.output}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    num_cpus = args.num_cpus or usable
    arms = [
        "in_process",
        "in_process_1thread",
        "flower_simulation_1cpu",
        "flower_simulation",
        "flower_simulation_inprocess",
    ]
    if args.deployment_only:
        arms = ["in_process_1thread"]
    deployed = args.deployment or args.deployment_only
    deployments = [DEPLOYMENT_ARMS[a] for a in DEPLOYMENT_ARMS if a in args.deployment_arms] if deployed else []
    deployments += ["flower_deployment_cold"] if args.cold_deployment else []
    arms += deployments
    rounds: dict[str, list[float]] = {a: [] for a in arms}
    totals: dict[str, list[float]] = {a: [] for a in arms}
    ppl: dict[str, set[float]] = {a: set() for a in arms}
    per_repeat: dict[str, dict[int, float]] = {a: {} for a in arms}
    first: dict[str, list[float]] = {a: [] for a in arms}
    later: dict[str, list[float]] = {a: [] for a in arms}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flower_overhead_") as tmp:
        root = Path(tmp)
        make_assets(root, args.real)
        run_in_process(make_config(args, root, root / "warm_up"))  # untimed: this process's one-time lazy imports
        for rep in range(args.repeats):
            order = arms if rep % 2 == 0 else list(reversed(arms))
            for arm in order:
                if arm in deployments and rep >= args.deployment_repeats:
                    continue
                config = make_config(args, root, root / f"{arm}_{rep}")
                if arm == "in_process":
                    r, total, p = run_in_process(config)
                elif arm == "in_process_1thread":
                    r, total, p = run_in_process(config, threads=1)
                elif arm == "flower_simulation_1cpu":
                    r, total, p = run_flower_sim(config, 1)
                elif arm == "flower_simulation":
                    r, total, p = run_flower_sim(config, num_cpus)
                elif arm == "flower_simulation_inprocess":
                    r, total, p = run_flower_sim(config, None, backend="inprocess")
                elif arm == "flower_deployment_warm":
                    r, total, p = run_deployment(config, root / f"{arm}_{rep}_fed")
                elif arm == "flower_deployment_warm_fastpoll":
                    r, total, p = run_deployment(config, root / f"{arm}_{rep}_fed", node_poll_interval=0.1)
                elif arm == "flower_deployment_in_node":
                    r, total, p = run_deployment(
                        config, root / f"{arm}_{rep}_fed", node_poll_interval=0.1, in_node=True
                    )
                else:
                    r, total, p = run_deployment(config, root / f"{arm}_{rep}_fed", warm=False)
                rounds[arm] += r
                first[arm].append(r[0])
                later[arm] += r[1:]
                per_repeat[arm][rep] = statistics.median(r)
                totals[arm].append(total)
                ppl[arm].add(round(p, 6))
                print(f"repeat {rep} {arm}: rounds {[f'{x:.2f}' for x in r]} s, total {total:.1f} s, ppl {p:.6f}")
    wall_min = (time.perf_counter() - started) / 60
    same = len(set().union(*ppl.values())) == 1

    base = "in_process_1thread"  # like for like with a Ray worker: one client at a time, one torch thread
    lines = [
        "| engine | round wall (s): median | min – max | round 0 (s) | later rounds (s) | rounds timed | "
        "× in_process_1thread: median of per-repeat ratios [min, max] | whole run incl. start-up (s): median | runs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratio: dict[str, float] = {}
    min_ratio: dict[str, float] = {}
    max_ratio: dict[str, float] = {}
    for arm in arms:
        pairs = [per_repeat[arm][k] / per_repeat[base][k] for k in per_repeat[arm]]
        ratio[arm] = statistics.median(pairs)
        min_ratio[arm], max_ratio[arm] = min(pairs), max(pairs)
        lines.append(
            f"| {arm} | {fmt_stats(rounds[arm])} | {statistics.median(first[arm]):.2f} | "
            f"{statistics.median(later[arm]) if later[arm] else float('nan'):.2f} | {len(rounds[arm])} | {ratio[arm]:.2f} "
            f"[{min(pairs):.2f}, {max(pairs):.2f}] | {statistics.median(totals[arm]):.1f} | {len(totals[arm])} |"
        )
    table = "\n".join(lines)
    med = {arm: statistics.median(rounds[arm]) for arm in arms}
    if args.deployment_only:
        deployment_only_block(args, table, ratio, med, same, wall_min)
        return
    all_ppl = sorted(set().union(*ppl.values()))
    import torch

    deployment = (
        f"; the deployment arms {min(args.deployment_repeats, args.repeats)} time(s) each" if deployments else ""
    )
    notes = "".join(f"- {n}\n" for n in args.machine_note)
    text = f"""{SECTION}

Round wall time of the same federated run on Flower against the in-process simulation.

Command:

```bash
{command_line()}
```

Machine:

{machine_lines()}{notes}- Ray: 1 or {num_cpus} CPUs (see the arms), 1 CPU per ClientApp worker; flwr 1.41.0, ray 2.55.1
- total benchmark wall time: {wall_min:.1f} min

Work: tiny random Llama (the tests' `tiny_llama`: 2 layers, hidden 16) and character tokenizer, 3 clients (one
category each, 9 training rows), PerFIT (r = 2, γ = 4), {args.num_rounds} round(s) of {args.local_steps} local steps
of batch 2 (the search in round 0), every client trained and evaluated every round. A round runs from the client
sampling to the end of its checkpoint; the last one includes the export of every client's final adapter (Flower's
ClientApps write it in the final evaluation, so the in-process arms' export time, after their last checkpoint, is
added to their last round: like for like).

Arms: `in_process` (torch's default of {torch.get_num_threads()} threads) and `in_process_1thread`: the in-process
simulation; `flower_simulation_1cpu`: Flower's simulation runtime with Ray given 1 CPU (one client at a time, one
torch thread: like for like with `in_process_1thread`); `flower_simulation`: Ray given {num_cpus} CPUs ({num_cpus}
clients at a time); `flower_simulation_inprocess`: Flower's simulation runtime with the in-process backend
(`run_flower_simulation(backend="inprocess")`: the ClientApp in this process, no Ray; one torch thread, like for like
with `in_process_1thread`); deployments: a `flower-superlink` and 3 SuperNodes on 127.0.0.1 (one torch thread each),
`flwr run recipes/flower`: `flower_deployment_warm` (`flower-supernode --isolation process` + a long-running
`python -m hf_perfit.flower.warm` ClientApp process per node, the model loaded once per run),
`flower_deployment_warm_fastpoll` (the same, SuperNodes started with `python -m hf_perfit.flower.supernode
--poll-interval 0.1`), `flower_deployment_cold` (Flower's default: a fresh `flwr-clientapp` process per message).
{args.repeats} repeat(s), arms alternating{deployment}; one untimed in-process warm-up run first.

{table}

Every run reached the same mean personalized perplexity: {"yes" if same else "NO"} ({all_ppl}).

Reading:

- Flower's own cost in its simulation runtime, like for like (`flower_simulation_1cpu` against
  `in_process_1thread`; goal ≤ 1.1×): {med["flower_simulation_1cpu"] - med[base]:+.2f} s per round
  ({ratio["flower_simulation_1cpu"]:.2f}×), for a round of 3 client trainings and 3 evaluations of a tiny model.
  `run_flower_simulation` hands each pushed message to a Ray worker at once (Flower 1.41 looks every 0.1 s) and
  the ServerApp's pull wakes on the stored reply; what remains is Ray's actor call (some 6 ms per message, 6
  messages a round one after the other on 1 CPU) and the Flower transport's bookkeeping between the phases
  (docs/flower.md, section 1). With a real model the client's training dominates it.
- Without Ray (`flower_simulation_inprocess`, the same Flower runtime with the ClientApp in this process; goal
  ≤ 1.1×): {med["flower_simulation_inprocess"] - med[base]:+.2f} s per round ({ratio["flower_simulation_inprocess"]:.2f}×
  [{min_ratio["flower_simulation_inprocess"]:.2f}, {max_ratio["flower_simulation_inprocess"]:.2f}]). Flower's
  messaging itself costs a few milliseconds a phase here (the pushing thread hands the messages to the worker, the
  worker stores its replies, the ServerApp's pull wakes on them); what remains is the Flower transport's own work
  around it (building and reading the messages, each client's state written to its disk), measured
  step by step with `python benchmarks/flower_sim_phases.py --backend inprocess` (docs/flower.md, section 1).
- With {num_cpus} CPUs Flower trains {num_cpus} clients at a time (`flower_simulation`,
  {ratio["flower_simulation"]:.2f}×).
- `in_process` with {torch.get_num_threads()} threads is erratic here: on a shared machine, torch's
  threads wait for each other whenever another process holds a core, and matrices this small gain nothing from a
  second thread.
- Start-up: the fresh Ray workers' cold start (imports, model load, tokenization) happens in the hello message
  before round 0, so round 0 and later rounds cost the same; the whole-run column adds it and Ray's start and stop
  (about 20 s) to the Flower runs with Ray; the in-process backend starts no Ray
  ({statistics.median(totals["flower_simulation_inprocess"]):.1f} s a whole run, against
  {statistics.median(totals[base]):.1f} s for `in_process_1thread`).
"""
    if args.deployment:
        text += f"""- Deployment (goal ≤ 1.5×): {_ratios(ratio)}. The model and the client's tokenized data are loaded once per run (in the hello message);
  every message carries its tensors as one packed array, and the ServerApp retries a reply's arrays after 10 ms
  (Flower's HTTP grid waits 1 s). What remains per phase of a round (train, then evaluate) is Flower's messaging: a
  chain of some 30 HTTP requests (the ServerApp pushes the message and its 3-8 objects to the SuperLink, the
  SuperNode pulls and confirms them, the ClientApp process acquires the task and pulls them from the SuperNode, and
  the reply goes back the same way), the SuperNode's idle poll of the SuperLink (`--poll-interval`, or Flower's 3 s)
  and the ClientApp process's task poll, on {num_cpus} cores shared by 3 SuperNodes, 3 ClientApp processes, the
  SuperLink and the ServerApp. Each request costs 5-50 ms on this machine, depending on its load; the in-process
  round it is compared with costs {med[base]:.2f} s.
"""
    if not args.deployment:
        kept = kept_deployment(args.output.read_text(encoding="utf-8")) if args.output.is_file() else ""
        if kept:
            text += f"\n{kept}\n"
    if args.deployment and not args.cold_deployment:
        text += """- Flower's default deployment (a fresh `flwr-clientapp` process per message, which imports torch and loads the
  model every time) was measured at 59.2 s per round, 41.5× `in_process_1thread`, on 2026-11-22 (commit 772c2b0, same
  machine and work); `--cold_deployment` measures it again (about a minute a round).
"""
    if args.cold_deployment:
        text += f"""- Flower's default deployment ({ratio["flower_deployment_cold"]:.0f}×): every message starts a fresh
  `flwr-clientapp` process that imports torch, transformers and hf_perfit and loads the model and the client's data
  before working; two messages per client and round.
"""
    text += """
The machine is shared with other work (see the load average), so absolute times drift between repeats; the per-repeat
ratios compare arms run back to back.
"""
    print(text)
    if args.write:
        update_doc(args.output, SECTION, text)
        print(f"updated {args.output}")


if __name__ == "__main__":
    main()
