"""How much of a round's wall time is the training and evaluation compute the round exists for?

Per round of an in-process federated run ([`FederatedSimulation`]), three clocks against the round's wall time (from
the client sampling, `Coordinator.plan_round`, to the committed checkpoint, `Coordinator.commit_round`):

- **train steps**: inside the local optimizer steps, from the Trainer's `on_step_begin` to its `on_step_end`
  (forward and backward of every micro-batch, gradient clipping, the optimizer step, PerFIT's mask hooks);
- **search**: PerFIT's foresight search (its scoring passes before the first step, `PerFITPruningCallback.on_train_begin`);
- **eval**: inside `evaluate_perplexity` (the evaluation forward passes and their loss), minus the one-time building
  of a test split's padded batches.

`compute = train steps + search + eval`; what is left (`wall - compute`) is the engine's fixed cost: client state
swaps, the Trainer's per-round set-up (data loader, optimizer), batch collation, aggregation, personalization,
records and the checkpoint. On CUDA every clock synchronizes the device at both ends, so asynchronous kernels are
counted where they run. Goal (issue 15, on a GPU): round wall / compute <= 1.3.

Models: `tiny` (the tests' random Llama, 2 layers, hidden 16, and character tokenizer: its steps take milliseconds, so
this is the fixed cost's worst case) or any `model_name_or_path` (`smollm2-135m-instruct`: the local preset, nothing
is downloaded). Data: synthetic instruction rows in 8 categories split with a Dirichlet partition (default), or
`--data` (a file, or a per-client folder such as FLAN-8: its first `--clients` clients).

    python benchmarks/compute_ratio.py --model tiny                        # writes its section of docs/benchmarks.md
    python benchmarks/compute_ratio.py --model smollm2-135m-instruct --clients 4 --rounds 2 --local-steps 2 \\
        --eval-examples 8 --threads 1
    python benchmarks/compute_ratio.py --model tiny smollm2-135m-instruct --device cuda \\
        --data .gpu/b/flan8 --clients 8 --rounds 3 --local-steps 6 --batch-size 4 --max-length 128   # a GPU run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import DOC_PATH, REPO_ROOT, command_and_machine, update_doc  # noqa: E402

GOAL = 1.3
CATEGORIES = 8


def section_title(model: str) -> str:
    return f"## Round wall against training and evaluation compute, {model} (benchmarks/compute_ratio.py)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", default=["tiny"], help="`tiny` and/or model names or paths, one run each")
    p.add_argument("--data", default=None, help="a dataset file or per-client folder (default: synthetic rows)")
    p.add_argument("--strategy", default="fedit")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--eval-examples", type=int, default=4)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto (CUDA when visible), cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", dest="write", action="store_false", help="print only, leave docs/benchmarks.md")
    p.add_argument("--output", type=Path, default=DOC_PATH, help="markdown file to update")
    return p.parse_args(argv)


class Clocks:
    """Accumulates seconds per round and kind; `sync()` waits for the device's queued kernels (CUDA) first."""

    def __init__(self, device: str) -> None:
        import torch

        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.round: int | None = None
        self.seconds: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    def sync(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def add(self, kind: str, seconds: float) -> None:
        if self.round is not None:
            self.seconds[self.round][kind] += seconds


@contextlib.contextmanager
def instrumented(clocks: Clocks) -> Iterator[Clocks]:
    """Put `clocks` into the engine for the duration of the block: a benchmark-only patch of this process, undone at
    the end (the Trainer gets one more callback, PerFIT's search callback and the evaluation function a timer around
    them; no number changes)."""
    from transformers import TrainerCallback

    from hf_perfit import callbacks as perfit_callbacks
    from hf_perfit.federated import client as client_mod
    from hf_perfit.federated import simulation as sim_mod

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = clocks.sync()

        def on_step_end(self, args, state, control, **kwargs):
            clocks.add("train", clocks.sync() - self.t0)

    def timed(kind: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = clocks.sync()
            try:
                return fn(*args, **kwargs)
            finally:
                clocks.add(kind, clocks.sync() - t0)

        return wrapper

    init = client_mod._LocalTrainer.__init__

    def timed_init(self, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.trainer.add_callback(StepClock())

    patches = [
        (client_mod._LocalTrainer, "__init__", timed_init),
        (
            perfit_callbacks.PerFITPruningCallback,
            "on_train_begin",
            timed("search", perfit_callbacks.PerFITPruningCallback.on_train_begin),
        ),
        (client_mod, "_eval_batches", timed("eval_setup", client_mod._eval_batches)),
        (sim_mod, "evaluate_perplexity", timed("eval_call", sim_mod.evaluate_perplexity)),
    ]
    originals = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, new in patches:
        setattr(obj, name, new)
    try:
        yield clocks
    finally:
        for obj, name, old in originals:
            setattr(obj, name, old)


def synthetic_clients(clients: int, seed: int):
    from datasets import Dataset

    from hf_perfit.data import partition_dataset

    rows = [
        {"instruction": f"Task {c}: echo {i}", "context": "", "response": f"{c}{i}{c} done", "category": f"c{c}"}
        for c in range(CATEGORIES)
        for i in range(max(40, 3 * clients))
    ]
    return partition_dataset(
        Dataset.from_list(rows), clients, method="dirichlet", alpha=0.5, seed=seed, test_fraction=0.2
    )


def run_one(model_name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One run of `model_name`; returns the per-round clocks and the run's description."""
    import torch

    from hf_perfit.federated import FederatedConfig, FederatedSimulation
    from hf_perfit.federated.runtime import load_clients, load_model

    tiny = model_name == "tiny"
    with tempfile.TemporaryDirectory(prefix="compute_ratio_") as tmp:
        config = FederatedConfig(
            model_name_or_path="unused" if tiny else model_name,
            **({"dataset_name": args.data} if args.data else {}),
            strategy=args.strategy,
            num_clients=args.clients,
            num_rounds=args.rounds,
            local_steps=args.local_steps,
            search_steps=min(args.local_steps, 10),
            per_device_train_batch_size=args.batch_size,
            max_length=args.max_length,
            lora_r=2 if tiny else args.lora_r,
            lora_alpha=4 if tiny else 2 * args.lora_r,
            max_eval_examples=args.eval_examples,
            eval_batch_size=args.eval_batch_size,
            device=args.device,
            seed=args.seed,
            output_dir=f"{tmp}/run",
        )
        if tiny:
            sys.path.insert(0, str(REPO_ROOT))
            from hf_perfit.federated.runtime import resolve_device
            from tests.conftest import build_tokenizer, tiny_llama

            model, tokenizer = tiny_llama().to(resolve_device(config)), build_tokenizer()
        else:
            model, tokenizer = load_model(config)
        clients = load_clients(config)[: args.clients] if args.data else synthetic_clients(args.clients, args.seed)
        if len(clients) != args.clients:
            raise SystemExit(f"--data {args.data} has {len(clients)} clients, fewer than --clients {args.clients}.")
        device = str(next(model.parameters()).device)
        clocks = Clocks(device)
        walls: dict[int, float] = {}

        class Timed(FederatedSimulation):
            def plan_round(self, r: int):
                clocks.round = r
                walls[r] = clocks.sync()
                return super().plan_round(r)

            def commit_round(self, r: int, summary: dict[str, Any]) -> None:
                super().commit_round(r, summary)
                walls[r] = clocks.sync() - walls[r]
                clocks.round = None

        with instrumented(clocks):
            t0 = time.perf_counter()
            sim = Timed(config, model=model, tokenizer=tokenizer, clients=clients)
            setup = time.perf_counter() - t0
            summary = sim.run()
        dtype = str(next(p for p in sim.transport.model.parameters() if not p.requires_grad).dtype).replace(
            "torch.", ""
        )
    rounds = []
    for r in sorted(walls):
        s = clocks.seconds[r]
        eval_s = max(0.0, s["eval_call"] - s["eval_setup"])
        compute = s["train"] + s["search"] + eval_s
        rounds.append(
            {
                "round": r,
                "wall": walls[r],
                "train": s["train"],
                "search": s["search"],
                "eval": eval_s,
                "compute": compute,
                "ratio": walls[r] / compute if compute > 0 else float("nan"),
            }
        )
    return {
        "model": model_name,
        "device": device,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "setup": setup,
        "mean_perplexity": float(summary["mean_perplexity"]),
        "rounds": rounds,
    }


def render(result: dict[str, Any], args: argparse.Namespace) -> str:
    rounds = result["rounds"]
    later = rounds[1:] or rounds
    total = {k: sum(r[k] for r in later) for k in ("wall", "train", "search", "eval", "compute")}
    ratio = total["wall"] / total["compute"] if total["compute"] > 0 else float("nan")
    data = args.data or f"synthetic rows in {CATEGORIES} categories, Dirichlet split (alpha 0.5)"
    lines = [
        section_title(result["model"]),
        "",
        *command_and_machine(),
        f"- model on {result['device']}, base weights {result['dtype']}, {result['threads']} torch thread(s)",
        "",
        f"Run: {result['model']}, {args.strategy}, {args.clients} clients (all sampled), {args.rounds} rounds of "
        f"{args.local_steps} local steps of batch {args.batch_size}, max_length {args.max_length}, "
        f"{args.eval_examples} eval examples per client (batch {args.eval_batch_size}); data: {data}. Set-up "
        f"(model wrap, tokenization, base-model evaluation, checkpoint 0): {result['setup']:.1f} s. Mean personalized "
        f"perplexity at the end: {result['mean_perplexity']:.3f}.",
        "",
        "| round | wall (s) | train steps (s) | search (s) | eval (s) | compute (s) | wall / compute |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rounds:
        lines.append(
            f"| {r['round']} | {r['wall']:.3f} | {r['train']:.3f} | {r['search']:.3f} | {r['eval']:.3f} | "
            f"{r['compute']:.3f} | {r['ratio']:.2f} |"
        )
    which = "rounds 1+" if len(rounds) > 1 else "round 0"
    lines += [
        "",
        f"Over {which} (round 0 also builds the run's one local trainer): wall {total['wall']:.3f} s, compute "
        f"{total['compute']:.3f} s, **wall / compute = {ratio:.2f}** (goal on a GPU: <= {GOAL}); per client-round "
        f"{(total['wall'] - total['compute']) / (len(later) * args.clients):.4f} s of fixed cost.",
        "",
        "Clocks: train steps = the Trainer's `on_step_begin` .. `on_step_end` (forward, backward, clipping, optimizer "
        "step); search = PerFIT's foresight search; eval = `evaluate_perplexity` minus the one-time building of a test "
        "split's batches; on CUDA each clock synchronizes the device. Wall = `plan_round` .. `commit_round` (the "
        "checkpoint committed).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_num_threads(args.threads)
    for model in args.model:
        result = run_one(model, args)
        print(json.dumps(result))
        text = render(result, args)
        print(text)
        ratios = [r["ratio"] for r in result["rounds"][1:]]
        if ratios:
            print(f"median wall/compute over rounds 1+: {statistics.median(ratios):.2f}")
        if args.write:
            update_doc(args.output, section_title(model), text)
            print(f"updated {args.output}")


if __name__ == "__main__":
    main()
