"""Tests for the `fedmut` and `fedqp` strategies: coefficient pairs and the beta schedule, the FedQP projection
against brute-force / KKT answers, resume exactness, options, and a tiny end-to-end run of each."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_perfit.federated.messages import ClientUpdate
from hf_perfit.federated.strategies import STRATEGIES, FedMutStrategy, FedQPStrategy, get_strategy
from hf_perfit.federated.strategies.fedmut import group_keys, lora_module_name
from hf_perfit.federated.strategies.fedqp import project_mutation, projection_coefficients

from .conftest import CPU_FP32

P = "base_model.model.model.layers.{}.self_attn.{}_proj.lora_{}.weight"
SHAPES = {
    P.format(0, "q", "A"): (4, 12),
    P.format(0, "q", "B"): (12, 4),
    P.format(0, "v", "A"): (4, 12),
    P.format(0, "v", "B"): (6, 4),
    P.format(1, "q", "A"): (4, 12),
    P.format(1, "q", "B"): (12, 4),
    P.format(1, "v", "A"): (4, 12),
    P.format(1, "v", "B"): (6, 4),
}
MODULES = sorted({lora_module_name(k) for k in SHAPES})
IDS = ["c0", "c1", "c2", "c3", "c4", "c5"]


def random_state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}


def dyadic_state(seed: int) -> dict[str, torch.Tensor]:
    """Multiples of 1/8 in [-2, 2]: every sum and product the tests form is exact in float32 and float64."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randint(-16, 17, s, generator=gen).float() / 8 for k, s in SHAPES.items()}


def advance(strategy, round_idx: int, new_global: dict[str, torch.Tensor]) -> None:
    """One round whose FedAvg result is exactly `new_global` (a single client with weight 1)."""
    strategy.configure_round(round_idx, ["solo"])
    strategy.configure_client("solo", round_idx)
    strategy.aggregate(round_idx, [ClientUpdate("solo", 1, {k: t.clone() for k, t in new_global.items()})])


def strategy_after_one_round(name: str = "fedmut", **options):
    """A strategy at the start of round 1: `w_0 = dyadic_state(0)`, `w_1 = dyadic_state(1)`, `Δ = w_1 − w_0`."""
    s = get_strategy(name, **options)
    s.initialize(dyadic_state(0))
    advance(s, 0, dyadic_state(1))
    return s


def flat(tensors: dict[str, torch.Tensor], keys=None) -> torch.Tensor:
    keys = list(SHAPES) if keys is None else keys
    return torch.cat([tensors[k].double().reshape(-1) for k in keys])


def unflatten(vec: torch.Tensor, keys) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for k in keys:
        n = math.prod(SHAPES[k])
        out[k] = vec[i : i + n].reshape(SHAPES[k])
        i += n
    return out


def kkt_halfspace_projection(m: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """`argmin ½‖x − m‖² s.t. ⟨x, g⟩ >= 0` by enumerating the active sets and solving each KKT system."""
    candidates = [m.clone()]  # constraint inactive: x = m
    n = m.numel()
    kkt = torch.zeros(n + 1, n + 1, dtype=torch.float64)  # constraint active: x − λg = m, ⟨g, x⟩ = 0
    kkt[:n, :n] = torch.eye(n, dtype=torch.float64)
    kkt[:n, n] = -g
    kkt[n, :n] = g
    rhs = torch.cat([m, torch.zeros(1, dtype=torch.float64)])
    candidates.append(torch.linalg.solve(kkt, rhs)[:n])
    feasible = [x for x in candidates if float(x @ g) >= -1e-12 * float(m.norm() * g.norm())]
    return min(feasible, key=lambda x: float((x - m).square().sum()))


# ---------------------------------------------------------------------- registry, options, schedule


def test_registered_with_defaults():
    assert STRATEGIES["fedmut"] is FedMutStrategy and STRATEGIES["fedqp"] is FedQPStrategy
    assert issubclass(FedQPStrategy, FedMutStrategy)
    assert get_strategy("fedmut").options == {
        "mutation_alpha": 1.0,
        "mutation_beta0": 0.3,
        "mutation_beta_rounds": 50,
        "mutation_seed": 0,
        "mutation_unit": "tensor",
    }
    assert get_strategy("fedqp").options["qp_group"] == "module"
    assert get_strategy("fedqp").options["qp_margin"] == 0.0
    s = get_strategy("fedqp", mutation_alpha=2, mutation_beta0=1, qp_margin=1)
    assert s.options["mutation_alpha"] == 2.0 and isinstance(s.options["mutation_alpha"], float)
    assert json.loads(json.dumps(s.options)) == s.options  # JSON-able, survives a checkpoint as is
    assert s.client_options() == {}


@pytest.mark.parametrize(
    ("name", "option", "bad"),
    [
        ("fedmut", "mutation_alpha", -1.0),
        ("fedmut", "mutation_alpha", float("nan")),
        ("fedmut", "mutation_alpha", "1"),
        ("fedmut", "mutation_alpha", True),
        ("fedmut", "mutation_beta0", -0.1),
        ("fedmut", "mutation_beta0", 1.5),
        ("fedmut", "mutation_beta0", float("nan")),
        ("fedmut", "mutation_beta_rounds", -1),
        ("fedmut", "mutation_beta_rounds", 2.5),
        ("fedmut", "mutation_seed", -3),
        ("fedmut", "mutation_seed", "0"),
        ("fedmut", "mutation_unit", "layer"),
        ("fedmut", "mutation_unit", None),
        ("fedqp", "qp_group", "row"),
        ("fedqp", "qp_group", 1),
        ("fedqp", "qp_margin", -0.5),
        ("fedqp", "qp_margin", 1.01),
        ("fedqp", "mutation_beta0", 2.0),
    ],
)
def test_bad_options_name_the_option(name, option, bad):
    with pytest.raises(ValueError, match=f"option {option}="):
        get_strategy(name, **{option: bad})


def test_unknown_options():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['qp_group'\].*mutation_alpha"):
        get_strategy("fedmut", qp_group="all")
    with pytest.raises(ValueError, match=r"\['alpha'\]"):
        get_strategy("fedqp", alpha=1.0)


def test_beta_schedule():
    s = FedMutStrategy(mutation_beta0=0.5, mutation_beta_rounds=4)
    assert [s.beta(t) for t in range(7)] == [0.5, 0.375, 0.25, 0.125, 0.0, 0.0, 0.0]
    default = FedMutStrategy()
    assert default.beta(0) == 0.3 and default.beta(25) == pytest.approx(0.15) and default.beta(50) == 0.0
    assert FedMutStrategy(mutation_beta_rounds=0).beta(0) == 0.0


@pytest.mark.parametrize("name", ["fedmut", "fedqp"])
def test_beta_is_that_of_the_round_that_produced_the_update(name):
    """The official FedMut (Training_FedMut.py) aggregates round `iter`, then mutates the next round's starts with
    `ctrl_rate = 0.3 * (1 - min(iter / 50, 1))`: round t uses β of round t - 1, so round 1 uses β₀ = 0.3 exactly."""
    s = get_strategy(name, mutation_alpha=1.0)  # official defaults β₀ = 0.3, T_b = 50
    s.initialize(dyadic_state(0))
    official = [0.3 * (1.0 - min(it / 50, 1.0)) for it in range(53)]
    used = []
    for t in range(53):
        s.configure_round(t, IDS[:2])
        plan = s.mutation_plan
        if t > 0:
            used.append(plan.beta)
            coeffs = {plan.coefficients[c][next(iter(SHAPES))] for c in IDS[:2]}
            assert coeffs == {1.0, -1.0 + official[t - 1]}
        s.aggregate(t, [ClientUpdate(c, 1, dyadic_state(t + 1)) for c in IDS[:2]])
    assert used[:3] == [0.3, official[1], official[2]] and used[0] == 0.3
    assert used == official[:52] and used[49] > 0.0 and used[50] == 0.0  # round 51 is the first with β = 0


def test_module_grouping():
    key = P.format(3, "q", "B")
    assert lora_module_name(key) == "base_model.model.model.layers.3.self_attn.q_proj"
    assert lora_module_name("x.lora_A.weight") == "x" and lora_module_name("w") == "w"
    assert lora_module_name("m.q.lora_embedding_A") == "m.q"
    keys = list(SHAPES)
    assert sorted(group_keys(keys, "module")) == MODULES
    assert all(len(v) == 2 for v in group_keys(keys, "module").values())
    assert group_keys(keys, "all") == {"all": keys}
    assert group_keys(keys, "tensor") == {k: [k] for k in keys}


# ---------------------------------------------------------------------- FedMut coefficients


def test_round_zero_has_no_mutation():
    s = FedMutStrategy(mutation_alpha=4.0)
    init = random_state(0)
    s.initialize(init)
    s.configure_round(0, IDS)
    plan = s.mutation_plan
    assert not plan.active and s.last_update is None
    for cid in IDS:
        inst = s.configure_client(cid, 0)
        assert all(torch.equal(inst.tensors[k], init[k]) for k in SHAPES)
        assert set(plan.coefficients[cid].values()) == {0.0}
    metrics = s.aggregate(0, [ClientUpdate(c, 2, random_state(i + 1)) for i, c in enumerate(IDS)])
    assert metrics["mutation_norm"] == 0.0 and metrics["num_mutated"] == 0.0 and metrics["beta"] == 0.3


@pytest.mark.parametrize("num_clients", [2, 4, 5, 6])
def test_pair_means_are_alpha_beta_delta_half_then_zero(num_clients):
    """α = 2, β₀ = 0.5, T_b = 2 and dyadic tensors: every equality below is exact."""
    alpha = 2.0
    s = strategy_after_one_round(mutation_alpha=alpha, mutation_beta0=0.5, mutation_beta_rounds=2)
    ids = IDS[:num_clients]
    # β of the round that produced Δ: round t mutates with β_{t-1} (0.5, 0.25, then 0 from round T_b + 1 = 3)
    for t, new_global, beta in [(1, dyadic_state(2), 0.5), (2, dyadic_state(3), 0.25), (3, None, 0.0)]:
        w, delta = s.global_tensors, s.last_update
        s.configure_round(t, ids)
        plan = s.mutation_plan
        assert plan.active and plan.beta == beta == s.beta(t - 1)
        assert len(plan.pairs) == num_clients // 2
        paired = [c for pair in plan.pairs for c in pair]
        assert sorted(paired + ([plan.unmutated] if plan.unmutated else [])) == sorted(ids)
        assert (plan.unmutated is None) == (num_clients % 2 == 0)
        starts = {c: s.configure_client(c, t).tensors for c in ids}
        for i, j in plan.pairs:
            for k in SHAPES:
                assert sorted([plan.coefficients[i][k], plan.coefficients[j][k]]) == [-1.0 + beta, 1.0]
                assert plan.multipliers[i][k] == alpha * plan.coefficients[i][k]
                pair_mean = (starts[i][k].double() + starts[j][k].double()) / 2
                assert torch.equal(pair_mean, w[k].double() + alpha * beta * delta[k].double() / 2)
                if beta == 0.0:
                    assert torch.equal(pair_mean, w[k].double())
        # over all mutated clients too: the mean of the coefficients is β/2 per tensor
        for k in SHAPES:
            mean_v = sum(plan.coefficients[c][k] for c in paired) / len(paired)
            assert mean_v == pytest.approx(beta / 2, abs=1e-15)
        if new_global is not None:
            s.aggregate(t, [ClientUpdate(c, 1, new_global) for c in ids])
            assert all(torch.equal(s.last_update[k], new_global[k] - w[k]) for k in SHAPES)


@pytest.mark.parametrize("num_clients", [1, 3, 5])
def test_odd_counts_leave_exactly_one_client_unmutated(num_clients):
    s = strategy_after_one_round(mutation_alpha=1.0)
    w = s.global_tensors
    ids = IDS[:num_clients]
    s.configure_round(1, ids)
    plan = s.mutation_plan
    assert plan.unmutated in ids and len(plan.pairs) == (num_clients - 1) // 2
    assert set(plan.coefficients[plan.unmutated].values()) == {0.0}
    assert plan.mutation_norms[plan.unmutated] == 0.0
    inst = s.configure_client(plan.unmutated, 1)
    assert all(torch.equal(inst.tensors[k], w[k]) for k in SHAPES)
    for c in ids:
        if c != plan.unmutated:
            assert 0.0 not in plan.coefficients[c].values()
            assert plan.mutation_norms[c] > 0


def test_the_unmutated_client_varies_with_the_round():
    s = strategy_after_one_round()
    unmutated = set()
    for t in range(1, 30):
        s.configure_round(t, IDS[:5])
        unmutated.add(s.mutation_plan.unmutated)
    assert len(unmutated) >= 3


def test_starts_are_global_plus_mutation():
    s = strategy_after_one_round(mutation_alpha=0.75, mutation_beta0=0.2)
    w, delta = s.global_tensors, s.last_update
    s.configure_round(1, IDS)
    plan = s.mutation_plan
    for c in IDS:
        start = s.configure_client(c, 1).tensors
        mutation = s.client_mutation(c)
        for k in SHAPES:
            assert start[k].dtype == torch.float32
            assert torch.equal(mutation[k], plan.multipliers[c][k] * delta[k].double())
            assert torch.equal(start[k], (w[k].double() + mutation[k]).float())
        norm = float(flat(mutation).norm())
        assert plan.mutation_norms[c] == pytest.approx(norm, rel=1e-12)


def test_mutation_unit_module_shares_a_coefficient_between_a_and_b():
    s = strategy_after_one_round(mutation_unit="module")
    t = strategy_after_one_round(mutation_unit="tensor")
    differs = False
    for r in range(1, 6):
        s.configure_round(r, IDS)
        t.configure_round(r, IDS)
        for c in IDS:
            for module in MODULES:
                a, b = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
                assert s.mutation_plan.coefficients[c][a] == s.mutation_plan.coefficients[c][b]
                differs |= t.mutation_plan.coefficients[c][a] != t.mutation_plan.coefficients[c][b]
    assert differs  # per-tensor draws do split A from B


@pytest.mark.parametrize("name", ["fedmut", "fedqp"])
def test_mutations_leave_the_global_adapter_untouched(name):
    s = strategy_after_one_round(name, mutation_alpha=3.0)
    w, delta = s.global_tensors, s.last_update
    s.configure_round(1, IDS)
    for c in IDS:
        inst = s.configure_client(c, 1)
        for t in inst.tensors.values():
            t.add_(100.0)  # the instruction is a fresh copy: writing into it must not reach the server
    for c in IDS:
        s.configure_client(c, 1)
    assert all(torch.equal(s.global_tensors[k], w[k]) for k in SHAPES)
    assert all(torch.equal(s.last_update[k], delta[k]) for k in SHAPES)
    assert any(not torch.equal(s.configure_client(c, 1).tensors[k], w[k]) for c in IDS for k in SHAPES)


def test_unsampled_client_or_unconfigured_round_gets_the_global():
    s = strategy_after_one_round()
    w = s.global_tensors
    s.configure_round(1, IDS[:2])
    for inst in (s.configure_client("stranger", 1), s.configure_client(IDS[0], 2)):
        assert all(torch.equal(inst.tensors[k], w[k]) for k in SHAPES)
    with pytest.raises(ValueError, match="more than once"):
        s.configure_round(2, ["a", "b", "a"])


def test_draws_are_deterministic_in_seed_and_round():
    def plan(seed, round_idx, ids):
        s = strategy_after_one_round(mutation_seed=seed)
        s.configure_round(round_idx, ids)
        return s.mutation_plan

    a = plan(0, 1, IDS)
    assert plan(0, 1, list(reversed(IDS))) == a  # the caller's order does not matter
    assert plan(1, 1, IDS).coefficients != a.coefficients
    assert plan(0, 2, IDS).coefficients != a.coefficients


def test_alpha_zero_is_fedit():
    s = strategy_after_one_round(mutation_alpha=0.0)
    w = s.global_tensors
    s.configure_round(1, IDS)
    for c in IDS:
        assert all(torch.equal(s.configure_client(c, 1).tensors[k], w[k]) for k in SHAPES)


def test_round_metrics():
    s = strategy_after_one_round(mutation_alpha=1.5, mutation_beta0=0.5, mutation_beta_rounds=4)
    s.configure_round(1, IDS[:5])
    norms = [float(flat(s.client_mutation(c)).norm()) for c in IDS[:5]]
    metrics = s.aggregate(1, [ClientUpdate(c, 3, random_state(i)) for i, c in enumerate(IDS[:5])])
    assert metrics["beta"] == 0.5 and metrics["mutation_alpha"] == 1.5  # round 1 mutates with β_0 = β₀
    assert metrics["num_mutated"] == 4.0 and metrics["num_clients"] == 5.0
    assert metrics["mutation_norm"] == pytest.approx(sum(norms) / 5, rel=1e-12)
    assert {"num_examples", "update_norm"} <= set(metrics)
    # a round aggregated without configure_round reports no mutation
    assert s.aggregate(2, [ClientUpdate("c0", 1, random_state(9))])["mutation_norm"] == 0.0


# ---------------------------------------------------------------------- checkpoint / resume


def save_and_load(strategy, tmp_path):
    tensors, meta = strategy.state_dict()
    path = tmp_path / "state.safetensors"
    save_file(tensors, str(path))
    return load_file(str(path)), json.loads(json.dumps(meta))


@pytest.mark.parametrize("name", ["fedmut", "fedqp"])
def test_state_dict_round_trip_resumes_exactly(name, tmp_path):
    options = {"mutation_alpha": 2.0, "mutation_seed": 7}
    s = get_strategy(name, **options)
    s.initialize(random_state(0))
    for r in range(2):
        s.configure_round(r, IDS[:5])
        for c in IDS[:5]:
            s.configure_client(c, r)
        s.aggregate(r, [ClientUpdate(c, 1 + i, random_state(10 * r + i)) for i, c in enumerate(IDS[:5])])

    tensors, meta = save_and_load(s, tmp_path)
    assert meta["has_delta"] and meta["last_round"] == 1
    assert {k for k in tensors if k.startswith("delta/")} == {f"delta/{k}" for k in SHAPES}
    r = get_strategy(meta["strategy"], **meta["options"])
    r.load_state_dict(tensors, meta)
    assert r.last_round == 1
    assert all(torch.equal(r.last_update[k], s.last_update[k]) for k in SHAPES)
    t2, m2 = r.state_dict()
    assert m2 == meta and all(torch.equal(t2[k], tensors[k]) for k in tensors)

    # both continue identically: same draws, same starts, same aggregate
    for strategy in (s, r):
        strategy.configure_round(2, IDS[:5])
    assert r.mutation_plan == s.mutation_plan and r.mutation_plan.active
    for c in IDS[:5]:
        a, b = s.configure_client(c, 2).tensors, r.configure_client(c, 2).tensors
        assert all(torch.equal(a[k], b[k]) for k in SHAPES)
    nxt = [ClientUpdate(c, 2, random_state(50 + i)) for i, c in enumerate(IDS[:5])]
    assert r.aggregate(2, nxt) == s.aggregate(2, nxt)


def test_state_dict_before_any_round_and_errors(tmp_path):
    s = FedMutStrategy()
    tensors, meta = s.state_dict()
    assert tensors == {} and meta["has_delta"] is False and meta["keys"] is None
    fresh = FedMutStrategy()
    fresh.load_state_dict(tensors, meta)
    assert not fresh.is_initialized and fresh.last_update is None

    s.initialize(random_state(0))
    tensors, meta = save_and_load(s, tmp_path)
    fresh.load_state_dict(tensors, meta)
    assert fresh.last_update is None  # round 0 again: no mutation

    s = strategy_after_one_round()
    tensors, meta = save_and_load(s, tmp_path)
    with pytest.raises(ValueError, match="saved by strategy 'fedmut'"):
        FedQPStrategy().load_state_dict(tensors, meta)
    with pytest.raises(ValueError, match="options"):
        FedMutStrategy(mutation_seed=1).load_state_dict(tensors, meta)
    missing = {k: v for k, v in tensors.items() if k != f"delta/{P.format(0, 'q', 'A')}"}
    with pytest.raises(ValueError, match="missing tensor 'delta/"):
        FedMutStrategy().load_state_dict(missing, meta)
    wrong = dict(tensors)
    wrong[f"delta/{P.format(0, 'q', 'A')}"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="shape"):
        FedMutStrategy().load_state_dict(wrong, meta)
    # a load replaces the whole state: a plan or Δ from before does not survive it
    other = strategy_after_one_round()
    other.configure_round(1, IDS)
    fresh_meta = dict(meta, has_delta=False)
    other.load_state_dict(tensors, fresh_meta)
    assert other.last_update is None and other.mutation_plan is None


# ---------------------------------------------------------------------- the FedQP projection itself


@pytest.mark.parametrize("seed", range(6))
def test_halfspace_projection_matches_kkt_solver(seed):
    keys = list(SHAPES)[:2]
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(sum(math.prod(SHAPES[k]) for k in keys), generator=gen, dtype=torch.float64)
    m = torch.randn(g.shape, generator=gen, dtype=torch.float64)
    if float(m @ g) > 0:
        m = m - 2 * (m @ g) / (g @ g) * g  # make it infeasible: reflect through the constraint plane
    projected, changed = project_mutation(unflatten(m, keys), unflatten(g, keys))
    p = flat(projected, keys)
    assert changed
    assert float(p @ g) == pytest.approx(0.0, abs=1e-10)
    assert torch.allclose(p, kkt_halfspace_projection(m, g), rtol=0, atol=1e-12)
    assert torch.allclose(p, m - (m @ g) / (g @ g) * g, rtol=0, atol=1e-14)  # the closed form of docs/fedmut.md
    # a feasible mutation is kept as is; g = 0 leaves every mutation alone
    kept, changed = project_mutation(unflatten(-m, keys), unflatten(g, keys))
    assert not changed and torch.equal(flat(kept, keys), -m)
    kept, changed = project_mutation(unflatten(m, keys), unflatten(torch.zeros_like(g), keys))
    assert not changed and torch.equal(flat(kept, keys), m)


def _cone_contains(x: torch.Tensor, g: torch.Tensor, margin: float, tol: float = 1e-10) -> bool:
    return float(x @ g) >= margin * float(x.norm() * g.norm()) - tol


@pytest.mark.parametrize("margin", [0.0, 0.3, 0.8, 1.0])
@pytest.mark.parametrize("seed", range(4))
def test_margin_projection_matches_brute_force_in_3d(margin, seed):
    """Brute force over a dense grid of cone directions `d` (the best length along `d` is `max(⟨m, d⟩, 0)`)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(3, generator=gen, dtype=torch.float64)
    m = torch.randn(3, generator=gen, dtype=torch.float64)
    if _cone_contains(m, g, margin, tol=0.0):
        m = m - 2 * (m @ g) / (g @ g) * g  # mirror it to the side of -g: outside the cone
    a, b, projected = projection_coefficients(float(m @ g), float(m @ m), float(g @ g), margin)
    p = a * g + b * m
    assert projected and _cone_contains(p, g, margin)

    e0 = g / g.norm()
    e1 = torch.linalg.svd(e0[None, :], full_matrices=True).Vh[1:]  # an orthonormal basis of g's complement
    theta = math.acos(margin)
    psi = torch.linspace(0, theta, 400, dtype=torch.float64)[:, None]
    chi = torch.linspace(0, 2 * math.pi, 800, dtype=torch.float64)[None, :]
    dirs = (
        torch.cos(psi)[..., None] * e0
        + (torch.sin(psi) * torch.cos(chi))[..., None] * e1[0]
        + (torch.sin(psi) * torch.sin(chi))[..., None] * e1[1]
    ).reshape(-1, 3)
    lengths = (dirs @ m).clamp_min(0.0)
    candidates = lengths[:, None] * dirs
    dist = (candidates - m).norm(dim=1)
    best = int(dist.argmin())
    ours = float((p - m).norm())
    assert ours <= float(dist[best]) + 1e-12  # nothing on the grid beats the closed form
    assert ours == pytest.approx(float(dist[best]), abs=2e-4)
    assert torch.allclose(p, candidates[best], atol=5e-3)


@pytest.mark.parametrize("margin", [0.0, 0.2, 0.6, 0.95])
def test_margin_projection_optimality_certificate_in_high_dimension(margin):
    """Moreau: `p = P_K(m)` iff `p ∈ K`, `m − p ∈ K°` (the polar cone) and `⟨m − p, p⟩ = 0`; plus no random feasible
    point is closer."""
    gen = torch.Generator().manual_seed(11)
    g = torch.randn(60, generator=gen, dtype=torch.float64)
    for _ in range(20):
        m = torch.randn(60, generator=gen, dtype=torch.float64) - 0.3 * g
        a, b, projected = projection_coefficients(float(m @ g), float(m @ m), float(g @ g), margin)
        p = a * g + b * m
        r = m - p
        assert _cone_contains(p, g, margin)
        assert projected == (not _cone_contains(m, g, margin, tol=0.0))
        # K° = {r : ⟨r, −g⟩ >= sin θ ‖r‖‖g‖}, θ = arccos γ
        sin_t = math.sqrt(1 - margin**2)
        assert float(-r @ g) >= sin_t * float(r.norm() * g.norm()) - 1e-9
        assert float(r @ p) == pytest.approx(0.0, abs=1e-9)
        for _ in range(50):
            x = p + 0.5 * torch.randn(60, generator=gen, dtype=torch.float64)
            if _cone_contains(x, g, margin, tol=0.0):
                assert float((x - m).norm()) >= float(r.norm()) - 1e-12


# ---------------------------------------------------------------------- FedQP in the strategy


def test_fedqp_draws_match_fedmut_and_projection_is_the_closest_feasible_point():
    alpha = 1.5
    mut = strategy_after_one_round("fedmut", mutation_alpha=alpha, mutation_beta0=0.2)
    qp = strategy_after_one_round("fedqp", mutation_alpha=alpha, mutation_beta0=0.2, qp_group="module")
    w, delta = qp.global_tensors, qp.last_update
    mut.configure_round(1, IDS)
    qp.configure_round(1, IDS)
    plan = qp.mutation_plan
    assert plan.coefficients == mut.mutation_plan.coefficients  # same draws, only the projection differs
    projected_groups = 0
    for c in IDS:
        raw = {k: alpha * plan.coefficients[c][k] * delta[k].double() for k in SHAPES}
        mutation = qp.client_mutation(c)
        start = qp.configure_client(c, 1).tensors
        assert all(torch.equal(start[k], (w[k].double() + mutation[k]).float()) for k in SHAPES)
        for module in MODULES:
            keys = [f"{module}.lora_A.weight", f"{module}.lora_B.weight"]
            m, g, p = flat(raw, keys), flat(delta, keys), flat(mutation, keys)
            assert float(p @ g) >= -1e-12 * float(m.norm() * g.norm())
            assert torch.allclose(p, kkt_halfspace_projection(m, g), rtol=0, atol=1e-12)
            projected_groups += float(m @ g) < 0
    assert sum(plan.num_projected.values()) == projected_groups > 0
    metrics = qp.aggregate(1, [ClientUpdate(c, 1, random_state(i)) for i, c in enumerate(IDS)])
    assert metrics["num_projected"] == projected_groups
    assert metrics["projected_fraction"] == projected_groups / (len(IDS) * len(MODULES))


def test_fedqp_tensor_groups_just_zero_the_negative_mutations():
    mut = strategy_after_one_round("fedmut", mutation_alpha=2.0)
    qp = strategy_after_one_round("fedqp", mutation_alpha=2.0, qp_group="tensor")
    w = qp.global_tensors
    for strategy in (mut, qp):
        strategy.configure_round(1, IDS)
    plan = qp.mutation_plan
    for c in IDS:
        a, b = mut.configure_client(c, 1).tensors, qp.configure_client(c, 1).tensors
        for k in SHAPES:
            v = plan.coefficients[c][k]
            assert plan.multipliers[c][k] == max(2.0 * v, 0.0)
            assert torch.equal(b[k], a[k] if v >= 0 else w[k])
        assert plan.num_projected[c] == sum(plan.coefficients[c][k] < 0 for k in SHAPES)


def test_fedqp_module_groups_with_module_units_degenerate_too():
    qp = strategy_after_one_round("fedqp", mutation_unit="module", qp_group="module", qp_margin=0.5)
    qp.configure_round(1, IDS)
    plan = qp.mutation_plan
    for c in IDS:
        for k in SHAPES:
            assert plan.multipliers[c][k] == max(plan.coefficients[c][k], 0.0)


@pytest.mark.parametrize(("group", "margin"), [("all", 0.0), ("all", 0.4), ("module", 0.7)])
def test_fedqp_group_and_margin(group, margin):
    qp = strategy_after_one_round("fedqp", mutation_alpha=1.0, qp_group=group, qp_margin=margin)
    delta = qp.last_update
    qp.configure_round(1, IDS)
    plan = qp.mutation_plan
    groups = group_keys(list(SHAPES), group)
    for c in IDS:
        raw = {k: plan.coefficients[c][k] * delta[k].double() for k in SHAPES}
        mutation = qp.client_mutation(c)
        for keys in groups.values():
            p, g = flat(mutation, keys), flat(delta, keys)
            assert _cone_contains(p, g, margin, tol=1e-9 * float(g.norm()) ** 2)
            expected, _ = project_mutation({k: raw[k] for k in keys}, {k: delta[k] for k in keys}, margin)
            assert torch.allclose(p, flat(expected, keys), rtol=0, atol=1e-12)


def test_fedqp_zero_delta_tensors_are_ignored():
    s = FedQPStrategy(qp_group="all")
    init = dyadic_state(0)
    s.initialize(init)
    frozen = P.format(0, "q", "A")
    nxt = dyadic_state(1)
    nxt[frozen] = init[frozen].clone()  # Δ = 0 there: no mutation, no direction
    advance(s, 0, nxt)
    s.configure_round(1, IDS)
    for c in IDS:
        start = s.configure_client(c, 1).tensors
        assert torch.equal(start[frozen], nxt[frozen])
        assert float(flat(s.client_mutation(c)) @ flat(s.last_update)) >= -1e-12


# ---------------------------------------------------------------------- end to end


def _sim_cfg(tmp_path, strategy, **kw):
    from hf_perfit.federated.config import FederatedConfig

    return FederatedConfig(
        model_name_or_path="unused",
        strategy=strategy,
        num_clients=3,
        num_rounds=2,
        local_steps=2,
        learning_rate=5e-3,
        per_device_train_batch_size=2,
        max_length=40,
        lora_r=2,
        lora_alpha=4,
        output_dir=str(tmp_path / strategy),
        seed=0,
        **kw,
    )


def _simulation(cfg):
    from hf_perfit.federated.simulation import FederatedSimulation

    from .conftest import build_tokenizer, tiny_llama

    return FederatedSimulation(cfg, model=tiny_llama(), tokenizer=build_tokenizer(), clients=_clients())


def _clients(n: int = 3):
    """Three clients with 9 train / 3 test echo examples each, one category per client."""
    from datasets import Dataset

    from hf_perfit.data import ClientData

    out = []
    for k in range(n):
        rows = [
            {"instruction": f"Task {k}: echo {i}", "context": "", "response": f"{k}{i}{k}", "category": f"c{k}"}
            for i in range(12)
        ]
        out.append(ClientData(f"client_{k}", Dataset.from_list(rows[:9]), Dataset.from_list(rows[9:]), [f"c{k}"]))
    return out


def _run_and_check(tmp_path, strategy, options, **kw):
    """Run 2 rounds of 3 clients, spying on the plans, the instructions and what the model was loaded with, and
    check the metrics the run wrote."""
    sim = _simulation(_sim_cfg(tmp_path, strategy, strategy_options=options, **kw))
    plans, sent, loaded = [], [], []
    configure_round, configure_client = sim.strategy.configure_round, sim.strategy.configure_client
    set_state = sim.model.set_adapter_state

    def spy_round(r, ids):
        configure_round(r, ids)
        plans.append(sim.strategy.mutation_plan)

    def spy_client(cid, r):
        sent.append(configure_client(cid, r))
        return sent[-1]

    def spy_load(tensors, *args, **kwargs):
        loaded.append(tensors)
        return set_state(tensors, *args, **kwargs)

    sim.strategy.configure_round, sim.strategy.configure_client = spy_round, spy_client
    sim.model.set_adapter_state = spy_load
    summary = sim.run()

    out = tmp_path / strategy
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    summaries = {r["round"]: r for r in records if r.get("summary")}
    assert [p.active for p in plans] == [False, True]
    assert summaries[0]["mutation_norm"] == 0.0 and summaries[0]["num_mutated"] == 0.0
    norms = plans[1].mutation_norms
    assert summaries[1]["mutation_norm"] == pytest.approx(sum(norms.values()) / 3, rel=1e-9)
    assert summaries[1]["mutation_norm"] > 0.0 and summaries[1]["num_mutated"] == sum(n > 0 for n in norms.values())
    assert summary["beta"] == sim.strategy.beta(0) and summary["mutation_alpha"] == options["mutation_alpha"]
    # every client trained from exactly the instruction it was sent (mutated copies in round 1)
    assert len(sent) == 6 and all(any(inst.tensors is t for t in loaded) for inst in sent)
    meta = json.loads((out / "state" / "checkpoint.json").read_text())["strategy_meta"]
    assert meta["has_delta"] and meta["options"]["mutation_alpha"] == options["mutation_alpha"]
    return summary


def test_fedqp_tiny_run_end_to_end(tmp_path):
    summary = _run_and_check(tmp_path, "fedqp", {"mutation_alpha": 1.0, "qp_group": "module"})
    assert 0.0 <= summary["num_projected"] <= 3 * 4 and 0.0 <= summary["projected_fraction"] <= 1.0


def test_fedmut_tiny_run_end_to_end_and_exact_resume_after_a_crash(tmp_path, monkeypatch):
    import hf_perfit.federated.simulation as sim_mod

    options = {"mutation_alpha": 0.5, "mutation_beta_rounds": 4, "mutation_seed": 3}
    _run_and_check(tmp_path / "a", "fedmut", options, **CPU_FP32)  # bit-for-bit resume (conftest.CPU_FP32)

    real = sim_mod.client_update
    calls = {"n": 0}

    def crash_in_round_1(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # round 1, second client: its mutation must be redrawn identically on resume
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(sim_mod, "client_update", crash_in_round_1)
    with pytest.raises(KeyboardInterrupt):
        _simulation(_sim_cfg(tmp_path / "b", "fedmut", strategy_options=options, **CPU_FP32)).run()
    monkeypatch.setattr(sim_mod, "client_update", real)
    _simulation(_sim_cfg(tmp_path / "b", "fedmut", strategy_options=options, resume=True, **CPU_FP32)).run()
    for c in ("client_0", "client_1", "client_2"):
        a = load_file(str(tmp_path / "a" / "fedmut" / "clients" / c / "adapter" / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "b" / "fedmut" / "clients" / c / "adapter" / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = [(tmp_path / x / "fedmut" / "metrics.jsonl").read_text() for x in ("a", "b")]
    summaries = [[json.loads(x) for x in m.splitlines() if '"summary"' in x] for m in metrics]
    assert summaries[0] == summaries[1]


@pytest.mark.parametrize("strategy", ["fedmut", "fedqp"])
def test_recipe_builds_the_strategy(strategy):
    import yaml

    from hf_perfit.federated.config import FederatedConfig

    path = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m" / strategy / "config_flan8.yaml"
    cfg = FederatedConfig.from_dict(yaml.safe_load(path.read_text()))
    assert cfg.strategy == strategy and cfg.num_clients == 8 and cfg.lora_r == 8 and cfg.lora_alpha == 16
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    s = get_strategy(strategy, **cfg.resolved_strategy_options())
    assert s.mutation_alpha == 1.0
