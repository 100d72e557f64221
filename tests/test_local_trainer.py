"""The reused local trainer gives exactly what a freshly built TRL SFTTrainer per client round gives.

`train_client` builds one `SFTTrainer` per model and reuses it every client round (new seed, data, optimizer,
scheduler and state). The reference here is the construction it replaces: a new `SFTTrainer` per round, on the same
data passed through TRL's own dataset preparation. Both run the same federated simulation for every strategy, with
gradient accumulation, and every round's losses and trained adapter must agree.
"""

from __future__ import annotations

import tempfile

import datasets
import pytest
import torch
from datasets import Dataset
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl import SFTConfig, SFTTrainer

import hf_perfit.federated.client as client_mod
from hf_perfit.callbacks import PerFITPruningCallback
from hf_perfit.data import ClientData
from hf_perfit.federated.client import LocalTrainingArgs, train_client
from hf_perfit.federated.simulation import FederatedConfig, FederatedSimulation
from hf_perfit.model import PerFITModel

from .conftest import build_tokenizer, tiny_llama

STRATEGIES = ["local", "fedit", "fedprox", "perfit", "fedmut", "fedqp", "fedamole"]
# the model's device: the CPU everywhere, and CUDA too where a GPU is visible (fp32 there as well, bf16="false")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def fresh_trainer_train_client(model, tokenizer, train_ds, args, proximal_mu=0.0, seed=None):
    """The client round as it was before the trainer was reused: a new SFTTrainer (with TRL's dataset preparation)
    every call."""
    seed = args.seed if seed is None else seed
    model.train()
    with tempfile.TemporaryDirectory() as tmp:
        sft_args = SFTConfig(
            output_dir=tmp,
            max_steps=args.local_steps,
            per_device_train_batch_size=args.per_device_train_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            learning_rate=args.learning_rate,
            weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm,
            lr_scheduler_type="constant",
            optim="adamw_torch",
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            max_length=args.max_length,
            bf16=False,
            gradient_checkpointing=args.gradient_checkpointing,
            use_cpu=next(model.parameters()).device.type == "cpu",
            seed=seed,
            data_seed=seed,
            dataloader_num_workers=0,
            disable_tqdm=True,
            remove_unused_columns=False,
            accelerator_config={"split_batches": False},
        )
        common = dict(
            model=model,
            args=sft_args,
            train_dataset=train_ds,
            processing_class=tokenizer,
            callbacks=[PerFITPruningCallback()] if isinstance(model, PerFITModel) else [],
        )
        datasets.disable_progress_bars()
        try:
            if proximal_mu > 0:
                trainer = client_mod._ProximalSFTTrainer(**common, proximal_mu=proximal_mu)
            elif hasattr(model, "auxiliary_loss"):
                trainer = client_mod._AuxLossSFTTrainer(**common)
            else:
                trainer = SFTTrainer(**common)
        finally:
            datasets.enable_progress_bars()
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    model.eval()
    return {"train_loss": float(sum(losses) / len(losses)), "steps": args.local_steps}


def _clients(n=3):
    out = []
    for k in range(n):
        rows = [
            {"instruction": f"Task {k}: echo {i}", "context": "", "response": f"{k}{i}{k}", "category": f"c{k}"}
            for i in range(12)
        ]
        out.append(ClientData(f"client_{k}", Dataset.from_list(rows[:9]), Dataset.from_list(rows[9:]), [f"c{k}"]))
    return out


def _cfg(tmp_path, strategy, name, **kw):
    extra = {}
    if strategy == "fedamole":
        extra = dict(num_experts=4, clients_per_expert=2, experts_per_client_min=1, experts_per_client_max=4)
    return FederatedConfig(
        model_name_or_path="unused",
        strategy=strategy,
        num_clients=3,
        num_rounds=2,
        local_steps=3,
        search_steps=3,
        prune_iterations=2,
        learning_rate=5e-3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_length=48,
        lora_r=2,
        lora_alpha=4,
        output_dir=str(tmp_path / name),
        seed=0,
        **extra,
        **kw,
    )


def _recorded_run(tmp_path, strategy, name, train_fn, monkeypatch, device="cpu"):
    """Run the simulation with `train_fn` as the local trainer; every client round's metrics and trained adapter."""
    rounds = []

    def recording(model, tokenizer, train_ds, args, proximal_mu=0.0, seed=None):
        metrics = train_fn(model, tokenizer, train_ds, args, proximal_mu, seed)
        tensors = {k: v.detach().clone() for k, v in model.get_adapter_state()[0].items()}
        rounds.append((metrics, tensors, proximal_mu, seed, {p.device.type for p in model.parameters()}))
        return metrics

    monkeypatch.setattr(client_mod, "train_client", recording)
    cfg = _cfg(tmp_path, strategy, name, device=device, bf16="false")
    sim = FederatedSimulation(cfg, model=tiny_llama().to(device), tokenizer=build_tokenizer(), clients=_clients())
    sim.run()
    return rounds


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_reused_trainer_equals_fresh_trainer_every_round(tmp_path, monkeypatch, strategy, device):
    fresh = _recorded_run(tmp_path, strategy, "fresh", fresh_trainer_train_client, monkeypatch, device)
    reused = _recorded_run(tmp_path, strategy, "reused", train_client, monkeypatch, device)
    assert len(fresh) == len(reused) == 6  # 3 clients x 2 rounds
    assert len({r[3] for r in reused}) == 6  # every client round has its own seed
    if strategy == "fedprox":
        assert all(r[2] > 0 for r in reused)
    assert all(r[4] == {device} for r in reused)  # trained where the model is, never moved
    for (m_ref, t_ref, *_), (m_new, t_new, *_) in zip(fresh, reused, strict=True):
        assert m_new["train_loss"] == pytest.approx(m_ref["train_loss"], abs=1e-6)
        assert m_new["steps"] == m_ref["steps"]
        assert t_new.keys() == t_ref.keys()
        for k in t_ref:
            assert torch.allclose(t_new[k], t_ref[k], atol=1e-6, rtol=0), k


def test_one_trainer_per_model_and_per_round_seed(tokenizer):
    """The trainer is built once; each call trains from the adapter the model holds, with the call's seed: a repeat
    of the same call gives the same result, another seed another one."""
    from hf_perfit import PerFITLoraConfig, get_perfit_model
    from hf_perfit.federated.client import tokenize_for_completion_loss

    rows = [{"prompt": f"Q{i}: say {i}", "completion": f" {i}{i}"} for i in range(8)]
    ds = tokenize_for_completion_loss(Dataset.from_list(rows), tokenizer, 32)
    model = get_perfit_model(
        tiny_llama(), PerFITLoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], expansion_factor=1)
    )
    args = LocalTrainingArgs(local_steps=2, per_device_train_batch_size=2, learning_rate=1e-2)
    start = model.get_adapter_state()
    a = train_client(model, tokenizer, ds, args, seed=3)
    after_a = model.get_adapter_state()[0]
    model.set_adapter_state(*start)
    b = train_client(model, tokenizer, ds, args, seed=3)
    after_b = model.get_adapter_state()[0]
    model.set_adapter_state(*start)
    c = train_client(model, tokenizer, ds, args, seed=4)
    assert len(model.__dict__[client_mod._TRAINERS_ATTR]) == 1
    assert a == b and c["train_loss"] != a["train_loss"]
    assert all(torch.equal(after_a[k], after_b[k]) for k in after_a)


def test_raw_or_long_rows_are_prepared_as_trl_would(tokenizer):
    """A dataset TRL would change (rows longer than max_length) goes through TRL's preparation, as before."""
    from hf_perfit import PerFITLoraConfig, get_perfit_model
    from hf_perfit.federated.client import tokenize_for_completion_loss

    rows = [{"prompt": f"Question {i}: say it", "completion": f" answer {i} " * 4} for i in range(6)]
    long_ds = tokenize_for_completion_loss(Dataset.from_list(rows), tokenizer, 200)
    args = LocalTrainingArgs(local_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, max_length=24)
    assert max(len(x) for x in long_ds["input_ids"]) > args.max_length

    def model():
        return get_perfit_model(
            tiny_llama(), PerFITLoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], expansion_factor=1)
        )

    ours, ref = model(), model()
    got = train_client(ours, tokenizer, long_ds, args, seed=1)
    want = fresh_trainer_train_client(ref, tokenizer, long_ds, args, seed=1)
    assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-6)
    a, b = ours.get_adapter_state()[0], ref.get_adapter_state()[0]
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_base_trains_and_evaluates_on_its_device(tokenizer, device):
    """What `load_model` gives with bf16: frozen bf16 weights on the device; training (bf16 autocast where `auto`
    turns it on, i.e. CUDA with bf16) leaves the adapter fp32, the base bf16, everything where it was, and the plain
    forward (no autocast wrapper) in place."""
    from hf_perfit import PerFITLoraConfig, get_perfit_model
    from hf_perfit.federated.client import evaluate_perplexity, tokenize_for_completion_loss

    rows = [{"prompt": f"Q{i}: say {i}", "completion": f" {i}{i}"} for i in range(8)]
    ds = tokenize_for_completion_loss(Dataset.from_list(rows), tokenizer, 32)
    base = tiny_llama().to(device=device, dtype=torch.bfloat16)
    model = get_perfit_model(base, PerFITLoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], expansion_factor=1))
    args = LocalTrainingArgs(local_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, bf16=None)
    before = evaluate_perplexity(model, tokenizer, ds)
    out = train_client(model, tokenizer, ds, args, seed=0)
    after = evaluate_perplexity(model, tokenizer, ds)
    assert torch.isfinite(torch.tensor([out["train_loss"], before["eval_loss"], after["eval_loss"]])).all()
    assert after["eval_loss"] != before["eval_loss"]  # the adapter trained
    assert {p.device.type for p in model.parameters()} == {device}
    assert {p.dtype for p in model.lora_parameters().values()} == {torch.float32}
    assert base.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert not hasattr(model.forward, "__wrapped__")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trainer_arguments_raise_no_deprecation_warning(tmp_path, checkpointing):
    """A client round must not warn (transformers 5.24 renamed gradient checkpointing; its old name, which TRL
    sets by default, warns every round): the setting reaches the trainer under the installed name."""
    import warnings

    from hf_perfit.federated.client import LocalTrainingArgs, _sft_config

    args = LocalTrainingArgs(local_steps=2, gradient_checkpointing=checkpointing)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        sft = _sft_config(args, str(tmp_path), seed=0, processes=1, device=torch.device("cpu"))
    assert sft.gradient_checkpointing is checkpointing
    assert sft.activation_checkpointing is checkpointing
