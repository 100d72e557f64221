"""TRL's fused LM head projects only the scored (response) positions on CPU, with the loss and gradients of the full
projection (hf_perfit/federated/compact_head.py)."""

from __future__ import annotations

import pytest
import torch
import trl.trainer.utils as trl_utils
from trl.trainer.utils import add_fused_lm_head

from hf_perfit.federated.compact_head import enable_compact_head_on_cpu

from .conftest import tiny_llama


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(3, 128, (3, 20))
    labels = ids.clone()
    labels[:, :15] = -100  # a prompt of 15 tokens, a response of 5
    labels[2, 15:] = -100  # and a row without a response
    return ids, labels


def _loss_and_grads(model, ids, labels):
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, fused_lm_head=True)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_cpu_projects_the_scored_positions_only_with_the_full_projections_loss_and_grads(monkeypatch):
    model = tiny_llama().train()
    add_fused_lm_head(model)
    ids, labels = _batch()
    scored = int((labels[:, 1:] != -100).sum())  # 2 rows × 5 next-token labels
    rows = []
    apply = trl_utils._ChunkedLogProbFunction.apply

    def spy(hidden, *args):
        rows.append(hidden.shape[0])
        return apply(hidden, *args)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", spy)
    # TRL's own switch (an earlier test of this process may have built a trainer, which patched it)
    original = getattr(trl_utils._use_triton, "__wrapped__", trl_utils._use_triton)
    monkeypatch.setattr(trl_utils, "_use_triton", original)  # restored after the test
    full_loss, full_grads = _loss_and_grads(model, ids, labels)
    assert rows == [ids.shape[0] * (ids.shape[1] - 1)]  # TRL's own CPU path: every position

    assert enable_compact_head_on_cpu() is True
    assert enable_compact_head_on_cpu() is True  # idempotent: wraps once
    assert trl_utils._use_triton(torch.device("cpu")) is True
    assert trl_utils._use_triton(torch.device("meta")) is original(torch.device("meta"))
    compact_loss, compact_grads = _loss_and_grads(model, ids, labels)
    assert rows[1:] == [scored]  # the response positions only

    assert compact_loss == pytest.approx(float(full_loss), rel=1e-6)
    assert compact_grads.keys() == full_grads.keys()
    for name, g in full_grads.items():
        assert torch.allclose(compact_grads[name], g, rtol=1e-5, atol=1e-7), name


def test_importing_the_client_code_turns_it_on():
    """A fresh process: importing the federated client (what every trainer of ours imports) patches TRL's switch, and
    the installed TRL still has it (a TRL release without it fails here: look again)."""
    import subprocess
    import sys

    code = (
        "import torch, trl.trainer.utils as u; before = u._use_triton(torch.device('cpu')); "
        "import hf_perfit.federated.client; print(before, u._use_triton(torch.device('cpu')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
