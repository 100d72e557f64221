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


def test_4bit_eval_then_train_without_train_mode_is_an_error(llama_dir, batch):
    """bitsandbytes' CPU inference kernel has no backward; forgetting model.train() must fail loudly."""
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    base = LlamaForCausalLM.from_pretrained(llama_dir, quantization_config=quant, device_map="cpu")
    model = get_perfit_model(
        base, PerFITLoraConfig(r=4, target_modules=["q_proj", "v_proj"], search_mode="train", search_steps=4)
    )
    with torch.no_grad():
        model.eval()(batch)
    model(batch, labels=batch).loss.backward()
    with pytest.raises(RuntimeError, match=r"no gradient reached.*model.train\(\)"):
        model.before_optimizer_step()


def test_8bit_base_is_refused(llama_dir):
    base = tiny_llama(hidden=64)
    base.config.quantization_config = BitsAndBytesConfig(load_in_8bit=True)
    with pytest.raises(ValueError, match="8-bit.*load_in_4bit=True"):
        get_perfit_model(base, PerFITLoraConfig(r=4, target_modules=["q_proj"]))
