"""`perfit federate` end to end on a tiny model saved to disk: YAML + flags, errors, plots, and a run killed with
SIGKILL mid-round that resumes to exactly the adapters of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hf_perfit.cli import main, parse_federate_args

from .conftest import CPU_FP32, pythonpath, save_run_assets

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny Llama + tokenizer saved like a Hub checkpoint, and a 3-category instruction file."""
    return save_run_assets(tmp_path_factory.mktemp("assets"), per_category=12)


def _config(assets: Path, out: Path, **overrides) -> Path:
    cfg = {
        "model_name_or_path": str(assets / "model"),
        "dataset_name": str(assets / "data.jsonl"),
        "strategy": "perfit",
        "num_clients": 3,
        "num_rounds": 3,
        "local_steps": 4,
        "search_steps": 4,
        "prune_iterations": 2,
        "learning_rate": 5e-3,
        "per_device_train_batch_size": 2,
        "max_length": 48,
        "lora_r": 2,
        "lora_alpha": 4,
        "test_fraction": 0.25,
        "output_dir": str(out),
        **overrides,
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_yaml_keys_and_flag_overrides(tmp_path, assets):
    path = _config(assets, tmp_path / "run", lora_target_modules=["q_proj"])
    cfg = parse_federate_args(
        [
            "--config",
            str(path),
            "--num_rounds",
            "5",
            "--strategy",
            "fedprox",
            "--strategy_options",
            '{"proximal_mu": 0.5}',
        ]
    )
    assert cfg.num_rounds == 5 and cfg.strategy == "fedprox"  # flags win over the YAML
    assert cfg.lora_target_modules == ["q_proj"] and cfg.num_clients == 3  # the YAML wins over the defaults
    assert cfg.resolved_strategy_options() == {"proximal_mu": 0.5}


def test_user_errors_exit_2_with_one_line(tmp_path, assets, capsys):
    bad_key = _config(assets, tmp_path / "a", lora_rank=4)
    assert main(["federate", "--config", str(bad_key)]) == 2
    assert "lora_rank" in capsys.readouterr().err
    assert main(["federate", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    unknown = _config(assets, tmp_path / "b", strategy="fedsgd")
    assert main(["federate", "--config", str(unknown)]) == 2
    assert "fedsgd" in capsys.readouterr().err
    assert main(["federate", "--config", str(unknown), "--strategy_options", "{oops"]) == 2
    assert main(["fedrate"]) == 2
    assert "unknown command 'fedrate'" in capsys.readouterr().err
    missing_col = tmp_path / "nocat.jsonl"
    missing_col.write_text(json.dumps({"instruction": "a", "response": "b"}) + "\n")
    cfg = _config(assets, tmp_path / "c", dataset_name=str(missing_col))
    assert main(["federate", "--config", str(cfg)]) == 2
    assert "category" in capsys.readouterr().err
    assert not (tmp_path / "c" / "metrics.jsonl").exists()  # refused before any training


def _refused(capsys, config: Path, *flags: str) -> str:
    """Run `perfit federate`, expect the one-line refusal (exit 2) and return what the user sees on stderr."""
    capsys.readouterr()
    assert main(["federate", "--config", str(config), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("perfit federate: error: ") and err.count("\n") == 1, err
    return err


def test_bad_inputs_refused_before_anything_is_written(tmp_path, assets, capsys):
    out = tmp_path / "run"

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("strategy: perfit\nnum_clients: [3\nlearning_rate: 0.1\n")
    err = _refused(capsys, bad_yaml)
    assert f"config file {bad_yaml}, line 3, column 14: not valid YAML: expected ',' or ']', but got ':'" in err
    assert "close every [ ] and { }" in err

    err = _refused(capsys, _config(assets, out, model_name_or_path=str(tmp_path / "no_model")))
    assert f"model_name_or_path='{tmp_path / 'no_model'}': no such folder; pass a local model folder" in err
    assert "a preset name (smollm2-135m-instruct) or a Hub model id" in err

    # conftest sets HF_HUB_OFFLINE=1: an uncached Hub id is refused, nothing is downloaded
    err = _refused(capsys, _config(assets, out, model_name_or_path="no-org/no-model"))
    assert "HF_HUB_OFFLINE is set, so it is not downloaded from the Hub" in err

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((assets / "model" / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    err = _refused(capsys, _config(assets, out, model_name_or_path=str(pickled)))
    assert f"model folder {pickled} holds only pickle weights (pytorch_model.bin); hf_perfit loads safetensors" in err
    assert "loading a pickle file runs whatever code it contains" in err and "save_pretrained(folder)" in err

    err = _refused(capsys, _config(assets, out, eval_batch_size=0))
    assert "eval_batch_size=0 is not allowed; it must be an integer >= 1." in err
    err = _refused(capsys, _config(assets, out), "--learning_rate", "-0.001")
    assert "learning_rate=-0.001 is not allowed; it must be a number in (0, inf)." in err
    err = _refused(capsys, _config(assets, out, budget_multipliers=[1.0, -2.0, 1.0]))
    assert "budget_multipliers[1]=-2.0 is not allowed; it must be a number in (0, inf)." in err
    err = _refused(capsys, _config(assets, out, strategy="fedamole", mole_top_k=9, num_experts=6))
    assert "mole_top_k=9 but a client holds at most 6 experts" in err
    assert not out.exists()  # nothing written for any of them


def test_record_without_output_is_dropped_with_a_warning(tmp_path, assets, caplog):
    rows = [json.loads(x) for x in (assets / "data.jsonl").read_text().splitlines()]
    del rows[5]["response"]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = _config(assets, tmp_path / "run", dataset_name=str(data), num_rounds=1, local_steps=2, search_steps=2)
    with caplog.at_level("WARNING", logger="hf_perfit.data"):
        assert main(["federate", "--config", str(config)]) == 0
    assert (
        f"{data}: dropped 1 of 36 records: 1 without a response (column 'response' missing, null or empty; first: "
        "record 5)" in caplog.text
    )


_HANG_SCRIPT = """
import os, sys, time
import hf_perfit.federated.client as client_mod
real, calls = client_mod.train_client, [0]
def train_then_hang(*args, **kwargs):
    out = real(*args, **kwargs)
    calls[0] += 1
    if calls[0] == int(os.environ["HANG_AFTER_CALL"]):
        open(os.environ["READY_FILE"], "w").close()
        time.sleep(600)  # mid-round: this client trained, its state is not saved, the round is not complete
    return out
client_mod.train_client = train_then_hang
from hf_perfit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_mid_round_then_resume_equals_uninterrupted(tmp_path, assets, capsys):
    # CPU fp32 only: bitwise-equal adapters (conftest.CPU_FP32 says why); the resume logic is the same on every device
    reference = tmp_path / "reference"
    assert main(["federate", "--config", str(_config(assets, reference, **CPU_FP32))]) == 0
    assert {"perplexity.png", "density.png", "results.md"} <= {p.name for p in reference.iterdir()}
    assert "![perplexity](perplexity.png)" in (reference / "results.md").read_text()

    killed = tmp_path / "killed"
    config = _config(assets, killed, **CPU_FP32)
    ready = tmp_path / "ready"
    env = {**os.environ, "HANG_AFTER_CALL": "8", "READY_FILE": str(ready), "PYTHONPATH": pythonpath()}
    proc = subprocess.Popen(
        [sys.executable, "-c", _HANG_SCRIPT, "federate", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 600
        while not ready.exists():  # round 2 (0-based), second client has trained
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the run never reached round 2"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    checkpoint = json.loads((killed / "state" / "checkpoint.json").read_text())
    assert checkpoint["completed_rounds"] == 2
    assert not (killed / "clients").exists()  # no export from a killed run

    capsys.readouterr()
    assert main(["federate", "--config", str(config)]) == 2  # another run's state: refused without --resume
    assert "holds another run's state; pass --resume to continue it or --overwrite" in capsys.readouterr().err
    assert main(["federate", "--config", str(config), "--resume"]) == 0
    for cid in ("client_0", "client_1", "client_2"):
        a = load_file(str(reference / "clients" / cid / "adapter" / "adapter_model.safetensors"))
        b = load_file(str(killed / "clients" / cid / "adapter" / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (cid, key)
    ref = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    res = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert ref == res  # the same records, each round once


def test_identical_runs_write_identical_bytes_under_different_hash_seeds(tmp_path, assets):
    """Two runs of one config in two processes whose PYTHONHASHSEED differ (so `set` iteration order differs, as
    the first assertion shows) write byte-identical adapters, masks, configs and metrics: `cmp` can compare runs."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    seeds = ("1", "2")
    env = {**os.environ, "PYTHONPATH": pythonpath()}
    orders = [
        subprocess.run(
            [sys.executable, "-c", f"print(list(set({targets!r})))"],
            env={**env, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in seeds
    ]
    assert orders[0] != orders[1]  # the seeds do reorder sets: the runs below would differ if a set leaked out
    # byte-identical runs are a CPU fp32 property (conftest.CPU_FP32: CUDA's backward accumulates with atomics); what
    # this test is about, no hash-ordered set reaching the results, is the same on every device
    config = _config(
        assets, tmp_path / "run", lora_target_modules=targets, num_rounds=1, local_steps=2, search_steps=2, **CPU_FP32
    )
    runs = [tmp_path / f"run_{seed}" for seed in seeds]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "hf_perfit.cli", "federate", "--config", str(config), "--output_dir", str(out)],
            env={**env, "PYTHONHASHSEED": seed},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for seed, out in zip(seeds, runs, strict=True)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-2000:]
    files = sorted(p.relative_to(runs[0]) for p in runs[0].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(runs[1]) for p in runs[1].rglob("*") if p.is_file())
    adapter_files = {
        "adapter_model.safetensors",
        "adapter_config.json",
        "perfit_masks.safetensors",
        "perfit_config.json",
    }
    assert adapter_files <= {f.name for f in files if "clients" in f.parts}
    for name in files:
        first, second = (runs[0] / name).read_bytes(), (runs[1] / name).read_bytes()
        if name.name in ("config.json", "checkpoint.json"):  # they record output_dir, the one key that differs
            first = first.replace(str(runs[0]).encode(), b"OUT")
            second = second.replace(str(runs[1]).encode(), b"OUT")
        assert first == second, name
    adapter_config = json.loads((runs[0] / "clients" / "client_0" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["target_modules"] == sorted(targets)
