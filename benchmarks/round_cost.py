"""What does one more client round cost, all included, when the steps themselves are nearly free?

A tiny random Llama (2 layers, hidden 16, as in tests/conftest.py) on synthetic instruction data split over the clients
with a Dirichlet partition, FedIT, 2 local steps of batch 2, 4 test examples per client. Its steps take milliseconds,
so the wall time of a round is the engine's fixed cost: trainer construction, dataset preparation, state handling,
evaluation set-up.

1. **Marginal wall time per client-round**: `(wall of a 4-round run - wall of a 1-round run) / (3 x clients)` with 16
   clients, every client every round. Both runs include set-up (tokenization, the base-model evaluation) and export, so
   the difference is what three more rounds cost. Goal: <= 0.15 s.
2. **Sampling**: the same with 64 clients and `fraction_clients=0.1` (6 sampled per round); the marginal round wall
   should follow the sampled clients, not all 64 (that depends on the coordinator's evaluation policy too).

Each configuration runs in a fresh subprocess (1-round run, then 4-round run, after a 1-client warm-up) with
`PYTHONPATH` pointing at the sources measured, so the same command times another checkout (`--baseline-src`). On the
CPU torch uses 1 intra-op thread (`--threads`): a hidden-16 model gains nothing from more, and on a loaded 2-core
machine a second spinning thread made every tiny matmul tens of milliseconds slower, which would hide what is measured.

    python benchmarks/round_cost.py --baseline-src /work/main/src     # before/after; writes docs/benchmarks.md
    python benchmarks/round_cost.py --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import REPO_ROOT, command_and_machine, publish  # noqa: E402

SECTION = "## Cost per client round (benchmarks/round_cost.py)"
GOAL_S = 0.15
CATEGORIES = 8
LOCAL_STEPS = 2
EVAL_EXAMPLES = 4


def _dataset(rows_per_category: int):
    """Synthetic instruction rows in `CATEGORIES` categories (short, so the character tokenizer keeps them small)."""
    from datasets import Dataset

    rows = [
        {"instruction": f"Task {c}: echo {i}", "context": "", "response": f"{c}{i}{c} done", "category": f"c{c}"}
        for c in range(CATEGORIES)
        for i in range(rows_per_category)
    ]
    return Dataset.from_list(rows)


def child(clients: int, fraction: float, device: str, threads: int) -> None:
    """One configuration in this process: a warm-up, a 1-round and a 4-round run; prints JSON."""
    warnings.filterwarnings("ignore")
    os.environ["TQDM_DISABLE"] = "1"
    sys.path.insert(0, str(REPO_ROOT))
    import torch

    from hf_perfit.data import partition_dataset
    from hf_perfit.federated import FederatedConfig, FederatedSimulation
    from tests.conftest import build_tokenizer, tiny_llama

    if device == "cpu":
        torch.set_num_threads(threads)
    ds = _dataset(rows_per_category=max(40, 3 * clients))
    parts = partition_dataset(ds, clients, method="dirichlet", alpha=0.5, seed=0, test_fraction=0.2)
    tok = build_tokenizer()

    def run(rounds: int, cl, frac: float) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = FederatedConfig(
                model_name_or_path="unused",
                strategy="fedit",
                num_clients=len(cl),
                num_rounds=rounds,
                fraction_clients=frac,
                local_steps=LOCAL_STEPS,
                per_device_train_batch_size=2,
                max_length=64,
                lora_r=2,
                lora_alpha=4,
                max_eval_examples=EVAL_EXAMPLES,
                eval_batch_size=8,
                output_dir=f"{tmp}/run",
            )
            t0 = time.perf_counter()
            FederatedSimulation(cfg, model=tiny_llama().to(device), tokenizer=tok, clients=cl).run()
            return time.perf_counter() - t0

    run(1, parts[:1], 1.0)  # imports, first trainer, allocator warm-up
    one = run(1, parts, fraction)
    four = run(4, parts, fraction)
    sampled = max(1, round(fraction * clients))
    print(
        json.dumps(
            {
                "clients": clients,
                "fraction": fraction,
                "device": device,
                "threads": threads,
                "sampled": sampled,
                "wall_1": one,
                "wall_4": four,
                "round_s": (four - one) / 3,
                "per_client_round_s": (four - one) / (3 * sampled),
            }
        )
    )


def measure(src: Path, clients: int, fraction: float, device: str, threads: int) -> dict:
    env = {
        **os.environ,
        "TQDM_DISABLE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(src), str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(clients), str(fraction), device, str(threads)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the {clients}-client run ({src}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def render(rows: list[tuple[str, dict]], device: str, threads: int) -> str:
    where = (
        f"fp32 on the CPU, {threads} torch thread(s)" if device == "cpu" else f"the model on {device} (`bf16: auto`)"
    )
    lines = [SECTION, "", *command_and_machine(), ""]
    lines += [
        f"Tiny random Llama (2 layers, hidden 16), synthetic rows in {CATEGORIES} categories split with "
        f"`partition=dirichlet` (alpha 0.5), FedIT, {LOCAL_STEPS} local steps of batch 2, max_length 64, "
        f"{EVAL_EXAMPLES} test examples per client, {where}. Marginal = (wall of a 4-round run - wall "
        "of a 1-round run) / 3 rounds, all included (training, evaluation, state, checkpoint, metrics).",
        "",
        "| code | clients | sampled per round | 1-round run (s) | 4-round run (s) | marginal round (s) "
        "| per client-round (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, m in rows:
        lines.append(
            f"| {label} | {m['clients']} | {m['sampled']} | {m['wall_1']:.1f} | {m['wall_4']:.1f} | "
            f"{m['round_s']:.2f} | **{m['per_client_round_s']:.3f}** |"
        )
    lines += [
        "",
        "The sampling row: its round wall divided by the sampled clients is what a client round costs there. With a "
        "coordinator that evaluates every client every round, a round also pays one evaluation per client of the "
        "federation (64 here), not per sampled client; evaluating only the sampled clients is the coordinator's "
        "`eval_clients` policy.",
    ]
    after = [m for label, m in rows if label.startswith("this") and m["fraction"] == 1.0]
    if after:
        ok = after[0]["per_client_round_s"] <= GOAL_S
        lines += ["", f"Goal <= {GOAL_S} s per client-round (16 clients, all sampled): {'met' if ok else 'missed'}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline-src", type=Path, help="also measure another checkout's src/ (e.g. main's)")
    p.add_argument("--baseline-label", default="main")
    p.add_argument("--skip-sampling", action="store_true", help="only the 16-client run")
    p.add_argument("--baseline-skip-sampling", action="store_true", help="only the 16-client run of the baseline")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--device", default="cpu", help="where the tiny model runs (cpu: 2 threads; cuda: bf16 auto)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads on CPU (1: a hidden-16 model gains nothing from more, and on a shared 2-core "
        "machine a second spinning thread costs more than it gives)",
    )
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(int(args.child[0]), float(args.child[1]), args.child[2], int(args.child[3]))
        return
    configs = [(16, 1.0)] + ([] if args.skip_sampling else [(64, 0.1)])
    sources = [(args.baseline_label, args.baseline_src)] if args.baseline_src else []
    sources.append(("this branch", REPO_ROOT / "src"))
    rows = []
    for label, src in sources:
        for clients, fraction in configs[:1] if src == args.baseline_src and args.baseline_skip_sampling else configs:
            m = measure(src, clients, fraction, args.device, args.threads)
            print(label, json.dumps(m), flush=True)
            rows.append((label, m))
    section = render(rows, args.device, args.threads)
    publish(SECTION, section, write=not args.no_write)


if __name__ == "__main__":
    main()
