"""`MoLEModel`: a `peft.PeftModel` with one MoLE adapter and the client-swapping interface of the federated simulation.

The federated client model holds the whole expert pool (`E` domain experts per module) and routes over the experts
the server assigned to the client in play (the *active* experts). It offers the same interface as
[`~hf_perfit.PerFITModel`], so the simulation swaps clients in and out of one shared base model the same way:

- [`get_adapter_state`] / [`set_adapter_state`]: the shared expert, `P` and the *active* experts only; which
  experts are active is read off the tensor keys, so a server instruction carrying a client's assigned experts
  also sets its architecture;
- [`client_extras`]: the routing statistics FedAMoLE's server assigns experts with (the mean token embedding
  `t̄_c` and the per-expert mean embeddings, over the non-padding tokens of the round's training batches);
- [`auxiliary_loss`]: the load-balancing loss of the last training forward, for trainers that compute the LM loss
  themselves (TRL's `SFTTrainer` does); a forward with `labels` adds it to `outputs.loss` directly;
- [`save_pretrained`]: a PEFT adapter folder with the active experts only, recorded in `held_experts` of its
  `adapter_config.json`; `peft.PeftModel.from_pretrained(base, folder)` (after `import hf_perfit`) rebuilds
  exactly that architecture.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from .._io import atomic_directory
from ..model import _unpack_cpu_4bit_weights
from .config import MoLEConfig
from .keys import (
    EXPERT_KINDS,
    NUM_TOKENS_KEY,
    SHARED_KINDS,
    expert_key,
    expert_mean_key,
    parse_key,
    shared_key,
    token_mean_key,
)
from .layer import MoLELayer, balance_loss
from .tuner import register

__all__ = ["MoLEModel", "get_mole_model"]


class _RoutingRecorder:
    """Collects the routing of the layers during one training forward of a [`MoLEModel`].

    Only [`MoLEModel.forward`] switches it on, so a gradient-checkpointing recomputation during backward (which
    re-runs the layers after the forward returned) records nothing twice.
    """

    def __init__(self) -> None:
        self.active = False
        self.records: list[tuple[str, str, list[int], torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def record(self, name: str, adapter: str, ids: list[int], z, t, h) -> None:
        # z keeps its graph (the balance loss backpropagates through it); t and h only feed statistics
        self.records.append((name, adapter, list(ids), z, t.detach(), h.detach()))


class MoLEModel(PeftModel):
    """A PEFT model with one MoLE adapter (FedAMoLE's mixture of LoRA experts) and per-client expert sets.

    Args:
        model ([`~transformers.PreTrainedModel`]): the base model.
        peft_config ([`MoLEConfig`]): the MoLE configuration.
        adapter_name (`str`, defaults to `"default"`): name of the adapter.
        autocast_adapter_dtype (`bool`, defaults to `True`): as in `PeftModel` (adapter weights in float32).
        low_cpu_mem_usage (`bool`, defaults to `False`): as in `PeftModel`.
    """

    def __init__(
        self,
        model: nn.Module,
        peft_config: MoLEConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        if not isinstance(peft_config, MoLEConfig):
            raise TypeError(f"MoLEModel needs a MoLEConfig, got {type(peft_config).__name__}.")
        register()
        super().__init__(model, peft_config, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage)
        self._adapter = adapter_name
        self._recorder = _RoutingRecorder()
        self._layers: dict[str, MoLELayer] = {}
        for name, module in self.base_model.model.named_modules():
            if isinstance(module, MoLELayer) and adapter_name in module.mole_P:
                module._mole_recorder = self._recorder
                module._mole_name = name
                self._layers[name] = module
        if not self._layers:
            raise ValueError(f"target_modules={peft_config.target_modules!r} matched no Linear layer of the model.")
        self._pending_aux: torch.Tensor | None = None
        self._reset_statistics()

    # ------------------------------------------------------------------ architecture

    @property
    def mole_config(self) -> MoLEConfig:
        """The adapter's [`MoLEConfig`]."""
        return self.peft_config[self._adapter]

    @property
    def module_names(self) -> list[str]:
        """The wrapped modules, as named in the base model (`model.layers.0.self_attn.q_proj`)."""
        return list(self._layers)

    def held_experts(self) -> dict[str, list[int]]:
        """The domain experts stored per module (all `E` in a federated client model)."""
        return {name: layer.held_experts(self._adapter) for name, layer in self._layers.items()}

    def active_experts(self) -> dict[str, list[int]]:
        """The domain experts the router uses per module (the client's assigned experts)."""
        return {name: list(layer.mole_active[self._adapter]) for name, layer in self._layers.items()}

    def set_active_experts(self, experts: dict[str, list[int]] | list[int]) -> None:
        """Route over `experts` only: a list applies to every module, a dict gives them per module (every module
        named). Experts must be held; the others are neither computed nor trained."""
        if isinstance(experts, dict):
            missing = sorted(set(self._layers) - set(experts))
            unknown = sorted(set(experts) - set(self._layers))
            if missing or unknown:
                raise ValueError(
                    f"expert sets must name every MoLE module: missing {missing[:3]}, unknown {unknown[:3]}."
                )
            per_module = experts
        else:
            per_module = {name: experts for name in self._layers}
        for name, layer in self._layers.items():
            layer.set_active_experts(self._adapter, list(per_module[name]))

    @property
    def is_searching(self) -> bool:
        """Always `False`: MoLE has no architecture search on the client (the server assigns the experts)."""
        return False

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        """Every adapter parameter (shared expert, `P`, all held experts), keyed like the adapter state dict."""
        params: dict[str, nn.Parameter] = {}
        a = self._adapter
        for name, layer in self._layers.items():
            params[shared_key(name, "shared_A")] = layer.mole_shared_A[a]
            params[shared_key(name, "shared_B")] = layer.mole_shared_B[a]
            params[shared_key(name, "P")] = layer.mole_P[a]
            for j in layer.held_experts(a):
                params[expert_key(name, "expert_A", j)] = layer.mole_expert_A[a][str(j)]
                params[expert_key(name, "expert_B", j)] = layer.mole_expert_B[a][str(j)]
        return params

    def _active_keys(self) -> list[str]:
        keys = []
        for name, layer in self._layers.items():
            keys += [shared_key(name, kind) for kind in SHARED_KINDS]
            for j in layer.mole_active[self._adapter]:
                keys += [expert_key(name, kind, j) for kind in EXPERT_KINDS]
        return keys

    def density(self) -> float:
        """The fraction of the adapter's parameters the client uses: shared experts, `P` and its active experts over
        shared experts, `P` and every held expert (1.0 when every held expert is active)."""
        params = self.lora_parameters()
        return sum(params[k].numel() for k in self._active_keys()) / sum(p.numel() for p in params.values())

    def train(self, mode: bool = True) -> MoLEModel:
        """As `nn.Module.train`; entering training mode also undoes bitsandbytes' CPU inference packing of 4-bit
        base weights (made by any eval-mode forward), whose kernel has no backward (as [`PerFITModel.train`])."""
        if mode:
            _unpack_cpu_4bit_weights(self)
        return super().train(mode)

    # ------------------------------------------------------------------ client state (federated swapping)

    def get_adapter_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        """The client's adapter: shared expert, `P` and active experts (CPU float32 copies), no masks, and the active
        expert ids per module in `meta["experts"]`. The inverse of [`set_adapter_state`]."""
        params = self.lora_parameters()
        tensors = {k: params[k].detach().float().cpu().clone() for k in self._active_keys()}
        return tensors, {}, {"experts": self.active_experts()}

    @torch.no_grad()
    def set_adapter_state(
        self,
        tensors: dict[str, torch.Tensor],
        masks: dict[str, torch.Tensor] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Load a client's adapter: every module's shared expert and `P`, plus any set of its held experts, which
        become the active ones (experts not in `tensors` keep their values but are not used). Resets the routing
        statistics of [`client_extras`].

        Args:
            tensors (`dict[str, Tensor]`): keyed like [`get_adapter_state`].
            masks: must be `None` or empty (MoLE has no element masks).
            meta: ignored (the experts are read off the keys); accepted for the common client-state interface.
        """
        if masks:
            raise ValueError("a MoLE adapter has no element masks; pass masks=None.")
        params = self.lora_parameters()
        experts: dict[str, set[int]] = {name: set() for name in self._layers}
        halves: dict[tuple[str, int], set[str]] = {}
        for key in tensors:
            parsed = parse_key(key)
            if parsed is None or key not in params:
                raise ValueError(
                    f"{key!r} is not a tensor of this MoLE adapter (its keys look like {next(iter(params))!r}; an "
                    "expert must be one the model holds)."
                )
            if parsed.expert is not None:
                experts[parsed.module].add(parsed.expert)
                halves.setdefault((parsed.module, parsed.expert), set()).add(parsed.kind)
        missing = [
            shared_key(n, kind) for n in self._layers for kind in SHARED_KINDS if shared_key(n, kind) not in tensors
        ]
        if missing:
            raise ValueError(f"adapter state lacks {len(missing)} shared tensors (first: {missing[0]}).")
        for (name, j), kinds in halves.items():
            if len(kinds) != 2:
                raise ValueError(
                    f"expert {j} of {name} comes with {sorted(kinds)} only; send both expert_A and expert_B."
                )
        for key, t in tensors.items():  # check everything before changing anything
            if tuple(t.shape) != tuple(params[key].shape):
                raise ValueError(f"{key} has shape {tuple(t.shape)}, expected {tuple(params[key].shape)}.")
        for key, t in tensors.items():
            params[key].copy_(t.to(device=params[key].device, dtype=params[key].dtype))
        self.set_active_experts({name: sorted(ids) for name, ids in experts.items()})
        self._reset_statistics()

    # ------------------------------------------------------------------ routing statistics (RSEA)

    def _reset_statistics(self) -> None:
        self._stats: dict[str, dict[str, Any]] = {}
        self._num_tokens = 0.0
        self._recorder.records = []
        self._pending_aux = None

    def client_extras(self) -> dict[str, torch.Tensor]:
        """What FedAMoLE's server needs to assign experts, over the non-padding tokens of the training forwards
        since the last [`set_adapter_state`]: per module `t̄_c` (mean of `P x`) and, per active expert, `e_j(c)`
        (mean of `A_j x`), plus the token count; keys as in [`hf_perfit.mole.keys`]. Empty before any training."""
        if self._num_tokens <= 0:
            return {}
        out: dict[str, torch.Tensor] = {NUM_TOKENS_KEY: torch.tensor([self._num_tokens], dtype=torch.float32)}
        active = self.active_experts()
        for name, s in self._stats.items():
            count = s["count"]
            if count <= 0:
                continue
            out[token_mean_key(name)] = (s["token_sum"] / count).float()
            for j, total in sorted(s["expert_sum"].items()):
                if j in active[name]:  # only experts the client holds now (what the server expects)
                    out[expert_mean_key(name, j)] = (total / count).float()
        return out

    def _fold_statistics(self, attention_mask: torch.Tensor | None) -> None:
        seen_tokens = None
        for name, adapter, ids, _z, t, h in self._recorder.records:
            if adapter != self._adapter:
                continue
            w = _token_weights(attention_mask, t.shape[:-1]).to(device=t.device, dtype=torch.float64)
            r = t.shape[-1]
            t2, h2 = t.reshape(-1, r).double(), h.reshape(-1, len(ids), r).double()
            s = self._stats.setdefault(
                name, {"count": 0.0, "token_sum": torch.zeros(r, dtype=torch.float64), "expert_sum": {}}
            )
            count = float(w.sum())
            s["count"] += count
            s["token_sum"] += (t2 * w[:, None]).sum(0).cpu()
            sums = (h2 * w[:, None, None]).sum(0).cpu()
            for i, j in enumerate(ids):
                s["expert_sum"][j] = s["expert_sum"].get(j, torch.zeros(r, dtype=torch.float64)) + sums[i]
            seen_tokens = count if seen_tokens is None else seen_tokens
        self._num_tokens += seen_tokens or 0.0

    # ------------------------------------------------------------------ forward and the balance loss

    def forward(self, *args: Any, **kwargs: Any):
        """As `PeftModel.forward`. In training mode with gradients on, also records the routing: the balance loss of
        this forward is added to `outputs.loss` when the model computed one (`labels` given, no fused LM head),
        otherwise kept for [`auxiliary_loss`]; the routing statistics of [`client_extras`] are updated."""
        recorder = self._recorder
        recording = self.training and torch.is_grad_enabled()
        recorder.records, self._pending_aux = [], None
        recorder.active = recording
        try:
            outputs = super().forward(*args, **kwargs)
        finally:
            recorder.active = False
        if not recording or not recorder.records:
            return outputs
        mask = kwargs.get("attention_mask")
        self._fold_statistics(mask)
        aux = self._balance_loss(mask)
        recorder.records = []  # the graph of z now lives in `aux` only
        if aux is None:
            return outputs
        loss = getattr(outputs, "loss", None)
        if loss is not None and kwargs.get("labels") is not None and not kwargs.get("fused_lm_head"):
            outputs.loss = loss + aux.to(loss)
        else:
            self._pending_aux = aux
        return outputs

    def _balance_loss(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        coef = float(self.mole_config.balance_loss_coef)
        if coef == 0.0:
            return None
        losses = [
            balance_loss(z, self.mole_config.top_k, _token_weights(attention_mask, z.shape[:-1]).to(z.device))
            for _name, adapter, _ids, z, _t, _h in self._recorder.records
            if adapter == self._adapter
        ]
        # Summed over the MoLE layers, as the authors' code accumulates it (docs/fedamole.md): a mean would make the
        # term 60x weaker on SmolLM2-135M (30 layers x q_proj, v_proj).
        return coef * torch.stack(losses).sum() if losses else None

    def auxiliary_loss(self) -> torch.Tensor | None:
        """The weighted balance loss `balance_loss_coef · Σ over MoLE layers` of the last training forward that
        did not already add it to `outputs.loss`, or `None`; each value is handed out once."""
        aux, self._pending_aux = self._pending_aux, None
        return aux

    # ------------------------------------------------------------------ save

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write the adapter atomically as a PEFT folder: `adapter_config.json` (a [`MoLEConfig`] whose
        `held_experts` are this model's active experts) and `adapter_model.safetensors` with the shared experts,
        `P` and the active experts only. Reload with `peft.PeftModel.from_pretrained(base, folder)` or
        `MoLEModel.from_pretrained(base, folder)` (after `import hf_perfit`)."""
        if not kwargs.get("is_main_process", True):
            return
        if kwargs.get("safe_serialization") is False:
            raise ValueError("MoLE adapters are written as safetensors only; drop safe_serialization=False.")
        kwargs.pop("selected_adapters", None)
        keep = set(self._active_keys())
        params = self.lora_parameters()
        dropped = {id(p) for k, p in params.items() if k not in keep}
        state = {k: v.detach() for k, v in self.state_dict(keep_vars=True).items() if id(v) not in dropped}
        config = self.mole_config
        previous = config.held_experts
        config.held_experts = self.active_experts()
        try:
            with atomic_directory(save_directory) as tmp:
                super().save_pretrained(str(tmp), selected_adapters=[self._adapter], state_dict=state, **kwargs)
        finally:
            config.held_experts = previous


def _token_weights(attention_mask: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    """Per-token weights of the flattened `shape`: the attention mask when it fits (padding weighs 0), else ones
    (e.g. a cached generation step, whose mask covers the whole history)."""
    if attention_mask is not None and tuple(attention_mask.shape) == tuple(shape):
        return attention_mask.reshape(-1).float()
    return torch.ones(int(torch.Size(shape).numel()))


def get_mole_model(model: nn.Module, config: MoLEConfig, adapter_name: str = "default") -> MoLEModel:
    """Wrap `model` with a MoLE adapter: the analogue of `peft.get_peft_model` for [`MoLEConfig`]."""
    return MoLEModel(model, config, adapter_name=adapter_name)
