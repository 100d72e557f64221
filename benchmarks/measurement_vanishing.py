"""Measurement vanishing (issue 18, ablation 3): the fraction of exactly-zero Taylor importance scores of PerFIT's
expanded adapter on a first search batch, with the symmetric init (the paper's) against PEFT's zero init (`B = 0`).

For each FLAN-8 client: SmolLM2-135M-Instruct with PerFIT's rank-32 adapter (r = 8, γ = 4, q/v, the benchmark's), a
batch of the client's first 4 training rows (max_length 128, completion-only labels, as the federated client
tokenizes them), one forward + backward, and the scores `taylor1 = |θ·g|`, `taylor2 = ½(θ·g)²` of every element. The
zero init is `PerFITLoraConfig(init_lora_weights=True)` (what `FederatedConfig.perfit_init: zero` builds). What the
math says: with `B = 0`, `θ_B = 0` makes every score of `B` exactly 0, and `∂L/∂A = s·Bᵀ(∂L/∂h)xᵀ = 0` makes every
score of `A` exactly 0; with the symmetric init neither `θ` nor `g` is 0 (float products can still underflow:
`taylor2` squares a product, and a product below ~1e-23 squares to 0 in float32). `mixed` ranks both scores: an
element with both scores 0 ties with every other such element, and ties are broken by position.

Then the foresight search itself runs on client 0 with each init (3 pruning iterations on that batch) and the table
says where the kept elements are: with all scores tied, the global top-k keeps the *last* `budget` elements in
parameter order, i.e. the last layers', whatever the data.

    python benchmarks/measurement_vanishing.py            # ~2-4 min on 2 cores; writes its docs/benchmarks.md section
    python benchmarks/measurement_vanishing.py --tiny     # the tiny random Llama and synthetic clients (seconds)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_setup as qset  # noqa: E402
from _report import command_line, machine_lines, publish  # noqa: E402

SECTION = "## Measurement vanishing: zero Taylor scores by init (benchmarks/measurement_vanishing.py)"
INITS = {"symmetric": "symmetric", "zero": True}


def first_batch(tokenized, tokenizer, size: int) -> dict:
    """The first `size` rows, right-padded (labels -100 on padding), as one dict batch."""
    import torch

    rows = [tokenized[i] for i in range(min(size, len(tokenized)))]
    width = max(len(r["input_ids"]) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = [r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in rows]
    labels = [r["labels"] + [-100] * (width - len(r["labels"])) for r in rows]
    mask = [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows]
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


def zero_fractions(model, batch) -> dict[str, float]:
    """One forward + backward; the fraction of exactly-zero scores (all elements, `A`'s, `B`'s) per importance."""
    import torch

    from hf_perfit.importance import taylor_score

    params = model.lora_parameters()
    for p in params.values():
        p.grad = None
    model(**batch).loss.backward()
    out: dict[str, float] = {}
    both_zero = total = 0
    for order, name in ((1, "taylor1"), (2, "taylor2")):
        zeros = {"A": 0, "B": 0}
        sizes = {"A": 0, "B": 0}
        for key, p in params.items():
            part = "A" if ".lora_A." in key else "B"
            s = taylor_score(p, p.grad, order)
            zeros[part] += int((s == 0).sum())
            sizes[part] += s.numel()
        out[name] = (zeros["A"] + zeros["B"]) / (sizes["A"] + sizes["B"])
        out[f"{name}_A"] = zeros["A"] / sizes["A"]
        out[f"{name}_B"] = zeros["B"] / sizes["B"]
    for p in params.values():
        s1, s2 = taylor_score(p, p.grad, 1), taylor_score(p, p.grad, 2)
        both_zero += int(((s1 == 0) & (s2 == 0)).sum())
        total += s1.numel()
    out["mixed_tied_at_zero"] = both_zero / total
    out["grad_A_zero"] = sum(int((p.grad == 0).sum()) for k, p in params.items() if ".lora_A." in k) / sum(
        p.numel() for k, p in params.items() if ".lora_A." in k
    )
    for p in params.values():
        p.grad = None
    del torch
    return out


def kept_layers(model) -> tuple[int, int, float]:
    """`(first layer with a kept element, last, share of the kept elements in the last quarter of the layers)`."""
    import re

    per_layer: dict[int, int] = {}
    for key, m in model.masks().items():
        layer = int(re.search(r"layers\.(\d+)\.", key).group(1))
        per_layer[layer] = per_layer.get(layer, 0) + int(m.sum())
    kept = {k: v for k, v in per_layer.items() if v}
    n = max(per_layer) + 1
    last_quarter = sum(v for k, v in kept.items() if k >= n - max(1, n // 4)) / max(1, sum(kept.values()))
    return min(kept), max(kept), last_quarter


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flan8", type=Path, default=qset.FLAN8, help="the FLAN-8 client folder")
    p.add_argument("--tiny", action="store_true", help="tiny random Llama + synthetic clients (never writes docs/)")
    p.add_argument("--no-write", action="store_true", help="print the section; leave docs/ alone")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    import copy

    import datasets
    import torch

    from hf_perfit import PerFITLoraConfig, get_perfit_model
    from hf_perfit.data import format_for_tokenizer, load_client_folder
    from hf_perfit.federated.client import tokenize_for_completion_loss

    datasets.disable_progress_bars()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    s = qset.Settings(tiny=args.tiny, **(qset.TINY_DEFAULTS if args.tiny else {}))
    fc = s.federated()  # benchmarks/quality.py's settings: benchmarks/settings/flan8_default.yaml (+ tiny.yaml)
    folder = qset.write_tiny_clients(Path("/tmp/hf_perfit_vanishing_tiny")) if args.tiny else args.flan8.resolve()
    base, tokenizer = qset.base_model_and_tokenizer(s)
    clients = load_client_folder(folder)
    t0 = time.perf_counter()
    rows, search = [], {}
    for c in clients:
        tok = tokenize_for_completion_loss(format_for_tokenizer(c.train, tokenizer), tokenizer, fc.max_length)
        batch = first_batch(tok, tokenizer, fc.per_device_train_batch_size)
        for init_name, init in INITS.items():
            torch.manual_seed(0)
            cfg = PerFITLoraConfig(
                r=fc.lora_r,
                lora_alpha=fc.lora_alpha,
                target_modules=list(fc.lora_target_modules),
                expansion_factor=fc.expansion_factor,
                init_lora_weights=init,
                prune_iterations=fc.prune_iterations,
                search_batches=1,
            )
            model = get_perfit_model(copy.deepcopy(base), cfg)
            rows.append(
                (c.client_id, c.categories[0] if c.categories else "", init_name, zero_fractions(model, batch))
            )
            if c is clients[0]:
                model.foresight_search([batch])
                search[init_name] = (model.num_kept(), model.expanded_size(), *kept_layers(model))
            del model
        print(f"{c.client_id}: done ({time.perf_counter() - t0:.0f} s)")
    lines = [
        SECTION,
        "",
        "The fraction of PerFIT's expanded-adapter elements whose Taylor importance is exactly 0 after one forward + "
        "backward on a client's first 4 training rows (SmolLM2-135M-Instruct, r = 8, γ = 4, q/v: 1,843,200 "
        "elements; max_length 128), with the symmetric init (the paper's) and with PEFT's zero init (`B = 0`, "
        "`perfit_init: zero`). `mixed` ranks the two scores; its column is the share of elements whose both scores "
        "are 0, which tie and are then ordered by position. `∂L/∂A = 0`: the share of `A`'s gradient that is exactly "
        "0 (with `B = 0` it is all of it).",
        "",
        "```bash",
        f"python benchmarks/measurement_vanishing.py{' --tiny' if args.tiny else ''}",
        "```",
        "",
        f"This section was written by `{command_line()}`.",
        "",
        machine_lines(),
        "| client | init | taylor1 zero | of A | of B | taylor2 zero | mixed tied at 0 | ∂L/∂A = 0 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for cid, cat, init_name, z in rows:
        label = f"{cid} ({cat})" if cat else cid
        lines.append(
            f"| {label} | {init_name} | {z['taylor1']:.6f} | {z['taylor1_A']:.6f} | {z['taylor1_B']:.6f} | "
            f"{z['taylor2']:.6f} | {z['mixed_tied_at_zero']:.6f} | {z['grad_A_zero']:.6f} |"
        )
    lines += [
        "",
        f"The foresight search on {clients[0].client_id} ({fc.prune_iterations} pruning iterations on that batch, "
        "taylor1) keeps:",
        "",
        "| init | kept / expanded | layers with kept elements | share of kept in the last quarter of the layers |",
        "|---|---:|---|---:|",
    ]
    for init_name, (kept, size, lo, hi, last) in search.items():
        lines.append(f"| {init_name} | {kept:,} / {size:,} | {lo}–{hi} | {last:.3f} |")
    sym = [z for _, _, i, z in rows if i == "symmetric"]
    zero = [z for _, _, i, z in rows if i == "zero"]
    lines += [
        "",
        f"Reading: with the zero init every score is exactly 0 on every client (taylor1 zero fraction "
        f"{min(z['taylor1'] for z in zero):.6f}–{max(z['taylor1'] for z in zero):.6f}), as the algebra says, so the "
        "search measures nothing: the global top-k keeps the elements with the highest *positions* (stable order), "
        "the same mask for every client whatever its data, in the last layers. With the symmetric init the zero "
        f"fraction is {min(z['taylor1'] for z in sym):.2e}–{max(z['taylor1'] for z in sym):.2e} (taylor1) and "
        f"{min(z['taylor2'] for z in sym):.2e}–{max(z['taylor2'] for z in sym):.2e} (taylor2; above taylor1's only "
        "where the squared product underflows float32): the scores rank the elements. The zero init's run in the "
        "quality table is "
        "`perfit_zeroinit` (benchmarks/quality_scale.py).",
        "",
    ]
    section = "\n".join(lines)
    publish(SECTION, section, write=not args.tiny and not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
