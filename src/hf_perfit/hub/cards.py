"""Model cards of a pushed run: `huggingface_hub.ModelCard.from_template` on `model_cards/client_card.md` and
`model_cards/federation_card.md`; what they say about each method and file is in `model_cards/methods.yaml`.

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

from ..federated.results import FinishedRun


def _shipped_folder() -> Path:
    """The card templates: installed package data, else the source checkout's top-level model_cards/."""
    package = Path(__file__).resolve().parents[1]
    return next((f for f in (package / "model_cards", package.parents[1] / "model_cards") if f.is_dir()), package)


_TEXTS = yaml.safe_load((_shipped_folder() / "methods.yaml").read_text(encoding="utf-8"))
STRATEGY_NAMES = {k: v["name"] for k, v in _TEXTS["methods"].items()}
STRATEGY_DESCRIPTIONS = {k: v["description"] for k, v in _TEXTS["methods"].items()}
KNOWN_BASE_MODELS = _TEXTS["base_models"]
"""Preset name -> `{hub_id, note}`: a preset is a local conversion of that Hub model, named in the card."""
_HIDDEN_CONFIG_KEYS = set(_TEXTS["hidden_config_keys"])
_LOCAL_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".arrow", ".txt")


@dataclass
class BaseModel:
    """The base model as a card names it: `hub_id` for metadata and the load snippet (`None` for a local folder)."""

    hub_id: str | None
    display: str
    note: str = ""


def looks_like_hub_id(value: str) -> bool:
    """A repo id `huggingface_hub.utils.validate_repo_id` accepts, and not the name of a local data file."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return not value.lower().endswith(_LOCAL_FILE_SUFFIXES)


def base_model_info(name_or_path: str, override: str | None) -> BaseModel:
    if name_or_path in KNOWN_BASE_MODELS and not override:
        known = KNOWN_BASE_MODELS[name_or_path]
        return BaseModel(known["hub_id"], known["hub_id"], known["note"])
    if override or looks_like_hub_id(name_or_path):
        return BaseModel(override or name_or_path, override or name_or_path)
    note = "The base model was loaded from a local folder; pass base_model='<hub id>' to `perfit push` to name it."
    return BaseModel(None, f"a local model ({Path(name_or_path.rstrip('/')).name or '?'})", note)


def scrub_base_model(raw: bytes, base: BaseModel, nested: bool = False) -> bytes:
    """The config as the run wrote it, except a local `base_model_name_or_path` (a folder on the training machine)
    becomes the base model's Hub id (or null). `nested`: the field sits under `"config"` (perfit_config.json)."""
    meta = json.loads(raw)
    holder = meta.get("config", {}) if nested else meta
    value = holder.get("base_model_name_or_path")
    if not isinstance(value, str) or looks_like_hub_id(value):
        return raw
    holder["base_model_name_or_path"] = base.hub_id
    return (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()


def fmt(value: float | None) -> str:
    """A perplexity as the cards print it (3 decimals, `-` when missing)."""
    return "-" if value is None or not math.isfinite(value) else f"{value:.3f}"


def method_name(strategy: str) -> str:
    return STRATEGY_NAMES.get(strategy, strategy)


def when(run: FinishedRun) -> str:
    """When the exported adapters were evaluated: after the last round, or after the local fine-tuning that follows
    it (`finetune_steps`)."""
    last = f"after round {run.num_rounds - 1}"
    return last + " + local fine-tuning" if run.final_round == run.num_rounds else last


def compare_label(other: FinishedRun, compare: list[FinishedRun]) -> str:
    label = f"{method_name(other.strategy)} (compare run, {when(other)})"
    return label + (f" `{other.path.name}`" if sum(o.strategy == other.strategy for o in compare) > 1 else "")


def mole_architecture(adapter_cfg: dict[str, Any]) -> dict[str, Any] | None:
    """For a MoLE adapter config: its architecture table (from `hf_perfit.mole`) and counts; `None` otherwise."""
    from ..mole import MOLE_PEFT_TYPE, architecture_markdown, architecture_summary

    if adapter_cfg.get("peft_type") != MOLE_PEFT_TYPE:
        return None
    summary = architecture_summary(adapter_cfg)
    arch = {k: summary[k] for k in ("num_experts", "top_k", "held", "pool")}
    return arch | {"markdown": architecture_markdown(adapter_cfg).rstrip("\n"), "num_modules": len(summary["modules"])}


@dataclass
class CardWriter:
    """Renders the cards of one push: the run, the compare runs, the base model, each client's repo id."""

    run: FinishedRun
    compare: list[FinishedRun]
    base: BaseModel
    links: dict[str, str]
    templates: dict[str, Path]

    def _context(self, repo_id: str, files: list[str], mole: bool) -> dict[str, Any]:
        """What both cards show: the run, the method, the base model, the config (paths cut) and the file list."""
        run, config = self.run, []
        for key in sorted(set(run.config) - _HIDDEN_CONFIG_KEYS):
            value = run.config[key]
            local = key in ("model_name_or_path", "dataset_name") and isinstance(value, str)
            if local and not looks_like_hub_id(value):
                value = f"local: {Path(value.rstrip('/')).name}" if value else "(given in code)"
            config.append((key, value if isinstance(value, str) else json.dumps(value, sort_keys=True)))
        texts = {**_TEXTS["files"], **(_TEXTS["mole_files"] if mole else {})}
        return {
            "repo_id": repo_id,
            "repo_name": repo_id.split("/", 1)[1],
            "num_rounds": run.num_rounds,
            "num_clients": len(run.client_ids),
            "method_name": method_name(run.strategy),
            "method_description": STRATEGY_DESCRIPTIONS.get(run.strategy, f"Method `{run.strategy}`."),
            "base_model": self.base.hub_id,
            "base_model_display": self.base.display,
            "base_model_note": self.base.note,
            "config_rows": config,
            "files": [(n, texts.get(n, "")) for n in sorted({*files, "README.md"})],
            "links": self.links,
            "fmt": fmt,
        }

    def client(self, cid: str, folder: Path, density: dict[str, float] | None) -> str:
        """The card of client `cid`'s repo, whose other files are already in `folder`."""
        run, compare = self.run, self.compare
        adapter_cfg = json.loads((folder / "adapter_config.json").read_bytes())
        perfit_path = folder / "perfit_config.json"
        perfit = json.loads(perfit_path.read_bytes()) if perfit_path.is_file() else {}
        mole = mole_architecture(adapter_cfg)
        this = f"this adapter ({method_name(run.strategy)}, {when(run)})"
        rows = [("base model (no adapter)", run.ppl[cid].get(-1)), (this, run.final_ppl(cid))] + [
            (compare_label(other, compare), other.final_ppl(cid)) for other in compare
        ]
        targets, alpha = adapter_cfg.get("target_modules") or [], adapter_cfg.get("lora_alpha")
        targets = [targets] if isinstance(targets, str) else sorted(targets)  # a set's order follows the hash seed
        ctx = self._context(self.links[cid], [p.name for p in folder.iterdir()], mole is not None) | {
            "client_id": cid,
            "client_number": run.client_ids.index(cid) + 1,
            "base_model_load": self.base.hub_id or "<base model id or folder>",
            "perplexity_rows": rows,
            "per_round": [(r, v) for r, v in sorted(run.ppl[cid].items()) if 0 <= r <= run.final_round],
            "lora_rank": adapter_cfg.get("r"),
            "lora_alpha": f"{alpha:g}" if isinstance(alpha, float) else alpha,  # 16.0 -> 16
            "target_modules": ", ".join(f"`{m}`" for m in targets),
            "has_perfit_files": perfit_path.is_file(),
            "mole": mole,
            "density": None if density is None else perfit | {"modules": density},
        }
        return self._render("client", mole is not None, ctx)

    def federation(self, repo_id: str, files: list[str]) -> str:
        """The federation repo's card: every client's perplexity next to the base model's, linking its repo."""
        run, compare = self.run, self.compare
        runs = [run, *compare]
        configs = {c: json.loads((run.adapter_dir(c) / "adapter_config.json").read_bytes()) for c in run.client_ids}
        archs = {c: mole_architecture(config) for c, config in configs.items()}
        ctx = self._context(repo_id, files, False) | {
            "columns": ["base model", method_name(run.strategy)] + [compare_label(o, compare) for o in compare],
            "rows": [(c, self.links[c], [run.ppl[c].get(-1)] + [r.final_ppl(c) for r in runs]) for c in configs],
            "means": [run.mean_ppl.get(-1)] + [r.mean_ppl.get(r.final_round) for r in runs],
            "has_density": "density.png" in files,
            "experts": archs if all(archs.values()) else None,
        }
        return self._render("federation", ctx["experts"] is not None, ctx)

    def _render(self, kind: str, mole: bool, ctx: dict[str, Any]) -> str:
        """Render a card template with YAML metadata (`library_name: peft`, the base model, tags)."""
        from huggingface_hub import ModelCard, ModelCardData

        tags = list(dict.fromkeys([*_TEXTS["tags"], *(["mixture-of-experts"] if mole else []), self.run.strategy]))
        base = {"base_model": self.base.hub_id} if self.base.hub_id else {}
        card = ModelCard.from_template(
            ModelCardData(library_name="peft", tags=tags, **base), template_path=str(self.templates[kind]), **ctx
        )
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
