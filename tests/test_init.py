"""Symmetric init: the model starts exactly at the base model, yet every element can be ranked."""

import pytest
import torch

from hf_perfit import PerFITLoraConfig, get_perfit_model


def _cfg(**kw):
    return PerFITLoraConfig(r=4, lora_alpha=8, target_modules=kw.pop("targets", ["q_proj", "v_proj"]), **kw)


@pytest.mark.parametrize("arch, targets", [("llama", ["q_proj", "v_proj"]), ("gpt2", ["c_attn", "c_fc"])])
def test_logits_equal_base_and_no_gradient_vanishes(arch, targets, request, batch):
    base = request.getfixturevalue(arch)
    with torch.no_grad():
        ref = base(batch).logits.clone()
    model = get_perfit_model(base, _cfg(targets=targets))
    out = model(batch, labels=batch)
    assert (out.logits - ref).abs().max().item() <= 1e-6
    out.loss.backward()
    params = model.lora_parameters()
    assert len(params) == 4 * len(targets)  # 2 layers x targets x (A, B)
    for name, p in params.items():
        assert p.grad is not None, name
        assert int((p.grad == 0).sum()) == 0, f"{name} has zero gradients"
        assert int((p == 0).sum()) == 0, f"{name} has zero weights"
    model.accumulate_importance()
    for name, s in model.importance_scores().items():
        assert bool((s > 0).all()), name


def test_symmetric_structure(llama):
    model = get_perfit_model(llama, _cfg())
    for name, p in model.lora_parameters().items():
        half = 8  # R = 16
        if "lora_A" in name:
            assert torch.equal(p[:half], p[half:])
        else:
            assert torch.equal(p[:, :half], -p[:, half:])


def test_standard_init_scores_vanish(llama, batch):
    """With PEFT's default init (B = 0) every score of B and every gradient of A is exactly 0: nothing in A or B can
    be ranked, which is why PerFIT needs the symmetric init."""
    model = get_perfit_model(llama, _cfg(init_lora_weights=True))
    model(batch, labels=batch).loss.backward()
    model.accumulate_importance()
    scores = model.importance_scores()
    for name, p in model.lora_parameters().items():
        assert float(scores[name].abs().max()) == 0.0, name
        if "lora_A" in name:
            assert float(p.grad.abs().max()) == 0.0
        else:
            assert float(p.grad.abs().max()) > 0.0  # B learns, but its score |0 * g| is 0


def test_wrapping_raises_no_deprecation_warning(llama):
    """`get_perfit_model` is silent: peft 0.21 reads an attribute transformers 5.24 deprecated, which would warn on
    every client model of a federation."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        get_perfit_model(llama, PerFITLoraConfig(r=2, expansion_factor=2, target_modules=["q_proj"]))
