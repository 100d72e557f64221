"""Dirichlet and IID partitions of a per-category client folder (FLAN-8) for benchmarks/quality_scale.py.

The 8 FLAN-8 clients' training rows (300 per category) are pooled and dealt to `num_clients` clients, and so are the
test rows (`test.jsonl`, 200 per category), **with the same proportions**: for every category `c`, one draw
`p_c ~ Dirichlet(α·1_K)` over the `K` clients cuts both its shuffled training rows and its shuffled test rows
(`iid`: every row of the pool to a uniformly shuffled, near-even share). So each client is tested on its own share of
each category's test split, and its test label mix follows its training label mix (in expectation exactly; up to the
rounding of a few rows), the test rows of different clients are disjoint, and the evaluation cost is the test
split's size whatever `K` is. (The alternative, every client tested on the whole test split weighted by its label
mix, is lower-variance but costs `K` times the test split per evaluation: 40 × 1,600 rows.)

A draw is repeated (up to `MAX_DRAWS`, same generator) until every client has at least `min_train` training rows
(one batch) and `min_test` test rows, as flwr-datasets' `DirichletPartitioner` redraws to a minimum size; with
α = 0.1 and 40 clients about one draw in 10-40 qualifies (α = 0.5 and 1.0: the first). This conditions the
partition on "no client empty", which the table states.

The folder is written once, atomically, in the layout `hf_perfit.data.load_client_folder` reads with per-client
test files (`local_training_{k}.json` + `test_{k}.jsonl`, docs/data.md), plus `partition.json` (the spec and the rows
per client and category). A later call with the same spec reuses it; another spec in the same folder is refused.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

PARTITION_FILE = "partition.json"
MAX_DRAWS = 10_000


def _read_rows(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8").strip()
    if text.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def pooled_rows(source: Path) -> tuple[list[dict], list[dict]]:
    """The training rows of every client of `source` (in client order) and its `test.jsonl` rows."""
    from hf_perfit.data import _client_files

    files = _client_files(source)
    if not files:
        raise FileNotFoundError(f"{source} has no local_training_{{k}}.json files: not a per-client folder.")
    train = [row for k in sorted(files) for row in _read_rows(files[k])]
    test_path = next((source / n for n in ("test.jsonl", "test.json") if (source / n).is_file()), None)
    if test_path is None:
        raise FileNotFoundError(f"{source} has no test.jsonl: the partition deals its test rows too.")
    return train, _read_rows(test_path)


def deal(
    train_labels: Sequence[str],
    test_labels: Sequence[str],
    num_clients: int,
    method: str,
    alpha: float | None,
    seed: int,
    min_train: int,
    min_test: int,
) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Row indices of each client's training and test rows, and the number of draws it took.

    Args:
        train_labels, test_labels: the category of every pooled training / test row.
        num_clients (`int`): `K`.
        method (`str`): `"dirichlet"` (per category, `p_c ~ Dir(α·1_K)` cuts the training and the test rows of `c`)
            or `"iid"` (shuffled near-even shares of each pool).
        alpha (`float`): the Dirichlet concentration (`dirichlet` only).
        seed (`int`): the generator's seed; the same arguments give the same partition.
        min_train, min_test (`int`): the least rows a client must get; draws are repeated until they hold.

    Raises:
        ValueError: a bad method or α, or no draw out of `MAX_DRAWS` gives every client its minimum (use fewer
            clients, a larger α, or smaller minimums).
    """
    if method not in ("dirichlet", "iid"):
        raise ValueError(f"method={method!r} is not a partition of this benchmark; allowed: dirichlet, iid.")
    if method == "dirichlet" and not (isinstance(alpha, int | float) and alpha > 0):
        raise ValueError(f"alpha={alpha!r} must be a number > 0 for method='dirichlet'.")
    if num_clients < 1:
        raise ValueError(f"num_clients={num_clients} must be >= 1.")
    rng = np.random.default_rng(seed)
    train_labels, test_labels = np.asarray(train_labels, dtype=object), np.asarray(test_labels, dtype=object)
    classes = sorted(set(train_labels.tolist()) | set(test_labels.tolist()))
    for draw in range(1, MAX_DRAWS + 1):
        if method == "iid":
            train_parts = np.array_split(rng.permutation(len(train_labels)), num_clients)
            test_parts = np.array_split(rng.permutation(len(test_labels)), num_clients)
        else:
            train_buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
            test_buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
            for c in classes:
                cum = np.cumsum(rng.dirichlet(np.full(num_clients, float(alpha))))[:-1]
                for labels, buckets in ((train_labels, train_buckets), (test_labels, test_buckets)):
                    idx = rng.permutation(np.flatnonzero(labels == c))
                    for k, chunk in enumerate(np.split(idx, (cum * len(idx)).astype(np.int64))):
                        buckets[k].append(chunk)
            train_parts = [np.concatenate(b) for b in train_buckets]
            test_parts = [np.concatenate(b) for b in test_buckets]
        if min(len(p) for p in train_parts) >= min_train and min(len(p) for p in test_parts) >= min_test:
            return [np.sort(p) for p in train_parts], [np.sort(p) for p in test_parts], draw
    raise ValueError(
        f"no {method} partition (alpha={alpha}) of {len(train_labels)} training / {len(test_labels)} test rows into "
        f"{num_clients} clients gave every client >= {min_train} training and >= {min_test} test rows in {MAX_DRAWS} "
        "draws; use fewer clients, a larger alpha, or smaller minimums."
    )


def write_partition(
    source: Path,
    folder: Path,
    num_clients: int,
    method: str,
    alpha: float | None = None,
    seed: int = 0,
    min_train: int = 4,
    min_test: int = 2,
) -> Path:
    """Write (once) the partition of `source`'s pooled rows into `folder` and return `folder`.

    Raises:
        SystemExit: `folder` holds a partition with another spec (it is never overwritten).
    """
    from hf_perfit._io import atomic_directory

    spec = {
        "source": str(source.resolve()),
        "num_clients": num_clients,
        "method": method,
        "alpha": alpha if method == "dirichlet" else None,
        "seed": seed,
        "min_train": min_train,
        "min_test": min_test,
    }
    done = folder / PARTITION_FILE
    if done.is_file():
        saved = json.loads(done.read_text())
        if saved.get("spec") != spec:
            raise SystemExit(
                f"{folder} holds another partition ({saved.get('spec')}, not {spec}); delete it or use another --root."
            )
        return folder
    train, test = pooled_rows(source)
    train_labels = [str(r.get("category", "")) for r in train]
    test_labels = [str(r.get("category", "")) for r in test]
    train_parts, test_parts, draws = deal(
        train_labels, test_labels, num_clients, method, alpha, seed, min_train, min_test
    )
    classes = sorted(set(train_labels))
    counts = {
        f"client_{k}": {
            "train": {c: int(sum(train_labels[i] == c for i in tp)) for c in classes},
            "test": {c: int(sum(test_labels[i] == c for i in sp)) for c in classes},
        }
        for k, (tp, sp) in enumerate(zip(train_parts, test_parts, strict=True))
    }
    with atomic_directory(folder) as tmp:
        for k, (tp, sp) in enumerate(zip(train_parts, test_parts, strict=True)):
            (tmp / f"local_training_{k}.json").write_text(json.dumps([train[i] for i in tp]))
            (tmp / f"test_{k}.jsonl").write_text("".join(json.dumps(test[i]) + "\n" for i in sp))
        (tmp / PARTITION_FILE).write_text(json.dumps({"spec": spec, "draws": draws, "rows": counts}, indent=1))
    return folder
