"""What does PerFIT cost per optimizer step, compared with vanilla PEFT LoRA?

One process, one base model (SmolLM2-135M-Instruct from the `smollm2-135m-instruct` preset when it is available, else
a tiny random Llama built here), four adapters on four copies of it:

1. `lora_r`:        vanilla PEFT LoRA at rank r;
2. `lora_gr`:       vanilla PEFT LoRA at rank γ·r (lora_alpha·γ, so the scale lora_alpha/r is the same);
3. `perfit_search`: PerFIT while the search runs (search_steps so large that it never ends during the measurement;
                    by default pruned once to the first level of the schedule, so the step does the importance EMA
                    *and* the gradient/weight masking, i.e. the steady state between two pruning iterations);
4. `perfit_after`:  PerFIT after the search (run to completion first, untimed), masks fixed at the rank-r budget.

One timed optimizer step is forward + backward + `before_optimizer_step` + `AdamW.step` + `after_optimizer_step` +
`zero_grad` (the PerFIT hooks only in the PerFIT arms), on the same fixed random token batches for every arm. The arms
are interleaved in rounds (a few steps of each arm per round, in a rotating order) so that load changes on a shared
machine hit all arms alike; medians and IQRs are over all timed steps. The PerFIT hooks are also timed on their own.

Writes (replacing only its own section) `docs/benchmarks.md`.

    python benchmarks/step_overhead.py                     # defaults: batch 2 x 128 tokens, r=8, γ=4, q_proj,v_proj
    python benchmarks/step_overhead.py --batch-size 4 --seq-len 256 --rounds 24
    python benchmarks/step_overhead.py --tiny --rounds 2 --no-write   # quick smoke run
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import REPO_ROOT, command_and_machine, machine_info, update_doc  # noqa: E402

PRESET = "smollm2-135m-instruct"
SECTION = "## Step overhead (benchmarks/step_overhead.py)"
GOAL_AFTER_VS_GR = 1.05
GOAL_AFTER_VS_R = 1.15
ARM_ORDER = ("lora_r", "lora_gr", "perfit_search", "perfit_after")


@dataclass
class Arm:
    key: str
    label: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    perfit: nn.Module | None = None  # the PerFITModel, for the PerFIT arms
    trained: int = 0  # adapter elements that train (kept elements for PerFIT)
    stored: int = 0  # adapter elements stored in the dense LoRA tensors
    step_s: list[float] = field(default_factory=list)
    hook_s: list[float] = field(default_factory=list)
    round_median_s: list[float] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch-size", type=int, default=2, help="sequences per batch (default 2)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--r", type=int, default=8, help="base LoRA rank r (default 8)")
    p.add_argument("--gamma", type=int, default=4, help="PerFIT expansion factor γ (default 4)")
    p.add_argument("--lora-alpha", type=float, default=None, help="lora_alpha of the rank-r LoRA (default 2·r)")
    p.add_argument("--target-modules", default="q_proj,v_proj", help="comma-separated (default q_proj,v_proj)")
    p.add_argument("--rounds", type=int, default=48, help="interleaved rounds (default 48)")
    p.add_argument("--steps-per-round", type=int, default=1, help="timed steps of each arm per round (default 1)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per arm (default 3)")
    p.add_argument(
        "--search-steps", type=int, default=8, help="search_steps of the perfit_after arm (run untimed; default 8)"
    )
    p.add_argument("--prune-iterations", type=int, default=4, help="prune_iterations of both PerFIT arms (default 4)")
    p.add_argument(
        "--search-phase",
        choices=("masked", "dense"),
        default="masked",
        help="perfit_search arm: 'masked' = after the first pruning iteration (importance EMA + masking, default);\n"
        "'dense' = before it (importance EMA only, nothing pruned yet)",
    )
    p.add_argument("--num-batches", type=int, default=4, help="distinct fixed random batches, cycled (default 4)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--hook-reps", type=int, default=30, help="repetitions of each hook in the breakdown (default 30)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: leave torch's default; 1 avoids OpenMP stalls when\n"
        "other processes share the cores)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="use the tiny random Llama even if the preset is available")
    p.add_argument("--output", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md", help="markdown file to update")
    p.add_argument("--no-write", action="store_true", help="print only; do not update the markdown file")
    args = p.parse_args(argv)
    args.targets = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    if args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.r
    for name in ("batch_size", "seq_len", "r", "gamma", "rounds", "steps_per_round", "num_batches", "hook_reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.search_steps < args.prune_iterations:
        p.error("--search-steps must be >= --prune-iterations")
    if (args.r * args.gamma) % 2:
        p.error("r·γ must be even (PerFIT's symmetric init splits the expanded rank in two halves)")
    if not args.targets:
        p.error("--target-modules is empty")
    return args


# ---------------------------------------------------------------------- model and data


def load_base(args: argparse.Namespace) -> tuple[nn.Module, str, bool]:
    """The base model, a description, and whether it is the real SmolLM2 preset."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from hf_perfit.presets import is_preset_available, resolve_model_path

    torch.manual_seed(args.seed)
    if not args.tiny and is_preset_available(PRESET):
        path = resolve_model_path(PRESET)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return model, f"SmolLM2-135M-Instruct (preset `{PRESET}`, fp32)", True
    why = "--tiny given" if args.tiny else f"preset `{PRESET}` not available"
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max(512, args.seq_len),
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    return model, f"tiny random Llama (4 layers, hidden 256, vocab 4096, fp32; {why})", False


def make_batches(args: argparse.Namespace, vocab_size: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(args.seed + 1)
    return [
        torch.randint(0, vocab_size, (args.batch_size, args.seq_len), generator=gen) for _ in range(args.num_batches)
    ]


def adapter_elements(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def train_step(arm: Arm, batch: torch.Tensor) -> tuple[float, float]:
    """One optimizer step; returns (step seconds, PerFIT hook seconds)."""
    t0 = time.perf_counter()
    loss = arm.model(input_ids=batch, labels=batch).loss
    loss.backward()
    h0 = time.perf_counter()
    if arm.perfit is not None:
        arm.perfit.before_optimizer_step()
    h1 = time.perf_counter()
    arm.optimizer.step()
    h2 = time.perf_counter()
    if arm.perfit is not None:
        arm.perfit.after_optimizer_step()
    h3 = time.perf_counter()
    arm.optimizer.zero_grad(set_to_none=True)
    t1 = time.perf_counter()
    if not torch.isfinite(loss.detach()):
        raise RuntimeError(f"{arm.key}: non-finite loss {loss.item()}")
    return t1 - t0, (h1 - h0) + (h3 - h2)


def build_arms(args: argparse.Namespace, base: nn.Module, batches: list[torch.Tensor]) -> dict[str, Arm]:
    from peft import LoraConfig, get_peft_model

    from hf_perfit import PerFITLoraConfig, get_perfit_model
    from hf_perfit.importance import keep_schedule

    r, g, alpha = args.r, args.gamma, args.lora_alpha
    bases = [copy.deepcopy(base) for _ in range(len(ARM_ORDER) - 1)] + [base]  # PEFT injects layers in place
    arms: dict[str, Arm] = {}

    def perfit_config(search_steps: int) -> PerFITLoraConfig:
        return PerFITLoraConfig(
            r=r,
            lora_alpha=alpha,
            target_modules=args.targets,
            lora_dropout=0.0,
            expansion_factor=g,
            search_steps=search_steps,
            prune_iterations=args.prune_iterations,
        )

    torch.manual_seed(args.seed)
    m = get_peft_model(bases[0], LoraConfig(r=r, lora_alpha=alpha, target_modules=args.targets, lora_dropout=0.0))
    n = adapter_elements(m)
    arms["lora_r"] = Arm("lora_r", f"LoRA r={r}", m, make_optimizer(m, args.lr), trained=n, stored=n)

    torch.manual_seed(args.seed)
    cfg = LoraConfig(r=g * r, lora_alpha=alpha * g, target_modules=args.targets, lora_dropout=0.0)
    m = get_peft_model(bases[1], cfg)
    n = adapter_elements(m)
    arms["lora_gr"] = Arm("lora_gr", f"LoRA r={g * r} (γr)", m, make_optimizer(m, args.lr), trained=n, stored=n)

    torch.manual_seed(args.seed)
    m = get_perfit_model(bases[2], perfit_config(10**9))  # never reaches a scheduled pruning iteration
    arm = Arm("perfit_search", "PerFIT during search", m, make_optimizer(m, args.lr), perfit=m)
    m.train()
    if args.search_phase == "masked":
        train_step(arm, batches[0])  # gives the importance EMA its first batch
        m.prune_to(keep_schedule(m.expanded_size(), m.trainable_budget(), args.prune_iterations)[0])
    arm.trained, arm.stored = m.num_kept(), m.expanded_size()
    arms[arm.key] = arm

    torch.manual_seed(args.seed)
    m = get_perfit_model(bases[3], perfit_config(args.search_steps))
    arm = Arm("perfit_after", "PerFIT after search", m, make_optimizer(m, args.lr), perfit=m)
    m.train()
    steps = 0
    with tqdm(total=args.search_steps, desc="perfit_after: search (untimed)", leave=False) as bar:
        while m.is_searching:
            train_step(arm, batches[steps % len(batches)])
            steps += 1
            bar.update(1)
    if m.num_kept() != m.trainable_budget():
        raise RuntimeError(f"search ended with {m.num_kept()} kept elements, budget {m.trainable_budget()}")
    arm.trained, arm.stored = m.num_kept(), m.expanded_size()
    arms[arm.key] = arm

    for a in arms.values():
        a.model.train()
    return arms


# ---------------------------------------------------------------------- measurement


def measure(args: argparse.Namespace, arms: dict[str, Arm], batches: list[torch.Tensor]) -> None:
    keys = list(ARM_ORDER)
    for key in keys:  # warm-up: allocator, thread pool, AdamW state
        for i in range(args.warmup):
            train_step(arms[key], batches[i % len(batches)])
    total = args.rounds * args.steps_per_round * len(keys)
    with tqdm(total=total, desc="timed steps", unit="step") as bar:
        for rnd in range(args.rounds):
            order = keys[rnd % len(keys) :] + keys[: rnd % len(keys)]  # rotate who goes first
            for key in order:
                arm, times = arms[key], []
                for k in range(args.steps_per_round):
                    step_s, hook_s = train_step(arm, batches[(rnd * args.steps_per_round + k) % len(batches)])
                    times.append(step_s)
                    arm.hook_s.append(hook_s)
                    bar.set_postfix_str(f"round {rnd + 1}/{args.rounds} {key} {step_s * 1e3:.0f} ms")
                    bar.update(1)
                arm.step_s.extend(times)
                arm.round_median_s.append(statistics.median(times))
    if not arms["perfit_search"].perfit.is_searching:
        raise RuntimeError("the perfit_search arm finished its search during the measurement")
    if arms["perfit_after"].perfit.is_searching:
        raise RuntimeError("the perfit_after arm is searching again")


def _median_of(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hook_breakdown(args: argparse.Namespace, arms: dict[str, Arm], batch: torch.Tensor) -> dict[str, dict[str, float]]:
    """Median seconds of each PerFIT hook and of its parts, called on their own with real gradients present."""
    out: dict[str, dict[str, float]] = {}
    for key in ("perfit_search", "perfit_after"):
        arm, m = arms[key], arms[key].perfit
        arm.model(input_ids=batch, labels=batch).loss.backward()
        rows = {
            "before_optimizer_step": _median_of(m.before_optimizer_step, args.hook_reps),
            "after_optimizer_step": _median_of(m.after_optimizer_step, args.hook_reps),
            "mask_gradients": _median_of(m.mask_gradients, args.hook_reps),
            "apply_masks": _median_of(m.apply_masks, args.hook_reps),
        }
        if key == "perfit_search":
            rows["accumulate_importance"] = _median_of(m.accumulate_importance, args.hook_reps)
            kept = m.num_kept()
            rows["one pruning iteration (prune_to)"] = _median_of(lambda m=m, kept=kept: m.prune_to(kept), 3)
        arm.optimizer.zero_grad(set_to_none=True)
        out[key] = rows
    return out


# ---------------------------------------------------------------------- report


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def paired_ratio(arms: dict[str, Arm], num: str, den: str) -> tuple[float, float, float]:
    """Median, min and max over rounds of (round median of `num`) / (round median of `den`)."""
    ratios = [a / b for a, b in zip(arms[num].round_median_s, arms[den].round_median_s, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def bootstrap_ratio_ci(
    arms: dict[str, Arm], num: str, den: str, steps_per_round: int, reps: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95% bootstrap interval of median(num) / median(den), resampling whole rounds (both arms' steps of a round
    together), so that a slow round weighs on both sides as in the measurement."""
    import random

    rng = random.Random(seed)
    n_rounds = len(arms[num].round_median_s)
    a, b = arms[num].step_s, arms[den].step_s
    ratios = []
    for _ in range(reps):
        picks = [rng.randrange(n_rounds) for _ in range(n_rounds)]
        xs = [t for i in picks for t in a[i * steps_per_round : (i + 1) * steps_per_round]]
        ys = [t for i in picks for t in b[i * steps_per_round : (i + 1) * steps_per_round]]
        ratios.append(statistics.median(xs) / statistics.median(ys))
    ratios.sort()
    return ratios[int(0.025 * reps)], ratios[int(0.975 * reps) - 1]


def summarize(arms: dict[str, Arm]) -> dict[str, dict[str, float]]:
    stats = {}
    for key, arm in arms.items():
        q1, med, q3 = quartiles(arm.step_s)
        stats[key] = {
            "median": med,
            "q1": q1,
            "q3": q3,
            "min": min(arm.step_s),
            "n": len(arm.step_s),
            "hook": statistics.median(arm.hook_s),
        }
    return stats


def results_table(arms: dict[str, Arm], stats: dict[str, dict[str, float]]) -> str:
    ref_r, ref_gr = stats["lora_r"]["median"], stats["lora_gr"]["median"]
    lines = [
        "| arm | adapter elements trained / stored | median step (ms) | IQR (ms) | fastest (ms) | steps "
        "| PerFIT hooks (ms, median) | × LoRA(r) | × LoRA(γr) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in ARM_ORDER:
        arm, s = arms[key], stats[key]
        hook = f"{s['hook'] * 1e3:.2f}" if arm.perfit is not None else "–"
        lines.append(
            f"| {arm.label} | {arm.trained:,} / {arm.stored:,} | {s['median'] * 1e3:.1f} | "
            f"{s['q1'] * 1e3:.1f} – {s['q3'] * 1e3:.1f} | {s['min'] * 1e3:.1f} | {s['n']} | {hook} | {s['median'] / ref_r:.3f} | "
            f"{s['median'] / ref_gr:.3f} |"
        )
    return "\n".join(lines)


def ratios_table(
    arms: dict[str, Arm], stats: dict[str, dict[str, float]], steps_per_round: int
) -> tuple[str, dict[str, float | tuple[float, float]]]:
    rows = [
        ("PerFIT after search / LoRA(γr)", "perfit_after", "lora_gr", GOAL_AFTER_VS_GR),
        ("PerFIT after search / LoRA(r)", "perfit_after", "lora_r", GOAL_AFTER_VS_R),
        ("PerFIT during search / LoRA(γr)", "perfit_search", "lora_gr", None),
        ("LoRA(γr) / LoRA(r)", "lora_gr", "lora_r", None),
    ]
    lines = [
        "| ratio | of medians | 95% CI (bootstrap over rounds) | per-round paired: median [min, max] "
        "| of fastest steps | goal |",
        "|---|---:|---:|---:|---:|---|",
    ]
    values = {}
    for name, num, den, goal in rows:
        ratio = stats[num]["median"] / stats[den]["median"]
        values[f"{num}/{den}"] = ratio
        ci_lo, ci_hi = bootstrap_ratio_ci(arms, num, den, steps_per_round)
        values[f"{num}/{den} ci"] = (ci_lo, ci_hi)
        pm, lo, hi = paired_ratio(arms, num, den)
        verdict = "–"
        if goal is not None:
            verdict = f"≤ {goal:.2f}: {'met' if ratio <= goal else '**missed**'}"
            if ci_lo <= goal < ci_hi:
                verdict += " (CI straddles the goal)"
        lines.append(
            f"| {name} | {ratio:.3f} | {ci_lo:.3f} – {ci_hi:.3f} | {pm:.3f} [{lo:.3f}, {hi:.3f}] | "
            f"{stats[num]['min'] / stats[den]['min']:.3f} | {verdict} |"
        )
    return "\n".join(lines), values


def breakdown_table(breakdown: dict[str, dict[str, float]]) -> str:
    lines = ["| call (on its own, gradients present) | during search (ms) | after search (ms) |", "|---|---:|---:|"]
    names = list(dict.fromkeys([*breakdown["perfit_search"], *breakdown["perfit_after"]]))
    for name in names:
        cells = [
            f"{breakdown[k][name] * 1e3:.2f}" if name in breakdown[k] else "–"
            for k in ("perfit_search", "perfit_after")
        ]
        lines.append(f"| `{name}` | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def reading(
    args: argparse.Namespace,
    arms: dict[str, Arm],
    stats: dict[str, dict[str, float]],
    values: dict[str, float | tuple[float, float]],
    breakdown: dict[str, dict[str, float]],
) -> str:
    """The one-paragraph reading of the numbers, written from them."""
    after, gr, search = stats["perfit_after"], stats["lora_gr"], stats["perfit_search"]
    a_gr, a_r = values["perfit_after/lora_gr"], values["perfit_after/lora_r"]
    (gr_lo, gr_hi), (r_lo, r_hi) = values["perfit_after/lora_gr ci"], values["perfit_after/lora_r ci"]
    s_gr, gr_r = values["perfit_search/lora_gr"], values["lora_gr/lora_r"]
    grr_lo, grr_hi = values["lora_gr/lora_r ci"]
    ok_gr, ok_r = a_gr <= GOAL_AFTER_VS_GR, a_r <= GOAL_AFTER_VS_R
    hook_after, hook_search = after["hook"], search["hook"]
    hook_pct = 100 * hook_after / after["median"]
    prune_s = breakdown["perfit_search"]["one pruning iteration (prune_to)"]

    def verdict(ok: bool, goal: float, lo: float, hi: float) -> str:
        if lo <= goal < hi:
            return f"{'met' if ok else 'missed'} on the point estimate, but the interval straddles the goal"
        return "met" if ok else "missed"

    paired_gr = paired_ratio(arms, "perfit_after", "lora_gr")[0]
    paired_r = paired_ratio(arms, "perfit_after", "lora_r")[0]
    text = [
        f"After the search PerFIT takes {after['median'] * 1e3:.0f} ms per step: {a_gr:.3f}× a rank-γr LoRA "
        f"(95% CI {gr_lo:.3f}–{gr_hi:.3f}; goal ≤ {GOAL_AFTER_VS_GR}: {verdict(ok_gr, GOAL_AFTER_VS_GR, gr_lo, gr_hi)}) "
        f"and {a_r:.3f}× a rank-r LoRA (95% CI {r_lo:.3f}–{r_hi:.3f}; goal ≤ {GOAL_AFTER_VS_R}: "
        f"{verdict(ok_r, GOAL_AFTER_VS_R, r_lo, r_hi)}); compared round by round, where both arms saw the same "
        f"load, the ratios are {paired_gr:.3f} and {paired_r:.3f}.",
        f"PerFIT's own work after the search, `before_optimizer_step` + `after_optimizer_step` (one "
        f"`torch._foreach_mul_` of the gradients and one of the weights by the float masks), takes "
        f"{hook_after * 1e3:.2f} ms per step, {hook_pct:.2f}% of it;",
    ]
    if gr_lo <= 1.0 + hook_pct / 100 <= gr_hi or gr_hi < 1.0:
        text.append(
            "the rest of the difference to LoRA(γr) is measurement noise (the interval of the ratio contains the "
            "hooks' share), so after the search PerFIT costs what the dense rank-γr LoRA it is stored in costs."
        )
    else:
        text.append(
            f"that does not account for the whole difference to LoRA(γr) ({(after['median'] - gr['median']) * 1e3:.1f}"
            " ms), whose interval excludes the hooks' share: the rest is something else (cache or allocator effects "
            "of the four models, or load that hit this arm's rounds harder); see the hook breakdown below."
        )
    text.append(
        f"What separates PerFIT from LoRA(r) is that dense storage: pruned elements are zeros inside full "
        f"rank-{args.gamma * args.r} tensors, so forward, backward and AdamW run at rank γr; LoRA(γr) / LoRA(r) = "
        f"{gr_r:.3f} (95% CI {grr_lo:.3f}–{grr_hi:.3f})"
        + (
            ", small because the LoRA matmuls are small next to the frozen base model's."
            if gr_r <= GOAL_AFTER_VS_R
            else ", which is the cost to remove (compacting kept ranks, or smaller γ) for the LoRA(r) goal."
        )
    )
    text.append(
        f"During the search a step costs {s_gr:.3f}× LoRA(γr); the hooks, which then also fold |θ·g| into the "
        f"importance EMA, take {hook_search * 1e3:.2f} ms per step, and each pruning iteration (a global top-k over "
        f"{arms['perfit_search'].stored:,} elements) costs {prune_s * 1e3:.1f} ms once per "
        f"search_steps / prune_iterations steps."
    )
    return " ".join(text)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    load_start = os.getloadavg()[0]
    wall0 = time.perf_counter()
    base, model_desc, is_real = load_base(args)
    batches = make_batches(args, base.config.vocab_size)
    if not is_real:
        print(f"NOTE: the SmolLM2 preset is not used; measuring a {model_desc}.", flush=True)
    arms = build_arms(args, base, batches)
    del base
    measure(args, arms, batches)
    breakdown = hook_breakdown(args, arms, batches[0])
    load_end = os.getloadavg()[0]
    wall = time.perf_counter() - wall0

    stats = summarize(arms)
    slow = sum(t > 1.5 * stats[k]["min"] for k, arm in arms.items() for t in arm.step_s)
    disturbed = 100 * slow / sum(len(arm.step_s) for arm in arms.values())
    table = results_table(arms, stats)
    ratios, values = ratios_table(arms, stats, args.steps_per_round)
    hooks = breakdown_table(breakdown)
    info = machine_info()
    search_note = (
        "pruned once to the first level of the schedule (importance EMA + gradient and weight masking)"
        if args.search_phase == "masked"
        else "before the first pruning iteration (importance EMA only, no masking yet)"
    )
    settings = [
        f"- model: {model_desc}",
        f"- batch: {args.batch_size} × {args.seq_len} random tokens ({args.num_batches} fixed batches, cycled; the "
        "same batch sequence for every arm), causal-LM loss on the inputs",
        f"- adapters: r = {args.r}, γ = {args.gamma} (rank γr = {args.r * args.gamma}), lora_alpha = "
        f"{args.lora_alpha:g} (× γ for the rank-γr LoRA, same scale), lora_dropout = 0, targets "
        f"{', '.join(args.targets)}",
        f"- optimizer: torch.optim.AdamW, lr = {args.lr:g}; one step = forward + backward + before_optimizer_step + "
        "optimizer.step + after_optimizer_step + zero_grad (hooks in the PerFIT arms only)",
        f"- PerFIT during search: search_steps = 10⁹ (never ends), {search_note}; PerFIT after search: search_steps "
        f"= {args.search_steps}, prune_iterations = {args.prune_iterations}, run to completion untimed, then masks "
        "fixed at the budget",
        f"- timing: {args.warmup} warm-up steps per arm, then {args.rounds} rounds × {args.steps_per_round} "
        f"step{'s' if args.steps_per_round > 1 else ''} per arm, arms interleaved in a rotating order; `time.perf_counter`; median and IQR over all timed steps; "
        "paired ratios compare the arms' medians within each round",
        f"- load average (1 min) at start / end: {load_start:.2f} / {load_end:.2f} (a shared machine); "
        f"{disturbed:.0f}% of the timed steps took over 1.5× their arm's fastest step; total wall time "
        f"{wall / 60:.1f} min",
    ]
    machine = [
        f"- CPU: {info['cpu']}, {info['cores']} cores",
        f"- torch {info['torch']}; {info['libs']}",
        f"- date: {info['date']}; repository commit {info['commit']}",
    ]
    text = reading(args, arms, stats, values, breakdown)
    section = "\n".join(
        [
            SECTION,
            "",
            "What PerFIT costs per optimizer step, next to vanilla PEFT LoRA at rank r and at rank γr.",
            "",
            *command_and_machine(machine),
            "",
            "Settings:",
            "",
            *settings,
            "",
            table,
            "",
            ratios,
            "",
            "PerFIT hooks called on their own (median of "
            f"{args.hook_reps} calls; the pruning iteration: of 3), with the gradients of one backward present:",
            "",
            hooks,
            "",
            text,
            "",
        ]
    )
    print()
    print(table)
    print()
    print(ratios)
    print()
    print(hooks)
    print()
    print(text)
    if not args.no_write:
        update_doc(args.output, SECTION, section)
        print(f"\nwrote section {SECTION!r} of {args.output}")


if __name__ == "__main__":
    main()
