"""`PerFITPruningCallback`: the Trainer hook of PerFIT's architecture search. Deliberately thin.

All logic lives in [`PerFITModel`]; this only calls it: `on_train_begin` runs the foresight search
(`search_mode="foresight"`, the default) on the trainer's own dataloader before the first step; `on_pre_optimizer_step`
(after backward, accumulation and clipping) and `on_optimizer_step` mask gradients and weights and, with
`search_mode="train"`, run the search during training.
"""

from __future__ import annotations

from typing import Any

from accelerate.utils import extract_model_from_parallel
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .model import PerFITModel


def find_perfit_model(model: nn.Module | None) -> PerFITModel:
    """Return the `PerFITModel` inside `model` (it may be wrapped by DDP, FSDP or `torch.compile`)."""
    seen = model
    while seen is not None and not isinstance(seen, PerFITModel):
        seen = getattr(seen, "module", None) or getattr(seen, "_orig_mod", None)
    if seen is None:
        raise ValueError(
            f"PerFITPruningCallback needs a PerFITModel, got {type(model).__name__}; build the model with "
            "hf_perfit.get_perfit_model(base_model, PerFITLoraConfig(...)) and pass that to the trainer."
        )
    return seen


def release_mixed_precision(model: nn.Module) -> None:
    """Undo what accelerate's `prepare` did to `model` for mixed precision, so that the model behaves exactly like the
    adapter it saves and the next `Trainer.train()` on it prepares it afresh: restore the plain `forward` (accelerate
    wraps it in autocast + fp32 outputs, TRL's SFTConfig defaulting to bf16, and leaves it there: later inference in
    the process would silently run in bf16) and clear the `_is_accelerate_prepared` mark.

    Why the mark too: accelerate skips a model marked prepared, so a trainer reused across rounds (the federated
    local trainer) wrapped the forward in the first round only, and once the wrapper was stripped every later round
    trained without autocast. In bf16 the first client round of each process then computed differently from the rest,
    so a resumed run differed from the uninterrupted one (grad sums 0.601896 against 0.601930 at the same step,
    2026-11-29). Now every `train()` runs under autocast and every evaluation after it without the wrapper."""
    extract_model_from_parallel(model, keep_fp32_wrapper=False)
    model.__dict__.pop("_is_accelerate_prepared", None)


class PerFITPruningCallback(TrainerCallback):
    """Runs PerFIT's iterative pruning inside a `transformers.Trainer` / `trl.SFTTrainer`.

    Example:
        ```python
        trainer = SFTTrainer(model=perfit_model, args=args, train_dataset=ds, callbacks=[PerFITPruningCallback()])
        ```
    Adds `perfit_density` and `perfit_kept` to the training logs.
    """

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        model = find_perfit_model(kwargs.get("model"))  # fail before the first step, not at it
        if model.perfit_config.search_mode == "foresight" and model.is_searching:
            loader = kwargs.get("train_dataloader")
            if loader is None:
                raise ValueError(
                    "PerFIT's foresight search needs the trainer's train_dataloader at on_train_begin; call "
                    "model.foresight_search(batches) yourself before trainer.train()."
                )
            model.foresight_search(loader)

    def on_pre_optimizer_step(self, args, state, control, **kwargs: Any):
        find_perfit_model(kwargs.get("model")).before_optimizer_step()

    def on_optimizer_step(self, args, state, control, **kwargs: Any):
        find_perfit_model(kwargs.get("model")).after_optimizer_step()

    def on_train_end(self, args, state, control, **kwargs: Any):
        model = kwargs.get("model")
        if model is not None:
            release_mixed_precision(find_perfit_model(model))

    def on_log(self, args, state, control, logs: dict[str, float] | None = None, **kwargs: Any):
        if logs is not None and kwargs.get("model") is not None:
            model = find_perfit_model(kwargs["model"])
            extra = {"perfit_kept": model.num_kept(), "perfit_density": round(model.density(), 6)}
            logs.update(extra)
            # The Trainer appends a copy of `logs` to the history before calling on_log; keep both in step.
            if state.log_history:
                state.log_history[-1].update(extra)
