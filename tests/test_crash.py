"""Kill a real `perfit federate` process (SIGKILL) at every commit point of a round, then `--resume`: the resumed run
must end with exactly the adapters and metrics of an uninterrupted run (or refuse, naming the round it can restart
from). The kill points are named by `HF_PERFIT_CRASH_AT` (see `hf_perfit.federated.run.crash_point`), which only
tests set."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hf_perfit.cli import main

from .conftest import CPU_FP32, pythonpath, save_run_assets

REPO = Path(__file__).resolve().parents[1]
CLIENTS = ("client_0", "client_1", "client_2")
# every commit point of a 2-round run, for PerFIT; a spread of them for FedIT and FedAMoLE
POINTS = {
    "perfit": [
        "round0.client0.after_train",
        "round0.client1.after_save",
        "round0.after_evaluate",
        "checkpoint1.after_files",
        "checkpoint1.after_manifest",
        "checkpoint1.after_rename",
        "checkpoint1.after_commit",
        "export.client1",
    ],
    "fedit": ["round0.after_aggregate", "round1.client2.after_train", "checkpoint2.after_commit"],
    "fedamole": ["round0.client1.after_train", "checkpoint1.after_rename", "round1.client0.after_save"],
}
STRATEGY_KEYS = {
    "perfit": {"search_steps": 1, "prune_iterations": 1},
    "fedit": {},
    "fedamole": {"num_experts": 4, "clients_per_expert": 2, "experts_per_client_min": 1, "experts_per_client_max": 4},
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny Llama + tokenizer saved like a Hub checkpoint, and a 3-category instruction file."""
    return save_run_assets(tmp_path_factory.mktemp("crash_assets"), per_category=8)


def _config(assets: Path, out: Path, strategy: str) -> Path:
    cfg = {
        "model_name_or_path": str(assets / "model"),
        "dataset_name": str(assets / "data.jsonl"),
        "strategy": strategy,
        "num_clients": 3,
        "num_rounds": 2,
        "local_steps": 1,
        "learning_rate": 5e-3,
        "per_device_train_batch_size": 2,
        "max_length": 40,
        "lora_r": 2,
        "lora_alpha": 4,
        "test_fraction": 0.25,
        "output_dir": str(out),
        **CPU_FP32,  # bit-for-bit comparison (conftest.CPU_FP32)
        **STRATEGY_KEYS[strategy],
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def references(assets, tmp_path_factory):
    """One uninterrupted run per strategy, shared by every kill point."""
    root = tmp_path_factory.mktemp("crash_references")
    out = {}
    for strategy in POINTS:
        run = root / strategy
        assert main(["federate", "--config", str(_config(assets, run, strategy))]) == 0
        out[strategy] = run
    return out


def _killed_run(config: Path, point: str) -> None:
    env = {**os.environ, "HF_PERFIT_CRASH_AT": point, "PYTHONPATH": pythonpath()}
    proc = subprocess.run(
        [sys.executable, "-m", "hf_perfit.cli", "federate", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]


def _same_run(reference: Path, resumed: Path) -> None:
    for cid in CLIENTS:
        a = load_file(str(reference / "clients" / cid / "adapter" / "adapter_model.safetensors"))
        b = load_file(str(resumed / "clients" / cid / "adapter" / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (cid, key)
    assert (reference / "metrics.jsonl").read_text() == (resumed / "metrics.jsonl").read_text()
    state = sorted(p.name for p in (resumed / "state").iterdir())
    assert state == ["checkpoint.json", "round_2", "run.json"]  # no temp files, no pending rounds, one checkpoint
    assert not list(resumed.glob(".*.tmp"))


@pytest.mark.parametrize(
    ("strategy", "point"), [(s, p) for s, points in POINTS.items() for p in points], ids=lambda x: str(x)
)
def test_kill_then_resume_equals_uninterrupted(tmp_path, assets, references, strategy, point, capsys):
    run = tmp_path / "run"
    config = _config(assets, run, strategy)
    _killed_run(config, point)
    assert main(["federate", "--config", str(config), "--resume"]) == 0, capsys.readouterr().err
    _same_run(references[strategy], run)


def test_kill_before_the_first_commit_is_refused_then_restarts(tmp_path, assets, references, capsys):
    run = tmp_path / "run"
    config = _config(assets, run, "fedit")
    _killed_run(config, "checkpoint0.after_manifest")  # the base-model evaluation ran, nothing is committed yet
    capsys.readouterr()
    assert main(["federate", "--config", str(config), "--resume"]) == 2
    assert "has no committed round to resume; start the run without --resume" in capsys.readouterr().err
    assert main(["federate", "--config", str(config)]) == 0  # our own folder, nothing committed: starts over
    _same_run(references["fedit"], run)
