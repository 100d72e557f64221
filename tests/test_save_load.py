"""Export: plain PEFT loads a PerFIT adapter with no hf_perfit code; PerFITModel.from_pretrained resumes it."""

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from hf_perfit import PerFITLoraConfig, PerFITModel, get_perfit_model

from .conftest import tiny_gpt2, tiny_llama
from .test_pruning import _train

CFG = dict(
    r=4,
    lora_alpha=8,
    expansion_factor=4,
    importance="mixed",
    importance_ema=0.6,
    search_mode="train",  # the search runs during _train's steps (a saved adapter can be mid-search)
    search_steps=4,
    prune_iterations=2,
    budget_multiplier=1.25,
    research_every=3,
    symmetric_init_std=0.05,
)


@pytest.fixture(params=["llama", "gpt2"])
def trained(request, tmp_path, batch):
    make, targets = {"llama": (tiny_llama, ["q_proj", "v_proj"]), "gpt2": (tiny_gpt2, ["c_attn"])}[request.param]
    model = get_perfit_model(make(), PerFITLoraConfig(target_modules=targets, **CFG))
    _train(model, batch, steps=6)
    model.eval()
    with torch.no_grad():
        logits = model(batch).logits.clone()
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    return make, model, logits, out


def test_plain_peft_reproduces_logits(trained, batch):
    make, _, logits, out = trained
    plain = PeftModel.from_pretrained(make(), out)
    assert type(plain).__module__.startswith("peft")
    with torch.no_grad():
        assert (plain(batch).logits - logits).abs().max().item() <= 1e-5


def test_plain_peft_in_a_process_without_hf_perfit(trained, batch, tmp_path):
    """A fresh interpreter that never imports hf_perfit gets the same logits."""
    make, _, logits, out = trained
    base_dir = tmp_path / "base"
    make().save_pretrained(base_dir)
    torch.save(batch, tmp_path / "batch.pt")
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
from safetensors.torch import load_file
m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(base_dir)!r}), {str(out)!r}).eval()
with torch.no_grad():
    torch.save(m(torch.load({str(tmp_path / "batch.pt")!r})).logits, {str(tmp_path / "logits.pt")!r})
assert not any(k.startswith("hf_perfit") for k in sys.modules)
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert (torch.load(tmp_path / "logits.pt") - logits).abs().max().item() <= 1e-5


def test_files_and_recorded_scale(trained):
    _, model, _, out = trained
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "perfit_config.json",
        "perfit_masks.safetensors",
    ]
    plain_cfg = json.loads((out / "adapter_config.json").read_text())
    assert plain_cfg["r"] == 16 and plain_cfg["lora_alpha"] == 32  # r = R, alpha = (8 / 4) * 16
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no temp folder left behind


def test_perfit_round_trip_and_training_continues(trained, batch):
    make, model, logits, out = trained
    loaded = PerFITModel.from_pretrained(make(), out, is_trainable=True)
    assert loaded.perfit_config.perfit_dict() == model.perfit_config.perfit_dict()
    for k, m in model.masks().items():
        assert torch.equal(loaded.masks()[k], m)
    assert loaded.search_state() == model.search_state()
    with torch.no_grad():
        assert (loaded.eval()(batch).logits - logits).abs().max().item() <= 1e-5
    loaded.train()
    assert all(p.requires_grad for p in loaded.lora_parameters().values())
    _train(loaded, batch, steps=3, check_zeros_from=1)
    assert loaded.num_kept() == loaded.trainable_budget()
    assert all(torch.equal(loaded.masks()[k], m) for k, m in model.masks().items())


def test_inference_load_is_frozen(trained):
    make, _, _, out = trained
    loaded = PerFITModel.from_pretrained(make(), out)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_bad_adapters_give_clear_errors(trained, tmp_path):
    make, _, _, out = trained
    with pytest.raises(FileNotFoundError, match="no adapter folder"):
        PerFITModel.from_pretrained(make(), tmp_path / "nope")
    plain_dir = tmp_path / "plain"
    PeftModel.from_pretrained(make(), out).save_pretrained(plain_dir)
    with pytest.raises(FileNotFoundError, match="not a PerFIT adapter.*peft.PeftModel.from_pretrained"):
        PerFITModel.from_pretrained(make(), plain_dir)
    (out / "perfit_masks.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="PerFIT masks file .* is damaged"):
        PerFITModel.from_pretrained(make(), out)
    (out / "perfit_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        PerFITModel.from_pretrained(make(), out)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{garbage", r"adapter_config.json is not valid JSON"),
        ("[1, 2]", r"adapter_config.json holds a list, not a PEFT config object"),
        ('{"peft_type": "LORA"}', r"adapter_config.json disagrees with perfit_config.json: r=None \(expected 16 = "),
        (None, r"adapter_config.json is missing; the adapter folder is incomplete"),
    ],
)
def test_garbage_adapter_config_is_refused(trained, content, message):
    """adapter_config.json is what plain PEFT reads: PerFIT's loader refuses one that disagrees with its own files."""
    make, _, _, out = trained
    if content is None:
        (out / "adapter_config.json").unlink()
    else:
        (out / "adapter_config.json").write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        PerFITModel.from_pretrained(make(), out)
    assert str(out / "adapter_config.json") in str(err.value)


def test_edited_adapter_config_names_the_disagreeing_keys(trained):
    make, _, _, out = trained
    config = json.loads((out / "adapter_config.json").read_text())
    config.update(lora_alpha=1.0, peft_type="IA3")
    (out / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        PerFITModel.from_pretrained(make(), out)
    assert "peft_type='IA3' (expected 'LORA')" in str(err.value) and "lora_alpha=1.0 (expected 32.0)" in str(err.value)


def _rewrite_masks(out, saved, change):
    """Replace the masks file by `change` applied to the masks `save_pretrained` wrote (`saved`)."""
    from safetensors.torch import save_file

    save_file(change(dict(saved)), str(out / "perfit_masks.safetensors"), metadata={"format": "pt"})


def test_tampered_masks_are_refused(trained):
    """The issue's case: every value 7 used to load as all-kept (3,584 elements against a budget of 896)."""
    make, model, _, out = trained
    budget, expanded = model.trainable_budget(), model.expanded_size()
    assert model.num_kept() == budget < expanded
    first = next(iter(model.masks()))
    saved = load_file(str(out / "perfit_masks.safetensors"))

    _rewrite_masks(out, saved, lambda m: {k: torch.full_like(v, 7) for k, v in m.items()})
    with pytest.raises(
        ValueError, match=r"perfit_masks.safetensors: mask .* holds values other than 0 and 1 \(e.g. 7\)"
    ):
        PerFITModel.from_pretrained(make(), out)

    _rewrite_masks(out, saved, lambda m: {k: v.float() for k, v in m.items()})
    with pytest.raises(ValueError, match=r"has dtype torch.float32; masks are uint8 or bool 0/1 values"):
        PerFITModel.from_pretrained(make(), out)

    _rewrite_masks(out, saved, lambda m: {**m, first: m[first][:1]})
    with pytest.raises(ValueError, match=rf"mask {first} has shape \(1, "):
        PerFITModel.from_pretrained(make(), out)

    _rewrite_masks(out, saved, lambda m: {**m, first: torch.ones_like(m[first])})
    with pytest.raises(ValueError, match=rf"keeps \d+ elements but perfit_config.json records num_kept={budget}"):
        PerFITModel.from_pretrained(make(), out)

    _rewrite_masks(out, saved, lambda m: {k: torch.ones_like(v) for k, v in m.items()})
    meta = json.loads((out / "perfit_config.json").read_text())
    (out / "perfit_config.json").write_text(json.dumps({**meta, "num_kept": expanded}))
    with pytest.raises(
        ValueError, match=rf"keeps {expanded} elements but the finished search keeps exactly the budget of {budget}"
    ):
        PerFITModel.from_pretrained(make(), out)


def test_wrong_base_model_is_refused(trained):
    make, _, _, out = trained
    other = tiny_llama(hidden=32) if make is tiny_llama else tiny_gpt2(hidden=32)
    with pytest.raises(ValueError, match="does not fit this base model"):
        PerFITModel.from_pretrained(other, out)


def test_failed_save_keeps_previous_adapter(trained, monkeypatch):
    _, model, _, out = trained
    before = (out / "adapter_model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("hf_perfit.model.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(out)
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert (out / "perfit_masks.safetensors").exists()
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())
