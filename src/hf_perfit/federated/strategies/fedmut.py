"""`fedmut`: FedAvg, then every sampled client starts its round from its own mutated copy of the global adapter
(FedMut, AAAI 2024; docs/fedmut.md § FedMut)."""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..messages import ClientInstruction, ClientUpdate
from .base import check_nonnegative_float, check_nonnegative_int, register_strategy
from .fedit import FedITStrategy

__all__ = ["FedMutStrategy", "MutationPlan", "lora_module_name"]

logger = logging.getLogger(__name__)

DELTA_PREFIX = "delta/"
MUTATION_UNITS = ("tensor", "module")


def lora_module_name(key: str) -> str:
    """The LoRA module a state-dict key belongs to: everything before its first `lora_*` component.

    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` and `...q_proj.lora_B.weight` both give
    `base_model.model.model.layers.0.self_attn.q_proj`. A key without a `lora_*` component is a module of its own.

    Args:
        key (`str`): a key of the adapter state, as `peft.get_peft_model_state_dict` writes it.

    Returns:
        `str`: the module name.
    """
    parts = key.split(".")
    for i, part in enumerate(parts):
        if i > 0 and part.startswith("lora_"):
            return ".".join(parts[:i])
    return key


def group_keys(keys: list[str], by: str) -> dict[str, list[str]]:
    """Partition adapter keys into groups, keeping the order of `keys`.

    Args:
        keys (`list[str]`): the adapter keys.
        by (`str`): `"tensor"` (every key alone), `"module"` (the A and B of one LoRA module together, see
            [`lora_module_name`]) or `"all"` (one group).

    Returns:
        `dict[str, list[str]]`: group name -> its keys.
    """
    if by == "tensor":
        return {k: [k] for k in keys}
    if by == "all":
        return {"all": list(keys)}
    if by == "module":
        groups: dict[str, list[str]] = {}
        for k in keys:
            groups.setdefault(lora_module_name(k), []).append(k)
        return groups
    raise ValueError(f"unknown grouping {by!r}; allowed: tensor, module, all.")


@dataclass
class MutationPlan:
    """The mutations of one round, as [`FedMutStrategy.configure_round`] drew them.

    Client `i` starts from `w_t[k] + multipliers[i][k] · Δ[k]` for every adapter key `k`. For FedMut
    `multipliers[i][k] = α · coefficients[i][k]`; FedQP replaces them by their projection (which stays a per-key
    multiple of `Δ`, see docs/fedmut.md).

    Args:
        round_idx (`int`): the round.
        beta (`float`): `β_t` of this round.
        pairs (`list[tuple[str, str]]`): the client pairs; within a pair, per mutation unit, one client gets `+1` and
            the other `−1 + β_t`.
        unmutated (`str`, *optional*): with an odd number of clients, the one left unmutated (`v = 0`).
        active (`bool`): `False` when there is no global update `Δ` yet (round 0): every client gets `θ_g`.
        coefficients (`dict[str, dict[str, float]]`): client -> key -> `v` (before `α` and before any projection).
        multipliers (`dict[str, dict[str, float]]`): client -> key -> the multiple of `Δ[k]` actually added.
        num_projected (`dict[str, int]`): FedQP: client -> number of its groups whose mutation was projected.
        mutation_norms (`dict[str, float]`): client -> `‖w_i − w_t‖₂` over all tensors (exact arithmetic).
    """

    round_idx: int
    beta: float
    pairs: list[tuple[str, str]]
    unmutated: str | None
    active: bool
    coefficients: dict[str, dict[str, float]]
    multipliers: dict[str, dict[str, float]]
    num_projected: dict[str, int] = field(default_factory=dict)
    mutation_norms: dict[str, float] = field(default_factory=dict)


@register_strategy
class FedMutStrategy(FedITStrategy):
    """FedMut over a LoRA adapter: FedAvg on the server, then each sampled client starts from a mutated copy.

    After round `t − 1`'s FedAvg the server keeps `w_t = θ_g` and the last global update `Δ = w_t − w_{t−1}`. For
    round `t` ([`configure_round`]) the `m` sampled clients (sorted by id) are shuffled into `⌊m/2⌋` pairs (odd `m`:
    one client, drawn at random, stays unmutated with `v = 0`). For every mutation unit (one adapter tensor, or one
    LoRA module, see `mutation_unit`) and every pair, a fair coin decides which member gets `v = +1` and which
    `v = −1 + β`, with `β = β_{t−1}` of the round that *produced* `Δ` (the official code's order: its round `t − 1`
    aggregates, then mutates with `β_{t−1}`, so round 1 uses `β₀`) and `β_s = β₀·(1 − min(s / T_b, 1))`. Client `i`
    starts from

        w_i[k] = w_t[k] + α · v_i[k] · Δ[k]            (computed in float64, stored as float32)

    so each pair's mean start is `w_t + α·β·Δ/2` (exactly `w_t` from round `T_b + 1` on). Round 0 has no `Δ`: every
    client gets `θ_g`. The draws come from a `torch.Generator` seeded from (`mutation_seed`, `t`) and depend on nothing
    else but the sampled ids, so a resumed run reproduces them exactly. The global adapter itself is never mutated:
    evaluation and export use `θ_g` (as FedIT).

    A and B are mutated separately, as the plain tensors they are (the mutated adapter is still a rank-r LoRA);
    `mutation_unit="module"` gives the A and B of a module the same coefficient, which makes the mutation of the
    product `BA` follow `±α·Δ(BA)` to first order. See docs/fedmut.md for why the product itself is not mutated.

    Round metrics: FedIT's (`num_clients`, `num_examples`, `update_norm`) plus `beta` (the `β` this round's mutations
    used; round 0, which mutates nothing, reports `β₀`), `mutation_alpha`,
    `mutation_norm` (mean of `‖w_i − w_t‖₂` over the round's clients, unmutated ones included) and `num_mutated`.

    Args:
        mutation_alpha (`float`, *optional*, defaults to 1.0): the mutation radius `α` (>= 0; 0 is plain FedIT).
            The paper's 4 is for full models; for LoRA, 1.0 is the largest `α` for which no mutated `B` of round 1 flips
            the sign of the global `B` (docs/fedmut.md).
        mutation_beta0 (`float`, *optional*, defaults to 0.3): `β₀`, in [0, 1].
        mutation_beta_rounds (`int`, *optional*, defaults to 50): `T_b` (>= 0); updates produced from round `T_b` on
            are mutated with `β = 0`, i.e. from round `T_b + 1` on (0: `β = 0` in every round).
        mutation_seed (`int`, *optional*, defaults to 0): seeds the draws (with the round index).
        mutation_unit (`str`, *optional*, defaults to `"tensor"`): what one coefficient covers: `"tensor"` (every
            adapter tensor draws its own, as FedMut does per layer) or `"module"` (A and B of one LoRA module share
            it).
    """

    name = "fedmut"
    default_options = {
        **FedITStrategy.default_options,
        "mutation_alpha": 1.0,
        "mutation_beta0": 0.3,
        "mutation_beta_rounds": 50,
        "mutation_seed": 0,
        "mutation_unit": "tensor",
    }

    def __init__(self, **options: Any) -> None:
        self._delta: dict[str, Tensor] | None = None
        self._plan: MutationPlan | None = None
        super().__init__(**options)

    # ------------------------------------------------------------------ options

    def _check_options(self) -> None:
        super()._check_options()
        o = self._options
        o["mutation_alpha"] = check_nonnegative_float("mutation_alpha", o["mutation_alpha"])
        o["mutation_beta0"] = check_unit_interval("mutation_beta0", o["mutation_beta0"])
        o["mutation_beta_rounds"] = check_nonnegative_int("mutation_beta_rounds", o["mutation_beta_rounds"])
        o["mutation_seed"] = check_nonnegative_int("mutation_seed", o["mutation_seed"])
        o["mutation_unit"] = check_choice("mutation_unit", o["mutation_unit"], MUTATION_UNITS)

    @property
    def mutation_alpha(self) -> float:
        """The mutation radius `α`."""
        return self._options["mutation_alpha"]

    def beta(self, round_idx: int) -> float:
        """`β_t = β₀·(1 − min(t / T_b, 1))` (0 for every round when `T_b = 0`): the coefficient for the global update
        *produced* by round `t`, i.e. the one the mutations of round `t + 1` use (docs/fedmut.md)."""
        t_b = self._options["mutation_beta_rounds"]
        if t_b == 0:
            return 0.0
        return self._options["mutation_beta0"] * (1.0 - min(round_idx / t_b, 1.0))

    # ------------------------------------------------------------------ state

    def _reset_state(self) -> None:
        super()._reset_state()
        self._delta = None
        self._plan = None

    @property
    def last_update(self) -> dict[str, Tensor] | None:
        """A copy of the last global update `Δ = w_t − w_{t−1}` (float32), or `None` before the first aggregation."""
        return None if self._delta is None else {k: t.clone() for k, t in self._delta.items()}

    @property
    def mutation_plan(self) -> MutationPlan | None:
        """A copy of the mutations drawn by the last [`configure_round`], or `None`."""
        return copy.deepcopy(self._plan)

    # ------------------------------------------------------------------ round

    def configure_round(self, round_idx: int, client_ids: list[str]) -> None:
        """Draw this round's pairs and coefficients for the sampled clients (see the class docstring).

        Args:
            round_idx (`int`): the round (0-based).
            client_ids (`list[str]`): the sampled clients; sorted here, so their order does not matter.

        Raises:
            ValueError: if a client id appears twice.
        """
        glob = self._require_global()
        ids = sorted(client_ids)
        if len(set(ids)) != len(ids):
            raise ValueError(f"configure_round({round_idx}) got a client id more than once: {client_ids}.")
        keys = list(glob)
        active = self._delta is not None
        # β of the round that produced Δ (the last aggregated one), as the official code: round 1 uses β₀.
        beta = self.beta(self.last_round if active and self.last_round is not None else 0)
        gen = torch.Generator().manual_seed(_round_seed(self._options["mutation_seed"], round_idx))

        order = [ids[i] for i in torch.randperm(len(ids), generator=gen).tolist()]
        unmutated = order.pop() if len(order) % 2 else None
        pairs = [(order[j], order[j + 1]) for j in range(0, len(order), 2)]
        units = group_keys(keys, self._options["mutation_unit"])
        # flips[p, u] = 1: the first member of pair p gets -1 + β on unit u, the second +1 (0: the other way round).
        flips = torch.randint(0, 2, (len(pairs), len(units)), generator=gen).tolist()

        up, down = 1.0, -1.0 + beta
        coefficients = {cid: dict.fromkeys(keys, 0.0) for cid in ids}
        if active:
            for (first, second), row in zip(pairs, flips, strict=True):
                for unit_keys, flip in zip(units.values(), row, strict=True):
                    v_first, v_second = (down, up) if flip else (up, down)
                    for k in unit_keys:
                        coefficients[first][k] = v_first
                        coefficients[second][k] = v_second

        alpha = self.mutation_alpha
        multipliers = {cid: {k: alpha * v for k, v in coeffs.items()} for cid, coeffs in coefficients.items()}
        plan = MutationPlan(
            round_idx=int(round_idx),
            beta=beta,
            pairs=pairs,
            unmutated=unmutated,
            active=active,
            coefficients=coefficients,
            multipliers=multipliers,
            num_projected=dict.fromkeys(ids, 0),
        )
        if active:
            sq_norms = self._delta_sq_norms()
            self._transform_plan(plan, sq_norms)
            # ‖Σ_k μ_k Δ_k‖ with the tensors disjoint: sqrt(Σ_k μ_k² ‖Δ_k‖²), no tensor work needed.
            plan.mutation_norms = {
                cid: math.sqrt(sum(mu * mu * sq_norms[k] for k, mu in plan.multipliers[cid].items())) for cid in ids
            }
        else:
            plan.mutation_norms = dict.fromkeys(ids, 0.0)
        self._plan = plan

    def _transform_plan(self, plan: MutationPlan, sq_norms: dict[str, float]) -> None:
        """Hook for subclasses (FedQP): change `plan.multipliers` in place before the clients are configured.

        Args:
            plan ([`MutationPlan`]): the drawn plan, `multipliers = α·coefficients`.
            sq_norms (`dict[str, float]`): `‖Δ[k]‖²` per key, in float64.
        """
        return None

    def configure_client(self, client_id: str, round_idx: int) -> ClientInstruction:
        """Client `client_id`'s mutated copy `w_t + μ·Δ` of the global adapter (a fresh tensor dict; `θ_g` is left
        untouched), plus [`client_options`] as config. Round 0, a round without [`configure_round`] and a client
        that was not sampled get a plain copy of `θ_g`."""
        glob = self._require_global()
        plan = self._plan
        if plan is None or plan.round_idx != round_idx or client_id not in plan.multipliers:
            if self._delta is not None:
                logger.warning(
                    "fedmut: no mutation drawn for client %r in round %d (configure_round() was not called with it); "
                    "it starts from the unmutated global adapter.",
                    client_id,
                    round_idx,
                )
            return ClientInstruction(tensors=self.global_tensors, config=self.client_options())
        if not plan.active:
            return ClientInstruction(tensors=self.global_tensors, config=self.client_options())
        mult = plan.multipliers[client_id]
        delta = self._delta or {}
        tensors = {}
        for k, w in glob.items():
            if mult[k] == 0.0:
                tensors[k] = w.clone()  # exactly θ_g (the unmutated client, a zeroed FedQP projection)
            else:
                tensors[k] = (w.double() + mult[k] * delta[k].double()).to(torch.float32)
        return ClientInstruction(tensors=tensors, config=self.client_options())

    def client_mutation(self, client_id: str) -> dict[str, Tensor]:
        """The mutation `μ·Δ` the last plan gives `client_id`, in float64 (zeros if it has none).

        Exposed for inspection and tests: `configure_client(...).tensors == float32(θ_g + client_mutation(...))`.
        """
        glob = self._require_global()
        plan = self._plan
        mult = plan.multipliers.get(client_id) if plan is not None and plan.active else None
        if mult is None or self._delta is None:
            return {k: torch.zeros_like(w, dtype=torch.float64) for k, w in glob.items()}
        return {k: mult[k] * self._delta[k].double() for k in glob}

    def _aggregate(self, round_idx: int, updates: list[ClientUpdate]) -> dict[str, float]:
        old = self._require_global()
        metrics = super()._aggregate(round_idx, updates)
        new = self._require_global()
        self._delta = {k: (new[k].double() - old[k].double()).to(torch.float32) for k in new}
        metrics.update(self._round_metrics(round_idx, updates))
        return metrics

    def _round_metrics(self, round_idx: int, updates: list[ClientUpdate]) -> dict[str, float]:
        """FedMut's metrics for the round just aggregated, read from its plan (zeros without one)."""
        plan = self._plan if self._plan is not None and self._plan.round_idx == round_idx else None
        norms = [plan.mutation_norms.get(u.client_id, 0.0) if plan else 0.0 for u in updates]
        return {
            "beta": plan.beta if plan else self.beta(0),
            "mutation_alpha": self.mutation_alpha,
            "mutation_norm": sum(norms) / len(norms),
            "num_mutated": float(sum(n > 0.0 for n in norms)),
        }

    def _delta_sq_norms(self) -> dict[str, float]:
        return {k: float(t.double().square().sum()) for k, t in (self._delta or {}).items()}

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """As [`FedITStrategy.state_dict`], plus the last global update as `delta/<key>` and `meta["has_delta"]`.

        The mutation plan is not saved: [`configure_round`] redraws it identically from (`mutation_seed`, round).
        """
        tensors, meta = super().state_dict()
        meta["has_delta"] = self._delta is not None
        if self._delta is not None:
            tensors.update({DELTA_PREFIX + k: t.clone().contiguous() for k, t in self._delta.items()})
        return tensors, meta

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Restore the state saved by [`state_dict`] (global adapter and last global update)."""
        super().load_state_dict(tensors, meta)
        if not meta.get("has_delta", False):
            return
        if self._global is None:
            raise ValueError("strategy state has a last global update but no global adapter.")
        delta = {}
        for k, ref in self._global.items():
            name = DELTA_PREFIX + k
            if name not in tensors:
                raise ValueError(f"strategy state is missing tensor {name!r}.")
            t = tensors[name]
            if tuple(t.shape) != tuple(ref.shape):
                raise ValueError(f"strategy state tensor {name!r} has shape {tuple(t.shape)}, expected {ref.shape}.")
            delta[k] = t.detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous()
        self._delta = delta


def _round_seed(seed: int, round_idx: int) -> int:
    """A 63-bit generator seed mixing (`seed`, `round_idx`), so that nearby pairs give unrelated streams."""
    digest = hashlib.blake2b(f"fedmut:{seed}:{round_idx}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def check_unit_interval(name: str, value: Any) -> float:
    """`float(value)` if it is a real number in [0, 1], else `ValueError` naming the option."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"option {name}={value!r} must be a number in [0, 1].")
    return float(value)


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    """`value` if it is one of `allowed`, else `ValueError` naming the option and the allowed values."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"option {name}={value!r} must be one of {list(allowed)}.")
    return value
