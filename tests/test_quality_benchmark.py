"""benchmarks/quality_scale.py's machinery on the tiny random Llama: cells computed once and reused, quality.json's
shape, the partitions it deals, and benchmarks/quality.py's tolerance of config keys added after a run was saved; the
settings YAMLs plus overrides giving exactly the configs of the cached runs (commit 6705756's), old flags, errors."""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import quality as q  # noqa: E402
import quality_grid as grid  # noqa: E402
import quality_partition as qp  # noqa: E402
import quality_run as qrun  # noqa: E402
import quality_scale as qs  # noqa: E402
import quality_scale_report as qr  # noqa: E402
import quality_setup as qset  # noqa: E402

# the fixture was written with these two: the comparison must normalise exactly as the generation did
from tests.fixtures.make_quality_configs import _data as _client_folder  # noqa: E402
from tests.fixtures.make_quality_configs import _norm as _normalized  # noqa: E402


def test_two_methods_two_seeds_then_reused(tmp_path, capsys):
    argv = ["run", "--tiny", "--setting", "flan8_recipe", "--seeds", "0", "1", "--methods", "local", "perfit"]
    argv += ["--root", str(tmp_path), "--threads", "1"]
    assert qs.main(argv) == 0
    assert "cells: trained 4, reused 0, skipped 0, failed 0, refused 0" in capsys.readouterr().out
    results = json.loads((tmp_path / "quality.json").read_text())
    assert list(results) == ["flan8_recipe"]
    assert sorted(results["flan8_recipe"]) == ["local", "perfit"]
    rounds = qset._yaml(qset.TINY_CONFIG)["num_rounds"]
    for seeds in results["flan8_recipe"].values():
        assert sorted(seeds) == ["0", "1"]
        for clients in seeds.values():
            assert sorted(clients) == ["client_0", "client_1", "client_2"]
            for values in clients.values():
                # [base model, after round 1, ..., after round T]: every client evaluated every round here
                assert len(values) == rounds + 1 and all(isinstance(v, float) and v > 1 for v in values)
    base = {c: v[0] for c, v in results["flan8_recipe"]["local"]["0"].items()}
    assert all(results["flan8_recipe"][m][s][c][0] == base[c] for m in ("local", "perfit") for s in "01" for c in base)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("flan8_recipe/seed*/*/metrics.jsonl")}
    assert len(stamps) == 4
    section = (tmp_path / "benchmarks_section.md").read_text()
    assert "| fedit | – | pending |" in section and "| perfit | 0, 1 | **" in section
    # the device of every cell (fp32 on CPU, bf16 on CUDA): where these 4 ran, the CPU or a visible GPU
    device = qrun._device()
    assert f"{device} 4." in section if device == "cpu" else f"{device} bf16 4." in section

    assert qs.main(argv) == 0
    assert "cells: trained 0, reused 4, skipped 0, failed 0, refused 0" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing retrained, nothing rewritten
    assert json.loads((tmp_path / "quality.json").read_text()) == results


def test_deal_uses_the_same_cuts_for_train_and_test():
    # equal train and test pools per category: the same proportions must give every client equal counts
    labels = [c for c in "abc" for _ in range(40)]
    train, test, draws = qp.deal(labels, labels, 7, "dirichlet", 0.5, seed=3, min_train=1, min_test=1)
    assert draws >= 1
    for tr, te in zip(train, test, strict=True):
        assert Counter(labels[i] for i in tr) == Counter(labels[i] for i in te)
    assert sorted(i for part in train for i in part) == list(range(len(labels)))  # every row exactly once
    again = qp.deal(labels, labels, 7, "dirichlet", 0.5, seed=3, min_train=1, min_test=1)
    assert all((a == b).all() for a, b in zip(train, again[0], strict=True))
    iid_train, iid_test, _ = qp.deal(labels, labels[:70], 7, "iid", None, seed=0, min_train=1, min_test=1)
    assert [len(p) for p in iid_train] == [18] * 1 + [17] * 6 and [len(p) for p in iid_test] == [10] * 7
    with pytest.raises(ValueError, match="no dirichlet partition"):
        qp.deal(labels, labels, 7, "dirichlet", 0.5, seed=0, min_train=30, min_test=1)


def test_run_status_tolerates_keys_added_later(tmp_path):
    from hf_perfit.federated import FederatedConfig

    config = FederatedConfig(strategy="fedit", dataset_name="x", output_dir=str(tmp_path))
    saved = config.to_dict()
    del saved["perfit_init"]  # a run saved before the key existed had its default
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "checkpoint.json").write_text(json.dumps({"completed_rounds": 1, "config": saved}))
    assert qrun.run_status(tmp_path, config, ["client_0"]) == "partial"
    config.perfit_init = "zero"
    with pytest.raises(SystemExit, match=r"perfit_init: 'symmetric' there, 'zero' now"):
        qrun.run_status(tmp_path, config, ["client_0"])


FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "quality_configs.json").read_text())
"""`FederatedConfig.to_dict()` of every run the benchmarks built at commit 6705756, before their settings became YAML
(written by tests/fixtures/make_quality_configs.py with that commit's code; rows added later, PerFIT's variants
`perfit_pb`, `perfit_ft` and the ones after them, pinned by its `--add` with the code that added them): cached runs
are reused only while the same command line gives exactly the same dict."""


def _quality_configs(command: str, data: Path, root: Path) -> dict[str, dict]:
    """benchmarks/quality.py's config of every row that `--methods <row> <command>` runs."""
    _, s = q.parse_args(shlex.split(command))
    n = len(list(data.glob("local_training_*.json")))
    common = s.federated()
    out = {}
    for m in qset.METHODS:
        if m == qset.HETERO and not s.perfit_budget_multipliers:
            continue
        budget = None
        if m == "fedamole":
            shapes = qset.target_shapes(s, common.lora_target_modules)
            budget = qset.fedamole_pool(
                shapes, common.lora_r, n, qset._recipe("fedamole"), s.fedamole_rank, s.fedamole_experts
            )
        out[m] = _normalized(qset.method_config(m, s, data, root / m, budget), root)
    return out


@pytest.mark.parametrize("command", list(FIXTURE["quality.py"]))
def test_quality_py_configs_are_those_of_6705756(command, tmp_path):
    n = 3 if "--tiny" in command else 8
    data = _client_folder(tmp_path / "data", n)
    assert _quality_configs(command, data, tmp_path / "root") == FIXTURE["quality.py"][command]


@pytest.mark.parametrize("tiny", [False, True], ids=["full", "tiny"])
@pytest.mark.parametrize("name", list(grid.SETTINGS))
def test_quality_scale_configs_are_those_of_6705756(name, tiny, tmp_path):
    setting = grid.SETTINGS[name]
    n = (3 if setting.partition == "flan8" else grid.TINY_PARTITION_CLIENTS) if tiny else setting.num_clients
    data = _client_folder(tmp_path / "data", n)
    root = tmp_path / "root"
    expected = FIXTURE["quality_scale.py --tiny" if tiny else "quality_scale.py"][name]
    assert sorted(expected) == ["0", "1"] and sorted(expected["0"]) == sorted(grid.methods_of(setting, ["all"]))
    for seed, runs in expected.items():
        for method, ref in runs.items():
            config, _, _ = grid.cell_config(setting, method, int(seed), root, data, tiny)
            assert _normalized(config, root) == ref, (seed, method)


def test_flan8_recipe_cells_match_the_background_command(tmp_path):
    # the running background job's command line (old flags): its runs are the cells flan8_recipe/seed0/<method>
    command = (
        "--methods fedit perfit local --rounds 10 --local-steps 10 --batch-size 4 --eval-examples 50 "
        "--rouge-examples 50 --seed 0 --threads 1 --no-write --data /data --output-root x"
    )
    args, s = q.parse_args(command.split())
    assert args.methods == ["fedit", "perfit", "local"] and s.rouge_examples == 50 and s.data == "/data"
    assert (
        s.overrides
        == "--num_rounds 10 --local_steps 10 --per_device_train_batch_size 4 --max_eval_examples 50 --seed 0".split()
    )
    data = _client_folder(tmp_path / "data", 8)
    root = tmp_path / "root"
    for m in args.methods:
        config = _normalized(qset.method_config(m, s, data, root / "flan8_recipe" / "seed0" / m), root)
        assert config == FIXTURE["quality_scale.py"]["flan8_recipe"]["0"][m]
    cell = grid.base_settings(grid.SETTINGS["flan8_recipe"], 0, data, tiny=False)
    assert (cell.rouge_examples, cell.max_new_tokens, cell.tiny) == (50, 32, False)
    assert grid.storage(grid.SETTINGS["alpha0.5"]).name == "dirichlet40_f20"
    assert grid.config_path(grid.SETTINGS["alpha0.5"]).name == "dirichlet40_f20.yaml"
    assert grid.methods_of(grid.SETTINGS["flan8_recipe"], ["ablations"])[0] == "perfit"


def test_old_and_new_flags_give_the_same_settings_and_new_commands():
    old = "--rounds 10 --local-steps 10 --batch-size 4 --lr=1e-4 --eval-examples 50 --targets q_proj k_proj --lora-r 4"
    new = (
        "--num_rounds 10 --local_steps 10 --per_device_train_batch_size 4 --learning_rate=1e-4 "
        "--max_eval_examples 50 --lora_target_modules q_proj k_proj --lora_r 4"
    )
    (_, a), (_, b) = q.parse_args(old.split()), q.parse_args(new.split())
    assert a == b and a.overrides == new.split()
    c = a.federated()
    assert (c.num_rounds, c.local_steps, c.learning_rate, c.lora_target_modules) == (
        10,
        10,
        1e-4,
        ["q_proj", "k_proj"],
    )
    assert c.search_steps == 10  # PerFIT searches over all of the first round's local steps unless given
    commands = q.commands_for(a, qset.DEFAULT_ROOT, qset.DEFAULT_ROOT)
    assert commands[1] == "python benchmarks/quality.py --methods local " + new
    assert commands[-1] == "python benchmarks/quality.py --report-only " + new
    _, s = q.parse_args(["--config", "benchmarks/settings/flan8_recipe.yaml", "--rouge-examples", "50", "--tiny"])
    assert q.commands_for(s, Path("/x"), qset.DEFAULT_ROOT)[0] == (
        "python benchmarks/quality.py --methods base --tiny --config benchmarks/settings/flan8_recipe.yaml "
        "--rouge-examples 50 --output-root /x"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num_round", "4"], r"'num_round': did you mean 'num_rounds'\?"),
        (["--rounds", "x"], r"--num_rounds/--num-rounds: invalid int value: 'x'; `perfit federate --help`"),
        (["--learning_rate", "0"], r"learning_rate=0.0 is not allowed"),
        (["--strategy", "fedit"], r"the benchmark sets strategy \(--methods\) itself"),
        (["--dataset_name", "d"], r"dataset_name \(--data \(and --split\)\)"),
        (["--budget_multipliers", "1", "1"], r"--perfit-budget-multipliers"),
        (["--config", "nope.yaml"], r"--config nope.yaml: no such file \(the settings are in benchmarks/settings/\)"),
        (["--search_mode", "train", "--search_steps", "7"], r"search_steps=7 > local_steps=6"),
    ],
)
def test_bad_settings_fail_naming_the_fix(argv, message):
    with pytest.raises(SystemExit, match=message):
        q.parse_args(argv)


def test_settings_of_old_runs_read_as_overrides(tmp_path):
    # quality_settings.json as 6705756 wrote it (its own field per federated setting)
    old = {"rounds": 10, "local_steps": 10, "batch_size": 4, "max_length": 128, "learning_rate": 0.0002}
    old |= {"eval_examples": 50, "rouge_examples": 50, "max_new_tokens": 32, "seed": 1, "lora_r": 8, "lora_alpha": 16}
    old |= {"targets": ["q_proj", "v_proj"], "expansion_factor": 4, "search_steps": 0, "prune_iterations": 3}
    old |= {"importance": "taylor1", "fedamole_rank": 0, "fedamole_experts": 0, "data": "/data"}
    old |= {"search_mode": "foresight", "search_batches": 8, "perfit_budget_multipliers": [], "split": "test"}
    old |= {"validation_examples": 50, "tiny": False}
    (tmp_path / "fedit").mkdir()
    (tmp_path / "fedit" / qset.SETTINGS_FILE).write_text(json.dumps(old))
    s = qset.stored_settings(tmp_path)
    assert s.overrides == "--num_rounds 10 --local_steps 10 --max_eval_examples 50 --seed 1".split()
    assert (s.config, s.rouge_examples, s.data) == (qset.DEFAULT_CONFIG, 50, "/data")
    _, again = q.parse_args([*s.overrides, "--rouge-examples", "50", "--data", "/data"])
    assert again == s


def test_quality_scale_overrides_need_a_root_of_their_own(tmp_path):
    with pytest.raises(SystemExit):
        qs.parse_args(["run", "--setting", "flan8_recipe", "--learning_rate", "1e-4"])
    with pytest.raises(SystemExit):
        qs.parse_args(["report", "--root", str(tmp_path), "--learning_rate", "1e-4"])
    with pytest.raises(SystemExit, match="did you mean 'learning_rate'"):
        qs.parse_args(["plan", "--root", str(tmp_path), "--learnig_rate", "1e-4"])
    args = qs.parse_args(["plan", "--setting", "iid", "--root", str(tmp_path), "--lr", "1e-4"])
    assert args.overrides == ["--learning_rate", "1e-4"]
    data = _client_folder(tmp_path / "data", 40)
    config, s, _ = grid.cell_config(grid.SETTINGS["iid"], "perfit", 2, tmp_path, data, False, args.overrides)
    assert (config.learning_rate, config.seed, config.num_rounds, config.fraction_clients) == (1e-4, 2, 20, 0.2)
    assert s.overrides == ["--seed", "2", "--learning_rate", "1e-4"]


@pytest.mark.parametrize(
    "source, tuned",
    [("fedit", "fedit_ft"), ("perfit", "perfit_ft"), ("perfit_pb", "perfit_pb_ft"), ("perfit_bsel", "perfit_bsel_ft")],
)
def test_finetuned_row_forked_from_its_source_equals_it_from_scratch(source, tuned, tmp_path, capsys):
    from safetensors.torch import load_file

    assert grid.METHODS[tuned].fork_of == source
    common = ["run", "--tiny", "--setting", "flan8_recipe", "--seeds", "0", "--no-report", "--threads", "1"]
    common += ["--device", "cpu", "--bf16", "false"]  # bit-for-bit (conftest.CPU_FP32); bf16: test_resume_bf16.py
    assert qs.main([*common, "--methods", source, tuned, "--root", str(tmp_path / "fork")]) == 0
    assert (
        f"forked the finished run {tmp_path / 'fork' / 'flan8_recipe' / 'seed0' / source}" in capsys.readouterr().out
    )
    assert qs.main([*common, "--methods", tuned, "--no-fork", "--root", str(tmp_path / "scratch")]) == 0
    assert "forked the finished run" not in capsys.readouterr().out
    runs = {k: tmp_path / k / "flan8_recipe" / "seed0" / tuned for k in ("fork", "scratch")}
    records = {k: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()] for k, p in runs.items()}
    assert records["fork"] == records["scratch"]  # every round's and the fine-tuning's evaluation, exactly
    assert any(r.get("finetune") for r in records["fork"])
    for cid in ("client_0", "client_1", "client_2"):
        a, b = (load_file(str(p / "clients" / cid / "adapter" / "adapter_model.safetensors")) for p in runs.values())
        assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


@pytest.mark.parametrize("tiny", [False, True], ids=["full", "tiny"])
def test_perfit_variants_differ_from_perfit_in_their_one_change_only(tiny, tmp_path):
    # the ablation that isolates each variant's gain: the same run as `perfit` but for one key
    setting = grid.SETTINGS["flan8_recipe"]
    assert {"perfit", "perfit_pb", "perfit_ft", "perfit_pb_ft"} <= set(grid.methods_of(setting, ["ablations"]))
    data = _client_folder(tmp_path / "data", 3 if tiny else 8)
    configs = {m: grid.cell_config(setting, m, 0, tmp_path, data, tiny)[0].to_dict() for m in grid.METHODS}

    def changed(m: str, against: str) -> set[str]:
        return {k for k in configs[against] if k != "output_dir" and configs[m][k] != configs[against][k]}

    assert changed("perfit_pb", "perfit") == {"strategy_options"}
    assert changed("perfit_ft", "perfit") == {"finetune_steps"}
    assert changed("perfit_pb_ft", "perfit_pb") == {"finetune_steps"}  # fine-tuning isolated on top of personal B
    assert changed("perfit_pb_ft", "perfit_ft") == {"strategy_options"}  # personal B isolated on top of fine-tuning
    assert configs["perfit_pb"]["strategy_options"] == {"personal_b": True}
    assert configs["perfit_ft"]["finetune_steps"] == configs["perfit"]["local_steps"]
    assert grid.METHODS["perfit_pb_ft"].fork_of == "perfit_pb"
    assert changed("perfit_bsel", "perfit") == {"strategy_options"}
    assert changed("perfit_bsel_ft", "perfit_bsel") == {"finetune_steps"}  # fine-tuning isolated on top of the choice
    assert grid.METHODS["perfit_bsel_ft"].fork_of == "perfit_bsel"
    for variant in ("perfit_pb", "perfit_bsel"):  # γ = 8 isolated on top of each variant, and as on faithful PerFIT
        assert changed(f"{variant}_g8", variant) == {"expansion_factor"} == changed("perfit_g8", "perfit")
        assert configs[f"{variant}_g8"]["expansion_factor"] == 8


def test_personal_b_recipe_is_the_flan8_recipe_plus_the_measured_variant(tmp_path):
    # the recipe docs/perfit.md recommends must be the perfit_pb_g8 row the benchmark measured, on the recipe's scale
    from hf_perfit.federated import load_config

    recipes = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m" / "perfit"
    data = _client_folder(tmp_path / "data", 8)
    plain, variant = (
        load_config(recipes / name, ["--dataset_name", str(data)]).to_dict()
        for name in ("config_flan8.yaml", "config_flan8_personal_b.yaml")
    )
    assert {k for k in plain if plain[k] != variant[k]} == {"strategy_options", "expansion_factor", "output_dir"}
    row = grid.cell_config(grid.SETTINGS["flan8_recipe"], "perfit_pb_g8", 0, tmp_path, data, False)[0].to_dict()
    keys = ("strategy_options", "expansion_factor", "finetune_steps")
    assert [variant[k] for k in keys] == [row[k] for k in keys]
    assert (variant["num_rounds"], variant["local_steps"]) == (row["num_rounds"], row["local_steps"])


def test_plot_curves_and_their_ratio_to_fedit_of_the_same_seed(tmp_path):
    import math

    # geometric mean over clients per round, None where no client has a value
    cell = {"finished": True, "loss": {"a": [0.0, math.log(2.0)], "b": [math.log(4.0), None]}}
    assert qr.round_curves(cell) == pytest.approx([2.0, 2.0])
    assert qr.round_curves({"loss": {"a": [None, 0.0]}}) == [None, 1.0]
    # paired per round; a fine-tuned row's extra last point against the reference's last round
    assert qr.ratio_curve([4.0, 2.0, 1.5], [4.0, 2.5]) == [1.0, 0.8, 0.6]
    assert qr.ratio_curve([None, 2.0], [4.0, 2.0]) == [None, 1.0]

    setting = grid.SETTINGS["flan8_recipe"]
    path = tmp_path / "plot.png"
    assert not qr.plot_setting(setting, {}, [path], tiny=True) and not path.exists()
    fedit = {"finished": True, "loss": {"a": [1.0, 0.5], "b": [1.0, 0.7]}}
    cells = {"fedit": {0: fedit}, "perfit": {0: cell}, "local": {1: {"finished": False, "loss": cell["loss"]}}}
    assert qr.plot_setting(setting, cells, [path], tiny=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temp file and renamed


def test_plot_draws_a_row_in_one_color_in_both_panels(tmp_path, monkeypatch):
    import math

    from matplotlib import colors as mcolors
    from matplotlib import pyplot as plt

    setting = grid.SETTINGS["flan8_recipe"]
    colors = qr.method_colors(setting)
    rows = [*setting.methods, *setting.ablations]
    assert set(colors) == set(rows) and colors["perfit"] == "black"
    assert len({mcolors.to_hex(colors[m]) for m in set(rows)}) == len(set(rows))  # every row its own color

    # the left panel draws a partial row (fedprox) that the right one skips: the cycle alone would shift the colors
    def cell(finished, *losses):
        return {"finished": finished, "loss": {"a": [math.log(x) for x in losses]}}

    cells = {
        "fedit": {0: cell(True, 6.0, 3.0)},
        "fedprox": {0: cell(False, 6.0, 3.1)},
        "perfit": {0: cell(True, 6.0, 2.0)},
        "perfit_pb": {0: cell(True, 6.0, 1.8)},
    }
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    assert qr.plot_setting(setting, cells, [tmp_path / "plot.png"], tiny=False)
    left, right = figures[-1].axes

    def by_row(ax, prop):  # row name (the label before " (n seeds)") -> prop(line), legend lines only
        return {line.get_label().split(" (")[0]: prop(line) for line in ax.lines if line.get_label()[0] != "_"}

    def line_colors(ax):
        return by_row(ax, lambda line: mcolors.to_hex(line.get_color()))

    assert set(line_colors(right)) == {"fedit", "perfit", "perfit_pb"}
    for m, c in line_colors(right).items():
        assert c == line_colors(left)[m] == mcolors.to_hex(colors[m])
    # and the marker tells a variant (square) from a method (circle) where two hues are close
    assert by_row(right, lambda line: line.get_marker()) == {"fedit": "o", "perfit": "o", "perfit_pb": "s"}

    # the right panel draws the goal the issue sets for the setting: 0.77x on flan8_recipe, 1 (no worse) on IID
    def levels(ax):
        return sorted(line.get_ydata()[0] for line in ax.lines if line.get_label()[0] == "_")

    assert levels(right) == [qr.GOAL_RATIO, 1.0] and "0.77x" in right.get_ylabel()
    assert qr.plot_setting(grid.SETTINGS["iid"], cells, [tmp_path / "iid.png"], tiny=False)
    right = figures[-1].axes[1]
    assert levels(right) == [1.0] and "at most 1" in right.get_ylabel()


def test_every_40_client_setting_runs_the_variants_beside_perfit(tmp_path):
    # the variant docs/perfit.md recommends is measured where clients share tasks too (IID included), as an ablation
    # of `perfit` on the same partition and schedule
    data = _client_folder(tmp_path / "data", 40)
    for name, setting in grid.SETTINGS.items():
        if setting.partition == "flan8":
            continue
        assert grid.methods_of(setting, ["ablations"]) == [
            "perfit",
            "perfit_pb",
            "perfit_pb_ft",
            "perfit_bsel",
            "perfit_bsel_ft",
            "perfit_pb_g8",
            "perfit_bsel_g8",
        ], name
        configs = {m: grid.cell_config(setting, m, 0, tmp_path, data, False)[0].to_dict() for m in setting.ablations}
        for variant, base, key in (  # each one change away from the row it varies
            ("perfit_pb", "perfit", "strategy_options"),
            ("perfit_bsel", "perfit", "strategy_options"),
            ("perfit_pb_g8", "perfit_pb", "expansion_factor"),
            ("perfit_bsel_g8", "perfit_bsel", "expansion_factor"),
        ):
            changed = {k for k in configs[base] if k != "output_dir" and configs[variant][k] != configs[base][k]}
            assert changed == {key}, (name, variant)
        assert configs["perfit_bsel_g8"]["expansion_factor"] == 8, name
        assert configs["perfit_bsel"]["strategy_options"] == {"select_b_rows": grid.SELECT_B_ROWS}
        assert configs["perfit_pb_ft"]["finetune_steps"] == configs["perfit"]["local_steps"], name
        assert configs["perfit_bsel_ft"]["finetune_steps"] == configs["perfit"]["local_steps"], name


def test_run_leaves_the_cells_of_a_running_quality_py_alone(tmp_path, capsys):
    import subprocess

    seed_root = tmp_path / "flan8_recipe" / "seed0"
    fake = [sys.executable, "-c", "import time; time.sleep(120)", "benchmarks/quality.py", "--methods", "fedit"]
    proc = subprocess.Popen([*fake, "--tiny", "--output-root", str(seed_root)])
    try:
        for _ in range(100):  # until /proc shows its command line
            if seed_root.resolve() in grid.quality_py_jobs():
                break
            time.sleep(0.05)
        assert grid.quality_py_jobs()[seed_root.resolve()] == (proc.pid, {"fedit"})
        argv = ["run", "--tiny", "--setting", "flan8_recipe", "--seeds", "0", "--methods", "fedit", "--no-report"]
        assert qs.main([*argv, "--root", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert f"skipped: benchmarks/quality.py (pid {proc.pid}) computes this run" in out
        assert "cells: trained 0, reused 0, skipped 1, failed 0, refused 0" in out
        assert not (seed_root / "fedit").exists()
    finally:
        proc.kill()
        proc.wait()


def test_ratio_to_fedit_pairs_seeds_and_says_when_it_cannot():
    stats = {"perfit": {1: {"geo": 1.6}, 2: {"geo": 1.8}}, "fedit": {1: {"geo": 2.0}, 0: {"geo": 1.0}}}
    assert qr._ratio_to_fedit(stats, "perfit") == (0.8, "over seed(s) 1")  # the shared seed only
    stats["fedit"].pop(1)  # no seed in common (the report crashed here): unpaired means, and said so
    ratio, over = qr._ratio_to_fedit(stats, "perfit")
    assert ratio == pytest.approx(1.7) and over == "over different seeds (perfit: 1, 2; fedit: 0; unpaired)"


def test_order_says_when_rows_finished_different_seeds():
    stats = {"local": {0: {"geo": 1.55}, 1: {"geo": 1.58}}, "perfit": {0: {"geo": 1.65}, 1: {"geo": 1.66}}}
    geo = {m: sum(v["geo"] for v in st.values()) / len(st) for m, st in stats.items()}
    assert qr._order(["perfit", "local"], stats, geo) == "local 1.565 < perfit 1.655"  # same seeds: plain
    stats["fedamole"] = {0: {"geo": 1.60}}  # one seed: its mean would sit between the two-seed means unmarked
    geo["fedamole"] = 1.60
    assert qr._order(["perfit", "local", "fedamole"], stats, geo) == (
        "local 1.565 (2) < fedamole 1.600 (1) < perfit 1.655 (2) (in parentheses: seeds finished); "
        "over seed(s) 0, which every row finished: local 1.550 < fedamole 1.600 < perfit 1.650"
    )


def test_cell_precision_from_sessions_devices_and_bf16():
    cpu, gpu = {"device": "cpu"}, {"device": "cuda (NVIDIA H200)"}
    assert qr.cell_precision({"config": {"bf16": "auto"}, "sessions": [cpu, cpu]}) == "fp32"
    assert qr.cell_precision({"config": {"bf16": "auto"}, "sessions": [gpu]}) == "bf16"
    assert qr.cell_precision({"config": {"bf16": False}, "sessions": [gpu]}) == "fp32"  # bf16 off on the GPU
    assert qr.cell_precision({"config": {}, "sessions": [gpu, cpu]}) == "bf16+fp32"  # resumed on the other machine
    assert qr.cell_precision({"config": {}, "sessions": [{"started": "before the device field"}]}) is None


def test_ratio_to_fedit_pairs_only_seeds_of_one_precision():
    stats = {
        "perfit": {0: {"geo": 1.6, "precision": "fp32"}, 1: {"geo": 1.0, "precision": "bf16"}},
        "fedit": {0: {"geo": 2.0, "precision": "fp32"}, 1: {"geo": 2.0, "precision": "fp32"}},
    }
    ratio, over = qr._ratio_to_fedit(stats, "perfit")
    assert ratio == pytest.approx(0.8)  # seed 1 (bf16 against fp32) left out; with it the ratio would be 0.65
    assert over == "over seed(s) 0 (not seed(s) 1: bf16 in one row, fp32 in the other)"
    stats["perfit"].pop(0)
    ratio, over = qr._ratio_to_fedit(stats, "perfit")
    assert ratio == pytest.approx(0.5) and over.startswith("over seeds of different precisions")
    stats["perfit"][1]["precision"] = None  # a cell of before the device field pairs with any (all were CPU fp32)
    assert qr._ratio_to_fedit(stats, "perfit") == (0.5, "over seed(s) 1")


def test_standing_marks_a_verdict_over_mixed_precisions_provisional():
    setting = grid.SETTINGS["iid"]
    stats = {m: {0: {"geo": g, "precision": p}} for m, g, p in (("perfit", 2.2, "bf16"), ("fedit", 2.3, "bf16"))}
    stats["local"] = {0: {"geo": 2.4, "precision": "fp32"}}
    geo = {m: st[0]["geo"] for m, st in stats.items()}
    plain = qr._standing(setting, {}, stats, geo)[0]
    mixed = qr._standing(setting, {}, stats, geo, mixed=True)[0]
    assert "**met**" in plain and "provisional" not in plain
    assert "**met**" in mixed and mixed.endswith("(provisional: the rows mix bf16 and fp32 cells).")
