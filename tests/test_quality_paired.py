"""benchmarks/quality_paired.py: two rows of the quality table compared paired by seed and client, on a results file
whose numbers are chosen so that every figure is known exactly."""

from __future__ import annotations

import json
import math

import pytest

from .conftest import benchmark_module

E = math.exp
# 3 clients, 3 rounds: [base, after round 1, 2, 3]. y is 1.0 everywhere after round 1 (log 0), so x's logs are the
# paired differences. After round 3, x's log is -0.1/-0.3/-0.2 (seed 0) and -0.1/-0.1/-0.4 (seed 1): the client means
# over the seeds are -0.1, -0.2, -0.3 (mean -0.2, standard deviation 0.1). After round 2 it is -0.2 everywhere, so the
# mean over the last 2 rounds per client is -0.15, -0.2, -0.25 (mean -0.2, standard deviation 0.05).
X = {
    "0": {"c0": [4.0, 1.0, E(-0.2), E(-0.1)], "c1": [4.0, 1.0, E(-0.2), E(-0.3)], "c2": [4.0, 1.0, E(-0.2), E(-0.2)]},
    "1": {"c0": [4.0, 1.0, E(-0.2), E(-0.1)], "c1": [4.0, 1.0, E(-0.2), E(-0.1)], "c2": [4.0, 1.0, E(-0.2), E(-0.4)]},
    "2": {"c0": [4.0, 9.0, 9.0, 9.0], "c1": [4.0, 9.0, 9.0, 9.0], "c2": [4.0, 9.0, 9.0, 9.0]},  # y has no seed 2
}
Y = {s: {c: [4.0, 1.0, 1.0, 1.0] for c in ("c0", "c1", "c2")} for s in ("0", "1")}
# x, then one fine-tuning entry: 0.5 for every client (log ratio to y: log 0.5)
X_FT = {s: {c: [*v, 0.5] for c, v in X[s].items()} for s in ("0", "1")}
RESULTS = {"s": {"x": X, "y": Y, "x_ft": X_FT}}
T975_DF2 = 4.302652729749464  # Student t, 97.5% quantile, 2 degrees of freedom


def test_paired_ratio_interval_and_verdict_by_both_readouts(tmp_path, capsys):
    paired = benchmark_module("quality_paired")
    out = paired.paired_table(RESULTS, "s", ["x", "x_ft"], ["y"], window=2)
    assert out["rounds"] == 3
    final = out["pairs"][0]["final"]
    assert final["seeds"] == ["0", "1"]  # seed 2 of x has no partner
    assert final["ratio"] == pytest.approx(E(-0.2))
    half = T975_DF2 * 0.1 / math.sqrt(3)
    assert final["low"] == pytest.approx(E(-0.2 - half)) and final["high"] == pytest.approx(E(-0.2 + half))
    assert final["high"] > 1 and final["verdict"] == "not resolved"  # 3 clients lower, but the spread is wide
    assert final["per_seed"] == {"0": pytest.approx(E(-0.2)), "1": pytest.approx(E(-0.2))}
    assert (final["clients_lower"], final["clients_higher"], final["n_clients"]) == (3, 0, 3)
    window = out["pairs"][0]["window"]
    half = T975_DF2 * 0.05 / math.sqrt(3)
    assert window["ratio"] == pytest.approx(E(-0.2)) and window["high"] == pytest.approx(E(-0.2 + half))
    assert window["verdict"] == "lower"
    # the fine-tuned row: after its fine-tuning every client is at 0.5 (no spread: the interval is the point); no
    # window of its own
    ft = out["pairs"][1]
    assert ft["final"]["ratio"] == pytest.approx(0.5) and ft["final"]["high"] == pytest.approx(0.5)
    assert ft["final"]["verdict"] == "lower" and ft["window"] is None
    # the reverse pair is the reciprocal, called higher
    back = paired.paired_table(RESULTS, "s", ["y"], ["x_ft"], window=2)["pairs"][0]["final"]
    assert back["ratio"] == pytest.approx(2.0) and back["verdict"] == "higher"

    path = tmp_path / "results.json"
    path.write_text(json.dumps(RESULTS))
    paired.main(["--results", str(path), "--setting", "s", "--methods", "x", "y", "x_ft", "--window", "2"])
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.startswith("| x vs y | 0")]
    assert lines == [
        "| x vs y | 0, 1 | 0.819, 0.819 | **0.819** [0.639, 1.050] | 3/0 of 3 | not resolved"
        " | 0.819, 0.819 | **0.819** [0.723, 0.927] | 3/0 of 3 | lower |"
    ]
    assert "| x vs x_ft | 0, 1 |" in text and "| y vs x_ft | 0, 1 |" in text  # every pair of --methods


def test_paired_refuses_what_it_cannot_compare(tmp_path):
    paired = benchmark_module("quality_paired")
    with pytest.raises(SystemExit, match=r"no setting 'q' in the results; there are: s"):
        paired.paired_table(RESULTS, "q", ["x"], ["y"], 2)
    with pytest.raises(SystemExit, match=r"zz: no results in 's'"):
        paired.paired_table(RESULTS, "s", ["x"], ["zz"], 2)
    with pytest.raises(ValueError, match=r"window=4 must be between 1 and the number of rounds \(3\)"):
        paired.paired_table(RESULTS, "s", ["x"], ["y"], 4)
    with pytest.raises(SystemExit, match=r"no pair to compare"):
        paired.paired_table(RESULTS, "s", ["x"], None, 2)
    only_two = {"s": {"x": {"2": X["2"]}, "y": Y}}
    with pytest.raises(SystemExit, match=r"the two rows share no seed"):
        paired.paired_table(only_two, "s", ["x"], ["y"], 2)
    one_client = {"s": {"x": {"0": {"c0": X["0"]["c0"]}}, "y": Y}}
    with pytest.raises(SystemExit, match=r"share 1 client\(s\) on seeds \['0'\]: an interval needs two"):
        paired.paired_table(one_client, "s", ["x"], ["y"], 2)
    with pytest.raises(SystemExit, match=r"no such file; run `python benchmarks/quality_scale.py report` first"):
        paired.main(["--results", str(tmp_path / "missing.json"), "--methods", "x"])


def test_seeds_option_pairs_one_seed_with_its_own_interval():
    paired = benchmark_module("quality_paired")
    final = paired.paired_table(RESULTS, "s", ["x"], ["y"], 2, seeds=["1"])["pairs"][0]["final"]
    # seed 1 alone: differences -0.1, -0.1, -0.4 (mean -0.2, standard deviation sqrt(0.03))
    half = T975_DF2 * math.sqrt(0.03) / math.sqrt(3)
    assert final["seeds"] == ["1"] and final["per_seed"] == {"1": pytest.approx(E(-0.2))}
    assert final["low"] == pytest.approx(E(-0.2 - half)) and final["high"] == pytest.approx(E(-0.2 + half))
    with pytest.raises(SystemExit, match=r"y has no seed 2 in 's'; it has: 0, 1\."):
        paired.paired_table(RESULTS, "s", ["x"], ["y"], 2, seeds=["2"])


def test_per_round_course_pairs_each_round_on_the_clients_evaluated_then(tmp_path, capsys):
    paired = benchmark_module("quality_paired")
    # a sampled setting: after round 0 only c0 was evaluated (the others null in both rows); after round 1 all three
    x = {"0": {"c0": [4.0, E(-0.2), E(-0.1)], "c1": [4.0, None, E(-0.3)], "c2": [4.0, None, E(-0.2)]}}
    y = {"0": {c: [4.0, None if c != "c0" else 1.0, 1.0] for c in ("c0", "c1", "c2")}}
    sampled = {"s": {"x": x, "y": y}}
    course = paired.paired_table(sampled, "s", ["x"], ["y"], 1, rounds_course=True)["pairs"][0]["per_round"]
    first, last = course["0"]
    assert first == {"ratio": pytest.approx(E(-0.2)), "low": None, "high": None, "clients_lower": 1, "n_clients": 1}
    half = T975_DF2 * 0.1 / math.sqrt(3)
    assert last["ratio"] == pytest.approx(E(-0.2)) and last["high"] == pytest.approx(E(-0.2 + half))
    assert (last["clients_lower"], last["n_clients"]) == (3, 3)

    # the fine-tuned row: its training rounds only (x's), per seed; round 0 is y's 1.0 everywhere: ratio exactly 1
    course = paired.paired_table(RESULTS, "s", ["x_ft"], ["y"], 2, rounds_course=True)["pairs"][0]["per_round"]
    assert list(course) == ["0", "1"] and [len(c) for c in course.values()] == [3, 3]
    assert course["1"][0] == {"ratio": 1.0, "low": 1.0, "high": 1.0, "clients_lower": 0, "n_clients": 3}
    assert course["1"][2]["ratio"] == pytest.approx(E(-0.2))

    path = tmp_path / "results.json"
    path.write_text(json.dumps(sampled))
    paired.main(
        ["--results", str(path), "--setting", "s", "--methods", "x", "--against", "y", "--window", "1", "--per_round"]
    )
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("| x vs y: after round (from 0) | seed 0: x/y [95% over clients] | seed 0: x lower |")
    assert lines[start + 2 :] == ["| 0 | 0.819 | 1 of 1 |", "| 1 | 0.819 [0.639, 1.050] | 3 of 3 |"]
