"""A pytest plugin for finding, without a GPU, the tests that a GPU's bf16 would break: wherever `bf16: auto` turns
bf16 on for a CUDA device with bf16 (base weights in bf16, training under autocast), it turns it on here too, on the
CPU. It cannot show what the model on another device breaks (a CPU batch fed to a CUDA model), and it flags more
than a GPU would: it turns bf16 on for models that stay on the CPU on a GPU machine too (a model passed to
`FederatedSimulation(model=...)`, as most tests pass `tiny_llama()`, trains where it is, in fp32 unless `bf16: true`). Not used by CI:

    PYTHONPATH=tests/plugins python -m pytest -p bf16_like_gpu -m "not slow" -rf

Subprocesses the tests start do not load it (their runs stay fp32), so a test comparing a subprocess's run with an
in-process one fails here without failing on a GPU (docs/benchmarks.md, "CUDA check (one H200, 2026-11-29)")."""

import torch

import hf_perfit.federated.client as client
import hf_perfit.federated.runtime as runtime


def _as_on_a_bf16_gpu(device: torch.device) -> bool:
    return True


client.bf16_supported = _as_on_a_bf16_gpu
runtime.bf16_supported = _as_on_a_bf16_gpu
