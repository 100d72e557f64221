"""PerFITLoraConfig: every bad value is a ValueError naming the field and what is allowed."""

import peft
import pytest
import trl
from datasets import Dataset
from peft import LoraConfig

from hf_perfit import PerFITLoraConfig, get_perfit_model


@pytest.mark.parametrize(
    "kwargs, field, allowed",
    [
        ({"expansion_factor": 0}, "expansion_factor", "integer >= 1"),
        ({"expansion_factor": 2.5}, "expansion_factor", "integer >= 1"),
        ({"expansion_factor": True}, "expansion_factor", "integer >= 1"),
        ({"budget_multiplier": 0}, "budget_multiplier", "> 0"),
        ({"budget_multiplier": -1.0}, "budget_multiplier", "> 0"),
        ({"prune_iterations": 0}, "prune_iterations", "integer >= 1"),
        ({"importance": "magnitude"}, "importance", "taylor1"),
        ({"search_steps": 2, "prune_iterations": 4}, "search_steps", "search_steps >= prune_iterations"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights", "symmetric"),
        ({"importance_ema": 1.0}, "importance_ema", "[0, 1)"),
        ({"r": 3, "expansion_factor": 1}, "odd", "even"),
        ({"use_dora": True}, "use_dora", "use_dora=False"),
    ],
)
def test_bad_values_name_the_field(kwargs, field, allowed):
    with pytest.raises(ValueError) as err:
        PerFITLoraConfig(target_modules=["q_proj"], **kwargs)
    assert field in str(err.value) and allowed in str(err.value)


def test_no_target_module_found(llama):
    cfg = PerFITLoraConfig(r=4, target_modules=["does_not_exist"])
    with pytest.raises(ValueError, match=r"target_modules=.*does_not_exist.*matched no module.*q_proj"):
        get_perfit_model(llama, cfg)


def test_is_a_lora_config_and_expands():
    cfg = PerFITLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], expansion_factor=4)
    assert isinstance(cfg, LoraConfig)
    plain = cfg.to_lora_config()
    assert type(plain) is LoraConfig
    assert plain.r == 16 and plain.lora_alpha == 32.0  # scale stays 8 / 4 = 32 / 16
    assert plain.init_lora_weights is True
    assert set(plain.target_modules) == {"q_proj", "v_proj"}


def test_dict_round_trip_keeps_every_field():
    cfg = PerFITLoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["q_proj"],
        expansion_factor=3,
        importance="mixed",
        importance_ema=0.5,
        search_steps=9,
        prune_iterations=3,
        budget_multiplier=1.5,
        research_every=2,
        symmetric_init_std=0.1,
    )
    again = PerFITLoraConfig.from_perfit_dict(cfg.perfit_dict())
    assert again.perfit_dict() == cfg.perfit_dict()
    with pytest.raises(ValueError, match="unknown fields.*bogus"):
        PerFITLoraConfig.from_perfit_dict({**cfg.perfit_dict(), "bogus": 1})


@pytest.mark.parametrize("init", ["symmetric", True])
@pytest.mark.parametrize("entry", ["get_peft_model", "PeftModel", "inject_adapter_in_model", "SFTTrainer"])
def test_peft_constructors_refuse_a_perfit_config_and_name_get_perfit_model(llama, tokenizer, tmp_path, entry, init):
    # "symmetric" would fail inside PEFT ("Unknown initialization"); True would silently build an unexpanded LoRA
    config = PerFITLoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    build = {
        "get_peft_model": lambda: peft.get_peft_model(llama, config),
        "PeftModel": lambda: peft.PeftModel(llama, config),
        "inject_adapter_in_model": lambda: peft.inject_adapter_in_model(config, llama),
        "SFTTrainer": lambda: trl.SFTTrainer(
            model=llama,
            args=trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, use_cpu=True, bf16=False, report_to="none"),
            train_dataset=Dataset.from_list([{"prompt": "a", "completion": "b"}] * 2),
            processing_class=tokenizer,
            peft_config=config,
        ),
    }[entry]
    with pytest.raises(ValueError, match=r"hf_perfit\.get_perfit_model\(base_model, config\)"):
        build()
    assert not any("lora" in name for name, _ in llama.named_modules())  # the base model is left as it was
    model = get_perfit_model(llama, config)  # the way that works, with the same config
    assert model.expanded_size() == 4 * model.trainable_budget()
