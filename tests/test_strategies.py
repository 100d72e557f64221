"""Tests for the server-side strategies (`hf_perfit.federated.strategies`): pure tensor code, no models."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_perfit.federated.comm import downlink_bytes
from hf_perfit.federated.messages import ClientInstruction, ClientUpdate
from hf_perfit.federated.strategies import (
    STRATEGIES,
    FedITStrategy,
    FedProxStrategy,
    LocalStrategy,
    PerFITStrategy,
    Strategy,
    get_strategy,
    register_strategy,
)
from hf_perfit.federated.strategies import perfit as perfit_module

P = "base_model.model.model.layers.{}.self_attn.{}_proj.lora_{}.weight"
SHAPES = {
    P.format(0, "q", "A"): (8, 12),
    P.format(0, "q", "B"): (12, 8),
    P.format(1, "v", "A"): (8, 6),
    P.format(1, "v", "B"): (5, 8),
}


def random_state(seed: int, shapes: dict[str, tuple[int, ...]] = SHAPES) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


def random_masks(seed: int, density: float, shapes: dict[str, tuple[int, ...]] = SHAPES) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.rand(s, generator=gen) < density for k, s in shapes.items()}


def masked(tensors: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.where(masks[k], t, 0.0) for k, t in tensors.items()}


# ---------------------------------------------------------------------- registry and options


def test_registry_contents_and_get_strategy():
    assert {"local", "fedit", "fedprox", "perfit"} <= set(STRATEGIES)
    assert STRATEGIES["perfit"] is PerFITStrategy
    assert isinstance(get_strategy("fedit"), FedITStrategy)
    s = get_strategy("fedprox", proximal_mu=0.5)
    assert isinstance(s, FedProxStrategy) and s.proximal_mu == 0.5


def test_get_strategy_unknown_name_lists_allowed():
    with pytest.raises(ValueError, match="unknown strategy 'fedavg'") as err:
        get_strategy("fedavg")
    for name in ("local", "fedit", "fedprox", "perfit"):
        assert name in str(err.value)


def test_unknown_option_names_it_and_allowed():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['mu'\].*proximal_mu"):
        FedProxStrategy(mu=0.1)
    with pytest.raises(ValueError, match=r"\['research'\].*research_every"):
        get_strategy("perfit", research=2)
    with pytest.raises(ValueError, match="allowed options: none"):
        FedITStrategy(proximal_mu=0.1)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.1", True, None])
def test_fedprox_rejects_bad_mu(bad):
    with pytest.raises(ValueError, match="proximal_mu"):
        FedProxStrategy(proximal_mu=bad)


@pytest.mark.parametrize("bad", [-1, 2.5, "3", True])
def test_perfit_rejects_bad_research_every(bad):
    with pytest.raises(ValueError, match="research_every"):
        PerFITStrategy(research_every=bad)


def test_register_strategy_errors_and_new_strategy():
    with pytest.raises(TypeError):
        register_strategy(dict)

    class Clash(FedITStrategy):
        name = "fedit"

    with pytest.raises(ValueError, match="already registered"):
        register_strategy(Clash)

    class Nameless(LocalStrategy):
        name = ""

    with pytest.raises(ValueError, match="non-empty"):
        register_strategy(Nameless)

    @register_strategy
    class Echo(LocalStrategy):
        name = "echo_test"
        default_options = {"alpha": 1.0}

    try:
        assert get_strategy("echo_test", alpha=2.0).options == {"alpha": 2.0}
    finally:
        STRATEGIES.pop("echo_test")


# ---------------------------------------------------------------------- common checks


@pytest.mark.parametrize("name", ["local", "fedit", "fedprox", "perfit"])
def test_aggregate_rejects_empty_and_bad_counts(name):
    s = get_strategy(name)
    s.initialize(random_state(0))
    masks = random_masks(1, 0.5)
    with pytest.raises(ValueError, match="no client updates"):
        s.aggregate(0, [])
    for n in (0, -3):
        bad = ClientUpdate("client_7", n, random_state(1), masks=masks, mask_changed=True)
        with pytest.raises(ValueError, match="client_7"):
            s.aggregate(0, [bad])
    twice = [ClientUpdate("a", 1, random_state(1), masks=masks, mask_changed=True)] * 2
    with pytest.raises(ValueError, match="more than once"):
        s.aggregate(0, twice)


@pytest.mark.parametrize("name", ["fedit", "perfit"])
def test_requires_initialize(name):
    s = get_strategy(name)
    with pytest.raises(RuntimeError, match="initialize"):
        s.configure_client("a", 0)
    with pytest.raises(RuntimeError, match="initialize"):
        _ = s.global_tensors


@pytest.mark.parametrize("name", ["fedit", "perfit"])
def test_mismatched_tensors_rejected(name):
    s = get_strategy(name)
    s.initialize(random_state(0))
    state = random_state(1)
    masks = random_masks(2, 0.5)
    missing = dict(state)
    missing.pop(P.format(0, "q", "A"))
    with pytest.raises(ValueError, match="missing"):
        s.aggregate(0, [ClientUpdate("a", 1, missing, masks=masks, mask_changed=True)])
    wrong = dict(state)
    wrong[P.format(0, "q", "A")] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="expected shape"):
        s.aggregate(0, [ClientUpdate("a", 1, wrong, masks=masks, mask_changed=True)])


def test_initialize_copies():
    init = random_state(0)
    s = FedITStrategy()
    s.initialize(init)
    before = {k: t.clone() for k, t in init.items()}
    for t in init.values():
        t.add_(1.0)
    g = s.global_tensors
    assert all(torch.equal(g[k], before[k]) for k in before)
    for t in g.values():
        t.zero_()  # modifying the returned copy must not touch the server
    assert all(torch.equal(s.global_tensors[k], before[k]) for k in before)


# ---------------------------------------------------------------------- local


def test_local_strategy():
    s = LocalStrategy()
    init = random_state(0)
    s.initialize(init)
    inst = s.configure_client("a", 0)
    assert isinstance(inst, ClientInstruction) and inst.tensors is None and inst.mask is None
    assert s.aggregate(0, [ClientUpdate("a", 5, random_state(1)), ClientUpdate("b", 5, {})]) == {}
    assert all(torch.equal(s.global_tensors[k], init[k]) for k in init)
    assert s.client_options() == {}


# ---------------------------------------------------------------------- fedit / fedprox


def test_fedit_fedavg_hand_computed():
    k1, k2 = "x.lora_A.weight", "x.lora_B.weight"
    s = FedITStrategy()
    s.initialize({k1: torch.zeros(2, 2), k2: torch.zeros(3)})
    updates = [
        ClientUpdate("a", 1, {k1: torch.tensor([[1.0, 2.0], [3.0, 4.0]]), k2: torch.tensor([1.0, 0.0, -2.0])}),
        ClientUpdate("b", 3, {k1: torch.tensor([[5.0, 6.0], [7.0, 8.0]]), k2: torch.tensor([5.0, 4.0, 2.0])}),
    ]
    metrics = s.aggregate(0, updates)
    g = s.global_tensors
    assert torch.equal(g[k1], torch.tensor([[4.0, 5.0], [6.0, 7.0]]))
    assert torch.equal(g[k2], torch.tensor([4.0, 3.0, 1.0]))
    assert g[k1].dtype == torch.float32
    assert metrics["num_clients"] == 2 and metrics["num_examples"] == 4
    assert metrics["update_norm"] == pytest.approx((16 + 25 + 36 + 49 + 16 + 9 + 1) ** 0.5)

    inst = s.configure_client("c", 1)
    assert inst.mask is None and inst.config == {}
    assert torch.equal(inst.tensors[k1], g[k1])
    inst.tensors[k1].zero_()
    assert torch.equal(s.global_tensors[k1], g[k1])


def test_fedit_accepts_other_dtypes():
    s = FedITStrategy()
    s.initialize({"w": torch.zeros(2, dtype=torch.bfloat16)})
    assert s.global_tensors["w"].dtype == torch.float32
    s.aggregate(0, [ClientUpdate("a", 2, {"w": torch.tensor([1.0, 3.0], dtype=torch.float64)})])
    assert torch.equal(s.global_tensors["w"], torch.tensor([1.0, 3.0]))


def test_fedprox():
    s = FedProxStrategy()
    assert s.proximal_mu == 0.01
    assert s.client_options() == {"proximal_mu": 0.01}
    s = FedProxStrategy(proximal_mu=0)
    assert s.client_options() == {"proximal_mu": 0.0}
    s = FedProxStrategy(proximal_mu=0.2)
    s.initialize({"w": torch.zeros(2)})
    assert s.configure_client("a", 0).config == {"proximal_mu": 0.2}
    s.aggregate(0, [ClientUpdate("a", 1, {"w": torch.tensor([2.0, 0.0])}), ClientUpdate("b", 1, {"w": torch.ones(2)})])
    assert torch.equal(s.global_tensors["w"], torch.tensor([1.5, 0.5]))


# ---------------------------------------------------------------------- perfit


def brute_force_perfit(old, updates, masks):
    """Per-element loop straight from the formula."""
    out = {}
    for key, t in old.items():
        res = t.clone()
        flat = res.view(-1)
        for p in range(t.numel()):
            num = den = 0.0
            for u, m in zip(updates, masks, strict=True):
                if bool(m[key].reshape(-1)[p]):
                    num += u.num_examples * float(u.tensors[key].reshape(-1)[p])
                    den += u.num_examples
            if den > 0:
                flat[p] = num / den
        out[key] = res
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_perfit_matches_brute_force(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    init = random_state(seed)
    s = PerFITStrategy()
    s.initialize(init)
    num_clients = 5
    densities = [0.05, 0.1, 0.25, 0.3, 0.15]  # sparse enough that some elements have S_p empty
    masks = [random_masks(10 * seed + k, densities[k]) for k in range(num_clients)]
    updates = []
    for k in range(num_clients):
        t = random_state(1000 + 10 * seed + k)
        # garbage outside the mask must be ignored (even NaN)
        t = {key: torch.where(masks[k][key], v, torch.tensor(float("nan"))) for key, v in t.items()}
        n = int(torch.randint(1, 500, (1,), generator=gen))
        updates.append(ClientUpdate(f"c{k}", n, t, masks=masks[k], mask_changed=True))
    s.aggregate(0, updates)
    expected = brute_force_perfit(init, updates, masks)
    got = s.global_tensors
    covered_any = False
    empty_any = False
    for key in init:
        assert torch.allclose(got[key], expected[key], rtol=0, atol=1e-7), key
        empty = ~torch.stack([m[key] for m in masks]).any(0)
        assert torch.equal(got[key][empty], init[key][empty])  # S_p empty: exactly the last value
        empty_any |= bool(empty.any())
        covered_any |= bool((~empty).any())
    assert empty_any and covered_any


def test_perfit_empty_support_keeps_last_aggregated_value():
    key = "w.lora_A.weight"
    s = PerFITStrategy()
    s.initialize({key: torch.zeros(4)})
    m_all = {key: torch.ones(4, dtype=torch.bool)}
    s.aggregate(0, [ClientUpdate("a", 2, {key: torch.tensor([1.0, 2.0, 3.0, 4.0])}, masks=m_all, mask_changed=True)])
    m_half = {key: torch.tensor([True, False, True, False])}
    s.aggregate(1, [ClientUpdate("b", 1, {key: torch.tensor([9.0, 0.0, 9.0, 0.0])}, masks=m_half, mask_changed=True)])
    assert torch.equal(s.global_tensors[key], torch.tensor([9.0, 2.0, 9.0, 4.0]))


def test_perfit_downlink_is_personalized_and_exactly_zero_outside_mask():
    init = {k: -torch.rand(s) - 0.5 for k, s in SHAPES.items()}  # all negative: `θ·0` would give -0.0
    s = PerFITStrategy()
    s.initialize(init)
    masks = random_masks(3, 0.3)
    state = random_state(4)
    unknown = s.configure_client("a", 0)
    # before any aggregation θ_g is the seeded init: flagged, so nothing is sent (docs/perfit.md)
    assert unknown.mask is None and unknown.config == {"seeded_init": True} and downlink_bytes(unknown) == 0
    assert all(torch.equal(unknown.tensors[k], init[k]) for k in init)

    s.aggregate(0, [ClientUpdate("a", 7, masked(state, masks), masks=masks, mask_changed=True)])
    g = s.global_tensors
    inst = s.configure_client("a", 1)
    for k in SHAPES:
        assert torch.equal(inst.mask[k], masks[k])
        assert torch.equal(inst.tensors[k], torch.where(masks[k], g[k], 0.0))
        outside = inst.tensors[k][~masks[k]]
        assert bool((outside == 0).all()) and not bool(torch.signbit(outside).any())
        assert torch.equal(inst.tensors[k][masks[k]], state[k][masks[k]])
        # untouched elements keep the initial (negative) values on the server
        assert torch.equal(g[k][~masks[k]], init[k][~masks[k]])
    inst.mask[next(iter(SHAPES))].fill_(False)  # the instruction is a copy
    assert torch.equal(s.client_mask("a")[next(iter(SHAPES))], masks[next(iter(SHAPES))])
    other = s.configure_client("b", 1)  # joins after an aggregation: θ_g dense, sent in full
    assert other.mask is None and other.config == {} and downlink_bytes(other) == 4 * sum(g[k].numel() for k in g)


def test_perfit_mask_cache():
    s = PerFITStrategy()
    init = random_state(0)
    s.initialize(init)
    ma, mb = random_masks(1, 0.5), random_masks(2, 0.5)
    ta, tb = random_state(3), random_state(4)

    with pytest.raises(ValueError, match="'a' uploaded no mask"):
        s.aggregate(0, [ClientUpdate("a", 1, ta)])
    with pytest.raises(ValueError, match="mask_changed=True but uploaded no masks"):
        s.aggregate(0, [ClientUpdate("a", 1, ta, mask_changed=True)])
    # a failing round leaves the server untouched
    with pytest.raises(ValueError, match="'b' uploaded no mask"):
        s.aggregate(0, [ClientUpdate("a", 1, ta, masks=ma, mask_changed=True), ClientUpdate("b", 1, tb)])
    assert s.known_clients == []
    assert all(torch.equal(s.global_tensors[k], init[k]) for k in init)

    s.aggregate(0, [ClientUpdate("a", 1, ta, masks=ma, mask_changed=True)])
    s.aggregate(1, [ClientUpdate("b", 1, tb, masks=mb, mask_changed=True)])
    assert s.known_clients == ["a", "b"]
    # later uploads may omit the mask: the cached one is used
    ref = PerFITStrategy()
    ref.initialize(s.global_tensors)
    ta2, tb2 = masked(random_state(5), ma), masked(random_state(6), mb)
    metrics = s.aggregate(2, [ClientUpdate("a", 3, ta2), ClientUpdate("b", 1, tb2)])
    ref_metrics = ref.aggregate(
        2, [ClientUpdate("a", 3, ta2, masks=ma, mask_changed=True), ClientUpdate("b", 1, tb2, masks=mb)]
    )
    assert all(torch.equal(s.global_tensors[k], ref.global_tensors[k]) for k in SHAPES)
    assert metrics["num_new_masks"] == 0 and ref_metrics["num_new_masks"] == 1
    assert {k: v for k, v in metrics.items() if k != "num_new_masks"} == {
        k: v for k, v in ref_metrics.items() if k != "num_new_masks"
    }
    # a new mask replaces the cached one
    mc = random_masks(7, 0.2)
    s.aggregate(3, [ClientUpdate("a", 1, masked(ta, mc), masks=mc, mask_changed=True)])
    assert all(torch.equal(s.client_mask("a")[k], mc[k]) for k in SHAPES)


def test_perfit_bad_mask_shape():
    s = PerFITStrategy()
    s.initialize(random_state(0))
    masks = random_masks(1, 0.5)
    masks[P.format(0, "q", "A")] = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="expected shape"):
        s.aggregate(0, [ClientUpdate("a", 1, random_state(1), masks=masks, mask_changed=True)])


def test_perfit_research_rounds():
    s = PerFITStrategy(research_every=3)
    s.initialize(random_state(0))
    m = random_masks(1, 0.4)
    s.aggregate(0, [ClientUpdate("a", 1, masked(random_state(1), m), masks=m, mask_changed=True)])
    research = [r for r in range(10) if s.configure_client("a", r).config.get("research")]
    assert research == [3, 6, 9]
    inst = s.configure_client("a", 6)
    assert inst.mask is None
    assert all(torch.equal(inst.tensors[k], s.global_tensors[k]) for k in SHAPES)  # dense θ_g to search from
    assert s.configure_client("a", 4).mask is not None
    never = PerFITStrategy()
    never.initialize(random_state(0))
    assert not any(never.configure_client("a", r).config.get("research") for r in range(10))


def test_perfit_overlap_metrics_hand_example():
    key = "w.lora_A.weight"
    rows = [
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 1, 0, 0],
        [1, 0, 0, 0, 0, 0, 0, 1],
    ]
    s = PerFITStrategy()
    s.initialize({key: torch.zeros(2, 4)})
    updates = [
        ClientUpdate(
            f"c{i}", 1, {key: torch.ones(2, 4)}, masks={key: torch.tensor(r).bool().view(2, 4)}, mask_changed=True
        )
        for i, r in enumerate(rows)
    ]
    metrics = s.aggregate(0, updates)
    # per-element counts: [3, 2, 1, 1, 1, 1, 0, 1]
    assert metrics["shared_fraction"] == 2 / 8
    assert metrics["exclusive_fraction"] == 5 / 8
    # pairs: |∧|/|∨| = 2/6, 1/5, 1/5
    assert metrics["mask_jaccard"] == pytest.approx((1 / 3 + 1 / 5 + 1 / 5) / 3, abs=1e-12)
    assert metrics["mean_density"] == pytest.approx((4 + 4 + 2) / 3 / 8, abs=1e-12)
    assert metrics["num_clients"] == 3 and metrics["num_examples"] == 3 and metrics["num_new_masks"] == 3

    single = s.aggregate(1, updates[:1])
    assert single["mask_jaccard"] == 1.0
    assert single["shared_fraction"] == 0.0 and single["exclusive_fraction"] == 4 / 8


def test_perfit_metrics_several_keys_and_chunked_gram(monkeypatch):
    s = PerFITStrategy()
    s.initialize(random_state(0))
    masks = [random_masks(k, 0.3 + 0.1 * k) for k in range(4)]
    updates = [
        ClientUpdate(f"c{k}", 1, masked(random_state(k), m), masks=m, mask_changed=True) for k, m in enumerate(masks)
    ]
    flat = [torch.cat([m[k].flatten() for k in SHAPES]) for m in masks]
    counts = torch.stack(flat).sum(0)
    total = counts.numel()
    jac = [float((a & b).sum()) / float((a | b).sum()) for a, b in itertools.combinations(flat, 2)]

    metrics = s.aggregate(0, updates)
    assert metrics["shared_fraction"] == int((counts >= 2).sum()) / total
    assert metrics["exclusive_fraction"] == int((counts == 1).sum()) / total
    assert metrics["mask_jaccard"] == pytest.approx(sum(jac) / len(jac), abs=1e-12)

    monkeypatch.setattr(perfit_module, "_GRAM_CHUNK", 7)
    s2 = PerFITStrategy()
    s2.initialize(random_state(0))
    assert s2.aggregate(0, updates) == metrics


def test_perfit_jaccard_of_empty_masks():
    key = "w"
    s = PerFITStrategy()
    s.initialize({key: torch.zeros(3)})
    empty = {key: torch.zeros(3, dtype=torch.bool)}
    m = s.aggregate(0, [ClientUpdate(c, 1, {key: torch.ones(3)}, masks=empty, mask_changed=True) for c in "ab"])
    assert m["mask_jaccard"] == 1.0 and m["shared_fraction"] == 0.0
    assert torch.equal(s.global_tensors[key], torch.zeros(3))


# ---------------------------------------------------------------------- checkpoint / resume


def save_and_load(strategy: Strategy, tmp_path) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = strategy.state_dict()
    path = tmp_path / "state.safetensors"
    save_file(tensors, str(path))
    return load_file(str(path)), json.loads(json.dumps(meta))


def test_perfit_state_dict_round_trip(tmp_path):
    s = PerFITStrategy(research_every=2)
    s.initialize(random_state(0))
    ids = ["client/0", "b", "c"]  # a '/' in an id must not confuse the key layout
    masks = {cid: random_masks(i, 0.3) for i, cid in enumerate(ids)}
    s.aggregate(
        0,
        [
            ClientUpdate(cid, 5 + i, masked(random_state(10 + i), masks[cid]), masks=masks[cid], mask_changed=True)
            for i, cid in enumerate(ids)
        ],
    )
    tensors, meta = save_and_load(s, tmp_path)
    assert any(k.startswith("global/") for k in tensors) and any(k.startswith("mask/client/0/") for k in tensors)
    assert meta["strategy"] == "perfit" and meta["last_round"] == 0

    r = get_strategy(meta["strategy"], **meta["options"])
    r.load_state_dict(tensors, meta)
    assert r.known_clients == s.known_clients and r.last_round == 0
    for k in SHAPES:
        assert torch.equal(r.global_tensors[k], s.global_tensors[k])
        for cid in ids:
            assert torch.equal(r.client_mask(cid)[k], s.client_mask(cid)[k])
            assert r.client_mask(cid)[k].dtype == torch.bool
    t2, m2 = r.state_dict()
    assert m2 == meta and set(t2) == set(tensors) and all(torch.equal(t2[k], tensors[k]) for k in tensors)

    # resumed and original continue identically (cached masks included)
    nxt = [ClientUpdate(cid, 3, masked(random_state(20 + i), masks[cid])) for i, cid in enumerate(ids[:2])]
    assert r.aggregate(1, nxt) == s.aggregate(1, nxt)
    assert all(torch.equal(r.global_tensors[k], s.global_tensors[k]) for k in SHAPES)
    inst_r, inst_s = r.configure_client("c", 3), s.configure_client("c", 3)
    assert all(torch.equal(inst_r.tensors[k], inst_s.tensors[k]) for k in SHAPES)


@pytest.mark.parametrize("name", ["local", "fedit", "fedprox"])
def test_state_dict_round_trip_simple(name, tmp_path):
    s = get_strategy(name)
    s.initialize(random_state(0))
    s.aggregate(4, [ClientUpdate("a", 2, random_state(1)), ClientUpdate("b", 1, random_state(2))])
    tensors, meta = save_and_load(s, tmp_path)
    r = get_strategy(name)
    r.load_state_dict(tensors, meta)
    assert r.last_round == 4
    assert all(torch.equal(r.global_tensors[k], s.global_tensors[k]) for k in SHAPES)


def test_state_dict_uninitialized_and_errors(tmp_path):
    s = PerFITStrategy()
    tensors, meta = s.state_dict()
    assert tensors == {} and meta["keys"] is None
    r = PerFITStrategy()
    r.load_state_dict(tensors, meta)
    assert not r.is_initialized

    s.initialize(random_state(0))
    tensors, meta = save_and_load(s, tmp_path)
    with pytest.raises(ValueError, match="saved by strategy 'perfit'"):
        FedITStrategy().load_state_dict(tensors, meta)
    with pytest.raises(ValueError, match="options"):
        PerFITStrategy(research_every=5).load_state_dict(tensors, meta)
    missing = dict(tensors)
    missing.pop(next(iter(missing)))
    with pytest.raises(ValueError, match="missing tensor"):
        PerFITStrategy().load_state_dict(missing, meta)
