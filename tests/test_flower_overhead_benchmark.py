"""benchmarks/flower_overhead.py: a run without `--deployment` keeps the deployment results already in its section of
docs/benchmarks.md (rows, reading, and the date and command that measured them), once and again."""

from __future__ import annotations

from .conftest import benchmark_module

_SECTION = """## Flower overhead (benchmarks/flower_overhead.py)

Command:

```bash
python benchmarks/flower_overhead.py --repeats 2 --deployment
```

Machine:

- date: 2026-11-28 21:55 UTC; repository commit 376f882

| engine | round wall (s): median | min – max |
|---|---:|---:|
| in_process_1thread | 0.20 | 0.12 – 0.33 |
| flower_simulation_1cpu | 0.45 | 0.31 – 0.50 |
| flower_deployment_warm | 7.39 | 7.20 – 7.80 |

Reading:

- Flower's own cost in its simulation runtime: +0.26 s.
- Deployment with warm ClientApp processes: 38.4×,
  with more on a second line.
- Before (commit c71495f): 17.7×.
- `in_process` with 2 threads is erratic.

## Next section

- Deployment in another section: not ours.
"""


def _flower_overhead():
    return benchmark_module("flower_overhead")


def test_a_simulation_only_run_keeps_the_deployment_results():
    fo = _flower_overhead()
    kept = fo.kept_deployment("# Benchmarks\n\n" + _SECTION)
    lines = kept.splitlines()
    assert lines[0] == fo.KEPT_START and lines[-1] == fo.KEPT_END
    assert lines[1] == (
        "Deployment arms, not re-measured by this command: from the run of 2026-11-28 21:55 UTC; repository commit "
        "376f882 (`python benchmarks/flower_overhead.py --repeats 2 --deployment`), whose `in_process_1thread` round "
        "took 0.20 s (the ratios are to it):"
    )
    assert lines[3:6] == [
        "| engine | round wall (s): median | min – max |",
        "|---|---:|---:|",
        "| flower_deployment_warm | 7.39 | 7.20 – 7.80 |",
    ]
    assert lines[7:-1] == [
        "- Deployment with warm ClientApp processes: 38.4×,",
        "  with more on a second line.",
        "- Before (commit c71495f): 17.7×.",
    ]
    # the next simulation-only run finds the kept block and carries it as it is
    again = _SECTION.replace("Reading:\n", f"Reading:\n\n{kept}\n")
    assert fo.kept_deployment(again) == kept
    # no deployment rows: nothing to keep
    assert fo.kept_deployment(_SECTION.replace("| flower_deployment_warm | 7.39 | 7.20 – 7.80 |\n", "")) == ""
    assert fo.kept_deployment("# Benchmarks\n") == ""


def test_a_deployment_only_run_replaces_only_the_kept_block():
    """`--deployment_only` writes its own kept block: in place of an earlier one, else before the section's closing
    paragraph; the simulation arms and their reading stay as they are."""
    fo = _flower_overhead()
    section = _SECTION.split("## Next section")[0].rstrip("\n") + (
        "\n\nThe machine is shared with other work (see the load average), so absolute times drift.\n"
    )
    block = f"{fo.KEPT_START}\nnew deployment rows\n{fo.KEPT_END}"
    once = fo.replace_kept(section, block)
    assert once.index(block) < once.index("The machine is shared") and once.count(fo.KEPT_START) == 1
    assert once.replace(block + "\n\n", "") == section  # nothing else changed
    again = fo.replace_kept(once, block.replace("new", "newer"))
    assert "newer deployment rows" in again and "new deployment rows" not in again
    assert again.count(fo.KEPT_START) == 1 and again.replace("newer", "new") == once
    assert fo.replace_kept("## Flower overhead\n", block) == f"## Flower overhead\n\n{block}\n"


def test_real_work_takes_three_flan8_clients_and_never_writes_the_tiny_section(tmp_path):
    """`--real`: three FLAN-8 clients' first rows, one category each, and the SmolLM2 preset's config; the results
    are printed only (the section's text is about the tiny work), and only beside `--deployment_only`."""
    import json

    import pytest

    fo = _flower_overhead()
    flan8 = tmp_path / "flan8"
    flan8.mkdir()
    for k in range(4):
        rows = [{"instruction": f"q{k}-{i}", "output": f"a{k}-{i}", "category": "x"} for i in range(fo.REAL_ROWS + 5)]
        (flan8 / f"local_training_{k}.json").write_text(json.dumps(rows))
    args = fo.parse_args(["--deployment_only", "--real", str(flan8), "--num_rounds", "2", "--local_steps", "3"])
    assert args.write is False
    fo.make_assets(tmp_path, args.real)
    rows = [json.loads(line) for line in (tmp_path / "data.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * fo.REAL_ROWS
    assert [r["category"] for r in rows[:: fo.REAL_ROWS]] == ["c0", "c1", "c2"]
    assert rows[fo.REAL_ROWS] == {"instruction": "q1-0", "response": "a1-0", "category": "c1"}
    config = fo.make_config(args, tmp_path, tmp_path / "out")
    assert (config.model_name_or_path, config.num_clients, config.per_device_train_batch_size) == (
        fo.REAL_MODEL,
        3,
        4,
    )
    assert (config.max_length, config.lora_r, config.num_rounds, config.local_steps) == (128, 8, 2, 3)
    with pytest.raises(SystemExit):
        fo.parse_args(["--real", str(flan8)])  # the simulation arms' section would describe the tiny work
    (flan8 / "local_training_2.json").unlink()
    with pytest.raises(SystemExit, match="local_training_2.json"):
        fo.make_assets(tmp_path / "b", flan8)
