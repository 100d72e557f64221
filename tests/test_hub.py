"""Publishing a federated run with the real `huggingface_hub` client, over HTTP, to a Hub-compatible server that the
tests start on 127.0.0.1 (`tests/hub_server.py`). Nothing contacts huggingface.co."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import httpx2
import pytest
import torch
from datasets import Dataset
from huggingface_hub import ModelCard, constants
from huggingface_hub.utils import _http as hf_http
from huggingface_hub.utils import set_client_factory
from huggingface_hub.utils._http import default_client_factory
from peft import PeftModel
from safetensors.torch import load_file

from hf_perfit import PerFITModel
from hf_perfit.data import ClientData
from hf_perfit.federated.simulation import FederatedConfig, FederatedSimulation
from hf_perfit.federated.strategies import STRATEGIES
from hf_perfit.hub import STRATEGY_DESCRIPTIONS, STRATEGY_NAMES, HubPushError, PushConfig, push_main, push_run

from .conftest import build_tokenizer, tiny_llama
from .hub_server import LocalHub, Repo

TOKEN = "hf_alice_TESTTOKEN_5f3a9c1e7b"
BOB_TOKEN = "hf_bob_TESTTOKEN_0d2e4b6a8c"
CLIENTS = ("client_0", "client_1", "client_2")
SECRET_TEXT = "zebra-quartz"  # in every training/test example: must never reach the Hub


def _clients(n=3):
    out = []
    for k in range(n):
        rows = [
            {
                "instruction": f"{SECRET_TEXT} {k}: echo {i}",
                "context": "",
                "response": f"{k}{i}{k}",
                "category": f"c{k}",
            }
            for i in range(12)
        ]
        out.append(ClientData(f"client_{k}", Dataset.from_list(rows[:9]), Dataset.from_list(rows[9:]), [f"c{k}"]))
    return out


def _local_only_client(url: str) -> httpx2.Client:
    """`huggingface_hub`'s default client, plus a hook that refuses any request not sent to the local Hub."""

    def only_local(request: httpx2.Request) -> None:
        if not str(request.url).startswith(url + "/"):
            raise RuntimeError(f"test tried to reach {request.url}: only the local Hub {url} is allowed")

    client = default_client_factory()
    client.event_hooks["request"] = [only_local, *client.event_hooks["request"]]
    return client


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The local Hub, with `huggingface_hub` pointed at it (endpoint, token, cache; offline mode off)."""
    home = tmp_path_factory.mktemp("hf_home")
    with LocalHub(tokens={TOKEN: "alice", BOB_TOKEN: "bob"}) as server:
        mp = pytest.MonkeyPatch()
        mp.setenv("HF_ENDPOINT", server.url)
        mp.setenv("HF_TOKEN", TOKEN)
        mp.setenv("HF_HUB_OFFLINE", "0")
        mp.setattr(constants, "ENDPOINT", server.url)
        mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        mp.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))  # never the machine's own login
        mp.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
        set_client_factory(lambda: _local_only_client(server.url))
        try:
            yield server
        finally:
            set_client_factory(default_client_factory)
            mp.undo()


@pytest.fixture(scope="module")
def run_dir(hub, tmp_path_factory):
    """A finished 2-round PerFIT run on tiny_llama, pushed to `alice/fed-*` by the run itself (`push_to_hub`)."""
    out = tmp_path_factory.mktemp("runs") / "perfit"
    cfg = FederatedConfig(
        model_name_or_path="unused",
        strategy="perfit",
        num_clients=3,
        num_rounds=2,
        local_steps=4,
        search_steps=4,
        prune_iterations=2,
        learning_rate=5e-3,
        per_device_train_batch_size=2,
        max_length=48,
        lora_r=2,
        lora_alpha=4,
        output_dir=str(out),
        seed=0,
        push_to_hub=True,
        hub_repo_prefix="alice/fed",
        hub_private=True,
    )
    FederatedSimulation(cfg, model=tiny_llama(), tokenizer=build_tokenizer(), clients=_clients()).run()
    return out


@pytest.fixture
def sleeps(monkeypatch):
    """The waits of huggingface_hub's retry backoff, recorded instead of slept."""
    waits = []
    monkeypatch.setattr(hf_http.time, "sleep", waits.append)
    return waits


def _no_secrets_on_hub(hub: LocalHub) -> None:
    for blob in hub.all_stored_blobs():
        assert TOKEN.encode() not in blob and BOB_TOKEN.encode() not in blob
        assert SECRET_TEXT.encode() not in blob


LOAD_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, batch_file, out_file, *repos = sys.argv[1:]
    batch = torch.load(batch_file)
    logits = {}
    for repo in repos:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), repo).eval()
        with torch.no_grad():
            logits[repo] = model(batch).logits
    assert "hf_perfit" not in sys.modules, "the load must not need hf_perfit"
    torch.save(logits, out_file)
    """
)


def test_run_pushes_and_fresh_process_loads_with_plain_peft(run_dir, hub, tmp_path):
    repos = [f"alice/fed-{c}" for c in CLIENTS]
    for repo in repos:
        assert hub.repos[repo].private  # hub_private=True
        files = hub.files(repo)
        assert set(files) == {
            ".gitattributes",
            "README.md",
            "adapter_config.json",
            "adapter_model.safetensors",
            "perfit_config.json",
            "perfit_masks.safetensors",
            "density.png",
        }
        local = run_dir / "clients" / repo.split("-")[-1] / "adapter"
        assert files["adapter_model.safetensors"] == (local / "adapter_model.safetensors").read_bytes()
        assert files["density.png"].startswith(b"\x89PNG")
    assert {"README.md", "results.md", "perplexity.png", "density.png"} <= set(hub.files("alice/fed-federation"))
    assert hub.files("alice/fed-federation")["results.md"] == (run_dir / "results.md").read_bytes()

    # a fresh process that never imports hf_perfit loads each repo with plain PEFT
    base_dir, batch_file, out_file = tmp_path / "base", tmp_path / "batch.pt", tmp_path / "logits.pt"
    tiny_llama().save_pretrained(base_dir)
    batch = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.save(batch, batch_file)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1")
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(base_dir), str(batch_file), str(out_file), *repos],
        env=env,
        cwd=tmp_path,  # so that "alice/fed-client_0" cannot be a local folder
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = torch.load(out_file)
    for repo, cid in zip(repos, CLIENTS, strict=True):
        with torch.no_grad():
            local = PeftModel.from_pretrained(tiny_llama(), run_dir / "clients" / cid / "adapter").eval()(batch).logits
        assert (remote[repo] - local).abs().max().item() <= 1e-5
    assert hub.count("GET", r"/resolve/") > 0  # the weights really came over HTTP
    _no_secrets_on_hub(hub)
    assert TOKEN not in proc.stdout + proc.stderr

    # PerFIT's extras come along: hf_perfit resumes the searched architecture from the repo
    restored = PerFITModel.from_pretrained(tiny_llama(), "alice/fed-client_0")
    masks = load_file(str(run_dir / "clients" / "client_0" / "adapter" / "perfit_masks.safetensors"))
    assert {k: m.bool() for k, m in masks.items()}.keys() == restored.masks().keys()
    assert all(torch.equal(masks[k].bool(), restored.masks()[k]) for k in masks)


def test_client_card_has_metadata_metrics_picture_and_load_snippet(run_dir, hub):
    card = ModelCard(hub.files("alice/fed-client_1")["README.md"].decode())
    assert card.data.base_model == "unused"
    assert card.data.library_name == "peft"
    assert {"federated-learning", "perfit", "lora"} <= set(card.data.tags)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    base = next(r for r in records if r.get("client") == "client_1" and r["round"] == -1)["perplexity"]
    final = next(r for r in records if r.get("client") == "client_1" and r["round"] == 1)["perplexity"]
    text = card.text
    assert f"| base model (no adapter) | {base:.3f} |" in text
    assert f"| this adapter (PerFIT, after round 1) | {final:.3f} |" in text
    assert "![Kept-parameter density per layer and module](density.png)" in text
    assert 'PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("unused"), "alice/fed-client_1")' in text
    assert "What this repository does not contain" in text and "No training example" in text
    assert "`output_dir`" not in text  # no local paths of the training machine
    fed = ModelCard(hub.files("alice/fed-federation")["README.md"].decode())
    assert "[alice/fed-client_2](/alice/fed-client_2)" in fed.text and "![" in fed.text


def test_repush_unchanged_makes_no_commit(run_dir, hub, caplog):
    heads = {repo: hub.repos[repo].head.oid for repo in hub.repos if repo.startswith("alice/fed-")}
    before = len(hub.requests)
    with caplog.at_level(logging.DEBUG):
        report = push_run(run_dir, "alice/fed", private=True)
    new = hub.requests[before:]
    assert [r.status for r in report.results] == ["unchanged"] * 4
    assert report.num_commits == 0
    assert {repo: hub.repos[repo].head.oid for repo in heads} == heads
    # huggingface_hub compares each file's oid with the remote one (pre-upload) and makes no empty commit
    assert not [r for r in new if "/commit/" in r.path or r.path == "/api/repos/create"]
    # 4 requests a repo: our model_info (parent commit, files), and upload_folder's README check, pre-upload and
    # head lookup; no tree listing (nothing to delete: delete_patterns is None)
    assert len(new) == 4 * 4 and not [r for r in new if "/tree/" in r.path], [(r.method, r.path) for r in new]
    assert {r.path.split("/")[4] for r in new if r.path.startswith("/api/models/")} == {
        f"fed-{n}" for n in (*CLIENTS, "federation")
    }
    assert TOKEN not in caplog.text

    # the real Hub lists weights as LFS files (the oid is the pointer's): compared by sha256, still unchanged
    hub.lfs_suffixes = (".safetensors", ".png")
    try:
        assert [r.status for r in push_run(run_dir, "alice/fed").results] == ["unchanged"] * 4
    finally:
        hub.lfs_suffixes = ()


def test_changed_card_commits_only_what_changed(run_dir, hub, tmp_path):
    # a "FedIT" run on the same clients (metrics only matter for the cards): a copy with other perplexities
    fedit = tmp_path / "fedit"
    shutil.copytree(run_dir, fedit, ignore=shutil.ignore_patterns("state"))
    cfg = json.loads((fedit / "config.json").read_text())
    (fedit / "config.json").write_text(json.dumps({**cfg, "strategy": "fedit"}))
    recs = [json.loads(x) for x in (fedit / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        if r["round"] >= 0:
            r["perplexity" if "client" in r else "mean_perplexity"] = 77.0
    (fedit / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))

    first = push_run(run_dir, "alice/cmp", clients=["client_0"])
    assert [r.status for r in first.results] == ["created", "created"]
    second = push_run(run_dir, "alice/cmp", clients=["client_0"], compare_runs=[fedit])
    assert [r.status for r in second.results] == ["updated", "updated"]
    assert second.results[0].files_changed == ["README.md"]  # the adapter did not change
    assert second.results[1].files_changed == ["README.md", "perplexity.png"]
    assert "| FedIT (compare run, after round 1) | 77.000 |" in hub.files("alice/cmp-client_0")["README.md"].decode()
    assert "alice/cmp-client_1" not in hub.repos
    # the same repos re-pushed from a non-PerFIT run: PerFIT's files are deleted, the adapter is the same
    third = push_run(fedit, "alice/cmp", clients="client_0", federation_repo=False)
    assert third.results[0].files_changed == [
        "README.md",
        "density.png",
        "perfit_config.json",
        "perfit_masks.safetensors",
    ]
    assert set(hub.files("alice/cmp-client_0")) == {
        ".gitattributes",
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    with pytest.raises(ValueError, match="seed: 0 vs 1"):
        (fedit / "config.json").write_text(json.dumps({**cfg, "strategy": "fedit", "seed": 1}))
        push_run(run_dir, "alice/cmp", compare_runs=[fedit])


def test_transient_failures_are_retried_with_backoff(run_dir, hub, sleeps, caplog):
    # huggingface_hub retries the pre-upload and the commit (HTTP 408/429/5xx, network errors) with its own backoff
    hub.fail(r"^/api/models/alice/flaky-client_0/preupload/", status=429, headers={"Retry-After": "7"})
    hub.fail(r"^/api/models/alice/flaky-client_0/commit/", status=503)
    hub.fail(r"^/api/models/alice/flaky-client_0/commit/", status=None)  # connection reset
    with caplog.at_level(logging.DEBUG):
        report = push_run(run_dir, "alice/flaky", clients=["client_0"], federation_repo=False)
    assert report.results[0].status == "created"
    assert len(sleeps) == 3 and sleeps[0] >= 7  # Retry-After honoured, then backoff
    assert hub.count("POST", r"^/api/models/alice/flaky-client_0/commit/") == 3
    assert len(hub.repos["alice/flaky-client_0"].commits) == 2  # initial + exactly one upload
    assert TOKEN not in caplog.text

    # the commit happens but its answer is lost: the re-sent commit names its parent and is refused (412), the
    # repo is compared again with its new head, and nothing is committed twice
    hub.fail(r"^/api/models/alice/lost-client_0/commit/", status=500, after=True)
    report = push_run(run_dir, "alice/lost", clients=["client_0"], federation_repo=False)
    assert report.results[0].status == "created" and "adapter_model.safetensors" in report.results[0].files_changed
    assert len(hub.repos["alice/lost-client_0"].commits) == 2

    # a failure that outlives the retries stops with the repo named
    hub.fail(r"^/api/models/alice/down-client_0/commit/", status=502, times=10)
    sleeps.clear()
    with pytest.raises(HubPushError, match=r"alice/down-client_0 failed: HTTP 502.*try again later") as info:
        push_run(run_dir, "alice/down")
    hub.clear_faults()
    assert len(sleeps) >= 3
    assert info.value.pushed == [] and info.value.client_id == "client_0"

    # huggingface_hub does not retry `create_repo`: a 429 there stops the push, and pushing again completes it
    hub.fail(r"^/api/repos/create$", status=429, headers={"Retry-After": "7"})
    with pytest.raises(HubPushError, match=r"alice/rate-client_0 failed: HTTP 429.*try again later"):
        push_run(run_dir, "alice/rate", clients=["client_0"], federation_repo=False)
    report = push_run(run_dir, "alice/rate", clients=["client_0"], federation_repo=False)
    assert report.results[0].status == "created"


def test_permanent_failures_stop_with_clear_message(run_dir, hub, sleeps):
    # a namespace owned by someone else: 403 on the first repo, nothing pushed, no retry
    with pytest.raises(HubPushError) as info:
        push_run(run_dir, "bob/theirs")
    err = info.value
    assert err.status_code == 403 and err.client_id == "client_0" and err.pushed == []
    assert "pushing client 'client_0' to bob/theirs-client_0 failed: HTTP 403" in str(err)
    assert "Already pushed: none." in str(err) and sleeps == []

    # an existing public repo of someone else: readable, so the push gets as far as the upload, which is refused
    theirs = Repo("bob/public-client_0", private=False)
    hub._new_commit(theirs, "initial commit", {".gitattributes": b"*.bin filter=lfs\n"})
    hub.repos[theirs.repo_id] = theirs
    with pytest.raises(HubPushError, match=r"bob/public-client_0 failed: HTTP 403.*belongs to someone else"):
        push_run(run_dir, "bob/public")
    assert len(theirs.commits) == 1

    # a 403 in the middle: the message says which repos were pushed and which were not
    hub.fail(r"^/api/models/alice/part-client_1/(preupload|commit)/", status=403, times=5)
    with pytest.raises(HubPushError) as info:
        push_run(run_dir, "alice/part")
    hub.clear_faults()
    err = info.value
    assert err.client_id == "client_1" and err.pushed == ["alice/part-client_0"]
    assert err.not_pushed == ["alice/part-client_1", "alice/part-client_2", "alice/part-federation"]
    assert "Already pushed: alice/part-client_0." in str(err) and "alice/part-client_2" not in hub.repos
    assert sleeps == []

    # no token at all: 401, with how to log in
    with pytest.raises(HubPushError, match=r"HTTP 401: no valid token.*hf auth login"):
        push_run(run_dir, "alice/anon", token=False)
    for e in (err, info.value):
        assert TOKEN not in str(e)
    _no_secrets_on_hub(hub)


def test_push_main_prints_table_and_keeps_the_token_out(run_dir, hub, capsys, caplog):
    with caplog.at_level(logging.DEBUG):
        assert push_main(PushConfig(run=str(run_dir), repo_prefix="alice/fed", private=True)) == 0
        out = capsys.readouterr().out
        assert "alice/fed-client_0" in out and "unchanged" in out and "4 repos, 0 with a new commit" in out
        assert push_main(PushConfig(run=str(run_dir), repo_prefix="bob/fed", clients="client_2")) == 1
        captured = capsys.readouterr()
        assert "bob/fed-client_2" in captured.err and "HTTP 403" in captured.err
    assert TOKEN not in caplog.text + out + captured.out + captured.err
    assert push_main(PushConfig(run=str(run_dir), repo_prefix="no-slash")) == 2
    assert "must be '<namespace>/<prefix>'" in capsys.readouterr().err


def test_inputs_are_validated_before_any_request(run_dir, hub, tmp_path, monkeypatch):
    before = len(hub.requests)
    with pytest.raises(FileNotFoundError, match="does not exist; pass the output_dir"):
        push_run(tmp_path / "nope", "alice/x")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for name in ("config.json", "metrics.jsonl"):
        shutil.copy(run_dir / name, unfinished / name)
    with pytest.raises(FileNotFoundError, match="not a finished run: no exported adapter.*--resume"):
        push_run(unfinished, "alice/x")
    for bad in ("alice", "alice/x/y", "alice/-x", "al ice/x", "alice/x--y"):
        with pytest.raises(ValueError, match="repo_prefix"):
            push_run(run_dir, bad)
    with pytest.raises(ValueError, match=r"unknown client id\(s\) \['client_9'\]; this run has: client_0"):
        push_run(run_dir, "alice/x", clients=["client_9"])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        push_run(run_dir, "alice/x")
    assert len(hub.requests) == before


def test_client_ids_read_from_the_run_are_checked_before_they_become_paths(run_dir, hub, tmp_path, capsys):
    # a hand-edited metrics.jsonl naming "../../outside": clients/../../outside/adapter is a folder outside the run
    tampered = tmp_path / "runs" / "tampered"
    shutil.copytree(run_dir, tampered, ignore=shutil.ignore_patterns("state"))
    shutil.copytree(run_dir / "clients" / "client_0" / "adapter", tmp_path / "runs" / "outside" / "adapter")
    assert (tampered / "clients" / "../../outside" / "adapter" / "adapter_model.safetensors").is_file()
    text = (tampered / "metrics.jsonl").read_text().replace('"client_0"', '"../../outside"')
    (tampered / "metrics.jsonl").write_text(text)
    before = len(hub.requests)
    with pytest.raises(ValueError, match=r"names the client '\.\./\.\./outside', which is not a valid client id"):
        push_run(tampered, "alice/tampered")
    with pytest.raises(ValueError, match="not a valid client id"):
        push_run(tampered, "alice/tampered", preview_dir=tmp_path / "preview")
    assert not (tmp_path / "preview").exists() and len(hub.requests) == before
    assert push_main(PushConfig(run=str(tampered), repo_prefix="alice/tampered")) == 2
    assert "not a valid client id" in capsys.readouterr().err


def test_preview_renders_the_same_bytes_twice(run_dir, tmp_path):
    a = push_run(run_dir, "alice/fed", preview_dir=tmp_path / "a")
    push_run(run_dir, "alice/fed", preview_dir=tmp_path / "b")
    assert a.results[0].status == "preview"
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 3 * 6 + 4
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


# ---------------------------------------------------------------------- FedAMoLE: MoLE adapters, not plain LoRA


@pytest.fixture(scope="module")
def mole_run_dir(tmp_path_factory):
    """A finished 1-round FedAMoLE run on tiny_llama (4 experts per module, each held by one client)."""
    out = tmp_path_factory.mktemp("runs") / "fedamole"
    cfg = FederatedConfig(
        model_name_or_path="unused",
        strategy="fedamole",
        num_clients=3,
        num_rounds=1,
        local_steps=2,
        learning_rate=5e-3,
        per_device_train_batch_size=2,
        max_length=48,
        lora_r=2,
        lora_alpha=4,
        num_experts=4,
        clients_per_expert=1,
        experts_per_client_min=1,
        experts_per_client_max=2,
        output_dir=str(out),
        seed=0,
    )
    FederatedSimulation(cfg, model=tiny_llama(), tokenizer=build_tokenizer(), clients=_clients()).run()
    return out


MOLE_LOAD_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, batch_file, out_file, *repos = sys.argv[1:]
    try:  # what the card warns about: without hf_perfit, PEFT does not know the MOLE adapter type
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), repos[0])
    except KeyError as err:
        assert "MOLE" in str(err), err
    else:
        raise AssertionError("plain PEFT loaded a MoLE adapter without hf_perfit")
    import hf_perfit  # the card's first line

    batch = torch.load(batch_file)
    logits = {}
    for repo in repos:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), repo).eval()
        with torch.no_grad():
            logits[repo] = model(batch).logits
    # the card's other way in: hf_perfit's own class, with the client's experts held
    held = hf_perfit.MoLEModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), repos[0]).held_experts()
    torch.save({"logits": logits, "held": held}, out_file)
    """
)


def test_fedamole_run_pushes_cards_with_experts_and_loads_after_import_hf_perfit(mole_run_dir, hub, tmp_path):
    assert set(STRATEGIES) <= set(STRATEGY_NAMES) & set(STRATEGY_DESCRIPTIONS)
    report = push_run(mole_run_dir, "alice/mole")
    assert [r.status for r in report.results] == ["created"] * 4
    repos = [f"alice/mole-{c}" for c in CLIENTS]
    pools: dict[str, list[int]] = {}
    for repo, cid in zip(repos, CLIENTS, strict=True):
        local = mole_run_dir / "clients" / cid / "adapter"
        files = hub.files(repo)
        assert set(files) == {".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors"}
        assert files["adapter_model.safetensors"] == (local / "adapter_model.safetensors").read_bytes()
        held = json.loads(files["adapter_config.json"])["held_experts"]
        assert held == json.loads((local / "adapter_config.json").read_text())["held_experts"]
        card = ModelCard(files["README.md"].decode())
        assert card.data.library_name == "peft" and {"fedamole", "mixture-of-experts"} <= set(card.data.tags)
        text = card.text
        snippet = text.split("```python\n", 1)[1].split("```", 1)[0]
        assert snippet.startswith("import hf_perfit") and snippet.index("import hf_perfit") < snippet.index(
            "PeftModel.from_pretrained"
        )
        assert "## Architecture" in text and "| module | domain experts held (ids) | count |" in text
        for module, ids in held.items():
            assert f"| `{module}` | {', '.join(map(str, ids))} | {len(ids)} |" in text
            for j in ids:
                pools.setdefault(module, []).append(j)
        assert f"holds {sum(map(len, held.values()))} of the {4 * len(held)} domain experts" in text
        assert "plain PEFT LoRA" not in text and "no hf_perfit code" not in text and "pruned" not in text
        assert "MoLE weights: per module the shared expert" in text
        assert "RSEA" in text and "`experts_per_client_max` | `2`" in text
    # clients_per_expert=1: every expert of every module is held by exactly one client
    assert all(sorted(ids) == [0, 1, 2, 3] for ids in pools.values())
    fed = hub.files("alice/mole-federation")["README.md"].decode()
    assert "## Expert assignments" in fed and "[`client_1`](/alice/mole-client_1)" in fed

    # a fresh process: plain PEFT refuses the adapter, `import hf_perfit` + PeftModel loads it with the run's logits
    base_dir, batch_file, out_file = tmp_path / "base", tmp_path / "batch.pt", tmp_path / "logits.pt"
    tiny_llama().save_pretrained(base_dir)
    batch = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    torch.save(batch, batch_file)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1")
    proc = subprocess.run(
        [sys.executable, "-c", MOLE_LOAD_SCRIPT, str(base_dir), str(batch_file), str(out_file), *repos],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = torch.load(out_file)
    for repo, cid in zip(repos, CLIENTS, strict=True):
        folder = mole_run_dir / "clients" / cid / "adapter"
        with torch.no_grad():
            ours = PeftModel.from_pretrained(tiny_llama(), folder).eval()(batch).logits
        assert (remote["logits"][repo] - ours).abs().max().item() <= 1e-5
    config = json.loads((mole_run_dir / "clients" / "client_0" / "adapter" / "adapter_config.json").read_text())
    assert remote["held"] == config["held_experts"]
    assert hub.count("GET", r"/alice/mole-client_2/resolve/") > 0  # the weights really came over HTTP
    _no_secrets_on_hub(hub)
    assert TOKEN not in proc.stdout + proc.stderr
    # deterministic cards: pushing the same run again commits nothing
    assert [r.status for r in push_run(mole_run_dir, "alice/mole").results] == ["unchanged"] * 4
