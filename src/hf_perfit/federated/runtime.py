"""Setting up a client-side runtime from a [`FederatedConfig`]: the base model, the clients' data, the adapter model
and the local training arguments. The in-process simulation and the Flower apps build everything through here, so
they train exactly the same thing."""

from __future__ import annotations

from typing import Any

import datasets
import torch

from ..model import PerFITModel
from ..mole import MoLEConfig, MoLEModel
from .client import LocalTrainingArgs, bf16_supported, tokenize_for_completion_loss
from .config import FederatedConfig


def tokenize_clients(
    clients: list, tokenizer: Any, config: FederatedConfig
) -> tuple[dict[str, datasets.Dataset], dict[str, datasets.Dataset]]:
    """Check and tokenize every client's train and test split (completion-only labels; chat template if any).

    Returns:
        `(train_sets, test_sets)`, each `{client_id: tokenized Dataset}`.

    Raises:
        ValueError: a client with no training or no test examples.
    """
    from ..data import format_for_tokenizer

    # one progress bar for the whole run: the per-client map/filter bars of `datasets` would drown it
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return _tokenize_clients(clients, tokenizer, config, format_for_tokenizer)
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def _tokenize_clients(clients, tokenizer, config, format_for_tokenizer):
    train_sets, test_sets = {}, {}
    for c in clients:
        if len(c.train) == 0:
            raise ValueError(f"client {c.client_id} has no training examples; remove it or repartition.")
        if len(c.test) == 0:
            raise ValueError(f"client {c.client_id} has no test examples; raise test_fraction or repartition.")
        test = c.test
        if config.max_eval_examples is not None:
            test = test.select(range(min(len(test), config.max_eval_examples)))
        train_sets[c.client_id] = tokenize_for_completion_loss(
            format_for_tokenizer(c.train, tokenizer), tokenizer, config.max_length
        )
        test_sets[c.client_id] = tokenize_for_completion_loss(
            format_for_tokenizer(test, tokenizer), tokenizer, config.max_length
        )
    return train_sets, test_sets


def build_client_model(base_model: torch.nn.Module, config: FederatedConfig) -> PerFITModel | MoLEModel:
    """Wrap the base model in the adapter the strategy trains (seeded with `config.seed`, so every process builds
    the same initial adapter): PerFIT's expanded masked LoRA for `perfit`, the MoLE adapter with the whole expert
    pool for `fedamole`, a vanilla rank-r LoRA otherwise."""
    torch.manual_seed(config.seed)
    adapter = config.adapter_config()
    if isinstance(adapter, MoLEConfig):
        return MoLEModel(base_model, adapter)
    return PerFITModel(base_model, adapter)


def resolve_device(config: FederatedConfig) -> torch.device:
    """The device the base model lives on for the whole run (`config.device`): `auto` is the process's CUDA device
    when there is one (`cuda:<local rank>` under `accelerate launch`), else the CPU.

    Raises:
        ValueError: `device: cuda` where no CUDA device is visible.
    """
    if config.device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if config.device == "cuda":
            raise ValueError("device=cuda but torch sees no CUDA device; use device: auto or cpu.")
        return torch.device("cpu")
    from ..distributed import process_state

    device = process_state().device  # cuda:<local rank> under accelerate launch
    index = device.index if device.type == "cuda" and device.index is not None else torch.cuda.current_device()
    return torch.device("cuda", index)


def resolve_bf16(config: FederatedConfig, device: torch.device) -> bool:
    """Whether the run computes in bf16 on `device` (`config.bf16`): `auto` turns it on for a CUDA device that
    supports bf16 (`torch.cuda.is_bf16_supported()`, Ampere and newer) and off on the CPU, where fp32 stays the
    reference.

    Raises:
        ValueError: `bf16: true` on a CUDA device without bf16 support.
    """
    if config.bf16 == "false":
        return False
    supported = bf16_supported(device)
    if config.bf16 == "true":
        if device.type == "cuda" and not supported:
            raise ValueError(f"bf16=true but {torch.cuda.get_device_name(device)} has no bf16; use bf16: auto.")
        return True
    return supported


def local_training_args(config: FederatedConfig) -> LocalTrainingArgs:
    """The local-update settings of every client of the run (`bf16: auto` becomes `None`: decided by the device of the
    model each client trains, see [`train_client`])."""
    return LocalTrainingArgs(
        local_steps=config.local_steps,
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_length=config.max_length,
        eval_batch_size=config.eval_batch_size,
        seed=config.seed,
        gradient_checkpointing=config.gradient_checkpointing,
        bf16={"auto": None, "true": True, "false": False}[config.bf16],
        lr_decay_per_round=config.lr_decay_per_round,
    )


def load_model(config: FederatedConfig):
    """The base model and tokenizer of `config.model_name_or_path` (a preset name, Hub id or local folder), loaded
    from safetensors only; `trust_remote_code` only when the config turns it on.

    The model is placed once on [`resolve_device`] and stays there: training and evaluation run on it without moving
    it. With bf16 ([`resolve_bf16`]) its frozen weights are loaded in bf16 (half the memory, the GPU's bf16 matrix
    units); the adapters stay fp32 and training runs under bf16 autocast."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..presets import check_model_path, resolve_model_path

    check_model_path(config.model_name_or_path)  # "no such folder" / pickle-only / offline, before any loading
    path = resolve_model_path(config.model_name_or_path)
    device = resolve_device(config)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        path,
        trust_remote_code=config.trust_remote_code,
        use_safetensors=True,
        dtype=torch.bfloat16 if resolve_bf16(config, device) else torch.float32,
    )
    return model.to(device), tok


def load_clients(config: FederatedConfig):
    """The clients' data (`list[ClientData]`) of `config.dataset_name`: a per-client folder as is, anything else
    partitioned with `config.partition`."""
    from ..data import detect_client_folder, load_client_folder, load_instruction_dataset, partition_dataset

    if not config.dataset_name:
        raise ValueError("dataset_name is empty; give a Hub id, a json/jsonl/parquet file or a per-client folder.")
    if detect_client_folder(config.dataset_name):
        return load_client_folder(config.dataset_name)
    ds = load_instruction_dataset(config.dataset_name)
    return partition_dataset(
        ds,
        config.num_clients,
        method=config.partition,
        column=config.partition_column,
        alpha=config.dirichlet_alpha,
        seed=config.seed,
        test_fraction=config.test_fraction,
    )


__all__ = [
    "build_client_model",
    "load_clients",
    "load_model",
    "local_training_args",
    "resolve_bf16",
    "resolve_device",
    "tokenize_clients",
]
