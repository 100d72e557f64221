"""Mask overlap after PerFIT's foresight search on FLAN-8 (issue 18): how many of the kept elements the 8 clients
share, how many are one client's alone, and where (which layers, `A` or `B`, q or v) the search puts them.

Every client starts from the same seeded adapter (as in a federated run: the round-0 adapter is rebuilt from the run
seed), SmolLM2-135M-Instruct with r = 8, γ = 4 on q/v (1,843,200 expanded elements, budget 460,800), and runs the
foresight search of the benchmark (taylor1, 3 pruning iterations, 8 batches of 4 of its own training rows, max_length
128). The batches are the client's first 32 training rows in file order; a federated run draws them through its
trainer's seeded shuffle, so its masks differ in detail (benchmarks/quality_scale.py reports the runs' own masks
once they exist), but not in kind.

    python benchmarks/mask_overlap.py          # ~5 min on 2 cores; writes its docs/benchmarks.md section
    python benchmarks/mask_overlap.py --tiny   # the tiny random Llama and synthetic clients (seconds)
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_setup as qset  # noqa: E402
from _report import command_line, machine_lines, publish  # noqa: E402
from measurement_vanishing import first_batch  # noqa: E402

SECTION = "## Mask overlap after PerFIT's search on FLAN-8 (benchmarks/mask_overlap.py)"
SEARCH_BATCHES = 8


def overlap(masks: dict[str, dict[str, torch.Tensor]]) -> dict:
    """Shared / exclusive / unused fractions of all elements, each client's exclusive share of its own kept
    elements, and the pairwise Jaccard matrix, from `{client: {key: bool mask}}`."""
    import torch

    clients = list(masks)
    keys = list(masks[clients[0]])
    flat = torch.stack([torch.cat([masks[c][k].flatten() for k in keys]) for c in clients])
    count = flat.sum(0)
    f32 = flat.float()
    gram = (f32 @ f32.T).double()
    kept = gram.diagonal()
    union = kept.view(-1, 1) + kept.view(1, -1) - gram
    jaccard = torch.where(union > 0, gram / union.clamp_min(1), torch.ones_like(gram))
    alone = ((count == 1).unsqueeze(0) & flat).sum(1).double()
    return {
        "total": flat.shape[1],
        "shared": float((count >= 2).sum()) / flat.shape[1],
        "all": float((count == len(clients)).sum()) / flat.shape[1],
        "exclusive": float((count == 1).sum()) / flat.shape[1],
        "none": float((count == 0).sum()) / flat.shape[1],
        "own_exclusive": {c: float(alone[i] / kept[i]) for i, c in enumerate(clients)},
        "jaccard": jaccard,
        "clients": clients,
        "count_hist": [int((count == j).sum()) for j in range(len(clients) + 1)],
    }


def allocation(masks: dict[str, torch.Tensor]) -> dict[str, float]:
    """Share of a client's kept elements in `A` vs `B`, q vs v, and per third of the layers."""
    kept = {k: int(m.sum()) for k, m in masks.items()}
    total = sum(kept.values())
    layers = [int(re.search(r"layers\.(\d+)\.", k).group(1)) for k in kept]
    n = max(layers) + 1
    out = {
        "A": sum(v for k, v in kept.items() if ".lora_A." in k) / total,
        "q": sum(v for k, v in kept.items() if "q_proj" in k) / total,
    }
    for third in range(3):
        lo, hi = third * n // 3, (third + 1) * n // 3
        out[f"layers {lo}-{hi - 1}"] = (
            sum(v for k, v in kept.items() if lo <= int(re.search(r"layers\.(\d+)\.", k).group(1)) < hi) / total
        )
    return out


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flan8", type=Path, default=qset.FLAN8, help="the FLAN-8 client folder")
    p.add_argument("--tiny", action="store_true", help="tiny random Llama + synthetic clients (never writes docs/)")
    p.add_argument("--no-write", action="store_true", help="print the section; leave docs/ alone")
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int, default=0, help="the seeded initial adapter every client starts from")
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
    s = qset.Settings(tiny=args.tiny, **(qset.TINY_DEFAULTS if args.tiny else {}))
    fc = s.federated()  # benchmarks/quality.py's settings: benchmarks/settings/flan8_default.yaml (+ tiny.yaml)
    batch = fc.per_device_train_batch_size
    folder = qset.write_tiny_clients(Path("/tmp/hf_perfit_overlap_tiny")) if args.tiny else args.flan8.resolve()
    base, tokenizer = qset.base_model_and_tokenizer(s)
    clients = load_client_folder(folder)
    masks, alloc, cats = {}, {}, {}
    t0 = time.perf_counter()
    magnitude = None  # the data-free mask: the budget's largest |θ| of the same initial adapter
    for c in clients:
        tok = tokenize_for_completion_loss(format_for_tokenizer(c.train, tokenizer), tokenizer, fc.max_length)
        batches = [
            first_batch(tok.select(range(i, min(len(tok), i + batch))), tokenizer, batch)
            for i in range(0, min(len(tok), SEARCH_BATCHES * batch), batch)
        ]
        torch.manual_seed(args.seed)  # the same initial adapter for every client, as in a federated run
        cfg = PerFITLoraConfig(
            r=fc.lora_r,
            lora_alpha=fc.lora_alpha,
            target_modules=list(fc.lora_target_modules),
            expansion_factor=fc.expansion_factor,
            importance=fc.importance,
            prune_iterations=fc.prune_iterations,
            search_batches=SEARCH_BATCHES,
        )
        model = get_perfit_model(copy.deepcopy(base), cfg)
        if magnitude is None:
            init = {k: p.detach().abs() for k, p in model.lora_parameters().items()}
            probe = get_perfit_model(copy.deepcopy(base), cfg)
            probe.prune_to(probe.trainable_budget(), scores=init)
            magnitude = {k: m.detach().cpu().clone() for k, m in probe.masks().items()}
            del probe
        model.foresight_search(batches)
        masks[c.client_id] = {k: m.detach().cpu().clone() for k, m in model.masks().items()}
        alloc[c.client_id] = allocation(masks[c.client_id])
        cats[c.client_id] = c.categories[0] if c.categories else ""
        del model
        print(f"{c.client_id}: searched ({time.perf_counter() - t0:.0f} s)")
    ov = overlap(masks)
    ids = ov["clients"]
    third_keys = [k for k in alloc[ids[0]] if k.startswith("layers")]
    lines = [
        SECTION,
        "",
        "Which of PerFIT's expanded-adapter elements each FLAN-8 client keeps after its foresight search, all starting "
        f"from the same seeded adapter (seed {args.seed}; r = {fc.lora_r}, γ = {fc.expansion_factor}, "
        f"{', '.join(fc.lora_target_modules)}: {ov['total']:,} elements, a quarter kept), {fc.importance}, "
        f"{fc.prune_iterations} "
        f"pruning iterations on {SEARCH_BATCHES} batches of {batch} of the client's first training rows "
        "(file order; a federated run's trainer shuffles them, so its masks differ in detail: "
        "benchmarks/quality_scale.py reports those once they exist).",
        "",
        "```bash",
        f"python benchmarks/mask_overlap.py{' --tiny' if args.tiny else ''}",
        "```",
        "",
        f"This section was written by `{command_line()}`.",
        "",
        machine_lines(),
        f"Of all {ov['total']:,} elements: kept by ≥ 2 clients **{ov['shared']:.3f}**, by all {len(ids)} "
        f"{ov['all']:.3f}, by exactly one **{ov['exclusive']:.3f}**, by none {ov['none']:.3f}. Elements by the number "
        "of clients keeping them (0.." + str(len(ids)) + "): " + ", ".join(f"{n:,}" for n in ov["count_hist"]) + ".",
        "",
        "| client | own exclusive | mean Jaccard with the others | Jaccard with the \\|θ\\| mask | kept in A | "
        "kept in q_proj | " + " | ".join(f"kept in {k}" for k in third_keys) + " |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(third_keys),
    ]
    jac = ov["jaccard"]
    mag = overlap({"magnitude": magnitude, **masks})["jaccard"][0, 1:]  # each client's mask against |θ|'s
    d = sum(int(m.sum()) for m in masks[ids[0]].values()) / ov["total"]  # the density (a quarter on SmolLM2)
    for i, c in enumerate(ids):
        others = [float(jac[i, j]) for j in range(len(ids)) if j != i]
        a = alloc[c]
        label = f"{c} ({cats[c]})" if cats[c] else c
        lines.append(
            f"| {label} | {ov['own_exclusive'][c]:.3f} | {sum(others) / max(1, len(others)):.3f} | {float(mag[i]):.3f} | "
            f"{a['A']:.3f} | "
            f"{a['q']:.3f} | " + " | ".join(f"{a[k]:.3f}" for k in third_keys) + " |"
        )
    pairs = [float(jac[i, j]) for i in range(len(ids)) for j in range(i + 1, len(ids))]
    lines += [
        "",
        f"Mean pairwise Jaccard index {sum(pairs) / max(1, len(pairs)):.3f} (min {min(pairs, default=1):.3f}, max "
        f"{max(pairs, default=1):.3f}); own exclusive = the share of a client's kept elements no other client keeps "
        "(PerFIT's aggregation averages an element over the clients that keep it, so such an element stays the one "
        "client's own value, a local model's). Two independent random masks of this density "
        f"({d:.2f}) would have a Jaccard index of {d / (2 - d):.3f}; the |θ| mask keeps the budget's largest "
        "magnitudes of the common initial adapter, without any data: a client's Jaccard with it measures how much of "
        "its mask the shared initialisation decides rather than its data.",
        "",
    ]
    section = "\n".join(lines)
    publish(SECTION, section, write=not args.tiny and not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
