"""The base model's evaluation of a client set, computed once and read by every cell that evaluates the same thing.

Every cell of a quality table starts by evaluating the base model on each client's test split (round -1). That
number depends on the base weights, their dtype and device, the tokenized test splits and the evaluation batch: not
on the method or the seed (a setting's partition is the same for every run seed). On 2 CPU cores a client's
evaluation takes ~17 s (SmolLM2-135M, 50 test rows of <= 128 tokens), so a 40-client cell spends ~11 minutes (its
setup measured 902 s at load 3.4, 2026-11-29) of its ~5 hours on numbers every other cell of its setting already has;
a FLAN-8 cell ~2 minutes.

The cache is a JSON file beside a setting's seeds, `{key: {client_id: {"eval_loss", "perplexity"}}}`, the key a
SHA-256 of everything above ([`base_eval_key`]); a different key (another precision, another max_length) is its own
entry. A hit returns the stored numbers, which equal a recomputation up to the rounding of the machine's thread count
(the same kernels on the same inputs). The file is written atomically; of two workers that miss at once and write
different keys, the later write may drop the other's entry, which the next miss computes again: nothing is lost but
time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

BASE_EVAL_FILE = "base_eval.json"


def base_eval_key(model: Any, tokenizer: Any, test_sets: dict[str, Any], eval_batch_size: int) -> str:
    """A SHA-256 of what the base model's evaluation depends on: every frozen parameter (the base weights; the
    adapters are trainable, and a PEFT wrapper's `.base_layer` is dropped from the names so that methods targeting
    different modules share the key) with its name, dtype, shape, device type and bytes; the pad token; each client's
    tokenized test rows (input ids and labels) in order; the evaluation batch size."""
    import torch

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda x: x[0]):
        if p.requires_grad:
            continue
        name = name.replace(".base_layer", "").removeprefix("base_model.model.")
        h.update(f"{name}|{p.dtype}|{tuple(p.shape)}|{p.device.type}|".encode())
        h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    h.update(f"pad={tokenizer.pad_token_id}|batch={eval_batch_size}|".encode())
    for cid in sorted(test_sets):
        ds = test_sets[cid]
        h.update(f"client={cid}|rows={len(ds)}|".encode())
        rows = ds.with_format(None)[: len(ds)]  # {column: [row, ...]} as plain lists, whatever the set's format
        for column in ("input_ids", "labels"):
            h.update(json.dumps(rows[column], separators=(",", ":")).encode())
    return h.hexdigest()


def read(path: Path) -> dict[str, dict[str, dict[str, float]]]:
    """The cache's entries; an unreadable file counts as empty (it is a cache: the evaluation reruns and rewrites
    it)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cached_evaluate(transport: Any, path: Path, log: Callable[[str], None] = print) -> Callable:
    """`transport.evaluate`, answering a base-model evaluation (round -1, every job `base=True`) from the cache at
    `path` when it has this key, and storing what it computes otherwise. Other evaluations pass through."""
    from hf_perfit._io import atomic_write_json

    evaluate = transport.evaluate

    def wrapped(round_idx: int, jobs: Sequence[Any]):
        if round_idx != -1 or not jobs or not all(job.base for job in jobs):
            return evaluate(round_idx, jobs)
        key = base_eval_key(
            transport.model, transport.tokenizer, transport.test_sets, transport.config.eval_batch_size
        )
        entry = read(path).get(key, {})
        ids = [job.client_id for job in jobs]
        if all(cid in entry for cid in ids):
            log(f"base-model evaluation of {len(ids)} clients: read from {path} (key {key[:12]})")
            return {cid: {**entry[cid], "num_examples": len(transport.train_sets[cid])} for cid in ids}, {}
        metrics, failed = evaluate(round_idx, jobs)
        if not failed:
            data = read(path)
            data.setdefault(key, {}).update(
                {cid: {"eval_loss": m["eval_loss"], "perplexity": m["perplexity"]} for cid, m in metrics.items()}
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, data)
        return metrics, failed

    return wrapped
