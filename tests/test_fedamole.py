"""FedAMoLE: the MoLE adapter (router, balance loss, save/load), RSEA expert assignment, the server's per-expert
aggregation, and a tiny federated run end to end."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from hf_perfit.federated.comm import downlink_bytes, uplink_bytes
from hf_perfit.federated.messages import ClientUpdate
from hf_perfit.federated.simulation import FederatedConfig, FederatedSimulation
from hf_perfit.federated.strategies import get_strategy
from hf_perfit.mole import (
    MoLEConfig,
    MoLEModel,
    architecture_markdown,
    assignment_error,
    balance_loss,
    expert_client_scores,
    route,
    selection_probabilities,
    solve_assignment,
)
from hf_perfit.mole.keys import NUM_TOKENS_KEY, expert_key, expert_mean_key, shared_key, token_mean_key

from .conftest import CPU_FP32, build_tokenizer, tiny_llama
from .test_simulation import _cfg, _clients

Q0 = "model.layers.0.self_attn.q_proj"


def _mole(num_experts=4, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = MoLEConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], num_experts=num_experts, **kw)
    return MoLEModel(tiny_llama(), cfg)


# ---------------------------------------------------------------------- RSEA assignment


def _brute_force(p, k, lo, hi):
    e, c = p.shape
    best = -math.inf
    for bits in itertools.product((0, 1), repeat=e * c):
        x = np.array(bits).reshape(e, c)
        if (x.sum(1) == k).all() and (lo <= x.sum(0)).all() and (x.sum(0) <= hi).all():
            best = max(best, float((p * x).sum()))
    return best


@pytest.mark.parametrize("e,c,k,lo,hi", [(3, 3, 2, 1, 3), (3, 3, 1, 1, 1), (4, 3, 1, 1, 2), (3, 4, 2, 1, 2)])
def test_assignment_satisfies_constraints_and_is_optimal(e, c, k, lo, hi):
    rng = np.random.default_rng(e * 100 + c * 10 + k)
    for _ in range(6):
        p = selection_probabilities(rng.normal(size=(e, c)) * 2)
        x = solve_assignment(p, k, lo, hi)
        assert x.dtype == bool and x.shape == (e, c)
        assert (x.sum(1) == k).all() and (x.sum(0) >= lo).all() and (x.sum(0) <= hi).all()
        assert float((p * x).sum()) == pytest.approx(_brute_force(p, k, lo, hi), abs=1e-9)


def test_scores_are_the_scaled_dot_product_and_softmax_runs_over_clients():
    e, t = np.array([[1.0, 0.0], [0.5, 2.0]]), np.array([[2.0, 1.0], [0.0, -1.0], [1.0, 1.0]])
    s = expert_client_scores(e, t, rank=2)
    assert s[1, 0] == pytest.approx((0.5 * 2 + 2.0 * 1) / math.sqrt(2))
    p = selection_probabilities(s)
    assert np.allclose(p.sum(1), 1.0) and p.shape == (2, 3)
    assert p[0, 0] == pytest.approx(math.exp(s[0, 0]) / np.exp(s[0]).sum())


def test_infeasible_assignment_names_the_fields():
    assert assignment_error(30, 8, 2, 2, 8) is None
    msg = assignment_error(4, 8, 2, 2, 8)  # 8 slots for 8 clients needing >= 2
    assert "experts_per_client_min" in msg and "num_experts" in msg
    assert "experts_per_client_max" in assignment_error(30, 4, 2, 2, 8)  # 60 slots, at most 32
    assert "clients_per_expert" in assignment_error(5, 2, 3, 1, 8)
    with pytest.raises(ValueError, match="experts_per_client_min"):
        solve_assignment(np.ones((2, 4)) / 4, 1, 1, 2)
    with pytest.raises(ValueError, match=r"strategy=fedamole with 8 clients per round: .*num_experts"):
        FederatedConfig(strategy="fedamole", num_clients=8, num_experts=4)
    with pytest.raises(ValueError, match="2 clients per round"):  # the per-round sample decides, not num_clients
        FederatedConfig(strategy="fedamole", num_clients=8, fraction_clients=0.25, num_experts=30)
    with pytest.raises(ValueError, match="mole_top_k"):
        FederatedConfig(strategy="fedamole", mole_top_k=0)
    with pytest.raises(ValueError, match="balance_loss_coef"):
        FederatedConfig(strategy="fedamole", balance_loss_coef=-1.0)
    with pytest.raises(ValueError, match="experts_per_client_min=3 > experts_per_client_max=2"):
        get_strategy("fedamole", experts_per_client_min=3, experts_per_client_max=2)
    with pytest.raises(ValueError, match="clients_per_expert"):
        get_strategy("fedamole", clients_per_expert=0)


# ---------------------------------------------------------------------- router and balance loss


def test_router_renormalizes_the_top2_of_a_softmax_over_the_held_experts():
    g = torch.Generator().manual_seed(0)
    h, t = torch.randn(5, 4, 3, generator=g), torch.randn(5, 3, generator=g)
    z, gates = route(h, t, top_k=2)
    assert torch.allclose(z, torch.einsum("nkr,nr->nk", h, t) / math.sqrt(3))
    p = torch.softmax(z, -1)
    top = p.topk(2, dim=-1)
    expected = torch.zeros_like(p).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    assert torch.allclose(gates, expected, atol=1e-6)
    assert ((gates > 0).sum(-1) == 2).all()
    _, one = route(h[:, :1], t, top_k=2)  # a module holding one expert uses it with weight 1
    assert torch.equal(one, torch.ones(5, 1))


def test_balance_loss_on_a_hand_computed_example():
    # 3 tokens, 2 experts, top-1: tokens 0 and 1 choose expert 0, token 2 chooses expert 1
    z = torch.tensor([[math.log(3.0), 0.0], [0.0, -math.log(3.0)], [0.0, math.log(3.0)]], requires_grad=True)
    # p(token) = [.75, .25], [.75, .25], [.25, .75]  ->  P̄ = [7/12, 5/12], f = [2/3, 1/3]
    loss = balance_loss(z, top_k=1)
    assert loss.item() == pytest.approx(2 * (2 / 3 * 7 / 12 + 1 / 3 * 5 / 12))
    # padding (weight 0) on token 2: P̄ = [.75, .25], f = [1, 0]
    assert balance_loss(z, 1, torch.tensor([1.0, 1.0, 0.0])).item() == pytest.approx(2 * 0.75)
    # top-2 of 2 experts: f = [.5, .5] whatever the scores, so L = 2 · .5 · Σ P̄ = 1
    assert balance_loss(z, 2).item() == pytest.approx(1.0)
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


# ---------------------------------------------------------------------- the MoLE model


def test_layer_output_is_shared_plus_top2_mixture_of_assigned_experts():
    model = _mole(init_weights=False)
    model.set_active_experts([1, 3])
    model.eval()  # no expert-input dropout (test_expert_input_dropout_as_the_authors covers training mode)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 16)
    a = "default"
    s = 4 / 2
    base = layer.base_layer(x)
    shared = x @ layer.mole_shared_A[a].T @ layer.mole_shared_B[a].T
    t = x @ layer.mole_P[a].T
    h = torch.stack([x @ layer.mole_expert_A[a][str(j)].T for j in (1, 3)], dim=-2)
    z = (h * t[..., None, :]).sum(-1) / math.sqrt(2)
    p = torch.softmax(z, -1)  # two held experts: top-2 keeps both
    experts = sum(p[..., i : i + 1] * (h[..., i, :] @ layer.mole_expert_B[a][str(j)].T) for i, j in enumerate((1, 3)))
    with torch.no_grad():
        assert torch.allclose(layer(x), base + s * (shared + experts), atol=1e-6)


def test_forward_touches_only_the_assigned_experts():
    model = _mole(init_weights=False)
    tensors, masks, meta = model.get_adapter_state()
    assert masks == {} and meta["experts"][Q0] == [0, 1, 2, 3]
    # what a server instruction carries: shared tensors and P of every module, plus experts 0 and 2
    assigned = {k: v for k, v in tensors.items() if ".mole_expert_" not in k or k.endswith((".0", ".2"))}
    model.set_adapter_state(assigned, None, meta)
    assert all(ids == [0, 2] for ids in model.active_experts().values())
    assert model.density() < 1.0
    x = torch.randint(3, 100, (2, 9))
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    params = model.lora_parameters()
    for name in model.module_names:
        for j in range(4):
            grad = params[expert_key(name, "expert_A", j)].grad
            assert (grad is not None) == (j in (0, 2)), (name, j)
        assert params[shared_key(name, "P")].grad is not None
    model.eval()
    with torch.no_grad():
        before = model(x).logits
        params[expert_key(Q0, "expert_B", 1)].add_(1.0)  # an unassigned expert: no effect
        params[expert_key(Q0, "expert_A", 3)].mul_(-5.0)
        assert torch.equal(model(x).logits, before)
        params[expert_key(Q0, "expert_B", 0)].add_(1.0)  # an assigned one: changes the output
        assert not torch.allclose(model(x).logits, before)
    state, _, _ = model.get_adapter_state()
    assert set(state) == set(assigned)


def test_adapter_state_is_checked():
    model = _mole()
    tensors, _, _ = model.get_adapter_state()
    with pytest.raises(ValueError, match="shared tensors"):
        model.set_adapter_state({k: v for k, v in tensors.items() if "mole_P" not in k})
    with pytest.raises(ValueError, match="both expert_A and expert_B"):
        model.set_adapter_state({k: v for k, v in tensors.items() if k != expert_key(Q0, "expert_B", 1)})
    with pytest.raises(ValueError, match="no element masks"):
        model.set_adapter_state(tensors, {"x": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="not a tensor of this MoLE adapter"):
        model.set_adapter_state({**tensors, expert_key(Q0, "expert_A", 9): torch.zeros(2, 16)})
    with pytest.raises(ValueError, match="not held"):
        model.set_active_experts([7])


def test_balance_loss_and_statistics_of_a_training_forward():
    model = _mole(init_weights=False, balance_loss_coef=0.5, lora_dropout=0.0)  # dropout off: exact LM loss below
    model.set_active_experts([0, 1, 3])
    x = torch.randint(3, 100, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    model.train()
    plain = model(input_ids=x, attention_mask=mask)  # no labels: kept for auxiliary_loss()
    aux = model.auxiliary_loss()
    assert plain.loss is None and aux is not None and aux.requires_grad
    assert model.auxiliary_loss() is None  # handed out once
    inputs = {}  # the same forward by hand: sum over layers of the masked balance loss

    def keep_input(name):
        def hook(module, args, output):
            inputs[name] = args[0]  # returns None: the output is left alone

        return hook

    hooks = [layer.register_forward_hook(keep_input(name)) for name, layer in model._layers.items()]
    model.eval()
    with torch.no_grad():
        model(input_ids=x, attention_mask=mask)
    for hook in hooks:
        hook.remove()
    records = []
    for name, layer in model._layers.items():
        xin = inputs[name]
        h = torch.stack([xin @ layer.mole_expert_A["default"][str(j)].T for j in (0, 1, 3)], dim=-2)
        t = xin @ layer.mole_P["default"].T
        z, _ = route(h, t, 2)
        records.append((balance_loss(z, 2, mask.float()), t, h))
    expected = 0.5 * torch.stack([r[0] for r in records]).sum()
    assert aux.item() == pytest.approx(expected.item(), rel=1e-5)
    # summed over the MoLE layers, as the authors' code accumulates it: not the mean (len(records)x smaller)
    assert len(records) == 4 and aux.item() > 0.5 * 3.5 * min(r[0].item() for r in records)
    extras = model.client_extras()
    assert extras[NUM_TOKENS_KEY].item() == 10  # the two padding tokens do not count
    w = mask.float()[..., None]
    t, h = records[0][1], records[0][2]
    assert torch.allclose(extras[token_mean_key(Q0)], (t * w).sum((0, 1)) / 10, atol=1e-6)
    assert torch.allclose(extras[expert_mean_key(Q0, 3)], (h[..., 2, :] * w).sum((0, 1)) / 10, atol=1e-6)
    assert expert_mean_key(Q0, 2) not in extras  # not active, no statistic
    model.train()
    out = model(input_ids=x, attention_mask=mask, labels=x)  # with labels the loss includes it
    assert model.auxiliary_loss() is None
    with torch.no_grad():
        model.eval()
        lm = model(input_ids=x, attention_mask=mask, labels=x).loss
    assert out.loss.item() == pytest.approx(lm.item() + aux.item(), rel=1e-5)
    model.set_adapter_state(model.get_adapter_state()[0])
    assert model.client_extras() == {}  # a new client round starts fresh statistics


def test_expert_input_dropout_as_the_authors():
    """lora_dropout (default 0.05, the authors' value) acts on the experts' input during training only; the router
    scores the undropped input. A deterministic stand-in for the dropout (x -> 2x) makes both exact."""
    assert MoLEConfig().lora_dropout == 0.05
    with pytest.raises(ValueError, match="lora_dropout"):
        MoLEConfig(lora_dropout=1.0)
    model = _mole(init_weights=False)
    model.set_active_experts([0, 1, 3])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.mole_dropout["default"], torch.nn.Dropout) and layer.mole_dropout["default"].p == 0.05
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        model.eval()
        base = layer.base_layer(x)
        eval_out = layer(x)
        model.train()
        torch.manual_seed(0)
        assert not torch.allclose(layer(x), eval_out)  # training: the experts see a dropped input

        class Double(torch.nn.Module):
            def forward(self, x):
                return 2 * x

        layer.mole_dropout["default"] = Double()
        # experts on 2x, gates from x: exactly twice the adapter's eval output (gates from 2x would differ)
        assert torch.allclose(layer(x) - base, 2 * (eval_out - base), atol=1e-6)


def test_fedamole_evaluates_the_locally_trained_model_as_the_authors():
    from hf_perfit.federated.strategies.fedamole import FedAMoLEStrategy

    assert FedAMoLEStrategy.evaluate_local_model is True


def test_save_and_load_give_identical_logits(tmp_path):
    import hf_perfit  # noqa: F401  (registers the MOLE PEFT type; what a user of a pushed adapter imports)

    model = _mole(init_weights=False)
    model.set_active_experts({name: ([0, 2] if "q_proj" in name else [3]) for name in model.module_names})
    model.eval()
    x = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        ours = model(x).logits
    model.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "MOLE" and cfg["held_experts"][Q0] == [0, 2]
    card = architecture_markdown(cfg)  # what a client's model card states
    assert f"| `{Q0}` | 0, 2 | 2 |" in card and "holds 6 of the 16 domain experts" in card
    assert cfg["held_experts"]["model.layers.1.self_attn.v_proj"] == [3]
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert set(weights) == set(model.get_adapter_state()[0])  # shared, P and the held experts only
    assert model.mole_config.held_experts is None  # the federated model still holds the whole pool
    plain = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    again = MoLEModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    assert again.held_experts()[Q0] == [0, 2] and again.active_experts()[Q0] == [0, 2]
    with torch.no_grad():
        assert torch.equal(plain(x).logits, ours)
        assert torch.equal(again(x).logits, ours)
        with model.disable_adapter():
            base = model(x).logits
        assert torch.allclose(base, tiny_llama().eval()(x).logits)


def test_balance_loss_gradient_is_the_same_under_gradient_checkpointing():
    grads = []
    for checkpointing in (False, True):
        model = _mole(init_weights=False, balance_loss_coef=1.0)
        if checkpointing:  # TRL's default; the layers are re-run during backward
            model.base_model.model.gradient_checkpointing_enable()
        model.train()
        x = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
        model(input_ids=x, attention_mask=torch.ones_like(x))
        model.auxiliary_loss().backward()
        grads.append(model.lora_parameters()[shared_key(Q0, "P")].grad.clone())
        assert model.client_extras()[NUM_TOKENS_KEY].item() == 16  # recomputation records nothing twice
    assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])


def test_4bit_base(tmp_path):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    tiny_llama(hidden=64).save_pretrained(tmp_path / "base")  # bitsandbytes quantizes in blocks of 64
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant, device_map="cpu")
    x = torch.randint(3, 100, (2, 8))
    with torch.no_grad():
        ref = base(x).logits.clone()
    model = MoLEModel(base, MoLEConfig(r=2, target_modules=["q_proj", "v_proj"], num_experts=3))
    with torch.no_grad():
        assert (model(x).logits - ref).abs().max().item() <= 1e-6  # B = 0: starts at the base model
    model.train()  # undoes the CPU inference packing of the eval forwards, whose kernel has no backward
    model(input_ids=x, labels=x).loss.backward()
    assert model.lora_parameters()[shared_key(Q0, "shared_B")].grad.abs().sum() > 0  # reaches layer 0


# ---------------------------------------------------------------------- server: aggregation and assignment


def _global(modules=("m0", "m1"), e=3, r=2, d_in=3, d_out=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        out[shared_key(m, "shared_A")] = torch.randn(r, d_in, generator=g)
        out[shared_key(m, "shared_B")] = torch.randn(d_out, r, generator=g)
        out[shared_key(m, "P")] = torch.randn(r, d_in, generator=g)
        for j in range(e):
            out[expert_key(m, "expert_A", j)] = torch.randn(r, d_in, generator=g)
            out[expert_key(m, "expert_B", j)] = torch.randn(d_out, r, generator=g)
    return out


def _upload(glob, cid, n, experts, value, extras=None):
    keys = [k for k in glob if ".mole_expert_" not in k]
    keys += [k for k in glob if ".mole_expert_" in k and int(k.rsplit(".", 1)[1]) in experts]
    return ClientUpdate(cid, n, {k: torch.full_like(glob[k], value) for k in keys}, extra_tensors=extras or {})


def test_aggregation_averages_shared_over_all_and_each_expert_over_its_holders():
    glob = _global(e=4)
    s = get_strategy("fedamole", clients_per_expert=1, experts_per_client_min=1, experts_per_client_max=3)
    s.initialize(glob)
    updates = [_upload(glob, "a", 1, {0, 1}, 1.0), _upload(glob, "b", 3, {1}, 5.0), _upload(glob, "c", 4, {2}, -2.0)]
    metrics = s.aggregate(0, updates)
    new = s.global_tensors
    for m in ("m0", "m1"):
        for kind in ("shared_A", "shared_B", "P"):  # (1·1 + 3·5 + 4·(−2)) / 8 = 1
            assert torch.allclose(new[shared_key(m, kind)], torch.full_like(glob[shared_key(m, kind)], 1.0))
        for kind in ("expert_A", "expert_B"):
            assert torch.allclose(new[expert_key(m, kind, 0)], torch.ones_like(glob[expert_key(m, kind, 0)]))
            assert torch.allclose(new[expert_key(m, kind, 1)], torch.full_like(glob[expert_key(m, kind, 1)], 4.0))
            assert torch.allclose(new[expert_key(m, kind, 2)], torch.full_like(glob[expert_key(m, kind, 2)], -2.0))
            assert torch.equal(new[expert_key(m, kind, 3)], glob[expert_key(m, kind, 3)])  # held by nobody
    assert metrics["experts_trained_fraction"] == 0.75 and metrics["num_examples"] == 8.0
    # the personalized adapter: global shared/P plus the global values of the client's own experts
    pers = s.personalized_tensors("b", updates[1].tensors)
    assert set(pers) == set(updates[1].tensors) and torch.allclose(
        pers[expert_key("m0", "expert_A", 1)], new[expert_key("m0", "expert_A", 1)]
    )


def test_configure_round_assigns_within_constraints_and_sends_only_assigned_experts():
    glob = _global(e=3)
    s = get_strategy("fedamole", clients_per_expert=2, experts_per_client_min=1, experts_per_client_max=3, seed=5)
    s.initialize(glob)
    clients = ["a", "b", "c"]
    s.configure_round(0, clients)
    first = s.assignment()
    s.configure_round(0, clients)
    assert s.assignment() == first  # round 0 is random, but seeded by (seed, round)
    for m in s.modules:
        counts = {j: sum(j in first[c][m] for c in clients) for j in range(3)}
        assert all(v == 2 for v in counts.values())
        assert all(1 <= len(first[c][m]) <= 3 for c in clients)
    instr = s.configure_client("a", 0)
    expected = {k for k in glob if ".mole_expert_" not in k}
    expected |= {expert_key(m, kind, j) for m in s.modules for j in first["a"][m] for kind in ("expert_A", "expert_B")}
    assert set(instr.tensors) == expected
    assert downlink_bytes(instr) == 4 * sum(glob[k].numel() for k in expected)
    wrong = _upload(glob, "a", 2, set(), 0.0)  # shared tensors only: not the assigned experts
    with pytest.raises(ValueError, match="differ from its assignment"):
        s.aggregate(0, [wrong])
    with pytest.raises(RuntimeError, match="configure_round"):
        s.configure_client("a", 1)
    with pytest.raises(ValueError, match="clients_per_expert=2 but only 1 clients"):
        s.configure_round(1, ["a"])


def _stats(r_vec_by_module, experts_by_module, n_tokens=10.0):
    extras = {NUM_TOKENS_KEY: torch.tensor([n_tokens])}
    for m, vec in r_vec_by_module.items():
        extras[token_mean_key(m)] = torch.tensor(vec)
        for j, ev in experts_by_module.get(m, {}).items():
            extras[expert_mean_key(m, j)] = torch.tensor(ev)
    return extras


def test_rsea_follows_the_uploaded_embeddings_and_resumes_exactly():
    glob = _global(modules=("m0",), e=2)
    s = get_strategy("fedamole", clients_per_expert=1, experts_per_client_min=1, experts_per_client_max=1)
    s.initialize(glob)
    s.configure_round(0, ["a", "b"])
    given = s.assignment()
    # client a's tokens point along +x, b's along +y; expert 0 looks like +y, expert 1 like +x (scaled up so that
    # the softmax over clients is decisive)
    emb = {0: [0.0, 8.0], 1: [8.0, 0.0]}
    ups = []
    for cid, tvec in (("a", [1.0, 0.0]), ("b", [0.0, 1.0])):
        held = given[cid]["m0"]
        ups.append(_upload(glob, cid, 5, set(held), 0.1, _stats({"m0": tvec}, {"m0": {j: emb[j] for j in held}})))
    metrics = s.aggregate(0, ups)
    assert metrics["clients_with_statistics"] == 2.0
    s.configure_round(1, ["a", "b"])
    assert s.assignment() == {"a": {"m0": [1]}, "b": {"m0": [0]}}
    # checkpoint/resume: a restored server makes the same next assignment
    tensors, meta = s.state_dict()
    restored = get_strategy("fedamole", **meta["options"])
    restored.load_state_dict(tensors, json.loads(json.dumps(meta)))
    assert restored.assignment() == s.assignment()
    for r in (2, 3):
        s.configure_round(r, ["a", "b"])
        restored.configure_round(r, ["a", "b"])
        assert restored.assignment() == s.assignment()
    assert all(torch.equal(restored.global_tensors[k], v) for k, v in s.global_tensors.items())
    bad = _upload(
        glob,
        "a",
        5,
        set(s.assignment()["a"]["m0"]),
        0.1,
        _stats({"m0": [1.0, 0.0]}, {"m0": {1 - s.assignment()["a"]["m0"][0]: [1.0, 1.0]}}),
    )
    with pytest.raises(ValueError, match="did not hold"):
        s.aggregate(3, [bad])


# ---------------------------------------------------------------------- end to end


def test_tiny_federated_run_exports_reloadable_client_adapters(tmp_path):
    import hf_perfit  # noqa: F401

    kw = dict(num_experts=4, clients_per_expert=2, experts_per_client_min=1, experts_per_client_max=4)
    kw.update(CPU_FP32)  # the run's model is compared with a plain-PEFT load on the CPU to 1e-5 (conftest.CPU_FP32)
    summary = FederatedSimulation(
        _cfg(tmp_path, "fedamole", **kw), model=tiny_llama(), tokenizer=build_tokenizer(), clients=_clients()
    ).run()
    out = tmp_path / "fedamole"
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    per_client = [r for r in records if "client" in r and r["round"] >= 0]
    assert len(per_client) == 6 and all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in per_client)
    assert summary["round"] == 1 and summary["mean_perplexity"] > 0
    assert summary["experts_trained_fraction"] == 1.0 and summary["clients_with_statistics"] == 3.0
    # a client downloads only the shared expert, P and its experts: less than the whole pool
    sim = FederatedSimulation(
        _cfg(tmp_path, "fedamole", resume=True, **kw),
        model=tiny_llama(),
        tokenizer=build_tokenizer(),
        clients=_clients(),
    )
    pool_bytes = 4 * sum(t.numel() for t in sim.init_tensors.values())
    assert all(r["bytes_down"] < pool_bytes for r in per_client)
    batch = torch.randint(3, 100, (2, 10))
    for c in ("client_0", "client_2"):
        folder = out / "clients" / c / "adapter"
        cfg = json.loads((folder / "adapter_config.json").read_text())
        sim._personalize(c, 1)
        assert cfg["held_experts"] == sim.model.active_experts()
        assert all(1 <= len(ids) <= 4 for ids in cfg["held_experts"].values())
        with torch.no_grad():
            ours = sim.model.eval()(batch).logits  # eval: no expert-input dropout
            plain = PeftModel.from_pretrained(tiny_llama(), folder).eval()(batch).logits
        assert (ours - plain).abs().max().item() <= 1e-5
    # uplink = the trained tensors plus the RSEA statistics
    tensors, _, _ = sim.model.get_adapter_state()
    up = ClientUpdate("x", 1, tensors, extra_tensors={NUM_TOKENS_KEY: torch.ones(1)})
    assert uplink_bytes(up) == 4 * (sum(t.numel() for t in tensors.values()) + 1)


def test_fedamole_recipe_parses():
    from hf_perfit.cli import parse_federate_args

    cfg = parse_federate_args(["--config", "recipes/smollm2-135m/fedamole/config_flan8.yaml"])
    assert cfg.strategy == "fedamole" and cfg.num_experts == 30
    assert isinstance(cfg.adapter_config(), MoLEConfig)
    assert cfg.resolved_strategy_options()["clients_per_expert"] == cfg.clients_per_expert


def test_recipe_uses_the_authors_defaults():
    import yaml

    from hf_perfit.federated.config import FederatedConfig as Config

    recipe = yaml.safe_load(open("recipes/smollm2-135m/fedamole/config_flan8.yaml", encoding="utf-8"))
    cfg = Config.from_dict(recipe)
    official = {
        "lora_r": 8,
        "lora_alpha": 16,
        "num_experts": 30,
        "clients_per_expert": 2,
        "experts_per_client_min": 2,
        "experts_per_client_max": 8,
        "mole_top_k": 2,
        "balance_loss_coef": 0.001,
        "learning_rate": 5e-5,
        "lr_decay_per_round": 0.99,
    }
    assert {k: getattr(cfg, k) for k in official} == official
    adapter = cfg.adapter_config()
    assert adapter.lora_dropout == 0.05 and adapter.r == 8 and adapter.num_experts == 30


def test_learning_rate_decays_per_round(tmp_path, monkeypatch):
    """lr_decay_per_round: round t trains with learning_rate · decay^t (the authors' 5e-5 · 0.99^t)."""
    import hf_perfit.federated.client as client_mod

    with pytest.raises(ValueError, match="lr_decay_per_round"):
        _cfg(tmp_path, "fedit", lr_decay_per_round=0.0)
    seen = []
    real = client_mod.train_client

    def spy(model, tokenizer, train_ds, args, *a, **kw):
        seen.append(args.learning_rate)
        return real(model, tokenizer, train_ds, args, *a, **kw)

    monkeypatch.setattr(client_mod, "train_client", spy)
    cfg = _cfg(tmp_path, "fedit", num_rounds=3, lr_decay_per_round=0.5, fraction_clients=1 / 3)
    FederatedSimulation(cfg, model=tiny_llama(), tokenizer=build_tokenizer(), clients=_clients()).run()
    assert seen == [5e-3, 5e-3 * 0.5, 5e-3 * 0.25]
