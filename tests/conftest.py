"""Tiny random models and a local tokenizer: nothing is downloaded, every test runs in seconds on 2 cores."""

from __future__ import annotations

import importlib
import os
import string
import sys
from types import ModuleType

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that tries to reach the Hub fails loudly
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% else %}<|assistant|>{% generation %}{{ m['content'] }}</s>{% endgeneration %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (printable ASCII + specials) with a chat template, built offline."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(vocab_size: int = 128, hidden: int = 16, seed: int = 0) -> LlamaForCausalLM:
    """2-layer Llama, hidden 16: q_proj 16→16 and v_proj 16→8 (2 KV heads) give layers of different sizes."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(vocab_size: int = 128, hidden: int = 16, seed: int = 0) -> GPT2LMHeadModel:
    """2-layer GPT-2 whose attention/MLP projections are `Conv1D` (transposed weights)."""
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab_size, n_embd=hidden, n_layer=2, n_head=4, n_positions=256, pad_token_id=0, eos_token_id=2
    )
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture
def llama() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def gpt2() -> GPT2LMHeadModel:
    return tiny_gpt2()


@pytest.fixture
def batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 128, (4, 12), generator=g)


REPO_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


# FederatedConfig keys for the tests that compare runs bit for bit (resume after a kill, a fork, another transport or
# process, a stored fp32 reference): fp32 on the CPU. With a GPU visible, `device: auto` trains on CUDA in bf16
# (`bf16: auto`), where two identical runs are not bitwise equal (CUDA's attention backward accumulates with atomics).
# The resume logic is the same on every device; tests/test_resume_bf16.py runs it in bf16 (exact on the CPU, within
# bf16 rounding on CUDA). Where `device` acts: a run that loads its base model (`perfit federate`, `run_federated` of
# a config with a model path, a Flower node) places it there; a model passed to `FederatedSimulation(model=...)`
# trains where it is (the tiny `tiny_llama()` of most tests: the CPU, in fp32 unless `bf16: true`, GPU or not).
CPU_FP32 = {"device": "cpu", "bf16": "false"}


def pythonpath() -> str:
    """PYTHONPATH for a subprocess: the repo's src/ first, then the one the tests run with (on some machines the
    packages come through it, so replacing it would lose them)."""
    return os.pathsep.join(filter(None, [REPO_SRC, os.environ.get("PYTHONPATH")]))


BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def benchmark_module(name: str) -> ModuleType:
    """`benchmarks/<name>.py`, imported with benchmarks/ (a folder of scripts, not a package) on `sys.path` only
    while it is imported, so no other test picks a module up from there by accident."""
    sys.path.insert(0, BENCHMARKS)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(BENCHMARKS)


def save_run_assets(root, per_category: int):
    """A tiny Llama + tokenizer saved like a Hub checkpoint in `root/model`, and `root/data.jsonl`: 3 categories of
    `per_category` echo instructions each (what the subprocess tests run `perfit federate` on)."""
    import json
    from pathlib import Path

    root = Path(root)
    tiny_llama().save_pretrained(root / "model")
    build_tokenizer().save_pretrained(root / "model")
    rows = [
        {"instruction": f"Task {k}: echo {i}", "response": f"{k}{i}{k}", "category": f"c{k}"}
        for k in range(3)
        for i in range(per_category)
    ]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Benchmarks called in-process (`quality_scale.main(["--threads", "1", ...])`) set torch's thread count for the
    whole pytest process; a later test comparing a run with one in a subprocess (default threads) could then see
    different float sums. Every test starts with the count the process started with."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
