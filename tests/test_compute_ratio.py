"""benchmarks/compute_ratio.py: its clocks count the training steps and evaluation passes of each round, inside the
round's wall time, and leave the engine as they found it."""

from __future__ import annotations

from .conftest import benchmark_module


def test_compute_clocks_fit_inside_each_round_and_are_undone():
    compute_ratio = benchmark_module("compute_ratio")
    from hf_perfit.callbacks import PerFITPruningCallback
    from hf_perfit.federated import client as client_mod
    from hf_perfit.federated import simulation as sim_mod

    before = (client_mod._LocalTrainer.__init__, client_mod._eval_batches, sim_mod.evaluate_perplexity)
    search_before = PerFITPruningCallback.on_train_begin
    args = compute_ratio.parse_args(
        [
            "--model",
            "tiny",
            "--strategy",
            "perfit",
            "--clients",
            "2",
            "--rounds",
            "2",
            "--local-steps",
            "2",
            "--device",
            "cpu",
            "--no-write",
        ]
    )
    result = compute_ratio.run_one("tiny", args)
    assert [r["round"] for r in result["rounds"]] == [0, 1]
    for r in result["rounds"]:
        assert r["train"] > 0 and r["eval"] > 0 and r["compute"] == r["train"] + r["search"] + r["eval"]
        assert r["compute"] <= r["wall"] and r["ratio"] >= 1.0
    assert result["rounds"][0]["search"] > result["rounds"][1]["search"]  # PerFIT searches in round 0 only
    assert (client_mod._LocalTrainer.__init__, client_mod._eval_batches, sim_mod.evaluate_perplexity) == before
    assert PerFITPruningCallback.on_train_begin is search_before
    text = compute_ratio.render(result, args)
    assert "| round | wall (s) |" in text and "wall / compute" in text
