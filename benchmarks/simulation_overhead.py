"""What does the in-process federated coordinator cost, and does its memory grow with the number of clients?

1. **Coordinator overhead**: a real run (SmolLM2-135M-Instruct preset when available, else a tiny random Llama) on
   the FLAN-8 client folder (`../shared/data/flan8`, else synthetic clients). The client training
   (`train_client`: SFTTrainer steps) and the per-round evaluation (`evaluate_perplexity`) are timed from inside the
   run; everything else in a round (loading and saving client state, aggregation, checkpoint, metrics, sampling) is
   the coordinator's overhead. Goal: <= 5% of the round wall time.
2. **Memory with 10 vs 100 clients**: the same tiny-model run in a fresh subprocess per client count (1 round, 1
   local step per client); peak RSS (`ru_maxrss`) of that process. Goal: ratio <= 1.2 (client state lives on disk).

    python benchmarks/simulation_overhead.py                 # writes its section of docs/benchmarks.md
    python benchmarks/simulation_overhead.py --tiny --no-write
    python benchmarks/simulation_overhead.py --no-write --config my.yaml --num_rounds 3 --fraction_clients 1.0

The run's settings are a `FederatedConfig` read by `hf_perfit.federated.load_config`: this benchmark's defaults
([`DEFAULTS`]), then the YAML of `--config`, then any `--<FederatedConfig key> value` flag (`output_dir` is always a
temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import REPO_ROOT, command_and_machine, publish  # noqa: E402

SECTION = "## Coordinator overhead and memory (benchmarks/simulation_overhead.py)"
PRESET = "smollm2-135m-instruct"
FLAN8 = REPO_ROOT.parent / "shared" / "data" / "flan8"
GOAL_OVERHEAD = 0.05
GOAL_RSS = 1.2


def _synthetic_clients(n: int, rows_per_client: int = 12):
    from datasets import Dataset

    from hf_perfit.data import ClientData

    out = []
    for k in range(n):
        rows = [
            {"instruction": f"Task {k}: echo {i}", "context": "", "response": f"{k}{i}{k}", "category": f"c{k}"}
            for i in range(rows_per_client)
        ]
        cut = rows_per_client * 3 // 4
        out.append(ClientData(f"client_{k}", Dataset.from_list(rows[:cut]), Dataset.from_list(rows[cut:]), [f"c{k}"]))
    return out


def _tiny():
    sys.path.insert(0, str(REPO_ROOT))
    from tests.conftest import build_tokenizer, tiny_llama

    return tiny_llama(), build_tokenizer()


def overhead(args: argparse.Namespace) -> dict:
    import hf_perfit.federated.client as client_mod
    import hf_perfit.federated.simulation as sim_mod
    from hf_perfit.federated import FederatedSimulation
    from hf_perfit.presets import is_preset_available

    timers = {"train": 0.0, "eval": 0.0}

    def timed(key, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timers[key] += time.perf_counter() - t0

        return wrapper

    client_mod.train_client = timed("train", client_mod.train_client)  # client_update calls it through the module
    sim_mod.evaluate_perplexity = timed("eval", sim_mod.evaluate_perplexity)

    real = not args.tiny and is_preset_available(PRESET)
    use_flan = real and FLAN8.is_dir()
    kwargs: dict = {}
    if not real:
        model, tok = _tiny()
        kwargs = {"model": model, "tokenizer": tok}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = settings(args, real, use_flan, f"{tmp}/run")
        if not use_flan:
            kwargs["clients"] = _synthetic_clients(cfg.num_clients)
        t_setup = time.perf_counter()
        sim = FederatedSimulation(cfg, **kwargs)
        setup = time.perf_counter() - t_setup
        round_times, parts = [], []
        original_checkpoint = sim._checkpoint

        def checkpoint(completed, records):  # a round ends with its checkpoint: time rounds there
            original_checkpoint(completed, records)
            now = time.perf_counter()
            round_times.append(now - marks[-1])
            parts.append(dict(timers))
            timers.update(train=0.0, eval=0.0)
            marks.append(now)

        sim._checkpoint = checkpoint
        marks = [time.perf_counter()]
        t0 = marks[0]
        sim.run()
        total = time.perf_counter() - t0
    # round 0 also holds the base-model evaluation (before the first round); count it as evaluation
    wall = sum(round_times)
    train = sum(p["train"] for p in parts)
    evaluation = sum(p["eval"] for p in parts)
    return {
        "model": "SmolLM2-135M-Instruct" if real else "tiny random Llama (hidden 16, 2 layers)",
        "data": f"FLAN-8 ({FLAN8})" if use_flan else f"{cfg.num_clients} synthetic clients",
        "clients": cfg.num_clients,
        "sampled": max(1, round(cfg.fraction_clients * cfg.num_clients)),
        "rounds": cfg.num_rounds,
        "setup_s": setup,
        "wall_s": wall,
        "train_s": train,
        "eval_s": evaluation,
        "export_s": total - wall,
        "per_round": [
            {"wall": w, "train": p["train"], "eval": p["eval"]} for w, p in zip(round_times, parts, strict=True)
        ],
        "settings": (
            f"{cfg.strategy}, {cfg.num_rounds} rounds, fraction {cfg.fraction_clients}, {cfg.local_steps} local steps "
            f"of batch {cfg.per_device_train_batch_size}, max_length {cfg.max_length}, eval on "
            f"{cfg.max_eval_examples} test examples per client ({cfg.resolved_eval_clients()} clients every round)"
        ),
    }


DEFAULTS: dict = {
    "model_name_or_path": PRESET,
    "strategy": "perfit",
    "num_clients": 4,  # synthetic clients; FLAN-8 has 8
    "num_rounds": 2,
    "fraction_clients": 0.5,
    "local_steps": 5,
    "search_steps": 5,
    "prune_iterations": 2,
    "per_device_train_batch_size": 2,
    "max_length": 128,
    "max_eval_examples": 8,
}
"""This benchmark's settings (FederatedConfig keys), under `--config` and the flags."""


def settings(args: argparse.Namespace, real: bool, use_flan: bool, output_dir: str):
    """The measured run's `FederatedConfig`: [`DEFAULTS`] (FLAN-8's folder and 8 clients when it is used, a rank-2
    LoRA on the tiny model), then `--config`, then the FederatedConfig flags; `output_dir` is always `output_dir`."""
    from hf_perfit.federated import load_config

    defaults = {**DEFAULTS, "lora_r": 8 if real else 2, "lora_alpha": 16 if real else 4}
    if use_flan:
        defaults.update(dataset_name=str(FLAN8), num_clients=8)
    return load_config(args.config, [*args.overrides, "--output_dir", output_dir], defaults=defaults)


def rss_child(n: int) -> None:
    """Run a 1-round tiny federation with `n` clients and print this process's peak RSS (bytes) as JSON."""
    warnings.filterwarnings("ignore")
    from hf_perfit.federated import FederatedConfig, FederatedSimulation

    model, tok = _tiny()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = FederatedConfig(
            model_name_or_path="unused",
            strategy="perfit",
            num_clients=n,
            num_rounds=1,
            local_steps=1,
            search_steps=1,
            prune_iterations=1,
            per_device_train_batch_size=2,
            max_length=48,
            lora_r=2,
            lora_alpha=4,
            output_dir=f"{tmp}/run",
        )
        t0 = time.perf_counter()
        FederatedSimulation(cfg, model=model, tokenizer=tok, clients=_synthetic_clients(n)).run()
        wall = time.perf_counter() - t0
    print(json.dumps({"clients": n, "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "s": wall}))


def rss(counts: list[int]) -> list[dict]:
    out = []
    for n in counts:
        env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": f"{REPO_ROOT / 'src'}:{REPO_ROOT}"}
        proc = subprocess.run(
            [sys.executable, __file__, "--rss-child", str(n)], capture_output=True, text=True, env=env, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"the {n}-client run failed:\n{proc.stderr[-3000:]}")
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def render(ov: dict | None, mem: list[dict] | None) -> str:
    lines = [SECTION, "", *command_and_machine(), ""]
    if ov:
        coord = ov["wall_s"] - ov["train_s"] - ov["eval_s"]
        share = coord / ov["wall_s"]
        lines += [
            f"Coordinator overhead: {ov['model']}, {ov['data']}, {ov['clients']} clients ({ov['sampled']} sampled "
            f"per round); {ov['settings']}.",
            "",
            "| round | wall (s) | client training (s) | evaluation (s) | coordinator (s) | coordinator share |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for i, r in enumerate(ov["per_round"]):
            c = r["wall"] - r["train"] - r["eval"]
            lines.append(
                f"| {i} | {r['wall']:.1f} | {r['train']:.1f} | {r['eval']:.1f} | {c:.2f} | {c / r['wall']:.2%} |"
            )
        lines += [
            f"| all | {ov['wall_s']:.1f} | {ov['train_s']:.1f} | {ov['eval_s']:.1f} | {coord:.2f} | **{share:.2%}** |",
            "",
            f"Goal <= {GOAL_OVERHEAD:.0%}: {'met' if share <= GOAL_OVERHEAD else 'missed'}. Round 0 includes the "
            "base model's evaluation. Not in the rounds: setup (loading the model and tokenizing every client) "
            f"{ov['setup_s']:.1f} s, final export of the adapters, results and plots {ov['export_s']:.1f} s.",
            "",
        ]
    if mem:
        a, b = mem[0], mem[-1]
        ratio = b["max_rss"] / a["max_rss"]
        lines += [
            "Peak memory (a fresh process per count; tiny random Llama, 1 round, 1 local step per client, PerFIT):",
            "",
            "| clients | peak RSS (MiB) | wall (s) |",
            "|---:|---:|---:|",
            *[f"| {m['clients']} | {m['max_rss'] / 2**20:.0f} | {m['s']:.0f} |" for m in mem],
            "",
            f"{b['clients']} vs {a['clients']} clients: **{ratio:.3f}×** peak RSS (goal <= {GOAL_RSS}: "
            f"{'met' if ratio <= GOAL_RSS else 'missed'}). Client adapters, masks and search state live on disk "
            "between rounds (`state/clients/<id>/round_<r>.safetensors`); what stays in memory per client is its "
            "tokenized data.",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny random model and synthetic clients")
    p.add_argument("--config", help="a FederatedConfig YAML applied over this benchmark's DEFAULTS")
    p.add_argument("--rss-counts", type=int, nargs="+", default=[10, 100])
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    p.epilog = "Any other `--<FederatedConfig key> value` sets the measured run's key (docs/federated.md)."
    args, args.overrides = p.parse_known_args(argv)
    if args.rss_child:
        rss_child(args.rss_child)
        return
    warnings.filterwarnings("ignore")
    ov = None if args.skip_overhead else overhead(args)
    mem = None if args.skip_rss else rss(args.rss_counts)
    section = render(ov, mem)
    publish(SECTION, section, write=not args.no_write)


if __name__ == "__main__":
    main()
