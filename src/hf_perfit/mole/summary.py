"""A MoLE adapter's architecture in words and tables, from its `adapter_config.json` (for model cards)."""

from __future__ import annotations

from typing import Any

from .config import MOLE_PEFT_TYPE

__all__ = ["architecture_markdown", "architecture_summary"]


def architecture_summary(adapter_config: dict[str, Any]) -> dict[str, Any]:
    """The architecture a saved MoLE adapter holds.

    Args:
        adapter_config (`dict`): the parsed `adapter_config.json` of a MoLE adapter.

    Returns:
        `dict` with `num_experts` (`E`, the pool size per module), `rank`, `lora_alpha`, `top_k`, `modules` (one
        `{"module", "experts", "count"}` per wrapped module, in name order; `experts=None` means the whole pool),
        `held` (experts held over all modules) and `pool` (`E` × number of modules).

    Raises:
        ValueError: the config is not a MoLE adapter's.
    """
    if adapter_config.get("peft_type") != MOLE_PEFT_TYPE:
        raise ValueError(f"not a MoLE adapter config (peft_type={adapter_config.get('peft_type')!r}).")
    e = int(adapter_config["num_experts"])
    held = adapter_config.get("held_experts")
    modules = [
        {"module": name, "experts": [int(j) for j in ids], "count": len(ids)}
        for name, ids in sorted((held or {}).items())
    ]
    return {
        "num_experts": e,
        "rank": int(adapter_config["r"]),
        "lora_alpha": adapter_config.get("lora_alpha"),
        "top_k": int(adapter_config.get("top_k", 2)),
        "modules": modules,
        "held": sum(m["count"] for m in modules) if held is not None else None,
        "pool": e * len(modules) if held is not None else None,
    }


def architecture_markdown(adapter_config: dict[str, Any]) -> str:
    """A short paragraph and a `| module | domain experts held |` table describing a MoLE adapter."""
    s = architecture_summary(adapter_config)
    head = (
        f"Mixture of LoRA experts (FedAMoLE): in every wrapped module a shared rank-{s['rank']} LoRA expert that is "
        f"always on, a token projection `P`, and domain experts of rank {s['rank']} from a pool of {s['num_experts']}; "
        f"the router mixes the top-{s['top_k']} of the experts this adapter holds, per token."
    )
    if s["held"] is None:
        return head + " This adapter holds the whole pool in every module.\n"
    rows = "\n".join(
        f"| `{m['module']}` | {', '.join(str(j) for j in m['experts']) or '-'} | {m['count']} |" for m in s["modules"]
    )
    return (
        f"{head} This adapter holds {s['held']} of the {s['pool']} domain experts:\n\n"
        "| module | domain experts held (ids) | count |\n|---|---|---:|\n"
        f"{rows}\n"
    )
