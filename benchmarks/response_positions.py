"""What does computing the LM head at the response positions only save, per training step and per evaluation?

With completion-only loss the loss reads the logits of the response positions only, yet a plain forward projects
every position onto the vocabulary (49,152 on SmolLM2) and takes its softmax. Two changes skip the others:

- **training**: TRL's fused LM head projects the scored positions only on Triton devices and every position
  elsewhere; `hf_perfit.federated.compact_head` makes it take that path on CPU too;
- **evaluation**: `evaluate_perplexity` passes the scored positions as `logits_to_keep`.

Arms, on real clients (FLAN-8 by default: prompts of ~40-120 tokens, responses of 1-60), the same model, data and
seed, interleaved client by client: `full` (TRL's CPU path, full logits in evaluation) and `scored` (both changes).
Per client: one `train_client` call of `--steps` local steps (the reused trainer, built before timing) and one
`evaluate_perplexity` over `--eval-examples` test rows; the losses of the two arms are printed side by side (they
agree to rounding). Writes its section of docs/benchmarks.md.

    python benchmarks/response_positions.py --data ../shared/data/flan8 --clients 0 4 5 6 --steps 3 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command_and_machine, publish  # noqa: E402

TITLE = "## Response positions only: LM head in training and evaluation (benchmarks/response_positions.py)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a per-client folder (e.g. FLAN-8's) or a dataset file")
    p.add_argument("--clients", type=int, nargs="+", default=[0, 4, 5, 6], help="client indices to time")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=3, help="local steps per client and arm")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--eval-examples", type=int, default=24)
    p.add_argument("--repeats", type=int, default=1, help="passes over the clients (arms alternate each time)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", dest="write", action="store_false", help="print only, leave docs/benchmarks.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import trl.trainer.utils as trl_utils

    import hf_perfit.federated.client as client_mod
    from hf_perfit.data import load_client_folder
    from hf_perfit.federated.compact_head import enable_compact_head_on_cpu
    from hf_perfit.federated.config import FederatedConfig
    from hf_perfit.federated.runtime import build_client_model, load_model, local_training_args, tokenize_clients

    torch.set_num_threads(args.threads)
    config = FederatedConfig(
        model_name_or_path=args.model,
        strategy="fedit",
        local_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        max_eval_examples=args.eval_examples,
        device="cpu",
    )
    clients = load_client_folder(args.data)
    picked = [clients[i] for i in args.clients]
    base, tokenizer = load_model(config)
    model = build_client_model(base, config)
    train_sets, test_sets = tokenize_clients(picked, tokenizer, config)
    train_args = local_training_args(config)
    enable_compact_head_on_cpu()
    patched = trl_utils._use_triton
    trl_default = patched.__wrapped__
    keep_default = client_mod._accepts_logits_to_keep
    start = model.get_adapter_state()

    def use(arm: str) -> None:
        trl_utils._use_triton = patched if arm == "scored" else trl_default
        client_mod._accepts_logits_to_keep = keep_default if arm == "scored" else (lambda model: False)

    client_mod.train_client(model, tokenizer, train_sets[picked[0].client_id], train_args, seed=0)  # build, untimed
    rows: dict[str, dict[str, list[float]]] = {}
    for rep in range(args.repeats):
        for j, c in enumerate(picked):
            arms = ("full", "scored") if (rep + j) % 2 == 0 else ("scored", "full")
            for arm in arms:
                use(arm)
                model.set_adapter_state(*start)
                t0 = time.perf_counter()
                out = client_mod.train_client(model, tokenizer, train_sets[c.client_id], train_args, seed=rep)
                t1 = time.perf_counter()
                ev = client_mod.evaluate_perplexity(model, tokenizer, test_sets[c.client_id], config.eval_batch_size)
                t2 = time.perf_counter()
                r = rows.setdefault(f"{c.client_id} {arm}", {"step": [], "eval": [], "loss": [], "eval_loss": []})
                r["step"].append((t1 - t0) / args.steps)
                r["eval"].append(t2 - t1)
                r["loss"].append(out["train_loss"])
                r["eval_loss"].append(ev["eval_loss"])
                print(f"{c.client_id} {arm}: {(t1 - t0) / args.steps:.2f} s/step, eval {t2 - t1:.1f} s", flush=True)
    use("scored")

    def tokens(ds) -> tuple[float, float]:
        n = len(ds)
        prompt = sum(sum(1 for y in lab if y == -100) for lab in ds["labels"]) / n
        return sum(len(x) for x in ds["input_ids"]) / n, prompt

    lines = [TITLE, "", __doc__.split("\n\n")[0], ""]
    lines += command_and_machine()
    lines += [
        "",
        f"Settings: {args.model} fp32 on CPU, {args.threads} torch thread(s), LoRA r={config.lora_r} on "
        f"{', '.join(config.lora_target_modules)}, batch {args.batch_size}, max_length {args.max_length}, "
        f"{args.steps} local steps per client and arm (time per step includes the round's data loader and optimizer "
        f"set-up), {args.eval_examples} test rows per client in batches of {config.eval_batch_size}; medians over "
        f"{args.repeats} pass(es).",
        "",
        "| client | tokens per row (prompt) | step full (s) | step scored (s) | × | eval full (s) | eval scored (s) "
        "| × | train loss full / scored | eval loss full / scored |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    ratios_step, ratios_eval = [], []
    for c in picked:
        f, s = rows[f"{c.client_id} full"], rows[f"{c.client_id} scored"]
        med = {k: (statistics.median(f[k]), statistics.median(s[k])) for k in f}
        ratios_step.append(med["step"][1] / med["step"][0])
        ratios_eval.append(med["eval"][1] / med["eval"][0])
        length, prompt = tokens(train_sets[c.client_id])
        lines.append(
            f"| {c.client_id} | {length:.0f} ({prompt:.0f}) | {med['step'][0]:.2f} | {med['step'][1]:.2f} | "
            f"{ratios_step[-1]:.2f} | {med['eval'][0]:.1f} | {med['eval'][1]:.1f} | {ratios_eval[-1]:.2f} | "
            f"{med['loss'][0]:.6f} / {med['loss'][1]:.6f} | {med['eval_loss'][0]:.7f} / {med['eval_loss'][1]:.7f} |"
        )
    lines += [
        "",
        f"Scored over full, median over the clients: training step **{statistics.median(ratios_step):.2f}×**, "
        f"evaluation **{statistics.median(ratios_eval):.2f}×**. The losses agree to rounding (the same sums over "
        "fewer rows).",
    ]
    publish(TITLE, "\n".join(lines) + "\n", args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
