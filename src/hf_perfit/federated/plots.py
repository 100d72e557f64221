"""Plots of a federated run, drawn from what the run wrote to disk (`metrics.jsonl`, the exported adapters), so they
can be redrawn at any time with `perfit plot --run <output_dir>`.

- `perplexity.png`: personalized perplexity of every client per round (round -1 is the base model), and the mean.
- `density.png` (PerFIT): the searched architecture, i.e. the kept fraction of each adapted module per client.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from .run import CLIENTS_DIR, check_client_id, read_metrics

MASKS_FILE = "perfit_masks.safetensors"
_MODULE_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_[AB]\.weight$")


def module_density(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Kept fraction per adapted module (its `lora_A` and `lora_B` together), keyed by the module path without the
    PEFT prefix (e.g. `model.layers.0.self_attn.q_proj`), in the masks' order."""
    kept: dict[str, int] = {}
    size: dict[str, int] = {}
    for key, mask in masks.items():
        match = _MODULE_RE.match(key)
        name = match.group("module") if match else key
        kept[name] = kept.get(name, 0) + int(mask.bool().sum())
        size[name] = size.get(name, 0) + mask.numel()
    return {name: kept[name] / size[name] for name in kept}


def client_module_density(run_dir: str | os.PathLike) -> dict[str, dict[str, float]]:
    """`{client_id: module_density}` from each exported adapter's PerFIT masks; `{}` when the run has none."""
    from safetensors.torch import load_file

    out: dict[str, dict[str, float]] = {}
    clients = Path(run_dir) / CLIENTS_DIR
    if not clients.is_dir():
        return out
    for folder in sorted(p for p in clients.iterdir() if p.is_dir()):
        check_client_id(folder.name)
        path = folder / "adapter" / MASKS_FILE
        if path.is_file():
            out[folder.name] = module_density(load_file(str(path)))
    return out


def _short(module: str) -> str:
    """`model.layers.11.self_attn.q_proj` -> `11.q_proj`."""
    parts = module.split(".")
    digits = [p for p in parts if p.isdigit()]
    return f"{digits[-1]}.{parts[-1]}" if digits else parts[-1]


def _save(fig, path: Path) -> None:
    """Write a figure atomically (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def plot_perplexity(records: list[dict], path: str | os.PathLike) -> Path:
    """Personalized perplexity per round, one line per client plus the mean (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_client: dict[str, dict[int, float]] = {}
    for r in records:
        if "client" in r:
            per_client.setdefault(r["client"], {})[int(r["round"])] = float(r["perplexity"])
    means = {int(r["round"]): float(r["mean_perplexity"]) for r in records if r.get("summary")}
    strategy = next((r["strategy"] for r in records if r.get("strategy") not in (None, "base")), "")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for cid in sorted(per_client):
        rounds = sorted(per_client[cid])
        ax.plot(rounds, [per_client[cid][x] for x in rounds], marker="o", ms=3, lw=1, alpha=0.75, label=cid)
    if means:
        rounds = sorted(means)
        ax.plot(rounds, [means[x] for x in rounds], color="black", lw=2.5, label="mean")
    ax.set_yscale("log")
    ax.set_xlabel("round (-1 = base model)")
    ax.set_ylabel("personalized perplexity")
    ax.set_title(f"{strategy}: personalized perplexity per client")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    out = Path(path)
    _save(fig, out)
    plt.close(fig)
    return out


def plot_density(densities: Mapping[str, Mapping[str, float]], path: str | os.PathLike) -> Path:
    """Heat map of PerFIT's searched architecture: kept fraction per module (columns) per client (rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = sorted(densities)
    modules = list(next(iter(densities.values())))
    grid = [[densities[c].get(m, 0.0) for m in modules] for c in clients]
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(modules) + 2), 0.4 * len(clients) + 1.8))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_yticks(range(len(clients)), clients, fontsize=7)
    ax.set_xticks(range(len(modules)), [_short(m) for m in modules], rotation=90, fontsize=6)
    ax.set_xlabel("adapted module (layer.projection)")
    ax.set_title("PerFIT: kept fraction of each module's expanded LoRA, per client")
    fig.colorbar(image, ax=ax, label="density")
    out = Path(path)
    _save(fig, out)
    plt.close(fig)
    return out


def plot_run(run_dir: str | os.PathLike) -> list[Path]:
    """Draw every plot a run supports into its folder; returns the written paths."""
    run = Path(run_dir)
    written = [plot_perplexity(read_metrics(run), run / "perplexity.png")]
    densities = client_module_density(run)
    if densities:
        written.append(plot_density(densities, run / "density.png"))
    return written


__all__ = ["client_module_density", "module_density", "plot_density", "plot_perplexity", "plot_run", "read_metrics"]
