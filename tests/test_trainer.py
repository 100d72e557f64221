"""PerFITPruningCallback inside TRL's SFTTrainer: gradient accumulation, AdamW with weight decay."""

import pytest
from datasets import Dataset
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from hf_perfit import PerFITLoraConfig, PerFITPruningCallback, get_perfit_model
from hf_perfit.callbacks import find_perfit_model


def _dataset():
    rows = [{"prompt": f"Add {i} and {i + 1}.", "completion": f" {2 * i + 1}"} for i in range(24)]
    return Dataset.from_list(rows)


class ZeroChecker(TrainerCallback):
    """Runs after PerFITPruningCallback at every optimizer step and records what it sees."""

    def __init__(self):
        self.kept, self.violations = [], 0

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        m = find_perfit_model(model)
        masks = m.masks()
        for name, p in m.lora_parameters().items():
            self.violations += int((p.detach()[~masks[name]] != 0).sum())
        self.kept.append(m.num_kept())


def _args(tmp_path, **kw):
    return SFTConfig(
        output_dir=str(tmp_path),
        max_steps=kw.pop("max_steps", 10),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=kw.pop("gradient_accumulation_steps", 2),
        learning_rate=5e-3,
        weight_decay=0.1,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        max_length=64,
        seed=0,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **kw,
    )


def test_sft_trainer_search_holds_budget_and_zeros(llama, tokenizer, tmp_path):
    cfg = PerFITLoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], search_mode="train", search_steps=6, prune_iterations=3
    )
    model = get_perfit_model(llama, cfg)
    checker = ZeroChecker()
    trainer = SFTTrainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=_dataset(),
        processing_class=tokenizer,
        callbacks=[PerFITPruningCallback(), checker],
    )
    trainer.train()
    assert len(checker.kept) == 10  # one per optimizer step, not per micro-batch
    assert checker.kept[5:] == [model.trainable_budget()] * 5
    assert checker.violations == 0
    assert model.num_kept() == model.trainable_budget()
    logs = [h for h in trainer.state.log_history if "perfit_density" in h]
    assert logs and logs[-1]["perfit_kept"] == model.trainable_budget()


def test_trained_model_runs_in_full_precision_and_exports_exactly(llama, tokenizer, tmp_path, batch):
    """SFTConfig defaults to bf16=True and accelerate wraps forward in autocast; after training the callback restores
    the plain forward, so in-process logits equal what plain PEFT computes from the saved adapter."""
    import torch
    from peft import PeftModel

    from .conftest import tiny_llama

    cfg = PerFITLoraConfig(r=4, target_modules=["q_proj", "v_proj"], search_steps=2, prune_iterations=1)
    model = get_perfit_model(llama, cfg)
    args = _args(tmp_path, max_steps=3, gradient_accumulation_steps=1)
    assert args.bf16  # the default this test is about
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=_dataset(),
        processing_class=tokenizer,
        callbacks=[PerFITPruningCallback()],
    )
    trainer.train()
    assert not hasattr(model.forward, "__wrapped__")
    model.save_pretrained(tmp_path / "adapter")
    model.eval()
    with torch.no_grad():
        ours = model(batch).logits
        plain = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()(batch).logits
    assert (ours - plain).abs().max().item() <= 1e-5


def test_callback_refuses_plain_model(llama, tokenizer, tmp_path):
    trainer = SFTTrainer(
        model=llama,
        args=_args(tmp_path, max_steps=1),
        train_dataset=_dataset(),
        processing_class=tokenizer,
        callbacks=[PerFITPruningCallback()],
    )
    with pytest.raises(ValueError, match="needs a PerFITModel.*get_perfit_model"):
        trainer.train()
