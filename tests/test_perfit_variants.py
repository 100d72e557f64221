"""PerFIT's named variants of issue 18: `perfit_pb` (strategy option `personal_b`: only the LoRA A matrices are
aggregated, every client keeps its own B) and `perfit_ft` (PerFIT, then `finetune_steps` of local fine-tuning of
each client's masked adapter), on pure tensors and through the in-process simulation of the tiny Llama."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from peft import PeftModel

from hf_perfit.federated.client import selection_split
from hf_perfit.federated.messages import OWN_B, PERSONAL, SELECT_B, ClientUpdate, is_personal_key
from hf_perfit.federated.simulation import FederatedConfig, FederatedSimulation
from hf_perfit.federated.strategies import PerFITStrategy

from .conftest import CPU_FP32, build_tokenizer, tiny_llama
from .test_simulation import _cfg as _sim_cfg
from .test_simulation import _clients

A, B = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"


def _state(a: list[float], b: list[float]) -> dict[str, torch.Tensor]:
    return {A: torch.tensor(a), B: torch.tensor(b)}


def _pb() -> PerFITStrategy:
    s = PerFITStrategy(personal_b=True)
    s.initialize(_state([9.0, 9.0, 9.0], [7.0, 7.0]))
    return s


def _upload(cid: str, a: list[float], mask: list[bool], n: int, changed: bool = True) -> ClientUpdate:
    return ClientUpdate(
        client_id=cid,
        num_examples=n,
        tensors={A: torch.tensor(a)},
        masks={A: torch.tensor(mask)} if changed else None,
        mask_changed=changed,
    )


# ---------------------------------------------------------------------- the strategy, on pure tensors


def test_personal_key_matches_dotted_components_only():
    assert is_personal_key("base_model.model.layers.0.self_attn.q_proj.lora_B.weight", ["lora_B"])
    assert not is_personal_key("base_model.model.layers.0.self_attn.q_proj.lora_A.weight", ["lora_B"])
    assert not is_personal_key("x.my_lora_B.weight", ["lora_B"])


def test_personal_b_aggregates_a_only_and_personalizes_b_with_the_clients_own():
    s = _pb()
    first = s.configure_client("a", 0)
    # round 0: the seeded init is rebuilt by the client; only A is ever sent, and the client is told to keep its B
    assert set(first.tensors) == {A} and first.config == {"seeded_init": True, PERSONAL: ["lora_B"]}
    metrics = s.aggregate(
        0,
        [
            _upload("a", [1.0, 2.0, 0.0], [True, True, False], 1),
            _upload("b", [3.0, 0.0, 0.0], [True, False, False], 3),
        ],
    )
    # A: per element over the clients that kept it ((1*1 + 3*3)/4, only a, nobody keeps 9); B: the seeded init
    assert s.global_tensors[A].tolist() == [2.5, 2.0, 9.0]
    assert s.global_tensors[B].tolist() == [7.0, 7.0]
    assert metrics["shared_fraction"] == pytest.approx(1 / 3)  # over the A elements only
    own_b = torch.tensor([0.5, 0.0])  # client a's trained B, 0 outside its mask
    mine = s.personalized_tensors("a", {A: torch.tensor([1.0, 2.0, 0.0]), B: own_b})
    assert mine[A].tolist() == [2.5, 2.0, 0.0] and torch.equal(mine[B], own_b)
    nxt = s.configure_client("b", 1)
    assert set(nxt.tensors) == {A} and set(nxt.mask) == {A} and nxt.config == {PERSONAL: ["lora_B"]}
    assert nxt.tensors[A].tolist() == [2.5, 0.0, 0.0]
    ft = s.finetune_instruction("b", {A: nxt.tensors[A], B: torch.tensor([1.0, 1.0])})
    assert set(ft.tensors) == {A} and set(ft.mask) == {A} and ft.config == {PERSONAL: ["lora_B"]}


def test_personal_b_refuses_an_uploaded_b_and_bad_options():
    s = _pb()
    bad = ClientUpdate("a", 1, _state([1.0, 1.0, 1.0], [1.0, 1.0]), masks=None)
    with pytest.raises(
        ValueError, match=r"shared \(LoRA A, personal_b\) tensors do not fit.*unexpected \['m.q_proj.lora_B"
    ):
        s.aggregate(0, [bad])
    with pytest.raises(ValueError, match=r"personal_b='yes' must be true or false"):
        PerFITStrategy(personal_b="yes")
    with pytest.raises(ValueError, match=r"personal_b=true with research_every=2 is not supported"):
        PerFITStrategy(personal_b=True, research_every=2)
    with pytest.raises(ValueError, match=r"personal_b=true needs LoRA B tensors"):
        PerFITStrategy(personal_b=True).initialize({"w": torch.zeros(2)})
    assert FederatedConfig(strategy="perfit", strategy_options={"personal_b": True}).resolved_strategy_options()[
        "personal_b"
    ]


def test_personal_b_state_round_trip_keeps_a_masks_only():
    s = _pb()
    s.aggregate(0, [_upload("a", [1.0, 2.0, 0.0], [True, True, False], 1)])
    tensors, meta = s.state_dict()
    assert {k for k in tensors if k.startswith("mask/")} == {f"mask/a/{A}"}
    r = PerFITStrategy(**meta["options"])
    r.load_state_dict(tensors, json.loads(json.dumps(meta)))
    assert r.client_mask("a")[A].tolist() == [True, True, False]
    assert all(torch.equal(r.global_tensors[k], s.global_tensors[k]) for k in (A, B))


# ---------------------------------------------------------------------- through the simulation


def _cfg(out, **kw) -> FederatedConfig:
    """test_simulation's tiny PerFIT run (3 clients, 2 rounds of 4 steps), written to `out`."""
    return dataclasses.replace(_sim_cfg(out.parent, "perfit", **kw), output_dir=str(out))


def _sim(cfg: FederatedConfig, callbacks=()) -> FederatedSimulation:
    return FederatedSimulation(
        cfg, model=tiny_llama(), tokenizer=build_tokenizer(), clients=_clients(), callbacks=callbacks
    )


def _records(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


PB = {"strategy_options": {"personal_b": True}}
BSEL = {"strategy_options": {"select_b_rows": 3}}


def test_perfit_pb_round_shares_a_per_element_and_keeps_each_clients_own_b(tmp_path):
    from tqdm.auto import tqdm

    sim = _sim(_cfg(tmp_path / "pb", **PB))
    sim._bar = tqdm(disable=True)  # what `run` opens around the rounds driven here step by step
    for r in range(2):
        _, ids, jobs = sim.plan_round(r)
        if r == 1:  # later rounds send the A kept values only, and tell the client to keep its B
            for job in jobs:
                assert job.instruction.config == {PERSONAL: ["lora_B"]}
                assert (
                    set(job.instruction.tensors)
                    == set(job.instruction.mask)
                    == set(sim.strategy.client_mask(job.client_id))
                )
        results, _ = sim._fit(r, jobs)
        sim.aggregate_round(r, ids, results, {})
        glob = sim.strategy.global_tensors
        a_keys = [k for k in glob if ".lora_A." in k]
        b_keys = [k for k in glob if ".lora_B." in k]
        assert a_keys and b_keys
        for res in results.values():  # B's values and mask never leave the client
            assert set(res.update.tensors) == set(res.update.masks or a_keys) == set(a_keys)
        weights = torch.tensor([float(results[c].update.num_examples) for c in ids], dtype=torch.float64)
        for key in a_keys:  # PerFIT's per-element rule, recomputed from the uploads
            masks = torch.stack([results[c].state[1][key] for c in ids])
            values = torch.stack([results[c].update.tensors[key] for c in ids]).to(torch.float64)
            w = weights.view(-1, *([1] * (values.dim() - 1)))
            num = torch.where(masks, values, 0.0).mul_(w).sum(0)
            den = masks.to(torch.float64).mul_(w).sum(0)
            assert torch.equal(glob[key], torch.where(den > 0, num / den, glob[key].double()).float())
        for cid in ids:
            own, mask, _ = sim.transport.state(cid)
            mine = sim._personalized(cid)
            for key in a_keys:
                assert torch.equal(mine[key], torch.where(mask[key], glob[key], 0.0))
            for key in b_keys:
                assert torch.equal(mine[key], results[cid].state[0][key])  # its own trained values, exactly
                assert torch.equal(mine[key], own[key])
            assert all(bool((mine[k][~mask[k]] == 0).all()) for k in mine)  # masked elements exactly 0
        if r == 0:
            b0 = {cid: {k: sim.transport.state(cid)[0][k].clone() for k in b_keys} for cid in ids}
    # round 1 trained each client's B from its own round-0 B (not the server's): B moved, and only on its mask
    for cid in ids:
        own, mask, _ = sim.transport.state(cid)
        assert any(not torch.equal(own[k], b0[cid][k]) for k in b_keys)
        assert all(bool((own[k][~mask[k]] == 0).all()) for k in b_keys)


def test_perfit_pb_counts_the_a_values_only_resumes_exactly_and_exports_plain_peft(tmp_path, monkeypatch):
    from hf_perfit.federated import coordinator

    def crash(name: str) -> None:  # killed in round 1 after two clients' results were saved, before aggregating
        if name == "round1.client1.after_save":
            raise KeyboardInterrupt

    full = _cfg(tmp_path / "full", **PB, **CPU_FP32)  # bit-for-bit resume (conftest.CPU_FP32)
    _sim(full).run()
    cut = _cfg(tmp_path / "cut", **PB, **CPU_FP32)
    monkeypatch.setattr(coordinator, "crash_point", crash)
    with pytest.raises(KeyboardInterrupt):
        _sim(cut).run()
    monkeypatch.undo()
    assert len(list((tmp_path / "cut" / "state" / "pending_1").iterdir())) == 2  # A-only uploads, read back
    resumed = _sim(dataclasses.replace(cut, resume=True))
    resumed.run()
    assert _records(tmp_path / "full") == _records(tmp_path / "cut")  # every evaluation and byte count, exactly
    from safetensors.torch import load_file

    for cid in ("client_0", "client_1", "client_2"):
        a, b = (
            load_file(str(tmp_path / r / "clients" / cid / "adapter" / "adapter_model.safetensors"))
            for r in ("full", "cut")
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # bytes: round 1 moves only A's kept values (4 B each) both ways; faithful PerFIT also moves B's
    _sim(_cfg(tmp_path / "perfit")).run()
    recs = {r: [x for x in _records(tmp_path / r) if x.get("client") and x["round"] == 1] for r in ("full", "perfit")}
    for x in recs["full"]:
        _, mask, _ = resumed.transport.state(x["client"])
        kept_a = sum(int(m.sum()) for k, m in mask.items() if ".lora_A." in k)
        assert x["bytes_up"] == x["bytes_down"] == 4 * kept_a
    assert sum(x["bytes_up"] for x in recs["full"]) < sum(x["bytes_up"] for x in recs["perfit"])

    # the exported adapter (A shared, B its own) reproduces the evaluated logits
    _assert_exports_reproduce_logits(resumed, tmp_path / "cut", ("client_0", "client_2"))


def _assert_exports_reproduce_logits(sim: FederatedSimulation, out, clients) -> None:
    """Each client's adapter exported under `out` loads with plain PEFT and gives the logits `sim` evaluated."""
    batch = torch.randint(3, 100, (2, 10))
    for cid in clients:
        sim._personalize(cid)
        with torch.no_grad():
            ours = sim.model(batch).logits
            theirs = PeftModel.from_pretrained(tiny_llama(), out / "clients" / cid / "adapter").eval()(batch).logits
        assert (ours - theirs).abs().max().item() <= 1e-5


@pytest.mark.parametrize("options", [{}, PB, BSEL], ids=["perfit_ft", "perfit_pb_ft", "perfit_bsel_ft"])
def test_perfit_finetune_keeps_masked_elements_exactly_zero(tmp_path, options):
    sim = _sim(_cfg(tmp_path / "ft", num_rounds=1, finetune_steps=3, **options))
    sim.run()
    recs = [x for x in _records(tmp_path / "ft") if x.get("client") and x.get("finetune")]
    assert len(recs) == 3
    for x in recs:
        if options is BSEL:  # it chose its B again, on its 3 held-out rows, before it fine-tuned
            assert x[OWN_B] == float(x["select_loss_own"] < x["select_loss_server"])
        else:
            assert OWN_B not in x
        own, mask, meta = sim.transport.state(x["client"])
        assert meta["prune_iterations_done"] == 2  # the mask of round 0, not searched again
        for k, t in own.items():
            assert bool((t[~mask[k]] == 0).all()), k  # fine-tuning trains the kept elements only
        shared = [k for k in mask if not (options is PB and ".lora_B." in k)]
        # the client holds its mask (and, with personal_b, its B): only the kept shared values come down
        assert x["bytes_down"] == 4 * sum(int(mask[k].sum()) for k in shared)
        last = [r for r in _records(tmp_path / "ft") if r.get("client") == x["client"] and r["round"] == 0][0]
        assert x["perplexity"] != last["perplexity"]  # it trained


def test_a_result_whose_upload_is_part_of_its_state_is_saved_once_and_read_back(tmp_path):
    from hf_perfit.federated.coordinator import FitResult, load_fit_result, save_fit_result

    state = (
        _state([1.0, 0.0, 3.0], [2.0, 0.0]),
        {A: torch.tensor([True, False, True]), B: torch.tensor([True, False])},
    )
    state = (*state, {"mask_uploaded": True})
    update = ClientUpdate("a", 4, {A: state[0][A]}, masks={A: state[1][A]}, mask_changed=True)
    save_fit_result(tmp_path / "a.safetensors", FitResult(update, {"bytes_up": 9}, state))
    from safetensors.torch import load_file

    assert not [k for k in load_file(str(tmp_path / "a.safetensors")) if k.startswith(("u/", "um/"))]  # not twice
    back = load_fit_result(tmp_path / "a.safetensors")
    assert set(back.update.tensors) == set(back.update.masks) == {A}
    assert torch.equal(back.update.tensors[A], state[0][A]) and torch.equal(back.update.masks[A], state[1][A])
    assert set(back.state[0]) == {A, B} and torch.equal(back.state[0][B], state[0][B])


# ---------------------------------------------------------------------- perfit_bsel: each client picks its B


def _bsel() -> PerFITStrategy:
    s = PerFITStrategy(select_b_rows=2)
    s.initialize(_state([9.0, 9.0, 9.0], [7.0, 7.0]))
    return s


def _full_upload(cid: str, a: list[float], b: list[float], mask_a, mask_b, n: int, own_b: float) -> ClientUpdate:
    return ClientUpdate(
        client_id=cid,
        num_examples=n,
        tensors=_state(a, b),
        masks={A: torch.tensor(mask_a), B: torch.tensor(mask_b)},
        mask_changed=True,
        metrics={"train_loss": 1.0, OWN_B: own_b},
    )


def test_select_b_aggregates_like_perfit_and_personalizes_with_the_b_each_client_chose():
    s = _bsel()
    assert s.configure_client("a", 0).config == {"seeded_init": True, SELECT_B: 2}
    metrics = s.aggregate(
        0,
        [
            _full_upload("a", [1.0, 2.0, 0.0], [4.0, 0.0], [True, True, False], [True, False], 1, own_b=1.0),
            _full_upload("b", [3.0, 0.0, 0.0], [8.0, 6.0], [True, False, False], [True, True], 3, own_b=0.0),
        ],
    )
    # A and B both by PerFIT's per-element rule: B[0] = (1*4 + 3*8)/4, B[1] only b's
    assert s.global_tensors[A].tolist() == [2.5, 2.0, 9.0] and s.global_tensors[B].tolist() == [7.0, 6.0]
    assert metrics["own_b_fraction"] == 0.5
    assert s.uses_own_b("a") and not s.uses_own_b("b") and not s.uses_own_b("never_seen")
    own_b = torch.tensor([0.5, 0.0])  # a's trained B (0 outside its mask): a chose its own, so its adapter has it
    mine = s.personalized_tensors("a", {A: torch.tensor([1.0, 2.0, 0.0]), B: own_b})
    assert mine[A].tolist() == [2.5, 2.0, 0.0] and torch.equal(mine[B], own_b)
    theirs = s.personalized_tensors("b", {A: torch.tensor([3.0, 0.0, 0.0]), B: torch.tensor([1.0, 1.0])})
    assert theirs[B].tolist() == [7.0, 6.0]  # b chose the server's: B_g ⊙ m_b
    nxt = s.configure_client("a", 1)  # the server's full personalized adapter, the client chooses
    assert set(nxt.tensors) == {A, B} and nxt.config == {SELECT_B: 2} and nxt.tensors[B].tolist() == [7.0, 0.0]
    ft = s.finetune_instruction(
        "a", mine
    )  # perfit_bsel_ft: the fine-tuning starts as a round does, the client chooses
    assert ft.config == {SELECT_B: 2} and ft.tensors[B].tolist() == [7.0, 0.0] and ft.mask[B].tolist() == [True, False]
    assert ft.tensors[A].tolist() == [2.5, 2.0, 0.0]
    with pytest.raises(ValueError, match=r"trains from its own B .* its last adapter lacks"):
        s.personalized_tensors("a", {A: torch.tensor([1.0, 2.0, 0.0])})

    tensors, meta = s.state_dict()  # the choices survive a checkpoint
    r = PerFITStrategy(**meta["options"])
    r.load_state_dict(tensors, json.loads(json.dumps(meta)))
    assert r.uses_own_b("a") and not r.uses_own_b("b")
    with pytest.raises(ValueError, match=r"own_b must map client ids to true/false"):
        r.load_state_dict(tensors, {**json.loads(json.dumps(meta)), "own_b": {"a": 1}})


def test_select_b_refuses_bad_options():
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match=r"select_b_rows=.* must be an integer >= 0"):
            PerFITStrategy(select_b_rows=bad)
    with pytest.raises(ValueError, match=r"select_b_rows > 0 with personal_b=true is not supported"):
        PerFITStrategy(select_b_rows=2, personal_b=True)
    with pytest.raises(ValueError, match=r"select_b_rows > 0 with research_every=3 is not supported"):
        PerFITStrategy(select_b_rows=2, research_every=3)
    assert PerFITStrategy().options["select_b_rows"] == 0  # the paper's PerFIT is the default


def test_selection_split_holds_the_same_rows_out_whatever_the_seed_and_refuses_too_many():
    from datasets import Dataset

    ds = Dataset.from_list([{"i": i} for i in range(10)])
    train, held = (list(d["i"]) for d in selection_split(ds, 3, "client_4"))
    again_train, again_held = (list(d["i"]) for d in selection_split(ds, 3, "client_4"))
    assert held == again_held and train == again_train  # no seed: the same every round and run
    assert len(held) == 3 and sorted(train + held) == list(range(10))  # disjoint, nothing lost
    assert train == sorted(train)  # the trained rows keep their order
    assert list(selection_split(ds, 3, "client_5")[1]["i"]) != held  # each client its own rows
    with pytest.raises(ValueError, match=r"client 'c' has 10 training rows; select_b_rows=10 .* leaves none"):
        selection_split(ds, 10, "c")


def test_select_b_takes_the_lower_held_out_loss_and_the_servers_b_on_a_tie(monkeypatch):
    from hf_perfit.federated import client

    class Model:  # records the adapter each evaluation saw
        def set_adapter_state(self, tensors, masks, meta):
            self.b = float(tensors[B][0])

    losses = {}
    monkeypatch.setattr(client, "evaluate_perplexity", lambda m, tok, ds, bs: {"eval_loss": losses[m.b]})
    sent, own = _state([1.0, 1.0, 1.0], [2.0, 0.0]), _state([5.0, 5.0, 5.0], [3.0, 0.0])
    for server_loss, own_loss, want in ((1.0, 0.5, 3.0), (0.5, 1.0, 2.0), (0.7, 0.7, 2.0)):
        losses = {2.0: server_loss, 3.0: own_loss}
        tensors, sel = client.select_b(Model(), None, None, sent, own, None, {}, 4)
        assert float(tensors[B][0]) == want and tensors[A] is sent[A]  # A is always the server's
        assert sel == {OWN_B: float(want == 3.0), "select_loss_server": server_loss, "select_loss_own": own_loss}


def test_perfit_bsel_round_starts_each_client_from_the_b_with_the_lower_held_out_loss(tmp_path):
    from tqdm.auto import tqdm

    from hf_perfit.federated.client import evaluate_perplexity

    sim = _sim(_cfg(tmp_path / "bsel", num_rounds=3, **BSEL, **CPU_FP32))
    sim._bar = tqdm(disable=True)
    chose = []
    for r in range(3):
        _, ids, jobs = sim.plan_round(r)
        expected = {}
        for job in jobs:  # what the client will compare: the server's B and its own, on its 3 held-out rows
            assert job.instruction.config.get(SELECT_B) == 3
            state = sim.transport.state(job.client_id)
            if state is None:
                continue
            held = selection_split(sim.train_sets[job.client_id], 3, job.client_id)[1]
            losses = []
            for b_from in (job.instruction.tensors, state[0]):
                mixed = {k: (b_from[k] if ".lora_B." in k else job.instruction.tensors[k]) for k in state[0]}
                sim.model.set_adapter_state(mixed, state[1], state[2])
                losses.append(evaluate_perplexity(sim.model, sim.tokenizer, held, 8)["eval_loss"])
            expected[job.client_id] = losses
        results, _ = sim._fit(r, jobs)
        sim.aggregate_round(r, ids, results, {})
        for cid, res in results.items():
            assert res.update.num_examples == 6  # 9 rows, 3 held out
            assert set(res.update.tensors) == set(sim.strategy.global_tensors)  # A and B both uploaded
            if cid not in expected:  # its first round: nothing of its own to choose
                assert OWN_B not in res.metrics
                continue
            server, own = expected[cid]
            assert res.metrics["select_loss_server"] == server and res.metrics["select_loss_own"] == own
            assert res.metrics[OWN_B] == float(own < server) and sim.strategy.uses_own_b(cid) == (own < server)
            chose.append(own < server)
            mine, (local, mask, _) = sim._personalized(cid), sim.transport.state(cid)
            for k in mine:  # evaluated with the B it trained from: its own, or the server's new B_g ⊙ m_k
                want = (
                    local[k]
                    if (".lora_B." in k and own < server)
                    else torch.where(mask[k], sim.strategy.global_tensors[k], 0.0)
                )
                assert torch.equal(mine[k], want), k
    assert len(chose) == 6  # rounds 1 and 2, 3 clients each


def test_perfit_bsel_resumes_exactly_and_exports_plain_peft(tmp_path, monkeypatch):
    from hf_perfit.federated import coordinator

    def crash(name: str) -> None:
        if name == "round2.client1.after_save":
            raise KeyboardInterrupt

    full = _cfg(tmp_path / "full", num_rounds=3, **BSEL, **CPU_FP32)
    _sim(full).run()
    cut = _cfg(tmp_path / "cut", num_rounds=3, **BSEL, **CPU_FP32)
    monkeypatch.setattr(coordinator, "crash_point", crash)
    with pytest.raises(KeyboardInterrupt):
        _sim(cut).run()
    monkeypatch.undo()
    resumed = _sim(dataclasses.replace(cut, resume=True))
    resumed.run()
    recs = _records(tmp_path / "full")
    assert recs == _records(tmp_path / "cut")
    chosen = [x for x in recs if x.get("client") and x["round"] >= 1]
    assert len(chosen) == 6 and all(OWN_B in x for x in chosen)  # the choices made after the resume, recorded
    _assert_exports_reproduce_logits(resumed, tmp_path / "cut", ("client_0", "client_1", "client_2"))
