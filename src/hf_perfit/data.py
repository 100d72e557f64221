"""Data layer: load instruction data, split it across federated clients, format it for TRL.

Everything here works on `datasets.Dataset` objects with four *canonical* columns:

- `instruction` (str): the task or question.
- `context` (str): optional extra input (Alpaca `input`, Dolly `context`); empty string when absent.
- `response` (str): the target answer (Alpaca/FedDPA `output`, Dolly `response`).
- `category` (str): optional task category; present only when the source has one. It drives the
  category/Dirichlet partitions and the per-client test splits of the Shepherd/FedDPA layout.

Three entry points produce per-client data (`ClientData`):

- `load_client_folder`: a folder in the Shepherd/FedDPA layout (`local_training_{k}.json` + `test.jsonl`);
  each client's test split is the test rows of its own training categories.
- `partition_dataset`: split one dataset across clients (pathological by category, Dirichlet, IID), each
  client keeping a seeded held-out test split.
- `load_instruction_dataset`: load one local file/folder or Hub dataset and normalize its columns.

`format_for_tokenizer` then turns canonical rows into TRL's prompt-completion format (conversational when
the tokenizer has a chat template, plain text otherwise), keeping only `prompt` and `completion`.

Why the partitioners are written here rather than taken from `flwr-datasets`: `flwr-datasets` 0.6.1 (the
current release) pins `datasets<5`, so `pip install flwr-datasets` in this project downgrades `datasets`
5.x -> 4.8, `huggingface_hub` 2.x -> 1.x, `fsspec` and `rich`, i.e. it changes the very libraries the rest
of the package is built and tested against (and as a dependency it would force `datasets<5` on every user).
The three partitions we need are a few lines of NumPy each; they follow the semantics of
`flwr_datasets.partitioner.{PathologicalPartitioner, DirichletPartitioner, IidPartitioner}` (whole classes
per client; per-class Dirichlet(alpha) proportions, redrawn until every client has a minimum size; a
shuffled even split) and are deterministic for a seed. Revisit once a `flwr-datasets` release supports
`datasets>=5`.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "CANONICAL_COLUMNS",
    "DEFAULT_COLUMN_ALIASES",
    "SUPPORTED_EXTENSIONS",
    "ClientData",
    "detect_client_folder",
    "format_for_tokenizer",
    "load_client_folder",
    "load_instruction_dataset",
    "normalize_columns",
    "partition_dataset",
    "resolve_column_map",
    "to_conversational",
    "to_prompt_completion_text",
]

CANONICAL_COLUMNS: tuple[str, ...] = ("instruction", "context", "response", "category")
"""Column names of a normalized instruction dataset, in order. `context` is always present (maybe empty),
`category` only when the source has one."""

REQUIRED_COLUMNS: tuple[str, ...] = ("instruction", "response")

DEFAULT_COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    # canonical name -> source names tried in order (first present wins)
    "instruction": ("instruction",),  # Alpaca, Dolly, FedDPA/flan
    "context": ("context", "input"),  # Dolly `context`, Alpaca `input` (FedDPA/flan has none)
    "response": ("response", "output"),  # Dolly `response`, Alpaca and FedDPA/flan `output`
    "category": ("category",),  # Dolly, FedDPA/flan (FedDPA's finer `task` column is dropped)
}
"""Source column names recognized for each canonical column: Alpaca (`instruction`, `input`, `output`),
Dolly (`instruction`, `context`, `response`, `category`) and FedDPA/flan (`instruction`, `output`, `category`,
`task`). Anything else can be mapped explicitly with `column_map`."""

SUPPORTED_EXTENSIONS: dict[str, str] = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
"""File extension -> `datasets` packaged builder used to read it."""

CLIENT_FILE_PATTERN = re.compile(r"^local_training_(\d+)\.jsonl?$")
CLIENT_TEST_PATTERN = re.compile(r"^test_(\d+)\.jsonl?$")
DEFAULT_TEST_FILES: tuple[str, ...] = ("test.jsonl", "test.json")
MIN_CLIENT_ROWS = 2  # one row to train on, one to test on


@dataclass
class ClientData:
    """The private data of one federated client.

    Args:
        client_id (`str`): `"client_{k}"`, `k` counting from 0.
        train (`datasets.Dataset`): training rows, canonical columns.
        test (`datasets.Dataset`): the client's own held-out rows (personalized evaluation), canonical columns.
        categories (`list[str]`): the client's training categories, most frequent first (empty when the data
            has no category column).
    """

    client_id: str
    train: datasets.Dataset
    test: datasets.Dataset
    categories: list[str] = field(default_factory=list)

    @property
    def num_examples(self) -> int:
        """Number of training rows (the `n_k` weight of FedAvg-style aggregation)."""
        return len(self.train)


# --------------------------------------------------------------------------------------------------------
# Column normalization
# --------------------------------------------------------------------------------------------------------


def resolve_column_map(
    column_names: Sequence[str], column_map: Mapping[str, str] | None = None, *, source: str = "the dataset"
) -> dict[str, str]:
    """Decide which source column feeds each canonical column.

    Args:
        column_names (`Sequence[str]`): columns present in the source.
        column_map (`Mapping[str, str]`, *optional*): explicit `{canonical: source}` entries; they win over
            `DEFAULT_COLUMN_ALIASES`. Canonical columns not mentioned are still looked up by alias.
        source (`str`, *optional*): how to name the source in error messages.

    Returns:
        `dict[str, str]`: `{canonical: source}` for every canonical column found (always `instruction` and
        `response`).

    Raises:
        `ValueError`: `column_map` names an unknown canonical column or a column not in the source, or no
            instruction/response column can be found.
    """
    present = list(column_names)
    column_map = dict(column_map or {})
    unknown = sorted(set(column_map) - set(CANONICAL_COLUMNS))
    if unknown:
        raise ValueError(
            f"column_map keys must be canonical column names {list(CANONICAL_COLUMNS)}, got {unknown}. "
            "column_map maps canonical -> source column, e.g. column_map={'response': 'answer'}."
        )
    resolved: dict[str, str] = {}
    for canonical in CANONICAL_COLUMNS:
        if canonical in column_map:
            src = column_map[canonical]
            if src not in present:
                raise ValueError(
                    f"column_map maps {canonical!r} to {src!r}, but {source} has no such column; "
                    f"columns present: {present}."
                )
            resolved[canonical] = src
            continue
        for alias in DEFAULT_COLUMN_ALIASES[canonical]:
            if alias in present:
                resolved[canonical] = alias
                break
    missing = [c for c in REQUIRED_COLUMNS if c not in resolved]
    if missing:
        aliases = {c: list(DEFAULT_COLUMN_ALIASES[c]) for c in missing}
        example = ", ".join(f"'{c}': '<your {c} column>'" for c in missing)
        raise ValueError(
            f"Could not find the {' and '.join(repr(c) for c in missing)} column(s) in {source}; "
            f"columns present: {present}. Recognized names: {aliases}. Pass column_map={{{example}}} "
            "(canonical -> source column) to map them explicitly."
        )
    return resolved


def normalize_columns(
    ds: datasets.Dataset, column_map: Mapping[str, str] | None = None, *, source: str = "the dataset"
) -> datasets.Dataset:
    """Rename/select the columns of `ds` to the canonical `instruction`, `context`, `response` (+ `category`).

    Values are converted to strings (`None` -> `""`); `context` is added empty when the source has none;
    all other columns are dropped.

    Args:
        ds (`datasets.Dataset`): the source dataset.
        column_map (`Mapping[str, str]`, *optional*): explicit `{canonical: source}` column names.
        source (`str`, *optional*): how to name the source in error messages.

    Returns:
        `datasets.Dataset`: the normalized dataset.
    """
    mapping = resolve_column_map(ds.column_names, column_map, source=source)
    out_columns = [c for c in CANONICAL_COLUMNS if c in mapping or c == "context"]
    features = datasets.Features({c: datasets.Value("string") for c in out_columns})

    def _normalize(batch: dict[str, list[Any]]) -> dict[str, list[str]]:
        n = len(batch[mapping["instruction"]])
        out: dict[str, list[str]] = {}
        for canonical in out_columns:
            src = mapping.get(canonical)
            values = batch[src] if src is not None else [None] * n
            out[canonical] = ["" if v is None else str(v) for v in values]
        return out

    out = ds.map(_normalize, batched=True, remove_columns=ds.column_names, features=features, desc="Normalizing")
    return _drop_incomplete_records(out, mapping, source)


def _drop_incomplete_records(ds: datasets.Dataset, mapping: Mapping[str, str], source: str) -> datasets.Dataset:
    """Drop the records that cannot be trained on or scored, with a warning that counts them.

    A record without a response (the mapped column missing, null or blank) has no completion tokens to learn or to
    score; one without an instruction and without a context has no prompt. Both are dropped, and the warning names
    the source, the counts, the reason and the first offending record (0-based, in file order), so a damaged row
    is never trained on silently. A source with no record left is a `ValueError`.
    """
    no_response, no_prompt = [], []
    for i, (instruction, context, response) in enumerate(
        zip(ds["instruction"], ds["context"], ds["response"], strict=True)
    ):
        if not response.strip():
            no_response.append(i)
        elif not instruction.strip() and not context.strip():
            no_prompt.append(i)
    if not no_response and not no_prompt:
        return ds
    reasons = []
    if no_response:
        reasons.append(
            f"{len(no_response)} without a response (column {mapping['response']!r} missing, null or empty; first: "
            f"record {no_response[0]})"
        )
    if no_prompt:
        reasons.append(
            f"{len(no_prompt)} without an instruction or context (column {mapping['instruction']!r} missing, null "
            f"or empty; first: record {no_prompt[0]})"
        )
    dropped = set(no_response) | set(no_prompt)
    if len(dropped) == len(ds):
        raise ValueError(
            f"{source}: none of its {len(ds)} records can be used: {'; '.join(reasons)}. Fill these fields in, or map "
            "the right columns with column_map={'response': '<column>', 'instruction': '<column>'}."
        )
    logger.warning(
        "%s: dropped %d of %d records: %s. They have nothing to train on or score; fill them in or remove them.",
        source,
        len(dropped),
        len(ds),
        "; ".join(reasons),
    )
    return ds.select([i for i in range(len(ds)) if i not in dropped])


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    """Whether a string that does not exist on disk was meant as a local path rather than a Hub dataset id."""
    return (
        Path(name).suffix.lower() in SUPPORTED_EXTENSIONS
        or name.startswith((".", "/", "~"))
        or "\\" in name
        or name.count("/") > 1
    )


def _read_local_file(path: Path) -> datasets.Dataset:
    """Read one .json/.jsonl/.parquet/.csv file with the matching `datasets` builder (raw columns)."""
    builder = SUPPORTED_EXTENSIONS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"Unsupported file type {path.suffix!r} for {path}; supported: {sorted(SUPPORTED_EXTENSIONS)}."
        )
    empty = ValueError(f"{path} contains no rows: an instruction dataset needs at least one example.")
    if path.stat().st_size == 0:
        raise empty
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:
        if builder == "json" and path.stat().st_size < 64 and path.read_text().strip() in ("", "[]", "{}"):
            raise empty from err
        raise ValueError(f"Could not read {path} as {builder}: {type(err).__name__}: {err}") from err
    if len(ds) == 0:
        raise empty
    return ds


def load_instruction_dataset(
    name_or_path: str | Path,
    split: str = "train",
    column_map: Mapping[str, str] | None = None,
    **load_kwargs: Any,
) -> datasets.Dataset:
    """Load an instruction dataset and normalize it to the canonical columns.

    Args:
        name_or_path (`str` or `Path`): one of
            - a local file (`.json` — a JSON array or JSON lines —, `.jsonl`, `.parquet`, `.csv`);
            - a local folder of such files (read with `datasets.load_dataset(folder)`, so files named after a
              split, e.g. `train.jsonl`/`test.jsonl`, form that split; otherwise every file is `train`);
            - a Hub dataset id (`datasets.load_dataset(name, split=split)`), tried only when no such local
              path exists;
            - a built-in dataset, `"builtin:stdlib"` (the Python standard library's documentation, one category
              per module family; see `hf_perfit.builtin_data`), with optional options as a query string, e.g.
              `"builtin:stdlib?max_per_category=200&seed=1"`. Nothing is downloaded; `split`, `column_map` and
              `load_kwargs` do not apply to it.
        split (`str`, *optional*, defaults to `"train"`): split to load from a folder or Hub dataset (a single
            file has one split and ignores it).
        column_map (`Mapping[str, str]`, *optional*): explicit `{canonical: source}` column names, e.g.
            `{"instruction": "question", "response": "answer"}`; Alpaca, Dolly and FedDPA/flan column names are
            recognized without it (see `DEFAULT_COLUMN_ALIASES`).
        **load_kwargs: forwarded to `datasets.load_dataset` for folders and Hub datasets (e.g. `name=` for a
            dataset configuration, `revision=`).

    Returns:
        `datasets.Dataset`: columns `instruction`, `context`, `response` and, when the source has one,
        `category`.

    Raises:
        `FileNotFoundError`: the path does not exist (or the name is neither a local path nor a loadable Hub
            dataset).
        `ValueError`: no instruction/response column (the message lists the columns present), an unreadable
            file, an empty dataset, or an unknown `builtin:` name (the message lists the available ones).

    Example:
        ```python
        >>> ds = load_instruction_dataset("alpaca_data.json")
        >>> ds = load_instruction_dataset("my.csv", column_map={"instruction": "question", "response": "answer"})
        >>> ds = load_instruction_dataset("builtin:stdlib")  # built from the local Python, nothing downloaded
        ```
    """
    name = str(name_or_path)
    if name.startswith("builtin:"):
        from .builtin_data import load_builtin_dataset

        return load_builtin_dataset(name)
    path = Path(name).expanduser()
    if path.is_file():
        ds = _read_local_file(path)
        source = str(path)
    elif path.is_dir():
        files = [p for p in sorted(path.iterdir()) if p.is_file() and p.suffix.lower() in SUPPORTED_EXTENSIONS]
        if not files:
            raise FileNotFoundError(
                f"Folder {path} contains no data file; supported extensions: {sorted(SUPPORTED_EXTENSIONS)}."
            )
        try:
            ds = datasets.load_dataset(str(path), split=split, **load_kwargs)
        except Exception as err:
            raise ValueError(
                f"Could not load split {split!r} from folder {path}: {type(err).__name__}: {err}"
            ) from err
        source = f"{path} (split {split!r})"
    elif _looks_like_path(name):
        raise FileNotFoundError(f"No such file or folder: {name!r}.")
    else:
        try:
            ds = datasets.load_dataset(name, split=split, **load_kwargs)
        except Exception as err:
            raise FileNotFoundError(
                f"{name!r} is not a local file or folder, and it could not be fetched as a Hub dataset "
                f"(split {split!r}): {type(err).__name__}: {err}"
            ) from err
        source = f"Hub dataset {name!r} (split {split!r})"
    if not isinstance(ds, datasets.Dataset):
        raise ValueError(f"Expected a datasets.Dataset from {source}, got {type(ds).__name__}.")
    if len(ds) == 0:
        raise ValueError(f"{source} contains no rows: an instruction dataset needs at least one example.")
    return normalize_columns(ds, column_map, source=source)


def _indexed_files(path: Path, pattern: re.Pattern[str], kind: str) -> dict[int, Path]:
    """`{k: file}` of the files in `path` whose name `pattern` matches with client index `k`; two for one client is
    an error naming both."""
    files: dict[int, Path] = {}
    for p in sorted(path.iterdir()):
        m = pattern.match(p.name)
        if m is None or not p.is_file():
            continue
        k = int(m.group(1))
        if k in files:
            raise ValueError(f"Client {k} has two {kind} files in {path}: {files[k].name} and {p.name}.")
        files[k] = p
    return files


def _client_files(path: Path) -> dict[int, Path]:
    return _indexed_files(path, CLIENT_FILE_PATTERN, "training")


def _client_test_files(path: Path, files: dict[int, Path]) -> dict[int, Path] | None:
    """Client `k`'s own `test_{k}.json(l)` for every client, or `None` when the folder has none."""
    tests = _indexed_files(path, CLIENT_TEST_PATTERN, "test")
    if not tests:
        return None
    if set(tests) != set(files):
        raise ValueError(
            f"{path} has per-client test files for clients {sorted(tests)} but training files for {sorted(files)}: "
            "give every client its own test_{k}.jsonl, or none (then test.jsonl is split by category)."
        )
    return tests


def detect_client_folder(path: str | Path) -> bool:
    """Whether `path` is a folder in the Shepherd/FedDPA client layout (has `local_training_{k}.json` files).

    Args:
        path (`str` or `Path`): a candidate folder.

    Returns:
        `bool`: `True` when `path` is a folder holding at least one `local_training_{k}.json(l)` file.
    """
    path = Path(path).expanduser()
    return path.is_dir() and any(CLIENT_FILE_PATTERN.match(p.name) for p in path.iterdir())


def _categories_by_frequency(values: Sequence[str]) -> list[str]:
    counts = Counter(values)
    return sorted(counts, key=lambda c: (-counts[c], str(c)))


def load_client_folder(
    path: str | Path,
    column_map: Mapping[str, str] | None = None,
    test_file: str | Path | None = None,
) -> list[ClientData]:
    """Load a folder in the Shepherd/FedDPA layout: one training file per client plus a shared test file.

    Layout: `local_training_0.json`, ..., `local_training_{K-1}.json` (JSON array or JSON lines; `.jsonl` also
    accepted) and `test.jsonl` (or `test.json`, or `test_file`). Training and test rows need a `category`
    column. Client `k`'s categories are the categories of its training rows, most frequent first (one per client
    in FedDPA's data); its test split is every test row whose category is one of them.

    Per-client test files: when the folder holds `test_{k}.json(l)` for every client `k` (and `test_file` is not
    given), client `k`'s test split is exactly that file, and no category column is needed (e.g. a Dirichlet or IID
    partition whose test rows follow each client's own label mix, benchmarks/quality_scale.py). Some clients with
    such a file and others without is an error.

    Args:
        path (`str` or `Path`): the folder.
        column_map (`Mapping[str, str]`, *optional*): explicit `{canonical: source}` column names, applied to
            every file.
        test_file (`str` or `Path`, *optional*): the test file, as a path or a name inside `path`; defaults to
            `test.jsonl`, then `test.json`.

    Returns:
        `list[ClientData]`: one entry per client, sorted by `k`, with `client_id="client_{k}"`.

    Raises:
        `FileNotFoundError`: `path` is not a folder, or holds no client or test file.
        `ValueError`: a gap in the client numbering, a file without a category column, an empty file, or a
            client whose categories have no test rows.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"No such folder: {str(path)!r}.")
    files = _client_files(path)
    if not files:
        raise FileNotFoundError(f"No local_training_{{k}}.json files in {path}: not a client folder.")
    missing = sorted(set(range(max(files) + 1)) - set(files))
    if missing:
        raise ValueError(
            f"Client files in {path} must be numbered 0..K-1 without gaps; found {sorted(files)}, "
            f"missing local_training_{{k}}.json for k in {missing}."
        )

    own_tests = _client_test_files(path, files) if test_file is None else None
    if own_tests is not None:
        own: list[ClientData] = []
        for k in sorted(files):
            train = normalize_columns(_read_local_file(files[k]), column_map, source=str(files[k]))
            test = normalize_columns(_read_local_file(own_tests[k]), column_map, source=str(own_tests[k]))
            cats = _categories_by_frequency(list(train["category"])) if "category" in train.column_names else []
            own.append(ClientData(f"client_{k}", train, test, cats))
        return own
    if test_file is not None:
        candidates = [Path(test_file).expanduser(), path / test_file]
    else:
        candidates = [path / name for name in DEFAULT_TEST_FILES]
    test_path = next((p for p in candidates if p.is_file()), None)
    if test_path is None:
        raise FileNotFoundError(
            f"No test file in {path}: looked for {[str(p) for p in candidates]}; pass test_file= to name it."
        )

    test = normalize_columns(_read_local_file(test_path), column_map, source=str(test_path))
    if "category" not in test.column_names:
        raise ValueError(
            f"{test_path} has no category column, needed to give each client its own test rows; "
            "map one with column_map={'category': '<column>'}."
        )
    test_categories = list(test["category"])

    clients: list[ClientData] = []
    for k in sorted(files):
        train = normalize_columns(_read_local_file(files[k]), column_map, source=str(files[k]))
        if "category" not in train.column_names:
            raise ValueError(
                f"{files[k]} has no category column, needed to match the client with its test rows; "
                "map one with column_map={'category': '<column>'}."
            )
        categories = _categories_by_frequency(list(train["category"]))
        wanted = set(categories)
        test_idx = [i for i, c in enumerate(test_categories) if c in wanted]
        if not test_idx:
            raise ValueError(
                f"client_{k} ({files[k].name}) trains on categories {categories}, but {test_path.name} has no "
                f"row with those categories (test categories: {sorted(set(test_categories))})."
            )
        clients.append(ClientData(f"client_{k}", train, test.select(test_idx), categories))
    return clients


# --------------------------------------------------------------------------------------------------------
# Partitioning
# --------------------------------------------------------------------------------------------------------

PARTITION_METHODS = ("category", "dirichlet", "iid")
DIRICHLET_MAX_DRAWS = 10


def _partition_category(labels: np.ndarray, classes: list[Any], num_clients: int, rng: np.random.Generator):
    if num_clients > len(classes):
        raise ValueError(
            f"method='category' gives each client whole categories, but there are more clients ({num_clients}) "
            f"than categories ({len(classes)}); use num_clients <= {len(classes)} or method='dirichlet'/'iid'."
        )
    order = rng.permutation(len(classes))
    owner = {classes[j]: pos % num_clients for pos, j in enumerate(order)}
    client_of_row = np.array([owner[v] for v in labels], dtype=np.int64)
    return [np.flatnonzero(client_of_row == i) for i in range(num_clients)]


def _partition_dirichlet(
    labels: np.ndarray, classes: list[Any], num_clients: int, alpha: float, rng: np.random.Generator
):
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0 for method='dirichlet', got {alpha}.")
    parts: list[np.ndarray] = []
    for _ in range(DIRICHLET_MAX_DRAWS):  # like flwr-datasets: redraw until every client has a minimum size
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for cls in classes:
            idx = rng.permutation(np.flatnonzero(labels == cls))
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(np.int64)
            for i, chunk in enumerate(np.split(idx, cuts)):
                buckets[i].append(chunk)
        parts = [np.sort(np.concatenate(b)) for b in buckets]
        if min(len(p) for p in parts) >= MIN_CLIENT_ROWS:
            break
    return parts


def partition_dataset(
    ds: datasets.Dataset,
    num_clients: int,
    method: str = "category",
    column: str = "category",
    alpha: float = 0.5,
    seed: int = 0,
    test_fraction: float = 0.1,
    min_test: int = 1,
) -> list[ClientData]:
    """Split one dataset across `num_clients` clients, each with a seeded held-out test split.

    Args:
        ds (`datasets.Dataset`): the rows to split (usually from `load_instruction_dataset`).
        num_clients (`int`): number of clients.
        method (`str`, *optional*, defaults to `"category"`):
            - `"category"`: pathological non-IID split; each client gets whole categories of `column`
              (categories shuffled with `seed`, then dealt round-robin). Needs `num_clients` <= number of
              categories.
            - `"dirichlet"`: for each category, Dirichlet(`alpha`) proportions over clients (smaller `alpha`, more
              skew); redrawn (up to 10 times) until every client has at least 2 rows.
            - `"iid"`: a shuffled, near-even split (`column` not needed).
        column (`str`, *optional*, defaults to `"category"`): the label column of the non-IID methods.
        alpha (`float`, *optional*, defaults to 0.5): Dirichlet concentration.
        seed (`int`, *optional*, defaults to 0): same seed, same partition and test splits.
        test_fraction (`float`, *optional*, defaults to 0.1): fraction of each client's rows held out for test.
        min_test (`int`, *optional*, defaults to 1): minimum number of test rows per client (at least one
            training row is always kept).

    Returns:
        `list[ClientData]`: `client_0`, ..., every row of `ds` in exactly one client's train or test split.
        `categories` lists the client's categories (from `column` when present), most frequent first.

    Raises:
        `ValueError`: unknown method, missing `column`, more clients than categories (`"category"`), or a client
            left with fewer than 2 rows.
    """
    if method not in PARTITION_METHODS:
        raise ValueError(f"Unknown partition method {method!r}; choose one of {list(PARTITION_METHODS)}.")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}.")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}.")
    if min_test < 0:
        raise ValueError(f"min_test must be >= 0, got {min_test}.")
    has_column = column in ds.column_names
    if method != "iid" and not has_column:
        raise ValueError(
            f"method={method!r} splits by the {column!r} column, which the dataset lacks; columns present: "
            f"{ds.column_names}. Pass column=<name> or use method='iid'."
        )

    rng = np.random.default_rng(seed)
    labels = np.asarray(list(ds[column]), dtype=object) if has_column else None
    if method == "iid":
        parts = [np.sort(p) for p in np.array_split(rng.permutation(len(ds)), num_clients)]
    else:
        classes = sorted(set(labels.tolist()), key=str)
        if method == "category":
            parts = _partition_category(labels, classes, num_clients, rng)
        else:
            parts = _partition_dirichlet(labels, classes, num_clients, alpha, rng)

    for i, part in enumerate(parts):
        if len(part) < MIN_CLIENT_ROWS:
            raise ValueError(
                f"client_{i} gets {len(part)} row(s) with method={method!r} ({len(ds)} rows, {num_clients} "
                f"clients); every client needs at least {MIN_CLIENT_ROWS} (train + test). Use fewer clients or "
                "another partition (e.g. method='iid', or a larger alpha for 'dirichlet')."
            )

    clients: list[ClientData] = []
    for i, part in enumerate(parts):
        n_test = min(max(min_test, int(round(test_fraction * len(part)))), len(part) - 1)
        split_rng = np.random.default_rng([seed, i])
        is_test = np.zeros(len(part), dtype=bool)
        is_test[split_rng.choice(len(part), size=n_test, replace=False)] = True
        categories = _categories_by_frequency(labels[part].tolist()) if has_column else []
        clients.append(
            ClientData(
                client_id=f"client_{i}",
                train=ds.select(part[~is_test].tolist()),
                test=ds.select(part[is_test].tolist()),
                categories=[str(c) for c in categories],
            )
        )
    return clients


# --------------------------------------------------------------------------------------------------------
# Formatting for TRL
# --------------------------------------------------------------------------------------------------------


def _user_content(example: Mapping[str, Any]) -> str:
    instruction = example["instruction"] or ""
    context = example.get("context") or ""
    return f"{instruction}\n\n{context}" if context else instruction


def to_conversational(example: Mapping[str, Any], system_prompt: str | None = None) -> dict[str, list[dict]]:
    """One canonical row -> TRL's conversational prompt-completion format.

    Args:
        example (`Mapping[str, Any]`): a row with `instruction`, `response` and optionally `context`.
        system_prompt (`str`, *optional*): prepended as a `system` message.

    Returns:
        `dict`: `{"prompt": [{"role": "user", "content": ...}], "completion": [{"role": "assistant", ...}]}`;
        the user content is the instruction, followed by `"\\n\\n"` and the context when there is one.
    """
    prompt = [{"role": "system", "content": system_prompt}] if system_prompt else []
    prompt.append({"role": "user", "content": _user_content(example)})
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": example["response"] or ""}]}


def to_prompt_completion_text(example: Mapping[str, Any], system_prompt: str | None = None) -> dict[str, str]:
    """One canonical row -> TRL's plain-text prompt-completion format (for tokenizers without a chat template).

    The prompt follows the Alpaca layout: `"### Instruction:\\n{instruction}\\n\\n"`, then
    `"### Input:\\n{context}\\n\\n"` when there is a context, then `"### Response:\\n"`.

    Args:
        example (`Mapping[str, Any]`): a row with `instruction`, `response` and optionally `context`.
        system_prompt (`str`, *optional*): a first paragraph before the instruction.

    Returns:
        `dict`: `{"prompt": str, "completion": str}`; the completion is the response.
    """
    prompt = f"{system_prompt}\n\n" if system_prompt else ""
    prompt += f"### Instruction:\n{example['instruction'] or ''}\n\n"
    context = example.get("context") or ""
    if context:
        prompt += f"### Input:\n{context}\n\n"
    prompt += "### Response:\n"
    return {"prompt": prompt, "completion": example["response"] or ""}


def format_for_tokenizer(ds: datasets.Dataset, tokenizer: Any, system_prompt: str | None = None) -> datasets.Dataset:
    """Format canonical rows for `trl.SFTTrainer`, choosing the format from the tokenizer.

    Args:
        ds (`datasets.Dataset`): canonical rows (other column names are normalized first, by alias).
        tokenizer: a tokenizer (or processor); when `tokenizer.chat_template` is set, rows become conversational
            (`to_conversational`), otherwise plain text (`to_prompt_completion_text`).
        system_prompt (`str`, *optional*): an optional system message / first paragraph.

    Returns:
        `datasets.Dataset`: exactly two columns, `prompt` and `completion`.
    """
    if not all(c in ds.column_names for c in REQUIRED_COLUMNS):
        ds = normalize_columns(ds)
    conversational = bool(getattr(tokenizer, "chat_template", None))
    fn = to_conversational if conversational else to_prompt_completion_text
    return ds.map(
        fn,
        fn_kwargs={"system_prompt": system_prompt},
        remove_columns=ds.column_names,
        desc="Formatting (conversational)" if conversational else "Formatting (text)",
    )
