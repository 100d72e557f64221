"""benchmarks/quality_scale.py's machinery on the tiny random Llama: cells computed once and reused, quality.json's
shape, the partitions it deals, and benchmarks/quality.py's tolerance of config keys added after a run was saved."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import quality as q  # noqa: E402
import quality_partition as qp  # noqa: E402
import quality_scale as qs  # noqa: E402


def test_two_methods_two_seeds_then_reused(tmp_path, capsys):
    argv = ["run", "--tiny", "--setting", "flan8_recipe", "--seeds", "0", "1", "--methods", "local", "perfit"]
    argv += ["--root", str(tmp_path), "--threads", "1"]
    assert qs.main(argv) == 0
    assert "cells: trained 4, reused 0, skipped 0, failed 0, refused 0" in capsys.readouterr().out
    results = json.loads((tmp_path / "quality.json").read_text())
    assert list(results) == ["flan8_recipe"]
    assert sorted(results["flan8_recipe"]) == ["local", "perfit"]
    rounds = q.TINY_DEFAULTS["rounds"]
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
    assert "cpu 4." in section  # the device of every cell (fp32 on CPU, bf16 on CUDA)

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
    assert q.run_status(tmp_path, config, ["client_0"]) == "partial"
    config.perfit_init = "zero"
    with pytest.raises(SystemExit, match=r"perfit_init: 'symmetric' there, 'zero' now"):
        q.run_status(tmp_path, config, ["client_0"])


def test_flan8_recipe_cells_match_the_background_command():
    # the command STATE.md records: quality.py defaults + these flags (the cells' runs must resume, not restart)
    setting = qs.SETTINGS["flan8_recipe"]
    s = qs.base_settings(setting, 0, Path("/data"), tiny=False)
    args, expected = q.parse_args(
        "--rounds 10 --local-steps 10 --batch-size 4 --eval-examples 50 --rouge-examples 50 --seed 0 --data /data".split()
    )
    assert s == expected
    assert qs.storage(qs.SETTINGS["alpha0.5"]).name == "dirichlet40_f20"
    assert qs.methods_of(setting, ["ablations"])[0] == "perfit" and "perfit_fedavg" in qs.methods_of(setting, ["all"])


def test_fedit_ft_forked_from_fedit_equals_fedit_ft_from_scratch(tmp_path, capsys):
    from safetensors.torch import load_file

    common = ["run", "--tiny", "--setting", "flan8_recipe", "--seeds", "0", "--no-report", "--threads", "1"]
    assert qs.main([*common, "--methods", "fedit", "fedit_ft", "--root", str(tmp_path / "fork")]) == 0
    assert "forked the finished run" in capsys.readouterr().out
    assert qs.main([*common, "--methods", "fedit_ft", "--no-fork", "--root", str(tmp_path / "scratch")]) == 0
    assert "forked the finished run" not in capsys.readouterr().out
    runs = {k: tmp_path / k / "flan8_recipe" / "seed0" / "fedit_ft" for k in ("fork", "scratch")}
    records = {k: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()] for k, p in runs.items()}
    assert records["fork"] == records["scratch"]  # every round's and the fine-tuning's evaluation, exactly
    assert any(r.get("finetune") for r in records["fork"])
    for cid in ("client_0", "client_1", "client_2"):
        a, b = (load_file(str(p / "clients" / cid / "adapter" / "adapter_model.safetensors")) for p in runs.values())
        assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_run_leaves_the_cells_of_a_running_quality_py_alone(tmp_path, capsys):
    import subprocess

    seed_root = tmp_path / "flan8_recipe" / "seed0"
    fake = [sys.executable, "-c", "import time; time.sleep(120)", "benchmarks/quality.py", "--methods", "fedit"]
    proc = subprocess.Popen([*fake, "--tiny", "--output-root", str(seed_root)])
    try:
        for _ in range(100):  # until /proc shows its command line
            if seed_root.resolve() in qs.quality_py_jobs():
                break
            time.sleep(0.05)
        assert qs.quality_py_jobs()[seed_root.resolve()] == (proc.pid, {"fedit"})
        argv = ["run", "--tiny", "--setting", "flan8_recipe", "--seeds", "0", "--methods", "fedit", "--no-report"]
        assert qs.main([*argv, "--root", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert f"skipped: benchmarks/quality.py (pid {proc.pid}) computes this run" in out
        assert "cells: trained 0, reused 0, skipped 1, failed 0, refused 0" in out
        assert not (seed_root / "fedit").exists()
    finally:
        proc.kill()
        proc.wait()
