"""The architecture search in a hand-written torch loop: exact budget, exact zeros, a global threshold."""

import pytest
import torch

from hf_perfit import PerFITLoraConfig, get_perfit_model
from hf_perfit.importance import keep_schedule, prune_steps


def _train(model, batch, steps, opt=None, check_zeros_from=None):
    opt = opt or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3, weight_decay=0.1)
    kept_history = []
    for step in range(1, steps + 1):
        model(batch, labels=batch).loss.backward()
        model.before_optimizer_step()
        opt.step()
        model.after_optimizer_step()
        opt.zero_grad()
        kept_history.append(model.num_kept())
        if check_zeros_from is not None and step >= check_zeros_from:
            assert_pruned_are_zero(model)
    return kept_history


def assert_pruned_are_zero(model):
    masks = model.masks()
    for name, p in model.lora_parameters().items():
        pruned = p.detach()[~masks[name]]
        assert bool((pruned == 0.0).all()), f"{name}: {int((pruned != 0).sum())} pruned elements are non-zero"


@pytest.mark.parametrize("importance", ["taylor1", "taylor2", "mixed"])
def test_search_reaches_budget_exactly_and_holds_zeros(llama, batch, importance):
    cfg = PerFITLoraConfig(
        r=4,
        target_modules=["q_proj", "v_proj", "o_proj"],
        search_mode="train",
        search_steps=8,
        prune_iterations=4,
        importance=importance,
    )
    model = get_perfit_model(llama, cfg)
    total, budget = model.expanded_size(), model.trainable_budget()
    history = _train(model, batch, steps=14, check_zeros_from=1)
    # geometric schedule, one pruning iteration every 2 steps, ends exactly at the budget
    assert history[:8] == [total, 1069, 1069, 715, 715, 478, 478, budget][:8] or history[7] == budget
    assert keep_schedule(total, budget, 4) == [history[1], history[3], history[5], history[7]]
    assert history[7:] == [budget] * 7
    assert not model.is_searching
    kept = sorted(model.kept_per_module().values())
    assert kept[0] != kept[-1], "one global threshold should give layers different counts"
    assert sum(kept) == budget


def test_schedule_is_geometric():
    assert prune_steps(20, 4) == [5, 10, 15, 20]
    counts = keep_schedule(1000, 250, 2)
    assert counts == [500, 250]  # sqrt(0.25) = 0.5
    assert keep_schedule(1000, 1000, 3) == [1000, 1000, 1000]


def test_pruned_stay_zero_with_plain_adam_momentum(llama, batch):
    """Adam's momentum would move a pruned element at the next step; masking gradients and re-zeroing after the
    step keeps it at exactly 0."""
    cfg = PerFITLoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], search_mode="train", search_steps=2, prune_iterations=1
    )
    model = get_perfit_model(llama, cfg)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _train(model, batch, steps=8, opt=opt, check_zeros_from=2)
    assert model.num_kept() == model.trainable_budget()


def test_prune_to_from_hand_written_loop(llama, batch):
    model = get_perfit_model(llama, PerFITLoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model(batch, labels=batch).loss.backward()
    assert model.accumulate_importance()
    kept = model.prune_to(density=0.5)
    assert kept == round(0.5 * model.expanded_size())
    assert_pruned_are_zero(model)
    assert model.prune_to(100) == 100
    with pytest.raises(ValueError, match="currently kept=100"):
        model.prune_to(200)  # pruning never revives elements
    # explicit scores: keep exactly the 10 elements we say
    scores = {k: torch.zeros_like(p) for k, p in model.lora_parameters().items()}
    first = next(iter(scores))
    masks = model.masks()[first]
    idx = masks.flatten().nonzero()[:10].flatten()
    scores[first].view(-1)[idx] = 1.0
    assert model.prune_to(10, scores=scores) == 10
    assert torch.equal(model.masks()[first].flatten().nonzero().flatten(), idx)


def test_prune_without_scores_says_what_to_do(llama):
    model = get_perfit_model(llama, PerFITLoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(RuntimeError, match="before_optimizer_step"):
        model.prune_to(density=0.5)


def test_research_restarts_search(llama, batch):
    cfg = PerFITLoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], search_mode="train", search_steps=2, prune_iterations=2
    )
    model = get_perfit_model(llama, cfg)
    _train(model, batch, steps=3)
    assert model.num_kept() == model.trainable_budget() and not model.is_searching
    model.start_search()
    assert model.is_searching and model.num_kept() == model.expanded_size()
    _train(model, batch, steps=2, check_zeros_from=2)
    assert model.num_kept() == model.trainable_budget()


def test_gpt2_conv1d_search(gpt2, batch):
    cfg = PerFITLoraConfig(
        r=2, target_modules=["c_attn", "c_proj"], search_mode="train", search_steps=4, prune_iterations=2
    )
    model = get_perfit_model(gpt2, cfg)
    _train(model, batch, steps=6, check_zeros_from=2)
    assert model.num_kept() == model.trainable_budget()


def test_adapter_state_swaps_clients_exactly(llama, batch):
    """One shared base model serves many clients: get/set_adapter_state round-trips weights, masks and progress."""
    cfg = PerFITLoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], search_mode="train", search_steps=4, prune_iterations=2
    )
    model = get_perfit_model(llama, cfg)
    fresh = model.get_adapter_state()
    _train(model, batch, steps=5)
    trained = model.get_adapter_state()
    with torch.no_grad():
        logits = model(batch).logits.clone()
    model.set_adapter_state(*fresh)  # another client, not searched yet
    assert model.num_kept() == model.expanded_size() and model.is_searching
    model.set_budget_multiplier(2.0)
    assert model.trainable_budget() == 2 * model.expanded_size() // 4
    model.set_adapter_state(*trained)  # back to the first client: budget, masks, weights, progress
    assert model.trainable_budget() == model.expanded_size() // 4 and not model.is_searching
    with torch.no_grad():
        assert torch.equal(model(batch).logits, logits)
    assert_pruned_are_zero(model)
