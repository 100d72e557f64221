"""PerFITLoraConfig and FederatedConfig: every bad value is a ValueError naming the field and what is allowed;
FederatedConfig's keys are declared once (TRL's, PerFIT's, MoLE's or the federation's own) and read like TRL's."""

import dataclasses
import pickle
import typing
from pathlib import Path

import peft
import pytest
import trl
import yaml
from datasets import Dataset
from peft import LoraConfig

from hf_perfit import PerFITLoraConfig, get_perfit_model
from hf_perfit.mole import MoLEConfig

REPO = Path(__file__).resolve().parents[1]


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


# ---------------------------------------------------------------------------------------------------------------------
# FederatedConfig composed from TRL's, PerFIT's and MoLE's dataclasses (one declaration per setting)

# `FederatedConfig().to_dict()` as written by c71495f, the commit before the config was composed: every saved run's
# config.json / checkpoint.json holds this shape, so a new run must give the same dict (same keys, order and values).
SAVED_DEFAULTS = {
    "model_name_or_path": "smollm2-135m-instruct",
    "dataset_name": "",
    "strategy": "perfit",
    "num_clients": 8,
    "num_rounds": 3,
    "fraction_clients": 1.0,
    "local_steps": 10,
    "learning_rate": 0.0002,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "gradient_checkpointing": False,
    "device": "auto",
    "bf16": "auto",
    "max_length": 512,
    "output_dir": "outputs/federated",
    "seed": 0,
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_target_modules": ["q_proj", "v_proj"],
    "expansion_factor": 4,
    "search_steps": 10,
    "prune_iterations": 4,
    "importance": "taylor1",
    "budget_multipliers": None,
    "research_every": 0,
    "proximal_mu": 0.01,
    "num_experts": 30,
    "experts_per_client_min": 2,
    "experts_per_client_max": 8,
    "clients_per_expert": 2,
    "mole_top_k": 2,
    "balance_loss_coef": 0.001,
    "partition": "category",
    "partition_column": "category",
    "dirichlet_alpha": 0.5,
    "test_fraction": 0.1,
    "max_eval_examples": None,
    "eval_batch_size": 8,
    "strategy_options": {},
    "trust_remote_code": False,
    "push_to_hub": False,
    "hub_repo_prefix": None,
    "hub_private": False,
    "resume": False,
    "overwrite": False,
    "lr_decay_per_round": 1.0,
    "search_mode": "foresight",
    "search_batches": 8,
    "client_state_memory_mb": 2048.0,
    "finetune_steps": 0,
    "eval_clients": "auto",
    "eval_local_model": False,
    "perfit_init": "symmetric",  # added after c71495f (issue 18's ablation): runs saved without it still resume
}

# FederatedArguments fields whose name a library dataclass also has, for another setting
SAME_NAME_OTHER_SETTING = {
    "bf16": "SFTConfig.bf16 is a bool for autocast; ours is auto/true/false and also loads the base weights in bf16"
}


def test_to_dict_is_the_saved_runs_dict():
    from hf_perfit.federated.config import FederatedConfig
    from hf_perfit.federated.coordinator import config_changes

    assert FederatedConfig().to_dict() == SAVED_DEFAULTS
    assert list(FederatedConfig().to_dict()) == list(SAVED_DEFAULTS)  # the key order of saved config.json files
    saved = {
        **SAVED_DEFAULTS,
        "strategy": "fedprox",
        "num_rounds": 5,
        "learning_rate": 1e-3,
        "lora_target_modules": ["q_proj"],
    }
    again = FederatedConfig.from_dict(saved)
    assert again.to_dict() == saved and config_changes(saved, again.to_dict()) == []  # --resume accepts it
    older = {k: v for k, v in saved.items() if k != "perfit_init"}  # a run saved by c71495f
    assert config_changes(older, again.to_dict()) == []
    assert config_changes(older, {**again.to_dict(), "perfit_init": "zero"}) == ["perfit_init"]
    assert pickle.loads(pickle.dumps(again)) == again  # Ray / multiprocessing ship it by reference to the class


def test_every_key_is_declared_once_with_its_source_default_or_a_stated_override():
    from hf_perfit.federated.config import DEFAULT_OVERRIDES, FIELD_SOURCES, FederatedArguments, FederatedConfig

    fields = {f.name: f for f in dataclasses.fields(FederatedConfig)}
    assert list(fields) == list(FIELD_SOURCES)
    libraries = (trl.SFTConfig, trl.ModelConfig, PerFITLoraConfig, MoLEConfig)
    for key, (source, name) in FIELD_SOURCES.items():
        declared = source.__dataclass_fields__[name]
        # the annotation: HfArgumentParser rewrites `Field.type` in place (`str | None` -> `str`) when it parses
        assert typing.get_type_hints(FederatedConfig)[key] == typing.get_type_hints(source)[name], key
        assert fields[key].metadata["help"] == declared.metadata["help"], key
        default = fields[key].default_factory() if fields[key].default is dataclasses.MISSING else fields[key].default
        library_default = declared.default_factory() if declared.default is dataclasses.MISSING else declared.default
        if key in DEFAULT_OVERRIDES:
            # an override states why and differs from the library's (no stale entry)
            assert default == DEFAULT_OVERRIDES[key][0] and default != library_default, key
            assert DEFAULT_OVERRIDES[key][1].startswith(("SFTConfig:", "TrainingArguments:", "ModelConfig:")), key
        else:
            assert default == library_default, key
        if source is FederatedArguments:  # a federation-only setting no library dataclass declares under that name
            twins = [lib.__name__ for lib in libraries if name in lib.__dataclass_fields__]
            assert not twins or key in SAME_NAME_OTHER_SETTING, (key, twins)
        else:  # a library's setting is not declared again by FederatedArguments
            assert key not in FederatedArguments.__dataclass_fields__, key
    assert set(FederatedArguments.__dataclass_fields__) <= set(FIELD_SOURCES)  # no unused declaration
    assert set(DEFAULT_OVERRIDES) <= set(FIELD_SOURCES)


def test_strategy_defaults_are_the_strategies_own():
    from hf_perfit.federated.config import FederatedConfig
    from hf_perfit.federated.strategies import FedProxStrategy, PerFITStrategy
    from hf_perfit.federated.strategies.fedamole import FedAMoLEStrategy

    config = FederatedConfig()
    assert config.proximal_mu == FedProxStrategy.default_options["proximal_mu"]
    assert config.research_every == PerFITStrategy.default_options["research_every"]
    for name in ("clients_per_expert", "experts_per_client_min", "experts_per_client_max"):
        assert getattr(config, name) == FedAMoLEStrategy.default_options[name]


def _yaml(path, **keys):
    path.write_text(yaml.safe_dump(keys))
    return path


def test_load_config_yaml_then_dict_overrides_then_flags(tmp_path):
    from hf_perfit.cli import parse_federate_args
    from hf_perfit.federated import FederatedConfig, load_config

    path = _yaml(
        tmp_path / "run.yaml", num_rounds=4, local_steps=6, learning_rate="1e-3", lora_target_modules=["q_proj"]
    )
    config = load_config(path)
    assert (config.num_rounds, config.local_steps, config.learning_rate) == (4, 6, 1e-3)  # YAML over the defaults
    assert config.lora_target_modules == ["q_proj"] and config.lora_r == 8
    config = load_config(path, {"local_steps": 2, "strategy_options": {"proximal_mu": 0.5}, "strategy": "fedprox"})
    assert (config.num_rounds, config.local_steps) == (4, 2)  # a dict override over the YAML
    assert config.resolved_strategy_options() == {"proximal_mu": 0.5}
    flags = ["--local_steps", "3", "--strategy_options", '{"proximal_mu": 0.5}', "--strategy", "fedprox"]
    assert load_config(path, flags) == parse_federate_args(["--config", str(path), *flags])  # perfit federate's
    assert load_config(path, flags).local_steps == 3
    assert load_config(None, {"num_rounds": 7}) == FederatedConfig(num_rounds=7)
    # a script's own defaults go under the YAML, the dict and the flags
    script = {"num_rounds": 9, "local_steps": 9, "seed": 9, "max_length": 99}
    config = load_config(path, ["--max_length", "77"], defaults=script)
    assert (config.num_rounds, config.local_steps, config.seed, config.max_length) == (4, 6, 9, 77)
    config = load_config(None, {"seed": 1}, defaults=script)
    assert (config.num_rounds, config.seed) == (9, 1)
    assert load_config() == FederatedConfig()
    with pytest.raises(ValueError, match="must be a list of flags"):
        load_config(path, "--num_rounds 5")
    with pytest.raises(ValueError, match=r"argument --num_rounds/--num-rounds: invalid int value: 'x'"):
        load_config(path, ["--num_rounds", "x"])  # a ValueError, not argparse's usage and SystemExit


@pytest.mark.parametrize(
    "path", sorted(REPO.glob("recipes/smollm2-135m/*/config_*.yaml")), ids=lambda p: p.parent.name + "/" + p.name
)
def test_every_recipe_parses_to_the_config_of_its_yaml(path):
    from hf_perfit.federated import FederatedConfig, load_config

    keys = yaml.safe_load(path.read_text())
    if path.name == "config_single.yaml":  # recipes/perfit_single.py's keys (TRL's sft), not a federation
        with pytest.raises(ValueError, match="'dataset_category': did you mean 'dataset_name'"):
            load_config(path)
        return
    assert load_config(path) == FederatedConfig.from_dict(keys)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("top_k", 3, "'top_k': use mole_top_k (MoLEConfig.top_k) instead"),
        ("r", 4, "'r': use lora_r"),
        ("max_steps", 40, "'max_steps': use local_steps (optimizer steps per client and round) and num_rounds"),
        ("max_seq_length", 256, "'max_seq_length': use max_length"),
        ("activation_checkpointing", True, "'activation_checkpointing': use gradient_checkpointing instead"),
        ("hub_private_repo", True, "'hub_private_repo': use hub_private instead"),
        (
            "lr_scheduler_type",
            "cosine",
            "'lr_scheduler_type': a field of trl.SFTConfig that a federated run does not read",
        ),
        ("lora_dropout", 0.1, "'lora_dropout': a field of trl.ModelConfig that a federated run does not read"),
        ("lora_rank", 4, "'lora_rank': did you mean 'lora_r'?"),
        ("num_round", 4, "'num_round': did you mean 'num_rounds'?"),
    ],
)
def test_library_and_misspelled_keys_name_the_key_to_use(tmp_path, key, value, message):
    from hf_perfit.federated import FederatedConfig, load_config

    with pytest.raises(ValueError) as err:
        load_config(_yaml(tmp_path / "bad.yaml", num_rounds=2, **{key: value}))
    assert f"unknown config keys ['{key}'] ({message}" in str(err.value)
    with pytest.raises(ValueError) as err:
        FederatedConfig.from_dict({key: value})  # a saved config.json or a Flower message
    assert f"unknown config keys ['{key}'] ({message}" in str(err.value)
    with pytest.raises(ValueError) as err:
        load_config(None, [f"--{key}", str(value)])
    assert f"unknown flags ['{key}'] ({message}" in str(err.value)
