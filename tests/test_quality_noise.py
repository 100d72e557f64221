"""benchmarks/quality_noise.py: the last-round noise of the quality table's rows, on a results file whose numbers
are chosen so that every figure is known exactly."""

from __future__ import annotations

import json
import math

import pytest

from .conftest import benchmark_module

# two clients, 3 rounds: [base, after round 1, 2, 3]; `a_ft` is `a` plus one entry after its fine-tuning
RESULTS = {
    "s": {
        "a": {"0": {"c0": [4.0, 2.0, 1.0, 2.0], "c1": [4.0, 2.0, 4.0, 2.0]}, "1": {"c0": [4.0, 1.0, 1.0, 1.0]}},
        "a_ft": {"0": {"c0": [4.0, 2.0, 1.0, 2.0, 1.0], "c1": [4.0, 2.0, 4.0, 2.0, 1.0]}},
        "b": {"0": {"c0": [4.0, 3.0, 3.0, 3.0], "c1": [4.0, 3.0, 3.0, 3.0]}},
    }
}


def test_noise_table_gives_the_geometric_means_their_changes_and_the_lowest_row(tmp_path, capsys):
    noise = benchmark_module("quality_noise")
    out = noise.noise_table(RESULTS, "s", None, window=2)
    assert out["rounds"] == 3
    a = out["rows"]["a"]["0"]
    # geometric means after rounds 1, 2, 3: 2, 2, 2; client c0 moves 1 → 2 (+100%), c1 4 → 2 (-50%) in round 3
    assert a["final"] == 2.0 and a["window"] == 2.0 and a["abs_change"] == 0.0
    assert a["client_change"] == pytest.approx((0.5 + 1.0 + 1.0 + 0.5) / 4)
    assert out["rows"]["a"]["1"] == {"final": 1.0, "window": 1.0, "abs_change": 0.0, "client_change": 0.0}
    ft = out["rows"]["a_ft"]["0"]
    assert ft["final"] == 1.0 and ft["window"] is None  # its training rounds are a's: no window of its own
    assert out["rows"]["b"]["0"]["final"] == pytest.approx(3.0)
    # the fine-tuned row is the lowest by its final value, its source by the window (it has none of its own)
    assert out["lowest"] == {"0": {"final": "a_ft", "window": "a"}, "1": {"final": "a", "window": "a"}}
    assert math.isclose(noise.row_noise(RESULTS["s"]["b"]["0"], 3, 3)["abs_change"], (0.25 + 0.0 + 0.0) / 3)

    path = tmp_path / "results.json"
    path.write_text(json.dumps(RESULTS))
    noise.main(["--results", str(path), "--setting", "s", "--methods", "a", "b", "--window", "2"])
    text = capsys.readouterr().out
    assert "| a | 2.0000 / 2.0000 / 0.00% / 75.0% | 1.0000 / 1.0000 / 0.00% / 0.0% | 1.5000 (2) |" in text
    assert "seed 0: lowest by final a, by the mean of the last 2 rounds a" in text


def test_noise_table_refuses_what_it_cannot_read(tmp_path):
    noise = benchmark_module("quality_noise")
    with pytest.raises(SystemExit, match=r"no setting 'x' in the results; there are: s"):
        noise.noise_table(RESULTS, "x", None, 2)
    with pytest.raises(SystemExit, match=r"--methods zz: no results in 's'"):
        noise.noise_table(RESULTS, "s", ["a", "zz"], 2)
    with pytest.raises(ValueError, match=r"window=4 must be between 1 and the number of rounds \(3\)"):
        noise.noise_table(RESULTS, "s", None, 4)
    with pytest.raises(SystemExit, match=r"no such file; run `python benchmarks/quality_scale.py report` first"):
        noise.main(["--results", str(tmp_path / "missing.json")])
