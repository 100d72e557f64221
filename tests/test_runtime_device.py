"""Where the model lives and in which precision (`device`, `bf16`), and the personalized perplexity on that device."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

import hf_perfit.federated.client as client_mod
from hf_perfit.federated.client import evaluate_perplexity, tokenize_for_completion_loss
from hf_perfit.federated.config import FederatedConfig
from hf_perfit.federated.runtime import load_model, local_training_args, resolve_bf16, resolve_device

from .conftest import build_tokenizer, tiny_llama


def test_config_device_and_bf16_values():
    assert FederatedConfig(bf16=True).bf16 == "true"  # YAML `bf16: true` is a boolean
    assert FederatedConfig(bf16="FALSE").bf16 == "false"
    assert FederatedConfig().device == "auto" and FederatedConfig().bf16 == "auto"
    with pytest.raises(ValueError, match=r"device='gpu' is unknown; allowed values: auto, cpu, cuda"):
        FederatedConfig(device="gpu")
    with pytest.raises(ValueError, match=r"bf16='yes' is unknown; allowed values: auto, true, false"):
        FederatedConfig(bf16="yes")


def test_resolve_device(monkeypatch):
    assert resolve_device(FederatedConfig(device="cpu")) == torch.device("cpu")
    auto = resolve_device(FederatedConfig())
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(FederatedConfig()) == torch.device("cpu")
    with pytest.raises(ValueError, match="device=cuda but torch sees no CUDA device"):
        resolve_device(FederatedConfig(device="cuda"))


def test_resolve_bf16(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_bf16(FederatedConfig(), cpu) is False  # fp32 on the CPU is the reference
    assert resolve_bf16(FederatedConfig(bf16="true"), cpu) is True  # asked for explicitly
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_bf16(FederatedConfig(), torch.device("cuda")) is True
    assert resolve_bf16(FederatedConfig(bf16="false"), torch.device("cuda")) is False
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Old GPU")
    assert resolve_bf16(FederatedConfig(), torch.device("cuda")) is False
    with pytest.raises(ValueError, match="bf16=true but Old GPU has no bf16"):
        resolve_bf16(FederatedConfig(bf16="true"), torch.device("cuda"))


def test_local_training_args_bf16():
    assert local_training_args(FederatedConfig()).bf16 is None  # auto: decided by the model's device
    assert local_training_args(FederatedConfig(bf16="true")).bf16 is True
    assert local_training_args(FederatedConfig(bf16="false")).bf16 is False


def test_load_model_places_the_model_once(monkeypatch, tmp_path):
    import transformers

    tiny_llama().save_pretrained(tmp_path / "model")  # a real folder: load_model checks the path before loading
    path = str(tmp_path / "model")
    seen = []

    def fake(path, **kwargs):
        seen.append(kwargs)
        return build_tokenizer() if len(seen) % 2 else tiny_llama().to(kwargs["dtype"])

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    model, _ = load_model(FederatedConfig(model_name_or_path=path, device="cpu"))
    assert next(model.parameters()).device.type == "cpu" and seen[1]["dtype"] == torch.float32
    cfg = FederatedConfig(model_name_or_path=path)
    model, _ = load_model(cfg)
    device = resolve_device(cfg)
    assert next(model.parameters()).device == device
    want = torch.bfloat16 if resolve_bf16(cfg, device) else torch.float32
    assert seen[3]["dtype"] == want and next(model.parameters()).dtype == want


def _test_set(tokenizer, n=7):
    rows = [{"prompt": f"Question {i}: repeat", "completion": " x" * (1 + i % 4)} for i in range(n)]
    return tokenize_for_completion_loss(Dataset.from_list(rows), tokenizer, 64)


def test_perplexity_is_token_weighted_over_the_split(tokenizer):
    """exp(sum of response-token NLL / number of response tokens), each row scored alone (no padding) as reference;
    the same for every batch size, and the same on a second call (cached batches)."""
    model = tiny_llama()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    ds = _test_set(tokenizer)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for x, y in zip(ds["input_ids"], ds["labels"], strict=True):
            logits = model(torch.tensor([x], device=device)).logits[0, :-1].float()
            target = torch.tensor(y[1:], device=device)
            keep = target != -100
            nll += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
            tokens += int(keep.sum())
    want = nll / tokens
    for batch_size in (1, 3, 8):
        got = evaluate_perplexity(model, tokenizer, ds, batch_size)
        assert got["eval_tokens"] == tokens
        assert got["eval_loss"] == pytest.approx(want, rel=1e-5)
        assert got["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)
    again = evaluate_perplexity(model, tokenizer, ds, 3)
    assert again == evaluate_perplexity(model, tokenizer, ds, 3)
    assert len(client_mod._EVAL_BATCHES[ds]) == 3  # one set of padded batches per batch size, built once


def test_perplexity_computes_logits_at_the_scored_positions_only(tokenizer):
    """The LM head sees only the positions some row of the batch scores (not every position of every row), and a
    model whose forward has no `logits_to_keep` gets the full logits: both give the reference loss."""
    model = tiny_llama()
    ds = _test_set(tokenizer)
    scored_columns = 0
    for _, _, shifted, _, _ in client_mod._eval_batches(ds, 8, tokenizer.pad_token_id, torch.device("cpu")):
        scored_columns += int((shifted != -100).any(dim=0).sum())
    rows = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1].numel()))
    sliced = evaluate_perplexity(model, tokenizer, ds, 8)
    hook.remove()
    assert rows == [len(ds) * scored_columns]  # one batch of 7 rows, its scored columns only
    assert scored_columns < max(len(x) for x in ds["input_ids"]) - 1  # fewer than every position

    class NoKeep(type(model)):
        def forward(self, input_ids=None, attention_mask=None):  # an architecture without `logits_to_keep`
            return super().forward(input_ids=input_ids, attention_mask=attention_mask)

    model.__class__ = NoKeep
    full = evaluate_perplexity(model, tokenizer, ds, 8)
    assert full["eval_tokens"] == sliced["eval_tokens"]
    assert full["eval_loss"] == pytest.approx(sliced["eval_loss"], rel=1e-6)


def test_perplexity_follows_the_adapter_the_model_holds(tokenizer):
    """The cached batches hold inputs only: changing the model's weights changes the result."""
    model = tiny_llama()
    ds = _test_set(tokenizer)
    before = evaluate_perplexity(model, tokenizer, ds)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    assert evaluate_perplexity(model, tokenizer, ds)["eval_loss"] != before["eval_loss"]
