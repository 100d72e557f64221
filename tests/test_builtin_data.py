"""Built-in `builtin:stdlib` dataset: content, determinism, loading through the data layer, category partitions."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import subprocess
import sys
import textwrap

import datasets
import pytest

from hf_perfit import builtin_data
from hf_perfit.builtin_data import (
    ALL_FAMILIES,
    DEFAULT_FAMILIES,
    MIN_SUMMARY_CHARS,
    build_stdlib_dataset,
    collect_stdlib_entries,
    list_builtin_datasets,
)
from hf_perfit.data import CANONICAL_COLUMNS, load_instruction_dataset, partition_dataset


def digest(ds: datasets.Dataset) -> str:
    rows = "\n".join(json.dumps(row, sort_keys=True, ensure_ascii=False) for row in ds)
    return hashlib.sha256(rows.encode("utf-8")).hexdigest()


@pytest.fixture(scope="module")
def stdlib_ds() -> datasets.Dataset:
    return build_stdlib_dataset()


@pytest.fixture(scope="module")
def stdlib_all() -> datasets.Dataset:
    return build_stdlib_dataset(families="all")


def test_columns_are_canonical(stdlib_ds):
    assert stdlib_ds.column_names == list(CANONICAL_COLUMNS)
    assert all(stdlib_ds.features[c] == datasets.Value("string") for c in CANONICAL_COLUMNS)
    assert set(stdlib_ds["context"]) == {""}


def test_families_are_distinct_categories(stdlib_ds, stdlib_all):
    assert len(set(ALL_FAMILIES)) == len(ALL_FAMILIES) >= 10
    assert sorted(set(stdlib_ds["category"])) == sorted(DEFAULT_FAMILIES)
    assert len(DEFAULT_FAMILIES) == 8
    assert sorted(set(stdlib_all["category"])) == sorted(ALL_FAMILIES)
    assert len(stdlib_ds) > 1000  # every family has 100+ items on CPython 3.11
    assert min(stdlib_all.to_pandas()["category"].value_counts()) >= 50


def test_rows_are_non_empty_short_and_unique(stdlib_ds):
    responses, instructions = stdlib_ds["response"], stdlib_ds["instruction"]
    assert all(MIN_SUMMARY_CHARS <= len(r) <= 300 for r in responses)
    assert all(r.strip() == r for r in responses)
    assert all("`" in i for i in instructions)  # every instruction names its object as code
    assert len(set(instructions)) == len(instructions)
    assert len({r.split("\n\nSignature:")[0] for r in responses}) == len(responses)


def test_response_comes_from_the_docstring(stdlib_ds):
    first_paragraph = " ".join(inspect.cleandoc(textwrap.dedent.__doc__).split("\n\n")[0].split())
    rows = [r for r in stdlib_ds if "textwrap.dedent`" in r["instruction"] or "`dedent`" in r["instruction"]]
    assert len(rows) == 1
    assert rows[0]["category"] == "text_processing"
    assert rows[0]["response"] == f"{first_paragraph}\n\nSignature: `textwrap.dedent(text)`"

    entries = {e.qualname: e for e in collect_stdlib_entries("text_processing")}
    entry = entries["textwrap.dedent"]
    assert (entry.kind, entry.signature, entry.doc) == (
        "function",
        "(text)",
        inspect.cleandoc(textwrap.dedent.__doc__),
    )
    assert entries["textwrap.TextWrapper.wrap"].kind == "method"  # methods are named Class.method, self dropped
    assert not any(name.rsplit(".", 1)[-1].startswith("_") for name in entries)


def test_third_party_patches_do_not_leak_in(stdlib_ds):
    import transformers.utils.logging  # noqa: F401  (adds warning_once & co. to logging.Logger)

    assert hasattr(logging.Logger, "warning_once")
    text = "\n".join(stdlib_ds["instruction"])
    assert "warning_once" not in text and "warning_advice" not in text
    assert "`inspect.getfile`" in text or "`getfile`" in text  # present although torch patches it


def test_same_seed_same_dataset_other_seed_other_templates(stdlib_ds):
    again = build_stdlib_dataset(seed=0)
    assert digest(again) == digest(stdlib_ds)
    other = build_stdlib_dataset(seed=1)
    assert other["response"] == stdlib_ds["response"]  # same items, same order
    assert other["category"] == stdlib_ds["category"]
    changed = sum(a != b for a, b in zip(other["instruction"], stdlib_ds["instruction"], strict=True))
    assert changed > len(stdlib_ds) // 2


def test_byte_identical_in_another_process_with_another_hash_seed(stdlib_ds):
    # load the module from its file, so the subprocess does not import hf_perfit (and torch)
    script = (
        "import hashlib, importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('bd', {builtin_data.__file__!r})\n"
        "bd = importlib.util.module_from_spec(spec); sys.modules['bd'] = bd; spec.loader.exec_module(bd)\n"
        "ds = bd.build_stdlib_dataset()\n"
        "rows = '\\n'.join(json.dumps(r, sort_keys=True, ensure_ascii=False) for r in ds)\n"
        "print(hashlib.sha256(rows.encode('utf-8')).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == digest(stdlib_ds)


def test_cap_is_seed_independent_and_lengths_respected():
    kwargs = {"max_per_category": 20, "max_response_chars": 120, "families": ["dates_time", "text_processing"]}
    a, b = build_stdlib_dataset(seed=0, **kwargs), build_stdlib_dataset(seed=3, **kwargs)
    assert len(a) == 40 and a["category"][:20] == ["text_processing"] * 20  # registry order, not the given order
    assert a["response"] == b["response"] and a["instruction"] != b["instruction"]
    assert all(len(r) <= 120 for r in a["response"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_response_chars"):
        build_stdlib_dataset(max_response_chars=10)
    with pytest.raises(ValueError, match="max_per_category"):
        build_stdlib_dataset(max_per_category=0)
    with pytest.raises(ValueError, match="families"):
        build_stdlib_dataset(families=["text_processing", "astrology"])


def test_load_instruction_dataset_builtin(stdlib_ds):
    assert list_builtin_datasets() == ["builtin:stdlib"]
    assert digest(load_instruction_dataset("builtin:stdlib")) == digest(stdlib_ds)
    ds = load_instruction_dataset("builtin:stdlib?max_per_category=15&families=dates_time,numbers_math&seed=2")
    assert len(ds) == 30 and ds.column_names == list(CANONICAL_COLUMNS)
    assert set(ds["category"]) == {"dates_time", "numbers_math"}


def test_unknown_builtin_name_and_bad_options():
    with pytest.raises(ValueError, match=r"available: \['builtin:stdlib'\]"):
        load_instruction_dataset("builtin:wikipedia")
    with pytest.raises(ValueError, match="Bad option"):
        load_instruction_dataset("builtin:stdlib?max_items=3")
    with pytest.raises(ValueError, match="Bad value"):
        load_instruction_dataset("builtin:stdlib?seed=one")


def test_category_partition_gives_one_family_per_client(stdlib_ds):
    clients = partition_dataset(stdlib_ds, 8, method="category", column="category")
    assert len(clients) == 8
    assert all(len(c.categories) == 1 for c in clients)
    assert sorted(c.categories[0] for c in clients) == sorted(DEFAULT_FAMILIES)
    for c in clients:
        assert len(c.test) >= 1 and set(c.test["category"]) == set(c.train["category"]) == set(c.categories)
    assert sum(len(c.train) + len(c.test) for c in clients) == len(stdlib_ds)


def test_category_partition_with_more_families_than_clients(stdlib_all):
    clients = partition_dataset(stdlib_all, 8, method="category", column="category")
    sizes = sorted(len(c.categories) for c in clients)
    assert sizes == [1] * 6 + [2] * 2  # whole families dealt round-robin: 10 families over 8 clients
    assert sorted(cat for c in clients for cat in c.categories) == sorted(ALL_FAMILIES)
    clients = partition_dataset(stdlib_all, 10, method="category", column="category")
    assert sorted(c.categories[0] for c in clients) == sorted(ALL_FAMILIES)
