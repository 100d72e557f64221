"""PerFIT's foresight search (the default `search_mode`): scores before any training, pairs of the symmetric init
pruned together, then training of the kept elements only; round 0 of a federated run costs no more than the budget;
heterogeneous budgets through a federated run."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from hf_perfit import PerFITLoraConfig, PerFITPruningCallback, get_perfit_model
from hf_perfit.federated.comm import downlink_bytes, packed_mask_bytes
from hf_perfit.federated.config import FederatedConfig
from hf_perfit.federated.strategies import get_strategy

from .conftest import tiny_llama
from .test_simulation import _cfg, _run
from .test_trainer import _args, _dataset


def _batches(n, seed=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 128, (2, 12), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def _model(**kw):
    torch.manual_seed(0)
    cfg = PerFITLoraConfig(r=4, target_modules=kw.pop("targets", ["q_proj", "v_proj"]), **kw)
    return get_perfit_model(tiny_llama(), cfg)


def _logits(model, x):
    with torch.no_grad():
        was = model.training
        model.eval()
        out = model(x).logits.clone()
        model.train(was)
    return out


def _base_logits(model, x):
    with torch.no_grad(), model.disable_adapter():
        return model.eval()(x).logits.clone()


def test_defaults_are_declared_once():
    assert PerFITLoraConfig().search_mode == "foresight" and PerFITLoraConfig().search_batches == 8
    fed = FederatedConfig()
    assert fed.search_mode == "foresight" and fed.search_batches == 8
    assert fed.search_steps == PerFITLoraConfig().search_steps == 10  # was 20 vs 10
    with pytest.raises(ValueError, match="search_mode"):
        PerFITLoraConfig(search_mode="during")
    with pytest.raises(ValueError, match="search_mode"):
        FederatedConfig(search_mode="during")
    with pytest.raises(ValueError, match="search_batches"):
        PerFITLoraConfig(search_batches=0)
    # search_steps > local_steps only matters while training searches
    FederatedConfig(strategy="perfit", local_steps=4, search_steps=8)
    with pytest.raises(ValueError, match="search_steps=8 > local_steps=4"):
        FederatedConfig(strategy="perfit", local_steps=4, search_steps=8, search_mode="train")
    adapter = FederatedConfig(search_mode="train", search_batches=3).adapter_config()
    assert adapter.search_mode == "train" and adapter.search_batches == 3


@pytest.mark.parametrize("importance", ["taylor1", "taylor2", "mixed"])
def test_foresight_prunes_to_the_budget_without_training(importance):
    model = _model(importance=importance, prune_iterations=3, search_batches=5)
    x = _batches(1, seed=9)[0]["input_ids"]
    init = {k: p.detach().clone() for k, p in model.lora_parameters().items()}
    base = _base_logits(model, x)
    model.train()
    with pytest.raises(RuntimeError, match="foresight_search"):  # a loop that forgot the search is told
        model(x, labels=x).loss.backward()
        model.before_optimizer_step()
    state = model.foresight_search(_batches(7))  # only the first search_batches=5 are used
    assert state["search_step"] == 5 and state["prune_iterations_done"] == 3 and not state["searching"]
    assert model.num_kept() == model.trainable_budget() == state["num_kept"]
    assert all(p.grad is None for p in model.lora_parameters().values())
    masks = model.masks()
    kept = sorted(model.kept_per_module().values())
    assert kept[0] != kept[-1]  # one global threshold: layers get different counts
    for k, p in model.lora_parameters().items():  # no optimizer step: kept values are the init, pruned are 0
        assert torch.equal(p.detach()[masks[k]], init[k][masks[k]])
        assert bool((p.detach()[~masks[k]] == 0).all())
    assert state["split_pairs"] == 0  # an even budget: every symmetric pair pruned whole
    # pairs kept whole: B·A is still exactly 0 in exact arithmetic, so the output is the base model's
    assert (_logits(model, x) - base).abs().max().item() < 1e-6
    assert model.foresight_search(_batches(1)) == model.search_state()  # done: nothing more to search


def test_split_pair_keeps_the_output_while_element_wise_pruning_jumps():
    """An odd budget forces one symmetric pair to split. Keeping its half at 0 keeps B·A = 0 (no logit jump);
    element-wise pruning of the very same scores leaves the half unbalanced and moves the logits."""
    budget = 448 + 1  # q_proj 4·(16+16) + v_proj 4·(16+8), two layers: 448; one more element is odd
    model = _model(budget_multiplier=budget / 448, prune_iterations=2, search_batches=2)
    assert model.trainable_budget() == budget
    x = _batches(1, seed=9)[0]["input_ids"]
    base = _base_logits(model, x)
    fresh = model.get_adapter_state()
    model.train()
    # element-wise, the way search_mode="train" prunes: same batch, same scores
    model(**_batches(1)[0]).loss.backward()
    model.accumulate_importance()
    model.prune_to(budget)
    element_wise_split, element_wise_jump = model.split_pair_count(), (_logits(model, x) - base).abs().max().item()
    assert element_wise_split == 1 and element_wise_jump > 1e-4
    model.set_adapter_state(*fresh)
    for p in model.lora_parameters().values():
        p.grad = None
    state = model.foresight_search(_batches(2))
    assert state["num_kept"] == budget and state["split_pairs"] == 1
    assert (_logits(model, x) - base).abs().max().item() < 1e-6
    # the split pair's kept half holds exactly 0 and is trainable (its gradient is not 0)
    model.train()
    model(**_batches(1)[0]).loss.backward()
    lone = []
    for k, p in model.lora_parameters().items():
        dim, m = (0 if ".lora_A." in k else 1), model.masks()[k]
        h = m.shape[dim] // 2
        m1, m2 = m.narrow(dim, 0, h), m.narrow(dim, h, h)
        for half, mh in ((0, m1 & ~m2), (h, m2 & ~m1)):
            values, grads = p.detach().narrow(dim, half, h)[mh], p.grad.narrow(dim, half, h)[mh]
            lone += list(zip(values.tolist(), grads.tolist(), strict=True))
    assert len(lone) == 1 and lone[0][0] == 0.0 and lone[0][1] != 0.0


def test_sft_trainer_runs_the_search_first_and_trains_only_the_kept(llama, tokenizer, tmp_path):
    from trl import SFTTrainer

    model = get_perfit_model(llama, PerFITLoraConfig(r=4, target_modules=["q_proj", "v_proj"], search_batches=4))
    trainer = SFTTrainer(
        model=model,
        args=_args(tmp_path, max_steps=3),
        train_dataset=_dataset(),
        processing_class=tokenizer,
        callbacks=[PerFITPruningCallback()],
    )
    trainer.train()
    assert model.search_state()["search_step"] == 4 and not model.is_searching
    assert model.num_kept() == model.trainable_budget()
    # the optimizer only ever saw the kept elements: Adam's first moment is exactly 0 everywhere else
    masks, params = model.masks(), model.lora_parameters()
    moved = 0
    for k, p in params.items():
        exp_avg = trainer.optimizer.state[p]["exp_avg"]
        assert bool((exp_avg[~masks[k]] == 0).all())
        moved += int((exp_avg != 0).sum())
    assert 0 < moved <= model.trainable_budget()


@pytest.mark.parametrize("mode", ["foresight", "train"])
def test_federated_round_0_sends_no_more_than_the_budget(tmp_path, mode):
    """Round 0 downloads nothing (the seeded init is rebuilt by the client), trains the kept elements only, and
    uploads the kept values plus the packed mask once; the federated client runs either search mode."""
    cfg = _cfg(tmp_path, "perfit", num_rounds=2, search_batches=2, search_mode=mode)
    _run(cfg)
    out = tmp_path / "perfit"
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    model = get_perfit_model(tiny_llama(), cfg.adapter_config())
    budget, numel = model.trainable_budget(), {k: p.numel() for k, p in model.lora_parameters().items()}
    mask_bytes = sum(packed_mask_bytes(n) for n in numel.values())
    round0 = [r for r in records if r.get("round") == 0 and "client" in r]
    assert len(round0) == 3
    assert all(r["bytes_down"] == 0 and r["bytes_up"] == 4 * budget + mask_bytes for r in round0)
    round1 = [r for r in records if r.get("round") == 1 and "client" in r]
    assert all(r["bytes_down"] == 4 * budget and r["bytes_up"] == 4 * budget for r in round1)
    # the strategy flags round 0 only; a train-mode run is flagged the same way (the init is seeded either way)
    s = get_strategy("perfit")
    s.initialize(model.get_adapter_state()[0])
    instruction = s.configure_client("client_0", 0)
    assert instruction.config == {"seeded_init": True} and downlink_bytes(instruction) == 0


def test_heterogeneous_budgets_through_a_federated_run(tmp_path):
    """Each client keeps exactly round(b_k · budget) elements, capped at the expanded size."""
    multipliers = [0.5, 1.3, 100.0]
    cfg = _cfg(tmp_path, "perfit", num_rounds=1, search_batches=2, budget_multipliers=multipliers)
    _run(cfg)
    model = get_perfit_model(tiny_llama(), cfg.adapter_config())
    expanded, budget = model.expanded_size(), model.trainable_budget()
    expected = [min(expanded, math.floor(b * budget + 0.5)) for b in multipliers]
    assert expected[-1] == expanded and expected[0] < budget < expected[1]
    out = tmp_path / "perfit"
    for k, want in enumerate(expected):
        folder = out / "clients" / f"client_{k}" / "adapter"
        meta = json.loads((folder / "perfit_config.json").read_text())
        masks = load_file(str(folder / "perfit_masks.safetensors"))
        assert meta["num_kept"] == want == sum(int(m.sum()) for m in masks.values())
        assert meta["config"]["budget_multiplier"] == multipliers[k]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    density = {r["client"]: r["density"] for r in records if r.get("round") == 0 and "client" in r}
    assert [round(density[f"client_{k}"] * expanded) for k in range(3)] == expected
