"""One PerFIT adapter on one dataset with TRL's `SFTTrainer`: the first thing to try before a federation.

    python recipes/perfit_single.py --config recipes/smollm2-135m/perfit/config_single.yaml
    accelerate launch recipes/perfit_single.py --config recipes/smollm2-135m/perfit/config_single.yaml --max_steps 60

The model is `get_perfit_model(base, PerFITLoraConfig(...))`: the LoRA is expanded γ-fold, `PerFITPruningCallback`
prunes it by Taylor importance during the first `search_steps` optimizer steps down to the parameter budget of a
rank-`lora_r` LoRA, and training goes on with the searched mask held (docs/perfit.md). Keys are the fields of
`ScriptArguments`, `trl.SFTConfig`, `trl.ModelConfig` and `PerFITArguments`, in the YAML or as `--key value` flags
(flags win), as in TRL's `trl sft`. The adapter saved to `output_dir` loads with plain
`peft.PeftModel.from_pretrained(base, output_dir)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser

from hf_perfit import PerFITLoraConfig, PerFITPruningCallback, get_perfit_model
from hf_perfit._compose import compose
from hf_perfit.data import format_for_tokenizer, load_instruction_dataset
from hf_perfit.federated.compact_head import enable_compact_head_on_cpu
from hf_perfit.presets import resolve_model_path

PERFIT_KEYS = ("expansion_factor", "importance", "search_steps", "prune_iterations", "budget_multiplier")


@dataclass
class ScriptArguments:
    """The data: one client's instruction dataset."""

    dataset_name: str = field(
        default="builtin:stdlib",
        metadata={"help": "Dataset (file, folder, Hub id or builtin:stdlib), see docs/data.md."},
    )
    dataset_category: str | None = field(
        default=None, metadata={"help": "Keep only the examples of this `category` (one client's data)."}
    )
    max_train_examples: int | None = field(default=None, metadata={"help": "Keep at most this many examples."})


@compose({name: (PerFITLoraConfig, name) for name in PERFIT_KEYS})
class PerFITArguments:
    """PerFIT's search: these fields are `PerFITLoraConfig`'s (type, default, help; docs/perfit.md)."""


def main(
    script_args: ScriptArguments, training_args: SFTConfig, model_args: ModelConfig, perfit_args: PerFITArguments
) -> None:
    model_path = resolve_model_path(model_args.model_name_or_path)  # a preset name becomes its converted folder
    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision)
    base = AutoModelForCausalLM.from_pretrained(model_path, revision=model_args.model_revision, dtype="float32")
    dataset = load_instruction_dataset(script_args.dataset_name)
    if script_args.dataset_category is not None:
        dataset = dataset.filter(lambda row: row["category"] == script_args.dataset_category)
        if len(dataset) == 0:
            raise ValueError(f"dataset_category={script_args.dataset_category!r} has no example in the dataset.")
    if script_args.max_train_examples is not None:
        dataset = dataset.select(range(min(script_args.max_train_examples, len(dataset))))
    config = PerFITLoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules,
        task_type="CAUSAL_LM",
        **dataclasses.asdict(perfit_args),
    )
    model = get_perfit_model(base, config)
    enable_compact_head_on_cpu()  # on CPU the loss projects the response positions only, as TRL does on CUDA
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=format_for_tokenizer(dataset, tokenizer),
        processing_class=tokenizer,
        callbacks=[PerFITPruningCallback()],
    )
    trainer.train()
    if trainer.is_world_process_zero():
        model.save_pretrained(training_args.output_dir)
        print(
            f"kept {model.num_kept()} of {model.expanded_size()} LoRA elements (budget {model.trainable_budget()}); "
            f"adapter in {training_args.output_dir}"
        )


def make_parser() -> TrlParser:
    return TrlParser((ScriptArguments, SFTConfig, ModelConfig, PerFITArguments))


if __name__ == "__main__":
    script_args, training_args, model_args, perfit_args = make_parser().parse_args_and_config()
    main(script_args, training_args, model_args, perfit_args)
