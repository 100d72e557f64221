"""`fedqp`: FedMut whose mutations are projected so that they never point against the last global update
(FedQP, SEKE 2024; docs/fedmut.md § FedQP)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from ..messages import ClientUpdate
from .base import register_strategy
from .fedmut import FedMutStrategy, MutationPlan, check_choice, check_unit_interval, group_keys

__all__ = ["FedQPStrategy", "project_mutation", "projection_coefficients"]

QP_GROUPS = ("module", "tensor", "all")


def projection_coefficients(
    inner: float, sq_norm_m: float, sq_norm_g: float, margin: float = 0.0
) -> tuple[float, float, bool]:
    """The closest point to a mutation `m` in the cone `{x : ⟨x, g⟩ ≥ γ‖x‖‖g‖}`, as `m̃ = a·g + b·m`.

    Only three numbers of the pair `(m, g)` matter: `⟨m, g⟩`, `‖m‖²` and `‖g‖²`. With `γ = 0` (the FedQP constraint
    `⟨m̃, g⟩ ≥ 0`, a half-space) this is the closed form `m̃ = m − (⟨m, g⟩/‖g‖²)·g` when `⟨m, g⟩ < 0`. With
    `0 < γ ≤ 1` the set is a circular cone around `g` with half-angle `θ = arccos γ`; it is symmetric under rotations
    that fix `g`, so the projection lies in the plane of `g` and `m`, where it is the projection onto the cone's
    boundary ray `cos θ·ĝ + sin θ·û` (`û` the unit part of `m` orthogonal to `g`), clipped at the apex `0`.

    Args:
        inner (`float`): `⟨m, g⟩`.
        sq_norm_m (`float`): `‖m‖²`.
        sq_norm_g (`float`): `‖g‖²`.
        margin (`float`, *optional*, defaults to 0.0): `γ` in [0, 1].

    Returns:
        `tuple[float, float, bool]`: `(a, b, projected)`; `(0.0, 1.0, False)` when `m` is feasible already, `m = 0`
        or `g = 0` (no direction to agree with: the mutation is kept).
    """
    if sq_norm_g <= 0.0 or sq_norm_m <= 0.0:
        return 0.0, 1.0, False
    norm_g = math.sqrt(sq_norm_g)
    if inner >= margin * math.sqrt(sq_norm_m) * norm_g:
        return 0.0, 1.0, False
    if margin == 0.0:
        return -inner / sq_norm_g, 1.0, True
    # Coordinates of m in the plane (ĝ, û): x along g, y >= 0 orthogonal to it.
    x = inner / norm_g
    y = math.sqrt(max(sq_norm_m - x * x, 0.0))
    cos_t, sin_t = margin, math.sqrt(max(1.0 - margin * margin, 0.0))
    t = max(0.0, x * cos_t + y * sin_t)  # length of the projection onto the boundary ray; 0: the apex
    if t == 0.0 or y == 0.0:
        return 0.0, 0.0, True
    b = t * sin_t / y  # û = (m − (x/‖g‖)·g)/y
    a = t * cos_t / norm_g - b * inner / sq_norm_g
    return a, b, True


def project_mutation(
    mutation: Mapping[str, Tensor], direction: Mapping[str, Tensor], margin: float = 0.0
) -> tuple[dict[str, Tensor], bool]:
    """Project one group's mutation `m` onto `{m̃ : ⟨m̃, g⟩ ≥ γ‖m̃‖‖g‖}` (the tensors of the group form one vector).

    `argmin ½‖m̃ − m‖²` subject to the constraint, in closed form (see [`projection_coefficients`]); inner products
    run in float64.

    Args:
        mutation (`Mapping[str, Tensor]`): the group's mutation `m`.
        direction (`Mapping[str, Tensor]`): `g`, same keys and shapes.
        margin (`float`, *optional*, defaults to 0.0): `γ` in [0, 1].

    Returns:
        `tuple[dict[str, Tensor], bool]`: `m̃` (float64) and whether it differs from `m`.
    """
    if set(mutation) != set(direction):
        raise ValueError("mutation and direction must have the same keys.")
    m = {k: t.detach().to(torch.float64) for k, t in mutation.items()}
    g = {k: direction[k].detach().to(torch.float64) for k in m}
    inner = sum(float((m[k] * g[k]).sum()) for k in m)
    sq_m = sum(float(m[k].square().sum()) for k in m)
    sq_g = sum(float(g[k].square().sum()) for k in m)
    a, b, projected = projection_coefficients(inner, sq_m, sq_g, margin)
    if not projected:
        return {k: t.clone() for k, t in m.items()}, False
    return {k: a * g[k] + b * m[k] for k in m}, True


@register_strategy
class FedQPStrategy(FedMutStrategy):
    """FedQP: FedMut's mutations, each projected onto the set of mutations that agree with the last global update.

    For every client and every group `G` of adapter tensors (`qp_group`), the mutation `m = α·v·Δ` restricted to `G`
    is replaced by

        m̃ = argmin ½‖m̃ − m‖²  s.t.  ⟨m̃, g⟩ ≥ γ‖m̃‖‖g‖,        g = Δ restricted to G (the last global update)

    in closed form: with `γ = 0`, `m̃ = m − (⟨m, g⟩/‖g‖²)·g` if `⟨m, g⟩ < 0`, else `m`; `g = 0` leaves `m`
    unchanged. With `γ > 0` the feasible set is a circular cone around `g` and its projection is closed-form too
    ([`projection_coefficients`]), so no QP solver is needed. Since every `m` is a per-tensor multiple of `Δ` and `m̃`
    lies in the span of `m` and `g`, the projection only changes the per-tensor multipliers `μ_k` of the
    [`MutationPlan`]: `μ̃_k = a + b·μ_k`. When all `μ_k` of a group are equal (always so for `qp_group="tensor"`,
    and for `qp_group="module"` with `mutation_unit="module"`), `m = μ·g` and the projection is exactly `max(μ, 0)·g`:
    it just zeroes the mutations that point against `Δ`.

    Round metrics: FedMut's plus `num_projected` (client-groups projected this round) and `projected_fraction`
    (`num_projected` over clients × groups).

    Args:
        qp_group (`str`, *optional*, defaults to `"module"`): the tensor groups with one constraint each: `"module"`
            (the A and B of one LoRA module), `"tensor"` or `"all"` (one constraint for the whole adapter).
        qp_margin (`float`, *optional*, defaults to 0.0): `γ` in [0, 1]; 0 is FedQP's `⟨m̃, g⟩ ≥ 0`, 1 keeps only
            the part of a mutation along `+g`.
        **fedmut_options: see [`FedMutStrategy`].
    """

    name = "fedqp"
    default_options = {**FedMutStrategy.default_options, "qp_group": "module", "qp_margin": 0.0}

    def _check_options(self) -> None:
        super()._check_options()
        self._options["qp_group"] = check_choice("qp_group", self._options["qp_group"], QP_GROUPS)
        self._options["qp_margin"] = check_unit_interval("qp_margin", self._options["qp_margin"])

    def _transform_plan(self, plan: MutationPlan, sq_norms: dict[str, float]) -> None:
        margin = self._options["qp_margin"]
        groups = [
            [k for k in keys if sq_norms[k] > 0.0]  # tensors with Δ_k = 0 carry no mutation and no direction
            for keys in group_keys(list(sq_norms), self._options["qp_group"]).values()
        ]
        groups = [g for g in groups if g]
        for cid, mult in plan.multipliers.items():
            count = 0
            for keys in groups:
                mus = [mult[k] for k in keys]
                if all(mu == mus[0] for mu in mus):
                    # m = μ·g exactly: feasible iff μ >= 0 (any γ <= 1), else the apex 0. Exact, no rounding.
                    if mus[0] < 0.0:
                        for k in keys:
                            mult[k] = 0.0
                        count += 1
                    continue
                inner = sum(mult[k] * sq_norms[k] for k in keys)
                sq_m = sum(mult[k] * mult[k] * sq_norms[k] for k in keys)
                sq_g = sum(sq_norms[k] for k in keys)
                a, b, projected = projection_coefficients(inner, sq_m, sq_g, margin)
                if projected:
                    for k in keys:
                        mult[k] = a + b * mult[k]
                    count += 1
            plan.num_projected[cid] = count

    def _round_metrics(self, round_idx: int, updates: list[ClientUpdate]) -> dict[str, float]:
        metrics = super()._round_metrics(round_idx, updates)
        plan = self._plan if self._plan is not None and self._plan.round_idx == round_idx else None
        count = sum(plan.num_projected.get(u.client_id, 0) for u in updates) if plan else 0
        num_groups = len(group_keys(list(self._require_global()), self._options["qp_group"]))
        metrics["num_projected"] = float(count)
        metrics["projected_fraction"] = count / (num_groups * len(updates))
        return metrics
