"""benchmarks/base_eval_cache.py: a quality cell reads the base model's evaluation another cell of its setting
computed, the numbers equal a recomputation, and the key changes with everything the evaluation depends on (and
with nothing else: not the adapter, not the method)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import datasets
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import base_eval_cache as bc  # noqa: E402
import quality_scale as qs  # noqa: E402

from hf_perfit.federated import FederatedConfig  # noqa: E402
from hf_perfit.federated.runtime import build_client_model  # noqa: E402
from tests.conftest import build_tokenizer, tiny_llama  # noqa: E402


def _tests(rows: list[list[int]]) -> dict[str, datasets.Dataset]:
    return {"client_0": datasets.Dataset.from_dict({"input_ids": rows, "labels": [[-100, *r[1:]] for r in rows]})}


def _model(strategy: str = "perfit", seed: int = 0, targets=("q_proj", "v_proj")):
    cfg = FederatedConfig(
        model_name_or_path="tiny", strategy=strategy, lora_r=2, num_clients=2, lora_target_modules=list(targets)
    )
    return build_client_model(tiny_llama(seed=seed), cfg)


def test_key_follows_base_weights_data_and_batch_not_adapters():
    tok, rows = build_tokenizer(), [[5, 6, 7], [8, 9]]
    model = _model()
    key = bc.base_eval_key(model, tok, _tests(rows), 8)
    assert bc.base_eval_key(model, tok, _tests(rows), 8) == key
    assert bc.base_eval_key(_model("fedit"), tok, _tests(rows), 8) == key  # another method: same base, same key
    assert bc.base_eval_key(_model(targets=("q_proj", "k_proj")), tok, _tests(rows), 8) == key  # other targets
    with torch.no_grad():  # training changes the adapter only
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(1.0)
    assert bc.base_eval_key(model, tok, _tests(rows), 8) == key

    assert bc.base_eval_key(model, tok, _tests(rows), 4) != key  # another batch
    assert bc.base_eval_key(model, tok, _tests([[5, 6, 7], [8, 10]]), 8) != key  # one token of the test rows
    assert bc.base_eval_key(_model(seed=1), tok, _tests(rows), 8) != key  # other base weights
    assert bc.base_eval_key(_model().to(torch.bfloat16), tok, _tests(rows), 8) != key  # another precision


def _fake_transport(calls: list):
    def evaluate(round_idx, jobs):
        calls.append((round_idx, [j.client_id for j in jobs]))
        return {j.client_id: {"eval_loss": 1.5, "perplexity": 4.48, "num_examples": 9} for j in jobs}, {}

    return SimpleNamespace(
        evaluate=evaluate,
        model=_model(),
        tokenizer=build_tokenizer(),
        test_sets=_tests([[5, 6, 7]]),
        train_sets={"client_0": [0] * 9},
        config=SimpleNamespace(eval_batch_size=8),
    )


def test_a_hit_evaluates_nothing_and_other_rounds_pass_through(tmp_path):
    calls: list = []
    path = tmp_path / "setting" / bc.BASE_EVAL_FILE
    logs: list[str] = []
    evaluate = bc.cached_evaluate(_fake_transport(calls), path, log=logs.append)
    job = SimpleNamespace(client_id="client_0", base=True)
    first = evaluate(-1, [job])
    assert calls == [(-1, ["client_0"])] and path.is_file()
    again = bc.cached_evaluate(_fake_transport(calls), path, log=logs.append)(-1, [job])
    assert again == first and len(calls) == 1  # read, not evaluated
    assert logs and "read from" in logs[0]
    evaluate(0, [SimpleNamespace(client_id="client_0", base=False)])  # a round's evaluation is never cached
    assert len(calls) == 2

    path.write_text("{ not json")  # a damaged cache is a miss: evaluated again and rewritten whole
    bc.cached_evaluate(_fake_transport(calls), path)(-1, [job])
    assert len(calls) == 3 and len(json.loads(path.read_text())) == 1


def test_cells_of_a_setting_share_the_base_evaluation_equal_to_a_recomputation(tmp_path, capsys):
    common = ["run", "--tiny", "--setting", "flan8_recipe", "--seeds", "0", "--threads", "1", "--no-report"]
    assert qs.main([*common, "--methods", "local", "fedit", "--root", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert out.count("base-model evaluation of 3 clients: read from") == 1  # the second cell read the first's
    cache = json.loads((tmp_path / "a" / "flan8_recipe" / bc.BASE_EVAL_FILE).read_text())
    assert len(cache) == 1 and sorted(next(iter(cache.values()))) == ["client_0", "client_1", "client_2"]

    def base(root: Path, method: str) -> list[dict]:
        lines = (root / "flan8_recipe" / "seed0" / method / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["round"] == -1]

    assert base(tmp_path / "a", "fedit") == base(tmp_path / "a", "local")
    # the same cell in a root without the cache evaluates the base model itself, and gets the same numbers
    assert qs.main([*common, "--methods", "fedit", "--root", str(tmp_path / "b")]) == 0
    assert "read from" not in capsys.readouterr().out
    assert base(tmp_path / "b", "fedit") == base(tmp_path / "a", "fedit")
