"""Running one row of benchmarks/quality.py: its federated run made, resumed or reused in its folder (refused when
the folder holds other settings), the run's wall time over all its sessions (`wall_time.json`), and ROUGE-L of
greedy answers per client (`rouge.json`)."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from base_eval_cache import BASE_EVAL_FILE, cached_evaluate  # noqa: E402
from quality_setup import (  # noqa: E402
    SETTINGS_FILE,
    Settings,
    _comparable,
    _recipe,
    _tiny_model_and_tokenizer,
    base_model_and_tokenizer,
    config_defaults,
    fedamole_pool,
    method_config,
    target_shapes,
)

WALL_FILE = "wall_time.json"
ROUGE_FILE = "rouge.json"
BUDGET_FILE = "fedamole_budget.json"


def run_status(out: Path, config, client_ids: list[str]) -> str:
    """`"missing"` (nothing to resume), `"partial"` (resume it) or `"finished"` (results.md and every client's
    adapter exported).

    Raises:
        SystemExit: `out` holds a run with other settings (it is never overwritten silently).
    """
    from hf_perfit.federated.run import RunFolder

    run = RunFolder(out)
    if not run.checkpoint.is_file():
        return "missing"
    saved = json.loads(run.checkpoint.read_text())
    # A key added to FederatedConfig after the run was saved is absent there: the run had that key's default.
    old = _comparable({**config_defaults(), **saved["config"]})
    new = _comparable(config.to_dict())
    if old != new:
        diff = ", ".join(
            f"{k}: {old.get(k)!r} there, {new.get(k)!r} now"
            for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)
        )
        raise SystemExit(
            f"{out} holds a run with other settings ({diff}); use another --output-root, or delete {out} to rerun."
        )
    adapters = all(
        (run.adapter_dir(cid) / name).is_file()
        for cid in client_ids
        for name in ("adapter_config.json", "adapter_model.safetensors")
    )
    done = int(saved["completed_rounds"]) >= config.num_rounds and run.results.is_file() and adapters
    return "finished" if done else "partial"


# ----------------------------------------------------------------------------------------------------------- wall time


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _device() -> str:
    """Where a run's base model lives (`device: auto`): `cuda (<name>)` when CUDA is visible, else `cpu`; on CUDA
    `bf16: auto` also means bf16 weights, so a table mixing the two says so."""
    import torch

    return f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _write_json(path: Path, obj: Any) -> None:
    from hf_perfit._io import atomic_write_json

    atomic_write_json(path, obj)


class WallClock:
    """The wall time of a method's run over all its sessions, in `<run>/wall_time.json`: per session the setup
    (model, data, tokenization), each completed round (round 0 includes the base model's evaluation) and the final
    export. A round counts once its checkpoint is written, so the part of a round a killed session lost (and redid
    after `resume`) is not counted; the setup of every session is."""

    def __init__(self, path: Path, fresh: bool) -> None:
        self.path = path
        self.data = {"sessions": []} if fresh or not path.is_file() else json.loads(path.read_text())

    def start(self, resumed_from: int, setup_s: float) -> None:
        self.data["sessions"].append(
            {
                "started": _now(),
                "resumed_from_round": resumed_from,
                "setup_s": setup_s,
                "rounds": {},
                "export_s": None,
                "load_start": os.getloadavg()[0],
                "load_end": None,
                "threads": _threads(),
                "device": _device(),
            }
        )
        self._save()

    def round_done(self, round_idx: int, seconds: float) -> None:
        self.data["sessions"][-1]["rounds"][str(round_idx)] = seconds
        self.data["sessions"][-1]["load_end"] = os.getloadavg()[0]
        self._save()

    def exported(self, seconds: float) -> None:
        self.data["sessions"][-1]["export_s"] = seconds
        self.data["sessions"][-1]["load_end"] = os.getloadavg()[0]
        self._save()

    def _save(self) -> None:
        self.data["wall_s"] = wall_seconds(self.data)
        _write_json(self.path, self.data)


def wall_seconds(data: dict[str, Any]) -> float:
    """Total wall time of a run from its `wall_time.json` content."""
    return float(
        sum(
            (s.get("setup_s") or 0.0) + sum(s.get("rounds", {}).values()) + (s.get("export_s") or 0.0)
            for s in data.get("sessions", [])
        )
    )


def run_method(method: str, s: Settings, root: Path, data: Path, client_ids: list[str]) -> str:
    """Run (or resume, or reuse) one method's federated run; returns its status before this call."""
    out = root / method
    budget = None
    if method == "fedamole":
        common = s.federated()
        budget = fedamole_pool(
            target_shapes(s, common.lora_target_modules),
            common.lora_r,
            len(client_ids),
            _recipe("fedamole"),
            rank=s.fedamole_rank,
            num_experts=s.fedamole_experts,
        )
    config = method_config(method, s, data, out, budget)
    return run_config(method, config, s, out, client_ids, budget, base_eval=root / BASE_EVAL_FILE)


def run_config(
    method: str,
    config,
    s: Settings,
    out: Path,
    client_ids: list[str],
    budget: dict | None = None,
    base_eval: Path | None = None,
) -> str:
    """Run (or resume, or reuse) the federated run of `config` in `out` (`method` names it in the prints), with
    [`WallClock`] timing and the settings file; returns its status before this call (see [`run_status`]). With
    `base_eval`, the base model's evaluation is read from / stored in that cache (benchmarks/base_eval_cache.py)."""
    from hf_perfit.federated import FederatedSimulation

    status = run_status(out, config, client_ids)
    if status == "finished":
        _write_json(out / SETTINGS_FILE, dataclasses.asdict(s))  # same run config; ROUGE-L follows these settings
        print(f"[{method}] finished run in {out}: reused")
        return status
    config.resume = status == "partial"
    print(f"[{method}] {'resuming' if config.resume else 'starting'} {config.num_rounds} rounds in {out}")
    kwargs = {}
    if s.tiny:
        model, tokenizer = _tiny_model_and_tokenizer()
        kwargs = {"model": model, "tokenizer": tokenizer}

    class TimedSimulation(FederatedSimulation):
        """The simulation, with a clock on its checkpoints and export, and the base-model evaluation cached."""

        def prepare(self) -> None:
            if base_eval is not None:
                self.transport.evaluate = cached_evaluate(self.transport, base_eval)
            super().prepare()

        def _checkpoint(self, completed: int, records: list[dict]) -> None:
            super()._checkpoint(completed, records)
            now = time.perf_counter()
            clock.round_done(completed - 1, now - self._mark)
            self._mark = now

        def _export(self) -> None:
            t0 = time.perf_counter()
            super()._export()
            clock.exported(time.perf_counter() - t0)

    t0 = time.perf_counter()
    # the simulation checks and creates its run folder first: it refuses a non-empty folder that is not a run
    sim = TimedSimulation(config, **kwargs)
    setup_s = time.perf_counter() - t0
    _write_json(out / SETTINGS_FILE, dataclasses.asdict(s))  # same run config; ROUGE-L follows these settings
    clock = WallClock(out / WALL_FILE, fresh=status == "missing")
    if budget is not None:
        _write_json(out / BUDGET_FILE, budget)
    clock.start(sim.completed_rounds, setup_s)
    sim._mark = time.perf_counter()
    sim.run()
    print(f"[{method}] done: {wall_seconds(clock.data) / 60:.1f} min of run wall time over all sessions")
    return status


# ------------------------------------------------------------------------------------------------------------- ROUGE-L


def rouge_for(row: str, s: Settings, root: Path, clients: list, base_cache: dict) -> None:
    """Greedy answers and ROUGE-L of `row` (a finished method's run, or `base`) on the first `s.rouge_examples`
    test examples of every client's own test split, cached per client in `<root>/<row>/rouge.json`."""
    from peft import PeftModel

    import hf_perfit  # noqa: F401  (registers FedAMoLE's MOLE PEFT type for PeftModel.from_pretrained)
    from hf_perfit.evaluation import generate_answers, rouge_l

    path = root / row / ROUGE_FILE
    if row == "base":
        _write_json(root / row / SETTINGS_FILE, dataclasses.asdict(s))
    settings = {"examples": s.rouge_examples, "max_new_tokens": s.max_new_tokens, "split": s.split}
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if cached.get("settings") != settings:
        cached = {"settings": settings, "clients": {}}
    todo = [c for c in clients if c.client_id not in cached["clients"]]
    if not todo:
        print(f"[{row}] ROUGE-L cached in {path}")
        return
    if "model" not in base_cache:
        base_cache["model"], base_cache["tokenizer"] = base_model_and_tokenizer(s)
    base, tokenizer = base_cache["model"], base_cache["tokenizer"]
    for c in todo:
        t0 = time.perf_counter()
        if row == "base":
            model = base
        else:
            model = PeftModel.from_pretrained(
                copy.deepcopy(base), str(root / row / "clients" / c.client_id / "adapter")
            )
        model.eval()
        examples = c.test.select(range(min(s.rouge_examples, len(c.test))))
        answers = generate_answers(model, tokenizer, examples, max_new_tokens=s.max_new_tokens, batch_size=8)
        references = list(examples["response"])
        scores = [rouge_l(a, r) for a, r in zip(answers, references, strict=True)]
        cached["clients"][c.client_id] = {
            "category": c.categories[0] if c.categories else "",
            "rouge_l": sum(scores) / len(scores),
            "scores": scores,
            "answers": answers,
            "references": references,
            "seconds": time.perf_counter() - t0,
        }
        _write_json(path, cached)
        print(f"[{row}] ROUGE-L {c.client_id}: {sum(scores) / len(scores):.3f} ({time.perf_counter() - t0:.0f} s)")
        del model
