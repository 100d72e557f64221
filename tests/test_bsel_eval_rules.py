"""benchmarks/bsel_eval_rules.py: on a finished `perfit_bsel` run of the tiny Llama, its `as_run` rule reproduces the
recorded perplexities, and its `rechosen` rule is exactly the choice the client makes at the next round's start."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from hf_perfit.federated.messages import OWN_B

from .conftest import CPU_FP32, benchmark_module, build_tokenizer, tiny_llama
from .test_perfit_variants import BSEL, _cfg, _records, _sim
from .test_simulation import _clients


def test_rules_reproduce_the_records_and_rechoose_as_the_next_round_would(tmp_path):
    rules = benchmark_module("bsel_eval_rules")
    three = _cfg(tmp_path / "three", num_rounds=3, **BSEL, **CPU_FP32)
    _sim(three).run()
    _sim(dataclasses.replace(three, num_rounds=4, output_dir=str(tmp_path / "four"))).run()
    result = rules.evaluate_rules(
        tmp_path / "three", model=tiny_llama(), tokenizer=build_tokenizer(), clients=_clients()
    )
    assert result["round"] == 2
    # what each client compared at the start of round 3 of the 4-round run (same seed: rounds 0-2 are the same run)
    nxt = {r["client"]: r for r in _records(tmp_path / "four") if r.get("round") == 3 and not r.get("summary")}
    assert sorted(result["clients"]) == sorted(nxt) == ["client_0", "client_1", "client_2"]
    for cid, v in result["clients"].items():
        assert v["ppl_as_run"] == pytest.approx(v["recorded"], rel=1e-6)  # the run's rule, re-evaluated
        assert v["ppl_as_run"] == (v["ppl_own"] if v["chosen_at_start"] else v["ppl_server"])
        assert v["select_loss_server"] == pytest.approx(nxt[cid]["select_loss_server"], rel=1e-6)
        assert v["select_loss_own"] == pytest.approx(nxt[cid]["select_loss_own"], rel=1e-6)
        assert v[OWN_B] == nxt[cid][OWN_B] == float(v["select_loss_own"] < v["select_loss_server"])
        assert v["ppl_rechosen"] == (v["ppl_own"] if v[OWN_B] else v["ppl_server"])
    for rule in rules.RULES:
        logs = [math.log(v[f"ppl_{rule}"]) for v in result["clients"].values()]
        assert result["geometric"][rule] == pytest.approx(math.exp(sum(logs) / 3), rel=1e-12)
    assert "| client_0 |" in rules.table(result)


def test_rules_refuse_a_run_without_select_b_rows(tmp_path):
    rules = benchmark_module("bsel_eval_rules")
    out = tmp_path / "plain"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(_cfg(out).to_dict()))
    with pytest.raises(ValueError, match="without select_b_rows.*select_b_rows: n > 0"):
        rules.evaluate_rules(out)
