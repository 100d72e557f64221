"""How many bytes does a PerFIT client send per round, next to FedIT at the same trainable budget?

Two measurements:

1. **Real shapes**: SmolLM2-135M-Instruct (the `smollm2-135m-instruct` preset when available, else a tiny random
   Llama) with r=8, γ=4 on q_proj/v_proj. A PerFIT adapter pruned to its budget (random scores: the byte count does not
   depend on which elements are kept, only on how many) against a vanilla rank-r LoRA; the upload of the round that
   carries the new mask, of a later round, and the mean over a run of `--rounds` rounds, in float32 and bfloat16.
2. **Measured in a run**: the `bytes_up` / `bytes_down` that the in-process simulation records in `metrics.jsonl`
   for a tiny 3-client, 3-round run of `perfit` and of `fedit` (the accounting a user sees).

Goal (issue 3): PerFIT bytes up per client per round <= 1.15x FedIT.

    python benchmarks/communication.py              # writes its section of docs/benchmarks.md
    python benchmarks/communication.py --tiny --no-write
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import REPO_ROOT, command_and_machine, publish  # noqa: E402

SECTION = "## Communication (benchmarks/communication.py)"
GOAL = 1.15
PRESET = "smollm2-135m-instruct"


def load_base(tiny: bool):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from hf_perfit.presets import is_preset_available, resolve_model_path

    if not tiny and is_preset_available(PRESET):
        return AutoModelForCausalLM.from_pretrained(resolve_model_path(PRESET)), "SmolLM2-135M-Instruct"
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg), "tiny random Llama (hidden 64, 2 layers)"


def real_shapes(args: argparse.Namespace) -> tuple[str, list[tuple[str, int, int, int]]]:
    """Rows (label, bytes up PerFIT, bytes up FedIT, elements) for the real model's shapes."""
    import copy

    from hf_perfit import PerFITLoraConfig, PerFITModel
    from hf_perfit.federated.comm import uplink_bytes
    from hf_perfit.federated.messages import ClientUpdate

    base, name = load_base(args.tiny)
    common = dict(r=args.r, lora_alpha=2 * args.r, target_modules=["q_proj", "v_proj"])
    perfit = PerFITModel(copy.deepcopy(base), PerFITLoraConfig(**common, expansion_factor=args.gamma))
    fedit = PerFITModel(base, PerFITLoraConfig(**common, expansion_factor=1, init_lora_weights=True))
    gen = torch.Generator().manual_seed(0)
    scores = {k: torch.rand(p.shape, generator=gen) for k, p in perfit.lora_parameters().items()}
    perfit.prune_to(perfit.trainable_budget(), scores=scores)
    tensors, masks, _ = perfit.get_adapter_state()
    f_tensors = fedit.get_adapter_state()[0]
    rows = []
    for wire, nbytes in (("float32", 4), ("bfloat16", 2)):
        first = uplink_bytes(ClientUpdate("k", 1, tensors, masks, mask_changed=True), nbytes)
        later = uplink_bytes(ClientUpdate("k", 1, tensors, masks, mask_changed=False), nbytes)
        dense = uplink_bytes(ClientUpdate("k", 1, f_tensors), nbytes)
        mean = (first + (args.rounds - 1) * later) / args.rounds
        rows += [
            (f"{wire}: round with the new mask", first, dense),
            (f"{wire}: every later round", later, dense),
            (f"{wire}: mean over {args.rounds} rounds (mask sent once)", round(mean), dense),
        ]
    info = (
        f"{name}; r = {args.r}, γ = {args.gamma}, q_proj/v_proj; PerFIT keeps {perfit.num_kept():,} of "
        f"{perfit.expanded_size():,} expanded elements (budget {perfit.trainable_budget():,}); the rank-r LoRA has "
        f"{sum(t.numel() for t in f_tensors.values()):,}"
    )
    return info, rows


def measured_run() -> dict[str, dict[str, list[float]]]:
    """bytes_up / bytes_down per client per round from metrics.jsonl of tiny perfit and fedit runs."""
    sys.path.insert(0, str(REPO_ROOT))
    from datasets import Dataset

    from hf_perfit.data import ClientData
    from hf_perfit.federated import FederatedConfig, FederatedSimulation
    from hf_perfit.federated.run import read_metrics
    from tests.conftest import build_tokenizer, tiny_llama

    out: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in ("perfit", "fedit"):
            clients = []
            for k in range(3):
                rows = [
                    {"instruction": f"Task {k}: echo {i}", "response": f"{k}{i}{k}", "category": f"c{k}"}
                    for i in range(12)
                ]
                clients.append(
                    ClientData(f"client_{k}", Dataset.from_list(rows[:9]), Dataset.from_list(rows[9:]), [f"c{k}"])
                )
            cfg = FederatedConfig(
                model_name_or_path="unused",
                strategy=strategy,
                num_clients=3,
                num_rounds=3,
                local_steps=4,
                search_steps=4,
                prune_iterations=2,
                per_device_train_batch_size=2,
                max_length=48,
                lora_r=2,
                lora_alpha=4,
                output_dir=f"{tmp}/{strategy}",
            )
            FederatedSimulation(cfg, model=tiny_llama(), tokenizer=build_tokenizer(), clients=clients).run()
            recs = read_metrics(f"{tmp}/{strategy}")
            per_round = [r for r in recs if "client" in r and r["round"] >= 0]
            out[strategy] = {
                "up": [sum(r["bytes_up"] for r in per_round if r["round"] == t) / 3 for t in range(3)],
                "down": [sum(r["bytes_down"] for r in per_round if r["round"] == t) / 3 for t in range(3)],
            }
    return out


def render(info: str, rows, run, args) -> str:
    lines = [
        SECTION,
        "",
        "Bytes a client uploads per round: PerFIT (kept values + packed mask bits, the mask only in the round it",
        "changed) against FedIT (the dense rank-r LoRA) at the same trainable budget. Goal: <= 1.15x FedIT.",
        "",
        *command_and_machine(),
        "",
        f"Real shapes: {info}.",
        "",
        "| upload | PerFIT (bytes) | FedIT (bytes) | PerFIT / FedIT | goal <= 1.15 |",
        "|---|---:|---:|---:|---|",
    ]
    for label, p, f in rows:
        ratio = p / f
        lines.append(f"| {label} | {p:,} | {f:,} | {ratio:.3f} | {'met' if ratio <= GOAL else 'missed'} |")
    lines += [
        "",
        "The mask costs one bit per expanded element: R(d_in+d_out)/8 bytes against the budget's r(d_in+d_out)",
        f"values of 4 bytes, i.e. γ/32 = {args.gamma / 32:.3f} of FedIT's upload in float32 (γ/16 in bfloat16), once.",
        "",
    ]
    if run:
        lines += [
            "Measured in a run (`metrics.jsonl` of a tiny 3-client, 3-round run; mean bytes per client):",
            "",
            "| round | PerFIT up | FedIT up | ratio | PerFIT down | FedIT down |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for t in range(3):
            pu, fu = run["perfit"]["up"][t], run["fedit"]["up"][t]
            pd, fd = run["perfit"]["down"][t], run["fedit"]["down"][t]
            lines.append(f"| {t} | {pu:,.0f} | {fu:,.0f} | {pu / fu:.3f} | {pd:,.0f} | {fd:,.0f} |")
        lines += [
            "",
            "Downlink: in its first round (and on a re-search round) a PerFIT client receives the dense expanded",
            "θ_g (γ× FedIT: it searches from all of it); afterwards only the global values on its own mask, which it",
            "already holds (= the budget, like FedIT).",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny random model instead of SmolLM2")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--rounds", type=int, default=10, help="rounds for the per-run mean")
    p.add_argument("--no-run", action="store_true", help="skip the measured tiny federated runs")
    p.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    info, rows = real_shapes(args)
    run = None if args.no_run else measured_run()
    section = render(info, rows, run, args)
    publish(SECTION, section, write=not args.no_write)


if __name__ == "__main__":
    main()
