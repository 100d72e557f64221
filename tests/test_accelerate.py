"""`recipes/perfit_sft.py` under `accelerate launch --cpu --num_processes 2` (gloo): each client's training is
data-parallel, only the main process writes, and the results agree with the one-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from .conftest import pythonpath
from .test_cli import _config, assets  # noqa: F401  (the module-scoped fixture with a saved tiny model and data)

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")


def _run(cmd: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "TQDM_DISABLE": "1",
        "PYTHONPATH": pythonpath(),
        "MASTER_PORT": str(29500 + os.getpid() % 1000),
    }
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    # the launcher's own traceback ends stderr; a failed worker's comes first, and it names the cause
    first = proc.stderr.find("Traceback")
    assert proc.returncode == 0, proc.stderr[max(first, 0) :][:3000] + "\n...\n" + proc.stderr[-1500:]
    return proc


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_cpu_processes_match_one(tmp_path, assets):  # noqa: F811
    recipe = str(REPO / "recipes" / "perfit_sft.py")
    one, two = tmp_path / "one", tmp_path / "two"
    # both on the CPU (the launched processes use gloo), so the one-process run must not take a visible GPU
    single = _run(
        [sys.executable, recipe, "--config", str(_config(assets, one, num_rounds=2, device="cpu"))], tmp_path
    )
    launched = _run(
        [
            str(ACCELERATE),
            "launch",
            "--cpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            recipe,
            "--config",
            str(_config(assets, two, num_rounds=2, device="cpu")),
        ],
        tmp_path,
    )
    assert "starting 2 with torch.distributed.run" in launched.stderr  # really two processes
    assert launched.stdout.count("mean personalized perplexity") == 1  # the main process reports, the other not
    assert single.stdout.count("mean personalized perplexity") == 1
    a, b = _records(one), _records(two)
    assert [(r["round"], r.get("client")) for r in a] == [(r["round"], r.get("client")) for r in b]
    for ra, rb in zip(a, b, strict=True):
        if "client" in ra:
            # same examples per optimizer step, split over two processes: equal up to the loss normalisation
            # (each process averages over its own tokens) and floating-point summation order
            assert rb["perplexity"] == pytest.approx(ra["perplexity"], rel=0.02)
            if ra["round"] >= 0:
                assert rb["density"] == ra["density"]  # the exact budget in both
        if ra["round"] == -1 and "client" in ra:
            assert rb["perplexity"] == ra["perplexity"]  # base model: no training involved
    for cid in ("client_0", "client_1", "client_2"):
        tensors = load_file(str(two / "clients" / cid / "adapter" / "adapter_model.safetensors"))
        assert tensors  # every client's adapter was exported exactly once, by the main process
    leftovers = [p.name for p in two.rglob("*") if p.name.startswith(".") and p.suffix == ".tmp"]
    assert not leftovers


def test_cpu_relaunch_hides_the_gpus_from_its_processes(monkeypatch):
    # On a machine with one GPU, accelerate's barrier on a gloo group of CPU processes asked for cuda:<rank> and rank 1
    # failed with "invalid device ordinal" (H200, 2026-11-30): the relaunched processes must not see the GPUs.
    from hf_perfit import distributed

    class Exec(Exception):
        pass

    def fake_execv(path, command):
        raise Exec(path, command, os.environ.get("CUDA_VISIBLE_DEVICES"))

    for name in ("WORLD_SIZE", "RANK", "HF_PERFIT_NO_RELAUNCH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(distributed, "_launcher_num_processes", lambda pid: 2)
    monkeypatch.setattr(distributed.os, "execv", fake_execv)
    with pytest.raises(Exec) as raised:
        distributed.relaunch_cpu_data_parallel(["--config", "x.yaml"])
    path, command, visible = raised.value.args
    assert visible == ""
    assert command[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
    assert command[-2:] == ["--config", "x.yaml"]
