"""The in-process federated simulation end to end on a tiny model: strategies, outputs, exports, resume."""

import dataclasses
import json

import pytest
import torch
from datasets import Dataset
from peft import PeftModel

from hf_perfit.data import ClientData
from hf_perfit.federated.simulation import FederatedConfig, FederatedSimulation

from .conftest import CPU_FP32, build_tokenizer, tiny_llama


def _clients(n=3):
    out = []
    for k in range(n):
        rows = [
            {"instruction": f"Task {k}: echo {i}", "context": "", "response": f"{k}{i}{k}", "category": f"c{k}"}
            for i in range(12)
        ]
        out.append(ClientData(f"client_{k}", Dataset.from_list(rows[:9]), Dataset.from_list(rows[9:]), [f"c{k}"]))
    return out


def _cfg(tmp_path, strategy, **kw):
    return FederatedConfig(
        model_name_or_path="unused",
        strategy=strategy,
        num_clients=3,
        num_rounds=kw.pop("num_rounds", 2),
        local_steps=4,
        search_steps=4,
        prune_iterations=2,
        learning_rate=5e-3,
        per_device_train_batch_size=2,
        max_length=48,
        lora_r=2,
        lora_alpha=4,
        output_dir=str(tmp_path / strategy),
        seed=0,
        **kw,
    )


def _run(cfg):
    return FederatedSimulation(cfg, model=tiny_llama(), tokenizer=build_tokenizer(), clients=_clients()).run()


@pytest.mark.parametrize("strategy", ["perfit", "fedit", "fedprox", "local"])
def test_run_writes_metrics_and_plain_peft_adapters(tmp_path, strategy):
    # the run's model is compared with a plain-PEFT load on the CPU to 1e-5: fp32 on the CPU (conftest.CPU_FP32)
    cfg = _cfg(tmp_path, strategy, budget_multipliers=[1.0, 1.0, 2.0] if strategy == "perfit" else None, **CPU_FP32)
    summary = _run(cfg)
    out = tmp_path / strategy
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    per_client = [r for r in records if "client" in r and r["round"] >= 0]
    assert len(per_client) == 2 * 3
    for r in per_client:
        for key in ("round", "client", "strategy", "train_loss", "eval_loss", "perplexity", "num_examples"):
            assert key in r
        # PerFIT's round 0 downloads nothing: the seeded init is rebuilt by the client (docs/perfit.md)
        assert (
            r["bytes_up"] > 0
            and (r["bytes_down"] > 0 or strategy == "perfit" and r["round"] == 0)
            or (strategy == "local")
        )
    assert summary["round"] == 1 and summary["mean_perplexity"] > 0
    if strategy == "perfit":
        assert {"shared_fraction", "exclusive_fraction", "mask_jaccard"} <= set(summary)
        densities = {r["client"]: r["density"] for r in per_client if r["round"] == 1}
        assert densities["client_2"] == pytest.approx(2 * densities["client_0"])  # heterogeneous budget
    assert "| client_0 |" in (out / "results.md").read_text()
    # every exported adapter loads with plain PEFT and gives the logits the run evaluated
    resumed = dataclasses.replace(cfg, resume=True)  # --resume refuses a config that changes the run
    sim = FederatedSimulation(resumed, model=tiny_llama(), tokenizer=build_tokenizer(), clients=_clients())
    batch = torch.randint(3, 100, (2, 10))
    for c in ("client_0", "client_2"):
        sim._personalize(c, 1)
        with torch.no_grad():
            ours = sim.model(batch).logits
            plain = PeftModel.from_pretrained(tiny_llama(), out / "clients" / c / "adapter").eval()(batch).logits
        assert (ours - plain).abs().max().item() <= 1e-5


def test_perfit_uploads_sparse_values(tmp_path):
    _run(_cfg(tmp_path, "perfit"))
    _run(_cfg(tmp_path, "fedit"))
    up = {}
    for s in ("perfit", "fedit"):
        recs = [json.loads(x) for x in (tmp_path / s / "metrics.jsonl").read_text().splitlines()]
        up[s] = [r["bytes_up"] for r in recs if r.get("client") == "client_0" and r["round"] >= 0]
    # round 0 carries the mask bits too, round 1 only kept values: <= 1.15x FedIT at the same budget
    assert up["perfit"][1] <= 1.15 * up["fedit"][1]
    assert up["perfit"][0] <= (1 + 4 / 32 + 0.01) * up["fedit"][0]


def test_bad_config_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="strategy='fedsgd' is unknown"):
        _cfg(tmp_path, "fedsgd")
    with pytest.raises(ValueError, match="unknown config keys.*lora_rank"):
        FederatedConfig.from_dict({"lora_rank": 4})
    with pytest.raises(ValueError, match="search_steps=8 > local_steps=4"):
        FederatedConfig(strategy="perfit", local_steps=4, search_steps=8, search_mode="train")
    empty = _clients()
    empty[1] = ClientData("client_1", empty[1].train.select([]), empty[1].test, ["c1"])
    with pytest.raises(ValueError, match="client client_1 has no training examples"):
        FederatedSimulation(_cfg(tmp_path, "fedit"), model=tiny_llama(), tokenizer=build_tokenizer(), clients=empty)


def test_uploads_carry_only_tensors_counts_and_metrics(tmp_path, monkeypatch):
    import hf_perfit.federated.simulation as sim_mod

    uploads = []
    real = sim_mod.client_update

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        uploads.append(result.update)
        return result

    monkeypatch.setattr(sim_mod, "client_update", spy)
    _run(_cfg(tmp_path, "perfit", num_rounds=1))
    assert len(uploads) == 3
    for u in uploads:
        for f in dataclasses.fields(u):
            value = getattr(u, f.name)
            if f.name == "client_id":
                assert value in ("client_0", "client_1", "client_2")
            elif f.name == "num_examples":
                assert type(value) is int
            elif f.name == "mask_changed":
                assert type(value) is bool
            elif f.name == "metrics":
                assert all(isinstance(k, str) and type(v) is float for k, v in value.items())
            else:  # tensors, masks, extra_tensors: tensors only, never text
                assert value is None or all(isinstance(t, torch.Tensor) for t in value.values()), f.name
    # checkpoints and adapters: safetensors and JSON only, never pickle
    suffixes = {p.suffix for p in (tmp_path / "perfit").rglob("*") if p.is_file()}
    assert suffixes <= {".safetensors", ".json", ".jsonl", ".md", ".png"}, suffixes


def test_trust_remote_code_stays_off_unless_asked(monkeypatch, tmp_path):
    import transformers

    from hf_perfit.federated.runtime import load_model

    folder = tmp_path / "model"  # passes check_model_path; the loaders below are fakes
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    seen = []

    def fake(path, **kwargs):
        seen.append(kwargs)
        return build_tokenizer() if len(seen) % 2 else tiny_llama()

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    load_model(FederatedConfig(model_name_or_path=str(folder)))
    assert [k["trust_remote_code"] for k in seen] == [False, False]
    assert seen[1]["use_safetensors"] is True  # weights from safetensors only, never a pickle checkpoint
    load_model(FederatedConfig(model_name_or_path=str(folder), trust_remote_code=True))
    assert [k["trust_remote_code"] for k in seen[2:]] == [True, True]
