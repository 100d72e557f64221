"""The MoLE layer: a Linear layer plus a shared LoRA expert, a pool of LoRA domain experts and a top-k router.

[`MoLELinear`] is a PEFT tuner layer (`peft.tuners.tuners_utils.BaseTunerLayer`), so PEFT's adapter switching,
`disable_adapter()`, state-dict saving and loading work on it like on a LoRA layer. Its parameters per adapter:

- `mole_shared_A[adapter]` `(r, d_in)`, `mole_shared_B[adapter]` `(d_out, r)`: the shared expert, always on;
- `mole_P[adapter]` `(r, d_in)`: the token projection of the router;
- `mole_expert_A[adapter][str(j)]` `(r, d_in)`, `mole_expert_B[adapter][str(j)]` `(d_out, r)`: domain expert `j`,
  for every `j` the adapter holds (all `E` in a federated model; a client's assigned ones in an exported adapter).

The router only ever sees the *active* experts (`mole_active[adapter]`, a subset of the held ones): their `A_j x`
is computed, scored and mixed; every other expert is not touched by the forward pass at all (no compute, no
gradient).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import MoLEConfig

__all__ = ["MoLELayer", "MoLELinear", "balance_loss", "route"]


def route(h: torch.Tensor, t: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoLE router: scores, and the top-k renormalized gates.

    Args:
        h (`torch.Tensor`): `A_j x` of the active experts, shape `(..., n, r)`.
        t (`torch.Tensor`): the token embedding `P x`, shape `(..., r)`.
        top_k (`int`): experts mixed per token (capped at `n`).

    Returns:
        `(z, gates)`: `z_j = (A_j x)ᵀ(P x)/√r`, shape `(..., n)`; `gates` `(..., n)`: the softmax over the `n` experts
        restricted to the `top_k` largest and renormalized to sum to 1 (which equals a softmax over the top-k
        scores), 0 elsewhere.
    """
    z = (h * t.unsqueeze(-2)).sum(-1) / math.sqrt(h.shape[-1])
    k = min(int(top_k), z.shape[-1])
    top_z, top_i = z.topk(k, dim=-1)
    gates = torch.zeros_like(z).scatter(-1, top_i, torch.softmax(top_z, dim=-1))
    return z, gates


def balance_loss(z: torch.Tensor, top_k: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-style load-balancing loss of one router over its `n` experts.

    With `p_j(x)` the softmax of the scores over the `n` experts, `f_j` the fraction of the `top_k` routing slots
    (over the weighted tokens) that go to expert `j`, and `P̄_j` the mean of `p_j(x)`:

        L = n · Σ_j f_j · P̄_j

    `L = 1` for perfectly uniform routing, up to `n` when every token goes to the same expert. Gradients flow
    through `P̄` (as in the Switch Transformer).

    Args:
        z (`torch.Tensor`): router scores, shape `(..., n)`.
        top_k (`int`): experts per token (capped at `n`).
        weights (`torch.Tensor`, *optional*): per-token weights of shape `z.shape[:-1]` (the attention mask, so that
            padding does not count); default all 1.
    """
    n = z.shape[-1]
    k = min(int(top_k), n)
    z = z.reshape(-1, n)
    w = torch.ones(z.shape[0], dtype=z.dtype, device=z.device) if weights is None else weights.reshape(-1).to(z)
    total = w.sum().clamp_min(1e-12)
    probs = torch.softmax(z, dim=-1)
    chosen = F.one_hot(z.topk(k, dim=-1).indices, n).sum(-2).to(z.dtype)  # (N, n), k ones per row
    f = (chosen * w[:, None]).sum(0) / (k * total)
    p_mean = (probs * w[:, None]).sum(0) / total
    return n * (f * p_mean).sum()


class MoLELayer(BaseTunerLayer):
    """The adapter state of a MoLE layer (see the module docstring); [`MoLELinear`] adds the forward pass."""

    adapter_layer_names = ("mole_shared_A", "mole_shared_B", "mole_P", "mole_expert_A", "mole_expert_B")
    other_param_names = ("mole_r", "mole_scaling", "mole_top_k", "mole_active", "mole_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.mole_shared_A = nn.ParameterDict({})
        self.mole_shared_B = nn.ParameterDict({})
        self.mole_P = nn.ParameterDict({})
        self.mole_expert_A = nn.ModuleDict({})
        self.mole_expert_B = nn.ModuleDict({})
        self.mole_r: dict[str, int] = {}
        self.mole_scaling: dict[str, float] = {}
        self.mole_top_k: dict[str, int] = {}
        self.mole_active: dict[str, list[int]] = {}
        self.mole_dropout = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        # set by MoLEModel: records routing of training forwards for the balance loss and the client statistics
        self._mole_recorder = None
        self._mole_name = ""
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(
                f"MoLE wraps nn.Linear layers (bitsandbytes 4-bit included); got {type(base).__name__}. Choose "
                "Linear target_modules."
            )
        self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(self, adapter_name: str, config: MoLEConfig, experts: list[int]) -> None:
        """Create adapter `adapter_name`: the shared expert, `P` and the domain experts `experts`."""
        r, d_in, d_out = int(config.r), self.in_features, self.out_features
        self.mole_r[adapter_name] = r
        self.mole_scaling[adapter_name] = config.scaling
        self.mole_top_k[adapter_name] = int(config.top_k)
        self.mole_active[adapter_name] = sorted(int(j) for j in experts)
        p = float(config.lora_dropout)
        self.mole_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.mole_shared_A[adapter_name] = nn.Parameter(torch.empty(r, d_in))
        self.mole_shared_B[adapter_name] = nn.Parameter(torch.empty(d_out, r))
        self.mole_P[adapter_name] = nn.Parameter(torch.empty(r, d_in))
        self.mole_expert_A[adapter_name] = nn.ParameterDict(
            {str(j): nn.Parameter(torch.empty(r, d_in)) for j in self.mole_active[adapter_name]}
        )
        self.mole_expert_B[adapter_name] = nn.ParameterDict(
            {str(j): nn.Parameter(torch.empty(d_out, r)) for j in self.mole_active[adapter_name]}
        )
        self.reset_mole_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @torch.no_grad()
    def reset_mole_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """LoRA's init for every expert (`A` Kaiming-uniform, `B = 0`) and a Kaiming-uniform `P`; with
        `init_weights=False`, `B ~ N(0, 0.02²)` instead. Experts are initialised in id order, so a seeded run
        builds the same adapter in every process."""
        As = [self.mole_shared_A[adapter_name], *self.mole_expert_A[adapter_name].values()]
        Bs = [self.mole_shared_B[adapter_name], *self.mole_expert_B[adapter_name].values()]
        for a, b in zip(As, Bs, strict=True):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            if init_weights:
                nn.init.zeros_(b)
            else:
                nn.init.normal_(b, std=0.02)
        nn.init.kaiming_uniform_(self.mole_P[adapter_name], a=math.sqrt(5))

    def held_experts(self, adapter_name: str) -> list[int]:
        """The domain experts this layer stores for `adapter_name`, sorted."""
        return sorted(int(j) for j in self.mole_expert_A[adapter_name].keys())

    def set_active_experts(self, adapter_name: str, experts: list[int]) -> None:
        """Route over `experts` only (a subset of [`held_experts`]); the others are neither computed nor trained."""
        held = set(self.held_experts(adapter_name))
        ids = sorted({int(j) for j in experts})
        missing = [j for j in ids if j not in held]
        if missing:
            raise ValueError(f"{self._mole_name or 'layer'}: experts {missing} are not held (held: {sorted(held)}).")
        self.mole_active[adapter_name] = ids

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "a MoLE adapter cannot be merged into the base weights: its experts are mixed per token by the router."
        )

    def unmerge(self) -> None:
        raise NotImplementedError("a MoLE adapter is never merged.")


class MoLELinear(nn.Module, MoLELayer):
    """A Linear layer with a MoLE adapter: `W₀x + s·B₀A₀x' + Σ_{j∈top-k} p̃_j(x)·s·B_jA_jx'` with `x' = dropout(x)`
    during training (`lora_dropout`) and the router `p̃` computed from the undropped `x` (see [`route`])."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MoLEConfig, experts: list[int]) -> None:
        super().__init__()
        MoLELayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, experts)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.mole_P:
                continue
            result = result + self._adapter_output(x, adapter).to(result.dtype)
        return result

    def _adapter_output(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        a0, b0, proj = self.mole_shared_A[adapter], self.mole_shared_B[adapter], self.mole_P[adapter]
        x = self._cast_input_dtype(x, a0.dtype)
        # Dropout on the experts' input only (docs/fedamole.md): the router below scores the undropped x, as the
        # authors' code does; in eval mode (or p = 0) `dropped` is `x` itself and nothing is computed twice.
        dropped = self.mole_dropout[adapter](x)
        out = F.linear(F.linear(dropped, a0), b0)
        ids = self.mole_active[adapter]
        if ids:
            r = self.mole_r[adapter]
            experts_a, experts_b = self.mole_expert_A[adapter], self.mole_expert_B[adapter]
            # only the active experts enter the graph: one matmul for all their A_j, one for all their B_j
            a = torch.cat([experts_a[str(j)] for j in ids], dim=0)  # (n·r, d_in)
            b = torch.cat([experts_b[str(j)] for j in ids], dim=1)  # (d_out, n·r)
            h = F.linear(x, a).unflatten(-1, (len(ids), r))  # A_j x: (..., n, r)
            t = F.linear(x, proj)  # P x: (..., r)
            z, gates = route(h, t, self.mole_top_k[adapter])
            h_out = h if dropped is x else F.linear(dropped, a).unflatten(-1, (len(ids), r))  # A_j·dropout(x)
            out = out + F.linear((h_out * gates.unsqueeze(-1)).flatten(-2), b)
            recorder = self._mole_recorder
            if recorder is not None and recorder.active:
                recorder.record(self._mole_name, adapter, ids, z, t, h)
        return out * self.mole_scaling[adapter]

    def __repr__(self) -> str:
        return "mole." + super().__repr__()
