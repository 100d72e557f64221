"""Reverse selection-based expert assignment (RSEA, docs/fedamole.md § Server: RSEA, per module): experts choose
clients.

For one MoLE module with `E` domain experts and `C` participating clients:

1. scores `S_jc = e_jᵀ t̄_c / √r` (expert embedding `e_j`, client token embedding `t̄_c`, both in `R^r`);
2. every expert turns its scores into preferences over clients, `p_jc = softmax_c(S_jc)`;
3. the assignment `X ∈ {0,1}^{E×C}` maximizes `Σ_jc p_jc X_jc` subject to

       Σ_c X_jc = k            for every expert j     (each expert is trained by exactly k clients)
       lo ≤ Σ_j X_jc ≤ hi      for every client c     (each client holds lo..hi experts)

   a transportation problem: its constraint matrix (the incidence matrix of the complete bipartite graph
   experts × clients) is totally unimodular, so the LP relaxation already has an integral optimum. We still hand it
   to `scipy.optimize.milp` (HiGHS) with integrality, which returns that optimum directly.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["assignment_error", "expert_client_scores", "selection_probabilities", "solve_assignment"]


def assignment_error(
    num_experts: int,
    num_clients: int,
    clients_per_expert: int,
    experts_per_client_min: int,
    experts_per_client_max: int,
) -> str | None:
    """Why no assignment satisfies the constraints, or `None` when one exists.

    With a complete bipartite graph a 0/1 assignment exists iff `lo <= hi`, `k <= C`, `lo <= E` and the number of
    expert slots `E·k` lies in `[lo·C, min(hi, E)·C]`. The message names the config fields and what to change.
    """
    e, c, k, lo, hi = num_experts, num_clients, clients_per_expert, experts_per_client_min, experts_per_client_max
    if lo > hi:
        return f"experts_per_client_min={lo} > experts_per_client_max={hi}; set min <= max."
    if k > c:
        return (
            f"clients_per_expert={k} but only {c} clients take part in a round; lower clients_per_expert to <= {c} "
            "(or sample more clients: fraction_clients, num_clients)."
        )
    if lo > e:
        return f"experts_per_client_min={lo} > num_experts={e}; a client cannot hold more experts than there are."
    top = min(hi, e)
    if e * k < lo * c:
        return (
            f"num_experts × clients_per_expert = {e} × {k} = {e * k} expert slots cannot give each of the {c} "
            f"clients of a round experts_per_client_min={lo} experts ({lo * c} needed); raise num_experts to >= "
            f"{math.ceil(lo * c / k)} or clients_per_expert, or lower experts_per_client_min to <= {e * k // c}."
        )
    if e * k > top * c:
        return (
            f"num_experts × clients_per_expert = {e} × {k} = {e * k} expert slots do not fit in {c} clients holding "
            f"at most experts_per_client_max={hi} experts each ({top * c} slots); raise experts_per_client_max to >= "
            f"{math.ceil(e * k / c)}, or lower num_experts or clients_per_expert."
        )
    return None


def expert_client_scores(expert_embeddings: np.ndarray, client_embeddings: np.ndarray, rank: int) -> np.ndarray:
    """`S_jc = e_jᵀ t̄_c / √r` for `expert_embeddings` `(E, r)` and `client_embeddings` `(C, r)`; shape `(E, C)`."""
    e = np.asarray(expert_embeddings, dtype=np.float64)
    t = np.asarray(client_embeddings, dtype=np.float64)
    return e @ t.T / math.sqrt(rank)


def selection_probabilities(scores: np.ndarray) -> np.ndarray:
    """Each expert's softmax over the clients: `p_jc = exp(S_jc) / Σ_c' exp(S_jc')` (rows sum to 1)."""
    s = np.asarray(scores, dtype=np.float64)
    s = s - s.max(axis=1, keepdims=True)
    ex = np.exp(s)
    return ex / ex.sum(axis=1, keepdims=True)


def solve_assignment(
    preferences: np.ndarray, clients_per_expert: int, experts_per_client_min: int, experts_per_client_max: int
) -> np.ndarray:
    """The 0/1 assignment maximizing `Σ p_jc X_jc` under the RSEA constraints (see the module docstring).

    Args:
        preferences (`np.ndarray`): `p`, shape `(E, C)`.
        clients_per_expert (`int`): `k`, clients per expert (exact).
        experts_per_client_min (`int`): `lo`, fewest experts per client.
        experts_per_client_max (`int`): `hi`, most experts per client.

    Returns:
        `np.ndarray` of `bool`, shape `(E, C)`: `X[j, c]` is whether client `c` holds expert `j`.

    Raises:
        ValueError: the constraints admit no assignment (the message says which and how to fix it).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    p = np.asarray(preferences, dtype=np.float64)
    if p.ndim != 2 or not np.isfinite(p).all():
        raise ValueError(f"preferences must be a finite (experts, clients) matrix, got shape {p.shape}.")
    e, c = p.shape
    error = assignment_error(e, c, clients_per_expert, experts_per_client_min, experts_per_client_max)
    if error is not None:
        raise ValueError(error)
    # x[j * C + c] = X[j, c]
    per_expert = np.kron(np.eye(e), np.ones((1, c)))  # row j sums X[j, :]
    per_client = np.kron(np.ones((1, e)), np.eye(c))  # row c sums X[:, c]
    result = milp(
        c=-p.ravel(),
        constraints=[
            LinearConstraint(per_expert, clients_per_expert, clients_per_expert),
            LinearConstraint(per_client, experts_per_client_min, experts_per_client_max),
        ],
        integrality=np.ones(e * c),
        bounds=Bounds(0, 1),
    )
    if result.status != 0 or result.x is None:  # cannot happen once assignment_error passed; keep it loud
        raise RuntimeError(f"the expert assignment solver failed: {result.message}")
    return result.x.reshape(e, c) > 0.5
