"""The library knobs of PerFIT's ablations (issue 18): plain-FedAvg aggregation of the masked adapters, the zero init
(measurement vanishing), and per-client test files in a client folder."""

from __future__ import annotations

import json

import pytest
import torch

from hf_perfit import get_perfit_model
from hf_perfit.data import load_client_folder
from hf_perfit.federated import FederatedConfig
from hf_perfit.federated.messages import ClientUpdate
from hf_perfit.federated.strategies import PerFITStrategy
from hf_perfit.importance import taylor_score

from .conftest import tiny_llama

KEY = "w"


def _update(cid: str, values: list[float], mask: list[bool], n: int) -> ClientUpdate:
    return ClientUpdate(
        client_id=cid,
        tensors={KEY: torch.tensor(values)},
        num_examples=n,
        masks={KEY: torch.tensor(mask)},
        mask_changed=True,
    )


def _aggregate(aggregation: str) -> torch.Tensor:
    strategy = PerFITStrategy(aggregation=aggregation)
    strategy.initialize({KEY: torch.tensor([9.0, 9.0, 9.0, 9.0])})
    strategy.aggregate(
        0,
        [
            _update("a", [1.0, 2.0, 4.0, 8.0], [True, True, False, False], 1),
            _update("b", [3.0, 6.0, 8.0, 8.0], [True, False, True, False], 3),
        ],
    )
    return strategy.global_tensors[KEY]


def test_masked_aggregation_is_per_element_over_the_clients_that_kept_it():
    # element 0: both (1*1 + 3*3)/4; element 1: only a; element 2: only b; element 3: nobody keeps the old 9
    assert _aggregate("masked").tolist() == [2.5, 2.0, 8.0, 9.0]


def test_fedavg_aggregation_averages_the_masked_adapters_over_every_client():
    # element 0: (1*1 + 3*3)/4; element 1: (1*2 + 3*0)/4; element 2: (1*0 + 3*8)/4; element 3: nobody: 0
    assert _aggregate("fedavg").tolist() == [2.5, 0.5, 6.0, 0.0]


def test_aggregation_option_is_checked():
    with pytest.raises(ValueError, match=r"aggregation='mean' is not supported by perfit.*'masked', 'fedavg'"):
        PerFITStrategy(aggregation="mean")
    config = FederatedConfig(strategy="perfit", strategy_options={"aggregation": "fedavg"})
    assert config.resolved_strategy_options()["aggregation"] == "fedavg"


def test_state_saved_before_the_aggregation_option_resumes_with_its_default():
    old = PerFITStrategy()
    old.initialize({KEY: torch.zeros(4)})
    tensors, meta = old.state_dict()
    meta["options"].pop("aggregation")  # a checkpoint written before the option existed
    new = PerFITStrategy()
    new.load_state_dict(tensors, meta)
    assert new.options == {"research_every": 0, "aggregation": "masked", "personal_b": False, "select_b_rows": 0}
    with pytest.raises(ValueError, match="saved with options"):
        PerFITStrategy(aggregation="fedavg").load_state_dict(tensors, meta)


def test_perfit_init_field():
    assert FederatedConfig(strategy="perfit").adapter_config().init_lora_weights == "symmetric"
    assert FederatedConfig(strategy="perfit", perfit_init="zero").adapter_config().init_lora_weights is True
    with pytest.raises(
        ValueError, match=r"perfit_init='gaussian' is unknown; allowed values: \['symmetric', 'zero'\]"
    ):
        FederatedConfig(strategy="perfit", perfit_init="gaussian")


def _model(init: str):
    config = FederatedConfig(
        strategy="perfit", lora_r=4, lora_alpha=8, expansion_factor=2, prune_iterations=2, perfit_init=init
    )
    torch.manual_seed(0)
    return get_perfit_model(tiny_llama(), config.adapter_config())


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.arange(2 * 6).view(2, 6) % 100 + 3
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_zero_init_makes_every_taylor_score_exactly_zero_and_symmetric_none():
    for init, expect_zero in (("zero", True), ("symmetric", False)):
        model = _model(init)
        model(**_batch()).loss.backward()
        for key, p in model.lora_parameters().items():
            for order in (1, 2):
                s = taylor_score(p, p.grad, order)
                if expect_zero:
                    assert bool((s == 0).all()), (init, key, order)
                else:
                    assert not bool((s == 0).any()), (init, key, order)
            if expect_zero and ".lora_A." in key:
                assert bool((p.grad == 0).all())  # ∂L/∂A = s·Bᵀ(...) with B = 0


def test_zero_init_search_keeps_the_last_elements_by_position():
    model = _model("zero")
    model.foresight_search([_batch()])
    flat = torch.cat([m.flatten() for m in model.masks().values()])
    budget = model.trainable_budget()
    assert int(flat.sum()) == budget
    assert bool(flat[-budget:].all()) and not bool(flat[:-budget].any())


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_client_folder_with_per_client_test_files(tmp_path):
    for k in range(2):
        (tmp_path / f"local_training_{k}.json").write_text(
            json.dumps([{"instruction": f"q{k}{i}", "output": "a", "category": f"c{i % 2}"} for i in range(3)])
        )
        _write(tmp_path / f"test_{k}.jsonl", [{"instruction": f"t{k}{i}", "output": "b"} for i in range(k + 1)])
    _write(tmp_path / "test.jsonl", [{"instruction": "never read", "output": "x", "category": "c0"}])
    clients = load_client_folder(tmp_path)
    assert [c.client_id for c in clients] == ["client_0", "client_1"]
    assert [list(c.test["instruction"]) for c in clients] == [["t00"], ["t10", "t11"]]
    assert clients[0].categories == ["c0", "c1"]
    (tmp_path / "test_1.jsonl").unlink()
    with pytest.raises(ValueError, match=r"per-client test files for clients \[0\] but training files for \[0, 1\]"):
        load_client_folder(tmp_path)
