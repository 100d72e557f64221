"""Personalized quality of every method on the 8-client FLAN benchmark (issue 9): mean personalized perplexity, its
ratio to FedIT, per-client perplexity, ROUGE-L of greedy answers, wall time and bytes sent.

SmolLM2-135M-Instruct on `../shared/data/flan8` (one FLAN task category per client, 300 training examples each,
evaluated on its own test split). Every method runs with the same rounds, local steps, batch, learning rate, seed and
the same trainable-parameter budget per client (that of a rank-r LoRA on the same target modules): `local`, `fedit`,
`fedprox`, `fedmut`, `fedqp` train exactly a rank-r LoRA; `perfit` expands it γ× and prunes back to the rank-r budget;
`fedamole` runs the authors' expert pool (rank-r experts, E = 30 per module, each to 2 clients, 2..8 per client: the
recipe's), and the table states its trainable parameters per client against the rank-r budget (`fedamole_pool`;
about 9.1× on SmolLM2 q/v) instead of shrinking the experts to fit the budget (rank-1 experts collapse its
reverse-selection assignment). The optional `perfit-hetero` row is PerFIT with per-client budget multipliers
(`--perfit-budget-multipliers`, the paper's resource heterogeneity). The `base` row is the model without an adapter.

The federated settings are a recipe-style YAML of `FederatedConfig` keys (`--config`, default
benchmarks/settings/flan8_default.yaml; docs/federated.md § Config keys) plus `--key value` overrides of those keys
(`--num_rounds 10 --local_steps 10 --max_eval_examples 50 --seed 1`), read by `hf_perfit.federated.federated_parser`
exactly as `perfit federate --config ... --key value` reads them; `--tiny` applies benchmarks/settings/tiny.yaml over
the YAML. PerFIT's keys (`expansion_factor`, `search_steps` (default: all of the first round's local steps), ...,
[`METHOD_KEYS`]) count for the PerFIT rows only, FedProx's μ, FedMut/FedQP's options and FedAMoLE's routing come from
recipes/smollm2-135m/<method>/config_flan8.yaml unless the YAML or an override sets them, and the benchmark sets the
model, data folder (`--data`), strategy, client count and run folder itself ([`PLACED_KEYS`]). The flags of the
benchmark's own settings ([`Settings`]: ROUGE-L, FedAMoLE's pool, the hetero row, the split) keep their dashed
names. The flags of the earlier version still work: `--rounds`, `--batch-size`, `--lr`, `--eval-examples`,
`--targets` are `--num_rounds`, `--per_device_train_batch_size`, `--learning_rate`, `--max_eval_examples`,
`--lora_target_modules` ([`OLD_FLAGS`]); `--local-steps`, `--lora-r`, ... are the keys' dashed spellings.

Each method is run through `hf_perfit.federated` (`FederatedSimulation(config).run()`, i.e. `run_federated`) into
`<output-root>/<method>`. A finished run there (same settings) is reused, a partial one resumed (`resume=True`), so
the table can be built one method at a time, and a killed run loses at most the round in progress. Wall time is
recorded per session in `<method>/wall_time.json` (setup + completed rounds + export, summed over the sessions of a
resumed run). After a run, each client's exported adapter (`clients/<id>/adapter`) is loaded on the base model and
answers the first `--rouge-examples` examples of its own test split greedily; answers and ROUGE-L
(`hf_perfit.evaluation.rouge_l`) are cached per client in `<method>/rouge.json`. Every invocation then rebuilds the
section of `docs/benchmarks.md` and `docs/quality_perplexity.png` from whatever runs are cached.

This file is the command line (its flags, the rows' loop, the commands that rebuild the table); the rest lives beside
it by what it holds: benchmarks/quality_setup.py (the settings, data folder, base model, FedAMoLE's pool and each row's
`FederatedConfig`), benchmarks/quality_run.py (a row's run made, resumed or reused, its wall time, ROUGE-L) and
benchmarks/quality_table.py (the results read back, the plot and the section of docs/benchmarks.md).

Default scale (benchmarks/settings/flan8_default.yaml): 3 rounds × 6 local steps of batch 4, max_length 128, lr 2e-4
(the recipes'), 40 test examples per client for perplexity (every round) and for ROUGE-L; chosen so that the seven
methods fit one working session on 2 cores (the measured times are in the table). The estimate that sized it, for 4
rounds and 50 examples (from the facts of this machine: a SmolLM2 optimizer step on 2×128 tokens takes ~1.5 s, on 4×256
~6 s):

- Token lengths with the SmolLM2 tokenizer (chat template incl. its default system prompt, prompt + answer) of the
  2,400 training examples: mean 88, median 83, p90 111, p95 132, p99 190, max 262; `max_length 128` keeps 94.5% of
  them whole (all of clients 0-2, 4 and 7, 99.3% of client 3's; it cuts the end of the answer of 28.7% of client 5's
  structure_to_text and 14.3% of client 6's text_formatting examples; 160 would keep 97.8% for ~4% more compute).
  Answers of the first 50 test examples per client: median 4 tokens, p90 32, p95 43.
- Training: a batch of 4 is padded to its longest example: 395 tokens per step on average (299-495 per client).
  At ~5.9 ms per token for forward + backward + AdamW (no activation checkpointing): ~2.3 s per step,
  ~20 s per client round with the trainer's setup, ~160 s per round for 8 clients.
- Evaluation (after every round and once for the base model, 50 test examples per client): 41,000 padded tokens
  forward only, ~2 ms per token: ~80 s per evaluation.
- ROUGE-L (50 examples per client, ≤ 32 new tokens, batch 8): ~2.5 min per method (prompt prefill ~9 s and up to
  7 × 32 cached decoding steps per client; short answers stop early).
- Total: 15 s setup + 80 s base evaluation + 4 × (160 + 80) s + 10 s export + 150 s ROUGE-L ≈ 20 min per method
  (PerFIT's rank-4r storage and FedAMoLE's routing within a few % of it).

On a loaded machine (load average above the 2 cores) PyTorch's two threads wait for each other at every operation
and everything takes several times longer; `--threads 1` then helps a lot. Measured here at load 3-6 with 2
threads: 4 optimizer steps of batch 4 in 63 s, perplexity of 50 test examples in 82 s, 8 greedy 32-token answers of
the base model in 135 s; at load ~4, 8 answers of 16 tokens took 5.2 s with 1 thread against 19.5 s with 2, and a
forward of 8×100 tokens 3.0 s against 7.4 s. Each run's `wall_time.json` records the load and thread count.

    python benchmarks/quality.py --methods base           # ROUGE-L of the base model (~3 min)
    python benchmarks/quality.py --methods fedit          # one method per call, ~20 min each; cached and resumable
    python benchmarks/quality.py --report-only            # rebuild the table and the plot from the cached runs
    python benchmarks/quality.py --split validation ...   # tune on held-out training examples, never the test split
    python benchmarks/quality.py --config benchmarks/settings/flan8_recipe.yaml --output-root outputs/q-r  # a setting
    python benchmarks/quality.py --methods perfit --learning_rate 1e-4 --output-root outputs/q-lr  # a YAML key changed
    python benchmarks/quality.py --tiny                   # smoke test: tiny random Llama, synthetic clients (~1 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import DOC_PATH, REPO_ROOT, update_doc  # noqa: E402
from quality_run import rouge_for, run_method  # noqa: E402
from quality_setup import (  # noqa: E402
    DEFAULT_CONFIG,
    FLAN8,
    HETERO,
    ROWS,
    TINY_CONFIG,
    TINY_DEFAULTS,
    Settings,
    _rel,
    available_methods,
    data_folder,
    stored_settings,
)
from quality_table import PLOT_NAME, PLOT_PATH, SECTION, collect, plot_rounds, render  # noqa: E402

OLD_FLAGS: dict[str, str] = {
    "--rounds": "--num_rounds",
    "--batch-size": "--per_device_train_batch_size",
    "--lr": "--learning_rate",
    "--eval-examples": "--max_eval_examples",
    "--targets": "--lora_target_modules",
}
"""The flags of benchmarks/quality.py before its settings became YAML (commit 6705756) whose name differs from the
`FederatedConfig` key they set (`--local-steps`, `--lora-r`, ... are the keys' dashed spellings, which the parser
takes as they are): still accepted, and written back as the key's flag."""


FLAGS: dict[str, str] = {
    "config": "--config",
    "rouge_examples": "--rouge-examples",
    "max_new_tokens": "--max-new-tokens",
    "fedamole_rank": "--fedamole-rank",
    "fedamole_experts": "--fedamole-experts",
    "data": "--data",
    "split": "--split",
    "validation_examples": "--validation-examples",
    "perfit_budget_multipliers": "--perfit-budget-multipliers",
}
"""Settings field -> command-line flag (the benchmark's own; `overrides` are written as they are)."""


def commands_for(s: Settings, root: Path, default_root: Path) -> list[str]:
    """The exact commands that build the table with these settings: one per row, then the report."""
    defaults = Settings(tiny=s.tiny, **(TINY_DEFAULTS if s.tiny else {}))
    flags: list[str] = ["--tiny"] if s.tiny else []
    if s.config_path().resolve() != defaults.config_path().resolve():
        flags += ["--config", _rel(s.config_path())]
    flags += s.overrides
    for name, flag in FLAGS.items():
        value, default = getattr(s, name), getattr(defaults, name)
        if name == "config" or (name == "data" and Path(value).expanduser().resolve() == Path(default).resolve()):
            continue
        if value != default:
            flags += [flag, *([str(v) for v in value] if isinstance(value, list) else [str(value)])]
    if root.resolve() != default_root.resolve():
        flags += ["--output-root", _rel(root)]
    base = ["python", "benchmarks/quality.py"]
    rows = [m for m in ROWS if m != HETERO or s.perfit_budget_multipliers]
    return [shlex.join([*base, "--methods", m, *flags]) for m in rows] + [shlex.join([*base, "--report-only", *flags])]


def federated_flags(argv: list[str]) -> list[str]:
    """`--key value` flags of `FederatedConfig` keys as the parser reads them: `--key_name` (dashes are the same key
    to the parser, underscores are how the docs and YAML spell it), old benchmark flags renamed ([`OLD_FLAGS`])."""
    out = []
    for arg in argv:
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            name = OLD_FLAGS.get(name, "--" + name[2:].replace("-", "_"))
            arg = name + eq + value
        out.append(arg)
    return out


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    """The benchmark's own flags, and the federated settings: `--config` (a YAML of `FederatedConfig` keys) plus every
    other `--key value` flag as an override of a `FederatedConfig` key (refused, naming the key to use, when there is
    no such key)."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        allow_abbrev=False,
        epilog="Any other --key value sets a FederatedConfig key over the YAML, as `perfit federate` reads it "
        "(docs/federated.md § Config keys), e.g. --num_rounds 10 --local_steps 10 --max_eval_examples 50 --seed 1.",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(ROWS),
        choices=[*ROWS, "all"],
        metavar="METHOD",
        help=f"rows to run (default: all): {', '.join(ROWS)}",
    )
    p.add_argument("--output-root", type=Path, help="cached runs (default: outputs/quality, -tiny, -validation)")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild the table and plot from the cached runs (their own settings; setting flags are ignored)",
    )
    p.add_argument("--no-write", action="store_true", help="print the section; leave docs/ alone")
    p.add_argument("--tiny", action="store_true", help="tiny random Llama + synthetic clients (never writes docs/)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    p.add_argument(
        "--config",
        help=f"the federated settings: a YAML of FederatedConfig keys (default: {DEFAULT_CONFIG}; "
        f"{_rel(TINY_CONFIG)} is applied over it with --tiny)",
    )
    p.add_argument("--rouge-examples", type=int, help="test examples per client answered for ROUGE-L")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--fedamole-rank", type=int, help="FedAMoLE expert rank (default: lora_r, the authors')")
    p.add_argument("--fedamole-experts", type=int, help="FedAMoLE experts per module (default: the recipe's 30)")
    p.add_argument(
        "--perfit-budget-multipliers",
        nargs="+",
        type=float,
        help=f"one budget multiplier per client: runs the {HETERO} row (e.g. 0.5 0.5 1 1 1 1 2 2)",
    )
    p.add_argument("--data", help=f"per-client folder (default: {_rel(FLAN8)}, i.e. ../shared/data/flan8)")
    p.add_argument(
        "--split",
        choices=["test", "validation"],
        help="test: the benchmark; validation: tune on held-out training examples (never the test split)",
    )
    p.add_argument(
        "--validation-examples", type=int, help="held-out training examples per client (--split validation)"
    )
    args, rest = p.parse_known_args(argv)
    if rest and not rest[0].startswith("--"):
        p.error(f"unexpected arguments {rest}; give every value after its --key.")
    base = {**dataclasses.asdict(Settings()), **(TINY_DEFAULTS if args.tiny else {}), "tiny": args.tiny}
    given = {k: v for k, v in vars(args).items() if k in base and v is not None}
    if args.config is not None and Path(args.config).expanduser().is_file():  # relative to the working directory
        given["config"] = _rel(Path(args.config).expanduser().resolve())
    settings = Settings(**{**base, **given, "overrides": federated_flags(rest)})
    settings.federated()  # a bad key or value fails now, naming it, not after the first run
    if "all" in args.methods:
        args.methods = list(ROWS)
    return args, settings


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args, s = parse_args(argv)
    warnings.filterwarnings("ignore")
    import datasets
    import torch

    datasets.disable_progress_bars()
    if args.threads:
        torch.set_num_threads(args.threads)
    suffix = "-tiny" if s.tiny else ""
    suffix += "-validation" if s.split == "validation" else ""
    default_root = REPO_ROOT / "outputs" / f"quality{suffix}"
    root = (args.output_root or default_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    failures = []
    if not args.report_only:
        from hf_perfit.data import load_client_folder

        data = data_folder(s, root)
        clients = load_client_folder(data)
        client_ids = [c.client_id for c in clients]
        unavailable = available_methods()
        base_cache: dict[str, Any] = {}
        for row in [r for r in ROWS if r in args.methods]:
            if row == HETERO and not s.perfit_budget_multipliers:
                if args.methods != list(ROWS):  # asked for by name
                    print(f"[{row}] skipped: give --perfit-budget-multipliers (one per client)")
                continue
            if row != "base" and unavailable[row]:
                print(f"[{row}] not available: {unavailable[row]}")
                continue
            try:
                if row != "base":
                    run_method(row, s, root, data, client_ids)
                rouge_for(row, s, root, clients, base_cache)
            except SystemExit:
                raise
            except Exception:  # one broken method must not cost the others their runs
                traceback.print_exc()
                failures.append(row)
                print(f"[{row}] FAILED (see above); continuing with the other methods")
    results = {row: collect(root, row) for row in ROWS}
    finished = {m: r for m, r in results.items() if m != "base" and r}
    plots = [root / PLOT_NAME]
    write = not args.no_write and not s.tiny and s.split == "test"  # docs/ hold the real benchmark only
    if finished:
        title = "mean personalized perplexity per round" + (
            " (tiny smoke test)" if s.tiny else " on FLAN-8, SmolLM2-135M-Instruct"
        )
        plot_rounds(finished, plots + ([PLOT_PATH] if write else []), title)
    shown = stored_settings(root) if args.report_only else None
    section = render(results, shown or s, root, commands_for(shown or s, root, default_root))
    print(section)
    if write:
        update_doc(DOC_PATH, SECTION, section)
        print(f"wrote {DOC_PATH} and {PLOT_PATH}")
    elif not args.no_write:
        print(f"--tiny and --split validation never write docs/ (as --no-write); the plot is in {plots[0]}")
    if failures:
        print(f"failed: {', '.join(failures)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
