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
        (
            {"search_mode": "train", "search_steps": 2, "prune_iterations": 4},
            "search_steps",
            "search_steps >= prune_iterations",
        ),
        ({"search_mode": "pretrain"}, "search_mode", "foresight"),
        ({"search_batches": 0}, "search_batches", "integer >= 1"),
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


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eval_batch_size": 0}, "eval_batch_size=0 is not allowed; it must be an integer >= 1."),
        ({"local_steps": 0}, "local_steps=0 is not allowed; it must be an integer >= 1."),
        ({"gradient_accumulation_steps": -1}, "gradient_accumulation_steps=-1 is not allowed; it must be an integer"),
        ({"seed": -1}, "seed=-1 is not allowed; it must be an integer >= 0."),
        ({"learning_rate": -2e-4}, "learning_rate=-0.0002 is not allowed; it must be a number in (0, inf)."),
        ({"learning_rate": 0.0}, "learning_rate=0.0 is not allowed; it must be a number in (0, inf)."),
        ({"learning_rate": float("nan")}, "learning_rate=nan is not allowed"),
        ({"fraction_clients": 0.0}, "fraction_clients=0.0 is not allowed; it must be a number in (0, 1]."),
        ({"fraction_clients": 1.5}, "fraction_clients=1.5 is not allowed; it must be a number in (0, 1]."),
        ({"lora_alpha": 0}, "lora_alpha=0 is not allowed; it must be a number in (0, inf)."),
        ({"proximal_mu": -0.1}, "proximal_mu=-0.1 is not allowed; it must be a number in [0, inf)."),
        ({"test_fraction": 1.0}, "test_fraction=1.0 is not allowed; it must be a number in [0, 1)."),
        ({"max_eval_examples": 0}, "max_eval_examples=0 is not allowed; it must be an integer >= 1 or null"),
        ({"research_every": -1}, "research_every=-1 is not allowed; it must be an integer >= 0."),
        ({"num_clients": 2, "budget_multipliers": [1.0, -0.5]}, "budget_multipliers[1]=-0.5 is not allowed"),
        ({"num_clients": 2, "budget_multipliers": [0, 1]}, "budget_multipliers[0]=0 is not allowed"),
        ({"lora_target_modules": []}, "lora_target_modules=[] must be a non-empty list of module names"),
        ({"resume": "yes"}, "resume='yes' must be true or false."),
        ({"importance": "magnitude"}, "importance='magnitude' is not supported"),
        (
            {"strategy": "fedamole", "mole_top_k": 9},
            "mole_top_k=9 but a client holds at most 8 experts (experts_per_client_max=8, num_experts=30), so no "
            "router could mix 9; set mole_top_k <= 8 or raise experts_per_client_max.",
        ),
        (
            {"strategy": "fedamole", "mole_top_k": 5, "strategy_options": {"experts_per_client_max": 4}},
            "mole_top_k=5 but a client holds at most 4 experts",
        ),
    ],
)
def test_federated_config_refuses_out_of_range_values(kwargs, message):
    """Every numeric field is range-checked when the config is built, i.e. before any model, data or file is touched
    (an `eval_batch_size` of 0 used to fail only after set-up, with "range() arg 3 must not be zero")."""
    from hf_perfit.federated.config import FederatedConfig

    with pytest.raises(ValueError) as err:
        FederatedConfig(**kwargs)
    assert message in str(err.value)


def test_federated_config_accepts_boundaries():
    from hf_perfit.federated.config import FederatedConfig

    FederatedConfig(fraction_clients=1.0, proximal_mu=0.0, test_fraction=0.0, seed=0, research_every=0)
    FederatedConfig(strategy="fedamole", mole_top_k=8)  # a client may hold 8 experts: top-8 routing is honoured


def test_mole_config_refuses_top_k_above_the_pool():
    from hf_perfit.mole import MoLEConfig

    with pytest.raises(ValueError, match=r"top_k=5 > num_experts=3; set top_k <= num_experts."):
        MoLEConfig(target_modules=["q_proj"], num_experts=3, top_k=5)
    assert MoLEConfig(target_modules=["q_proj"], num_experts=3, top_k=3).top_k == 3
