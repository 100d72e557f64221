"""Data layer: loading + column normalization, client folders, partitions, TRL formatting (synthetic data only)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pandas as pd
import pytest

from hf_perfit.data import (
    ClientData,
    detect_client_folder,
    format_for_tokenizer,
    load_client_folder,
    load_instruction_dataset,
    normalize_columns,
    partition_dataset,
    to_conversational,
    to_prompt_completion_text,
)

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "hi"},
]
DOLLY = [
    {
        "instruction": "Who wrote it?",
        "context": "Hamlet is a play.",
        "response": "Shakespeare",
        "category": "closed_qa",
    },
    {"instruction": "Name a color.", "context": "", "response": "red", "category": "brainstorming"},
]
FLAN = [
    {
        "instruction": "Is it fine?\nOPTIONS:\n- yes\n- no",
        "output": "yes",
        "task": "cola",
        "category": "acceptability",
    },
    {"instruction": "Who is he?", "output": "John", "task": "wsc", "category": "coreference"},
]


def write_json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records))
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_rows(categories: dict[str, int]) -> list[dict]:
    rows, i = [], 0
    for cat, n in categories.items():
        for _ in range(n):
            rows.append({"instruction": f"q{i}", "output": f"a{i}", "task": f"t-{cat}", "category": cat})
            i += 1
    return rows


def make_ds(categories: dict[str, int]) -> datasets.Dataset:
    return normalize_columns(datasets.Dataset.from_list(make_rows(categories)))


# ---------------------------------------------------------------------------------------------- loading


def test_alpaca_aliases(tmp_path):
    ds = load_instruction_dataset(write_json(tmp_path / "alpaca.json", ALPACA))
    assert ds.column_names == ["instruction", "context", "response"]
    assert ds[0] == {"instruction": "Add the numbers.", "context": "2 and 3", "response": "5"}
    assert ds[1]["context"] == ""


def test_dolly_aliases(tmp_path):
    ds = load_instruction_dataset(write_jsonl(tmp_path / "dolly.jsonl", DOLLY))
    assert ds.column_names == ["instruction", "context", "response", "category"]
    assert ds[0] == DOLLY[0]


def test_flan_aliases(tmp_path):
    ds = load_instruction_dataset(write_json(tmp_path / "flan.json", FLAN))
    assert ds.column_names == ["instruction", "context", "response", "category"]  # `task` dropped
    assert ds["response"] == ["yes", "John"]
    assert ds["context"] == ["", ""]
    assert ds["category"] == ["acceptability", "coreference"]


def test_column_map(tmp_path):
    records = [{"question": "2+2?", "answer": 4, "topic": "math", "output": "ignored"}]
    path = write_jsonl(tmp_path / "custom.jsonl", records)
    ds = load_instruction_dataset(
        path, column_map={"instruction": "question", "response": "answer", "category": "topic"}
    )
    assert ds[0] == {"instruction": "2+2?", "context": "", "response": "4", "category": "math"}
    # a partial map: the other canonical columns are still found by alias
    ds = load_instruction_dataset(path, column_map={"instruction": "question"})
    assert ds[0]["response"] == "ignored"


def test_column_map_errors(tmp_path):
    path = write_json(tmp_path / "a.json", ALPACA)
    with pytest.raises(ValueError, match="canonical"):
        load_instruction_dataset(path, column_map={"prompt": "instruction"})
    with pytest.raises(ValueError, match="'nope'"):
        load_instruction_dataset(path, column_map={"response": "nope"})


@pytest.mark.parametrize("fmt", ["json", "json-lines-in-.json", "jsonl", "parquet", "csv"])
def test_file_formats(tmp_path, fmt):
    if fmt == "json":
        path = write_json(tmp_path / "d.json", DOLLY)
    elif fmt == "json-lines-in-.json":
        path = write_jsonl(tmp_path / "d.json", DOLLY)
    elif fmt == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", DOLLY)
    elif fmt == "parquet":
        path = tmp_path / "d.parquet"
        pd.DataFrame(DOLLY).to_parquet(path)
    else:
        path = tmp_path / "d.csv"
        pd.DataFrame(DOLLY).to_csv(path, index=False)
    ds = load_instruction_dataset(str(path))
    assert ds.column_names == ["instruction", "context", "response", "category"]
    assert ds["response"] == ["Shakespeare", "red"]
    assert ds[0]["context"] == "Hamlet is a play."


def test_folder_splits(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ALPACA)
    write_jsonl(tmp_path / "test.jsonl", ALPACA[:1])
    assert len(load_instruction_dataset(tmp_path)) == 2
    assert len(load_instruction_dataset(tmp_path, split="test")) == 1


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_instruction_dataset(missing)
    with pytest.raises(FileNotFoundError, match="data/missing.jsonl"):
        load_instruction_dataset("data/missing.jsonl")


def test_hub_failure_is_wrapped(monkeypatch):
    def fail(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(FileNotFoundError, match="not a local file or folder.*Hub.*offline"):
        load_instruction_dataset("some-org/some-dataset")


def test_missing_column_message(tmp_path):
    path = write_json(tmp_path / "bad.json", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match="column_map") as err:
        load_instruction_dataset(path)
    assert "['question', 'answer']" in str(err.value)
    assert "'instruction'" in str(err.value) and "'response'" in str(err.value)


@pytest.mark.parametrize("content", ["", "[]"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="no rows"):
        load_instruction_dataset(path)


# ---------------------------------------------------------------------------------------------- client folder


def make_client_folder(root: Path, cats=("alpha", "beta", "gamma"), n_train=5, n_test=4) -> Path:
    root.mkdir(exist_ok=True)
    for k, cat in enumerate(cats):
        write_json(root / f"local_training_{k}.json", make_rows({cat: n_train}))
    test = make_rows({c: n_test for c in (*cats, "unused")})
    for i, row in enumerate(test):
        row["instruction"] = f"test{i}-{row['category']}"
    write_jsonl(root / "test.jsonl", test)
    return root


def test_client_folder(tmp_path):
    folder = make_client_folder(tmp_path / "fl")
    assert detect_client_folder(folder)
    assert not detect_client_folder(tmp_path)
    assert not detect_client_folder(tmp_path / "missing")
    clients = load_client_folder(folder)
    assert [c.client_id for c in clients] == ["client_0", "client_1", "client_2"]
    for client, cat in zip(clients, ["alpha", "beta", "gamma"], strict=True):
        assert isinstance(client, ClientData)
        assert client.categories == [cat]
        assert len(client.train) == 5 and client.num_examples == 5
        assert client.test["category"] == [cat] * 4
        assert all(s.endswith(f"-{cat}") for s in client.test["instruction"])
        assert client.train.column_names == ["instruction", "context", "response", "category"]


@pytest.mark.parametrize(("name", "kind"), [("local_training_1.jsonl", "training"), ("test_1.jsonl", "test")])
def test_client_folder_refuses_two_files_for_one_client(tmp_path, name, kind):
    folder = make_client_folder(tmp_path / "fl")
    if kind == "test":
        for k in range(3):
            (folder / f"test_{k}.json").write_text("[]")
    (folder / name).write_text("")
    with pytest.raises(ValueError, match=rf"Client 1 has two {kind} files in .*: .*_1\.json and {name}"):
        load_client_folder(folder)


def test_client_folder_sorted_numerically_and_multi_category(tmp_path):
    folder = make_client_folder(tmp_path / "fl", cats=[f"c{k}" for k in range(11)], n_train=2, n_test=1)
    write_json(folder / "local_training_3.json", make_rows({"c5": 1, "c3": 2}))
    clients = load_client_folder(folder)
    assert [c.client_id for c in clients] == [f"client_{k}" for k in range(11)]  # 10 after 9, not after 1
    assert clients[3].categories == ["c3", "c5"]  # most frequent first
    assert sorted(clients[3].test["category"]) == ["c3", "c5"]


def test_client_folder_test_file_and_column_map(tmp_path):
    folder = tmp_path / "fl"
    folder.mkdir()
    for k, cat in enumerate(["x", "y"]):
        write_json(folder / f"local_training_{k}.json", [{"q": f"{cat}{i}", "a": "1", "label": cat} for i in range(3)])
    write_json(folder / "eval.json", [{"q": f"t{c}", "a": "0", "label": c} for c in "xyxy"])
    cmap = {"instruction": "q", "response": "a", "category": "label"}
    with pytest.raises(FileNotFoundError, match="test_file"):
        load_client_folder(folder, column_map=cmap)
    clients = load_client_folder(folder, column_map=cmap, test_file="eval.json")
    assert [c.test["instruction"] for c in clients] == [["tx", "tx"], ["ty", "ty"]]


def test_client_folder_gap(tmp_path):
    folder = make_client_folder(tmp_path / "fl")
    (folder / "local_training_1.json").unlink()
    with pytest.raises(ValueError, match=r"missing .*\[1\]"):
        load_client_folder(folder)


def test_client_folder_empty_client(tmp_path):
    folder = make_client_folder(tmp_path / "fl")
    (folder / "local_training_2.json").write_text("[]")
    with pytest.raises(ValueError, match="local_training_2.json contains no rows"):
        load_client_folder(folder)


def test_records_without_output_are_dropped_with_a_counted_warning(tmp_path, caplog):
    rows = make_rows({"a": 4})
    del rows[1]["output"]  # the key is absent from this JSON line only
    rows[3]["output"] = "   "  # blank: nothing to learn either
    rows[2]["instruction"] = ""  # no prompt at all
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with caplog.at_level("WARNING", logger="hf_perfit.data"):
        ds = load_instruction_dataset(path)
    assert ds["instruction"] == ["q0"]
    assert caplog.messages == [
        f"{path}: dropped 3 of 4 records: 2 without a response (column 'output' missing, null or empty; first: "
        "record 1); 1 without an instruction or context (column 'instruction' missing, null or empty; first: "
        "record 2). They have nothing to train on or score; fill them in or remove them."
    ]


def test_a_file_of_records_without_output_is_refused(tmp_path):
    rows = [{"instruction": "q", "output": None}, {"instruction": "r", "output": ""}]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(ValueError, match=r"none of its 2 records can be used: 2 without a response"):
        load_instruction_dataset(path)


def test_client_left_without_rows_after_the_drop_is_refused(tmp_path):
    folder = make_client_folder(tmp_path / "fl")
    rows = json.loads((folder / "local_training_2.json").read_text())
    (folder / "local_training_2.json").write_text(json.dumps([{**r, "output": None} for r in rows]))
    with pytest.raises(ValueError, match="local_training_2.json: none of its .* records can be used"):
        load_client_folder(folder)


# ---------------------------------------------------------------------------------------------- partitions


def assert_exact_cover(ds: datasets.Dataset, clients: list[ClientData]) -> None:
    seen = [q for c in clients for split in (c.train, c.test) for q in split["instruction"]]
    assert sorted(seen) == sorted(ds["instruction"])  # every row exactly once
    assert all(len(c.train) >= 1 and len(c.test) >= 1 for c in clients)


def fingerprint(clients: list[ClientData]) -> list[tuple[list[str], list[str]]]:
    return [(c.train["instruction"], c.test["instruction"]) for c in clients]


@pytest.mark.parametrize("method", ["category", "dirichlet", "iid"])
def test_partition_exact_cover_and_determinism(method):
    ds = make_ds({f"cat{i}": 12 for i in range(6)})
    clients = partition_dataset(ds, 3, method=method, seed=7)
    assert [c.client_id for c in clients] == ["client_0", "client_1", "client_2"]
    assert_exact_cover(ds, clients)
    assert fingerprint(partition_dataset(ds, 3, method=method, seed=7)) == fingerprint(clients)
    others = [fingerprint(partition_dataset(ds, 3, method=method, seed=s)) for s in range(3)]
    assert any(o != fingerprint(clients) for o in others)
    for c in clients:  # categories describe the client's rows
        rows = set(c.train["category"]) | set(c.test["category"])
        assert set(c.categories) == rows


def test_category_partition_disjoint():
    ds = make_ds({f"cat{i}": 10 for i in range(7)})
    clients = partition_dataset(ds, 3, method="category", seed=1)
    cats = [set(c.train["category"]) | set(c.test["category"]) for c in clients]
    assert sorted(len(s) for s in cats) == [2, 2, 3]  # round-robin deal of 7 categories
    assert set.union(*cats) == {f"cat{i}" for i in range(7)}
    assert sum(len(s) for s in cats) == 7  # pairwise disjoint


def test_test_split_size():
    ds = make_ds({"a": 40, "b": 40})
    clients = partition_dataset(ds, 2, method="iid", test_fraction=0.1)
    assert [len(c.test) for c in clients] == [4, 4]
    clients = partition_dataset(ds, 2, method="iid", test_fraction=0.0, min_test=3)
    assert [len(c.test) for c in clients] == [3, 3]


def test_too_many_clients_for_categories():
    ds = make_ds({"a": 5, "b": 5, "c": 5})
    with pytest.raises(ValueError, match=r"more clients \(4\) than categories \(3\)"):
        partition_dataset(ds, 4, method="category")


def test_empty_client_error():
    ds = make_ds({"a": 3})
    with pytest.raises(ValueError, match="client_1 gets 1 row.*fewer clients"):
        partition_dataset(ds, 2, method="iid")
    ds = make_ds({"a": 6, "b": 1})
    with pytest.raises(ValueError, match=r"client_\d gets 1 row"):
        partition_dataset(ds, 2, method="category")


def test_partition_missing_column():
    ds = make_ds({"a": 4}).remove_columns("category")
    with pytest.raises(ValueError, match="'category' column"):
        partition_dataset(ds, 2, method="dirichlet")
    assert len(partition_dataset(ds, 2, method="iid")) == 2


# ---------------------------------------------------------------------------------------------- formatting


def test_to_conversational_and_text():
    row = {"instruction": "Add.", "context": "2 and 3", "response": "5"}
    conv = to_conversational(row, system_prompt="Be brief.")
    assert conv == {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add.\n\n2 and 3"}],
        "completion": [{"role": "assistant", "content": "5"}],
    }
    assert to_conversational({**row, "context": ""})["prompt"] == [{"role": "user", "content": "Add."}]
    text = to_prompt_completion_text(row)
    assert text == {"prompt": "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n", "completion": "5"}
    assert to_prompt_completion_text({**row, "context": ""})["prompt"] == "### Instruction:\nAdd.\n\n### Response:\n"


def test_format_for_tokenizer_chat_template(tokenizer):
    ds = make_ds({"a": 2})
    out = format_for_tokenizer(ds, tokenizer)
    assert out.column_names == ["prompt", "completion"]
    assert out[0] == {
        "prompt": [{"role": "user", "content": "q0"}],
        "completion": [{"role": "assistant", "content": "a0"}],
    }
    rendered = tokenizer.apply_chat_template(out[0]["prompt"] + out[0]["completion"], tokenize=False)
    assert rendered == "<|user|>q0<|assistant|>a0</s>"


def test_format_for_tokenizer_without_chat_template(tokenizer):
    tokenizer.chat_template = None
    raw = datasets.Dataset.from_list(ALPACA)  # un-normalized columns are normalized first
    out = format_for_tokenizer(raw, tokenizer)
    assert out.column_names == ["prompt", "completion"]
    assert out[0] == {
        "prompt": "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n",
        "completion": "5",
    }
