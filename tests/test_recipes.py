"""`recipes/perfit_single.py`: one PerFIT adapter with TRL's SFTTrainer, run as a user runs it (a subprocess, YAML
config plus a flag), on a tiny Llama saved to disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file

from .conftest import build_tokenizer, pythonpath, tiny_llama

REPO = Path(__file__).resolve().parents[1]


def test_perfit_single_recipe_searches_to_the_budget_and_saves_a_plain_peft_adapter(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "model")
    build_tokenizer().save_pretrained(tmp_path / "model")
    rows = [
        {"instruction": f"Task {k}: echo {i}", "response": f"{k}{i}{k}", "category": f"c{k}"}
        for k in range(2)
        for i in range(12)
    ]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "adapter"
    config = {
        "model_name_or_path": str(tmp_path / "model"),
        "dataset_name": str(tmp_path / "data.jsonl"),
        "dataset_category": "c1",
        "lora_r": 2,
        "lora_alpha": 4,
        "lora_target_modules": ["q_proj", "v_proj"],
        "expansion_factor": 4,
        "search_steps": 4,
        "prune_iterations": 2,
        "output_dir": str(out),
        "max_steps": 100,  # overridden by the flag below
        "learning_rate": 5e-3,
        "per_device_train_batch_size": 2,
        "max_length": 48,
        "save_strategy": "no",
        "report_to": "none",
        "bf16": False,
        "use_cpu": True,
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": pythonpath()}
    proc = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "perfit_single.py"), "--config", "config.yaml", "--max_steps", "6"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    # the search ran inside SFTTrainer: exactly the rank-2 budget is kept, out of the 4x expanded LoRA
    meta = json.loads((out / "perfit_config.json").read_text())
    budget = sum(2 * (i + o) for i, o in ((16, 16), (16, 8))) * 2  # r·(d_in + d_out), q_proj and v_proj, 2 layers
    assert meta["budget"] == meta["num_kept"] == budget and meta["expanded_size"] == 4 * budget
    assert f"kept {budget} of {4 * budget} LoRA elements (budget {budget})" in proc.stdout
    masks = load_file(str(out / "perfit_masks.safetensors"))
    assert sum(int(m.bool().sum()) for m in masks.values()) == budget
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8  # γ·r

    # plain PEFT loads it; the pruned elements are exact zeros in the saved weights, the kept ones are trained
    model = PeftModel.from_pretrained(tiny_llama(), out)
    weights = load_file(str(out / "adapter_model.safetensors"))
    for key, mask in masks.items():
        assert torch.all(weights[key][~mask.bool()] == 0), key
    assert any(torch.count_nonzero(w) for k, w in weights.items() if "lora_B" in k)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()
