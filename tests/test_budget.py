"""trainable_budget() = r * (d_in + d_out) summed over targets, times budget_multiplier, capped."""

import pytest

from hf_perfit import PerFITLoraConfig, get_perfit_model


@pytest.mark.parametrize("mult", [1.0, 0.5, 1.7])
def test_llama_budget(llama, mult):
    model = get_perfit_model(llama, PerFITLoraConfig(r=4, target_modules=["q_proj", "v_proj"], budget_multiplier=mult))
    base = 2 * (4 * (16 + 16) + 4 * (16 + 8))  # 2 layers; q_proj 16->16, v_proj 16->8
    assert model.trainable_budget() == round(mult * base)
    assert model.expanded_size() == 4 * base  # expansion_factor 4


def test_gpt2_conv1d_budget(gpt2):
    model = get_perfit_model(gpt2, PerFITLoraConfig(r=2, target_modules=["c_attn", "c_fc"]))
    # Conv1D: c_attn 16 -> 48, c_fc 16 -> 64
    assert model.trainable_budget() == 2 * (2 * (16 + 48) + 2 * (16 + 64))


def test_budget_capped_at_expanded_size(llama):
    cfg = PerFITLoraConfig(r=4, target_modules=["q_proj"], expansion_factor=2, budget_multiplier=5.0)
    model = get_perfit_model(llama, cfg)
    assert model.trainable_budget() == model.expanded_size() == 2 * 8 * 32
    assert not model.is_searching  # nothing to prune
