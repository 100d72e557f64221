"""QLoRA: PerFIT on a bitsandbytes 4-bit base (bitsandbytes runs 4-bit layers on CPU) works; 8-bit is refused."""

import pytest
import torch
from transformers import BitsAndBytesConfig, LlamaForCausalLM

from hf_perfit import PerFITLoraConfig, get_perfit_model

from .conftest import tiny_llama
from .test_pruning import _train, assert_pruned_are_zero


@pytest.fixture
def llama_dir(tmp_path):
    # hidden 64: bitsandbytes quantizes in blocks of 64 elements
    tiny_llama(hidden=64).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_4bit_base(llama_dir, batch):
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    base = LlamaForCausalLM.from_pretrained(llama_dir, quantization_config=quant, device_map="cpu")
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    # bitsandbytes' CPU 4-bit matmul uses another kernel under autograd (it differs by ~2e-3 from the no-grad one
    # even without any adapter), so compare like with like: no_grad both times.
    with torch.no_grad():
        ref = base(batch).logits.clone()
    model = get_perfit_model(
        base, PerFITLoraConfig(r=4, target_modules=["q_proj", "v_proj"], search_mode="train", search_steps=4)
    )
    with torch.no_grad():
        assert (model(batch).logits - ref).abs().max().item() <= 1e-6
    model.train()  # undoes bitsandbytes' CPU inference packing done by the eval-mode forwards above
    _train(model, batch, steps=6, check_zeros_from=4)
    assert model.num_kept() == model.trainable_budget()
    assert_pruned_are_zero(model)


def test_4bit_eval_then_train_without_train_mode_never_trains_silently(llama_dir, batch):
    """Forgetting model.train() after an eval-mode forward on a 4-bit CPU base: bitsandbytes before 0.50.2 packs the
    weights for a CPU inference kernel without a backward, so no gradient reaches the adapter, and that must fail
    loudly; with 0.50.2 (what a fresh install got on 2026-11-29) the gradient reaches it and the step works."""
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    base = LlamaForCausalLM.from_pretrained(llama_dir, quantization_config=quant, device_map="cpu")
    model = get_perfit_model(
        base, PerFITLoraConfig(r=4, target_modules=["q_proj", "v_proj"], search_mode="train", search_steps=4)
    )
    with torch.no_grad():
        model.eval()(batch)
    model(batch, labels=batch).loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if all(p.grad is None for p in trainable):
        with pytest.raises(RuntimeError, match=r"no gradient reached.*model.train\(\)"):
            model.before_optimizer_step()
    else:
        assert any(float(p.grad.abs().sum()) > 0 for p in trainable if p.grad is not None)
        model.before_optimizer_step()  # the gradient is real: the step goes on


def test_8bit_base_is_refused(llama_dir):
    base = tiny_llama(hidden=64)
    base.config.quantization_config = BitsAndBytesConfig(load_in_8bit=True)
    with pytest.raises(ValueError, match="8-bit.*load_in_4bit=True"):
        get_perfit_model(base, PerFITLoraConfig(r=4, target_modules=["q_proj"]))
