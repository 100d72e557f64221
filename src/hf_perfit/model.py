"""`PerFITModel`: a `peft.PeftModel` whose LoRA is expanded, symmetrically initialised and pruned by Taylor importance.

How it maps onto PEFT: the adapter is a plain PEFT LoRA of rank `R = γ·r` built from
[`PerFITLoraConfig.to_lora_config`] (so Linear, GPT-2 `Conv1D` and bitsandbytes 4-bit targets all use PEFT's own
layers). PerFIT adds, in this class:

- the symmetric initialisation `A = [A₀; A₀]`, `B = [B₀, −B₀]` (output starts exactly at the base model);
- one boolean mask per LoRA matrix, keyed like the PEFT adapter state dict;
- the architecture search. `search_mode="foresight"` (default, the paper's): [`foresight_search`] scores the
  elements from gradients on a few local batches, with no optimizer step, and prunes to the budget before training
  starts (symmetric pairs are pruned together, docs/perfit.md). `search_mode="train"`: [`before_optimizer_step`]
  folds `|θ·g|` into an EMA during the first `search_steps` steps and [`after_optimizer_step`] prunes at the
  scheduled steps. In both modes [`before_optimizer_step`] masks the gradients and [`after_optimizer_step`]
  re-zeroes pruned weights (Adam's momentum and weight decay would otherwise move them). A Trainer uses these through
  [`PerFITPruningCallback`]; a hand-written loop calls them around `optimizer.step()`.

Pruned elements are *stored* as exact zeros in the dense LoRA tensors, so an exported adapter is an ordinary LoRA
that plain `peft.PeftModel.from_pretrained` loads and that reproduces the logits.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ._io import atomic_directory, atomic_write_json
from .config import PerFITLoraConfig
from .importance import ImportanceTracker, global_topk_masks, keep_schedule, prune_steps

PERFIT_CONFIG_NAME = "perfit_config.json"
PERFIT_MASKS_NAME = "perfit_masks.safetensors"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
FORMAT_VERSION = 1


class PerFITModel(PeftModel):
    """A PEFT model with one PerFIT adapter (expanded LoRA + masks + Taylor-importance architecture search).

    Create it with [`get_perfit_model`] or `PerFITModel(base_model, PerFITLoraConfig(...))`; reload a saved one with
    [`PerFITModel.from_pretrained`]. `model.peft_config[adapter]` is the plain expanded `LoraConfig` PEFT runs;
    `model.perfit_config` is the `PerFITLoraConfig` you passed.

    Args:
        model ([`~transformers.PreTrainedModel`]): the base model.
        peft_config ([`PerFITLoraConfig`]): the PerFIT configuration.
        adapter_name (`str`, defaults to `"default"`): name of the adapter.
        autocast_adapter_dtype (`bool`, defaults to `True`): as in `PeftModel` (adapter weights in float32).
    """

    def __init__(
        self,
        model: nn.Module,
        peft_config: PerFITLoraConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        if not isinstance(peft_config, PerFITLoraConfig):
            raise TypeError(
                f"PerFITModel needs a PerFITLoraConfig, got {type(peft_config).__name__}; for a plain LoRA use "
                "peft.get_peft_model."
            )
        _refuse_unsupported_base(model)
        try:
            with warnings.catch_warnings():
                # peft 0.21 reads `model.is_gradient_checkpointing`, which transformers 5.24 deprecated: a FutureWarning
                # on every wrap (every client model) that no user setting can address
                warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
                super().__init__(
                    model, peft_config.to_lora_config(), adapter_name, autocast_adapter_dtype, low_cpu_mem_usage
                )
        except ValueError as err:
            if "not found in the base model" in str(err) or "No modules were targeted" in str(err):
                raise ValueError(
                    f"target_modules={_show_targets(peft_config.target_modules)} matched no module of "
                    f"{type(model).__name__}; allowed values are names of its Linear/Conv1D layers, e.g. "
                    f"{_linear_names(model)[:8]}."
                ) from err
            raise
        self.perfit_config = peft_config
        self._adapter = adapter_name
        self._layers: dict[str, LoraLayer] = {}
        self._params: dict[str, nn.Parameter] = {}
        for name, module in self.base_model.model.named_modules():
            if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
                continue
            if not isinstance(module.lora_A[adapter_name], nn.Linear):
                raise ValueError(
                    f"PerFIT supports Linear and GPT-2 Conv1D targets; {name} is a {type(module).__name__}. Remove "
                    "it from target_modules."
                )
            prefix = f"base_model.model.{name}"
            self._layers[prefix] = module
            self._params[f"{prefix}.lora_A.weight"] = module.lora_A[adapter_name].weight
            self._params[f"{prefix}.lora_B.weight"] = module.lora_B[adapter_name].weight
        if not self._layers:  # PEFT normally refuses first; keep the promise of a clear error regardless
            raise ValueError(f"target_modules={_show_targets(peft_config.target_modules)} matched no Linear layer.")
        if peft_config.init_lora_weights == "symmetric":
            self._symmetric_init()
        self._masks: dict[str, torch.Tensor] = {
            k: torch.ones_like(p, dtype=torch.bool, device=p.device) for k, p in self._params.items()
        }
        self._float_masks: dict[str, torch.Tensor] | None = None  # None while nothing is pruned
        self._tracker = ImportanceTracker(peft_config.importance, peft_config.importance_ema)
        self._budget = self._compute_budget()
        self._search_step = 0
        self._iterations_done = 0
        self._split_pairs = 0
        self._schedule_steps = prune_steps(peft_config.search_steps, peft_config.prune_iterations)
        self._schedule_keep = keep_schedule(self.expanded_size(), self._budget, peft_config.prune_iterations)

    # ------------------------------------------------------------------ sizes and budget

    def expanded_size(self) -> int:
        """Number of elements of the expanded adapter: `R·(d_in + d_out)` summed over target modules."""
        return sum(p.numel() for p in self._params.values())

    def _compute_budget(self) -> int:
        cfg = self.perfit_config
        base = sum(cfg.r * (layer.in_features + layer.out_features) for layer in self._layers.values())
        # Round, not floor: 1.0 * budget must give the budget exactly even after float error.
        return min(self.expanded_size(), max(1, math.floor(cfg.budget_multiplier * base + 0.5)))

    def set_budget_multiplier(self, multiplier: float) -> None:
        """Change `budget_multiplier` (e.g. per federated client, for heterogeneous resources) and recompute the
        budget and pruning schedule. Only allowed before the search has pruned anything."""
        if not isinstance(multiplier, int | float) or isinstance(multiplier, bool) or not multiplier > 0:
            raise ValueError(f"budget_multiplier={multiplier!r} must be a number > 0.")
        if self._iterations_done:
            raise RuntimeError("the search already pruned with the old budget; call start_search() first.")
        self.perfit_config.budget_multiplier = float(multiplier)
        self._budget = self._compute_budget()
        self._schedule_keep = keep_schedule(self.expanded_size(), self._budget, self.perfit_config.prune_iterations)

    def trainable_budget(self) -> int:
        """Elements this client keeps: `r·(d_in + d_out)` summed over target modules, times `budget_multiplier`,
        capped at [`expanded_size`]."""
        return self._budget

    # ------------------------------------------------------------------ masks

    def masks(self) -> dict[str, torch.Tensor]:
        """The boolean keep-masks, keyed like the PEFT adapter state dict (`...lora_A.weight`). Do not modify them
        in place: use [`set_masks`]."""
        return dict(self._masks)

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        """The LoRA parameters, keyed like [`masks`] and like `peft.get_peft_model_state_dict`."""
        return dict(self._params)

    def num_kept(self) -> int:
        """Number of kept (unmasked) elements."""
        return sum(int(m.sum()) for m in self._masks.values())

    def density(self) -> float:
        """Kept elements over [`expanded_size`]."""
        return self.num_kept() / self.expanded_size()

    def kept_per_module(self) -> dict[str, int]:
        """Kept elements per target module (its `lora_A` and `lora_B` together): the searched architecture."""
        return {
            prefix: int(self._masks[f"{prefix}.lora_A.weight"].sum())
            + int(self._masks[f"{prefix}.lora_B.weight"].sum())
            for prefix in self._layers
        }

    @torch.no_grad()
    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Replace the masks (same keys and shapes as [`masks`]) and zero the newly pruned weights."""
        if set(masks) != set(self._masks):
            missing, extra = sorted(set(self._masks) - set(masks)), sorted(set(masks) - set(self._masks))
            raise ValueError(f"masks do not fit this adapter: missing {missing[:3]}, unexpected {extra[:3]}.")
        for k, m in masks.items():
            if tuple(m.shape) != tuple(self._masks[k].shape):
                raise ValueError(f"mask {k} has shape {tuple(m.shape)}, expected {tuple(self._masks[k].shape)}.")
        self._masks = {k: masks[k].to(device=self._params[k].device, dtype=torch.bool) for k in self._masks}
        pruned = any(not bool(m.all()) for m in self._masks.values())
        self._float_masks = (
            {k: m.to(self._params[k].dtype) for k, m in self._masks.items()} if pruned else None  # for _foreach_mul_
        )
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Set every pruned element to exactly 0.0."""
        if self._float_masks is None:
            return
        keys = list(self._params)
        torch._foreach_mul_([self._params[k].data for k in keys], [self._float_masks[k] for k in keys])

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradients of pruned elements (before the optimizer step)."""
        if self._float_masks is None:
            return
        pairs = [(p.grad, self._float_masks[k]) for k, p in self._params.items() if p.grad is not None]
        if pairs:
            torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])

    # ------------------------------------------------------------------ search

    @property
    def is_searching(self) -> bool:
        """True while the architecture search has pruning iterations left."""
        return self._iterations_done < len(self._schedule_steps) and self._budget < self.expanded_size()

    def importance_scores(self) -> dict[str, torch.Tensor]:
        """The importance accumulated since the last pruning iteration (see `PerFITLoraConfig.importance`)."""
        return self._tracker.scores()

    def accumulate_importance(self) -> bool:
        """Fold the current gradients into the importance EMA. Returns False when no gradient is present."""
        return self._tracker.update(self._params)

    @torch.no_grad()
    def prune_to(
        self,
        num_keep: int | None = None,
        *,
        density: float | None = None,
        scores: dict[str, torch.Tensor] | None = None,
    ) -> int:
        """Keep the `num_keep` (or `density · expanded_size`) most important of the currently kept elements, with
        one global threshold across all target modules; pruned weights become exactly 0.

        Args:
            num_keep (`int`, *optional*): number of elements to keep.
            density (`float`, *optional*): fraction of [`expanded_size`] to keep (instead of `num_keep`).
            scores (`dict[str, Tensor]`, *optional*): importance per element; defaults to the accumulated EMA.

        Returns:
            `int`: the number of kept elements.
        """
        if (num_keep is None) == (density is None):
            raise ValueError("pass exactly one of num_keep= and density=.")
        if density is not None:
            if not 0.0 < density <= 1.0:
                raise ValueError(f"density={density} must be in (0, 1].")
            num_keep = max(1, math.floor(density * self.expanded_size() + 0.5))
        scores = self._tracker.scores() if scores is None else scores
        self.set_masks(global_topk_masks(scores, self._masks, int(num_keep)))
        return self.num_kept()

    def start_search(self, reset_masks: bool = True) -> None:
        """Restart the architecture search (e.g. every `research_every` rounds). With `reset_masks`, every element
        becomes trainable again (pruned ones restart from 0)."""
        self._search_step = 0
        self._iterations_done = 0
        self._tracker.reset()
        if reset_masks:
            self.set_masks({k: torch.ones_like(m) for k, m in self._masks.items()})

    @property
    def uses_symmetric_pairs(self) -> bool:
        """Whether pruning keeps the symmetric init's pairs together: foresight search on a symmetric init, where
        rank `i` and rank `i + R/2` cancel exactly (`A` rows equal, `B` columns opposite)."""
        cfg = self.perfit_config
        return cfg.search_mode == "foresight" and cfg.init_lora_weights == "symmetric"

    def foresight_search(
        self,
        batches: Iterable[Any],
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """PerFIT's foresight search (docs/perfit.md): prune the expanded adapter to the budget *before* training.

        Takes the first `search_batches` batches of `batches`, splits them evenly over the `prune_iterations`
        pruning iterations (fewer batches than iterations: they are reused in turn), and in each iteration
        accumulates the Taylor importance (`importance`, EMA as in training) from `loss.backward()` on its batches,
        then keeps the next count of the geometric schedule with one global threshold. No optimizer step is taken
        and no weight changes except the pruned ones (set to 0), so a client trains only the kept elements. With the
        symmetric init the pairs (rank `i`, rank `i + R/2`) are scored and pruned together; when the count is odd
        the one pair that must split keeps its half at value 0, so `B·A = 0` still holds exactly and the model's
        output does not move (the count of such pairs is `search_state()["split_pairs"]`).

        Args:
            batches (`Iterable`): batches for `loss_fn`, e.g. a `DataLoader` of tokenized rows with `labels`.
            loss_fn (`Callable[[model, batch], Tensor]`, *optional*): the loss of one batch. Defaults to
                `model(input_ids=..., attention_mask=..., labels=...).loss` of a dict batch (moved to the model's
                device).

        Returns:
            `dict`: [`search_state`] after the search. Does nothing when the search is already done.
        """
        if not self.is_searching:
            return self.search_state()
        cfg = self.perfit_config
        taken = list(itertools.islice(iter(batches), cfg.search_batches))
        if not taken:
            raise ValueError("foresight_search got no batches; pass at least one batch of this client's data.")
        loss_fn = _default_loss if loss_fn is None else loss_fn
        params = list(self._params.values())
        remaining = len(self._schedule_keep) - self._iterations_done
        n = len(taken)
        for i in range(remaining):
            chunk = taken[(i * n) // remaining : ((i + 1) * n) // remaining] or [taken[i % n]]
            self._tracker.reset()
            for batch in chunk:
                for p in params:
                    p.grad = None
                with torch.enable_grad():
                    loss = loss_fn(self, batch)
                    if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
                        raise ValueError(
                            "the foresight loss has no gradient: loss_fn must return the differentiable loss of the "
                            "batch (a batch needs `labels` for the default loss_fn)."
                        )
                    loss.backward()
                _average_gradients_across_processes(params)
                self._search_step += 1
                if not self._tracker.update(self._params):
                    raise RuntimeError("no gradient reached the PerFIT LoRA parameters during the foresight search.")
            keep = self._schedule_keep[self._iterations_done]
            if self.uses_symmetric_pairs:
                self._prune_pairs(self._tracker.scores(), keep)
            else:
                self.prune_to(keep)
            self._iterations_done += 1
        for p in params:
            p.grad = None
        self._tracker.reset()
        return self.search_state()

    @torch.no_grad()
    def _prune_pairs(self, scores: dict[str, torch.Tensor], num_keep: int) -> None:
        """Keep `num_keep` elements choosing whole symmetric pairs by their summed score (one global threshold); at
        most one pair splits (odd count), and every split pair keeps its half at exactly 0 ([`split_pair_count`])."""
        keys = list(self._params)
        halves = {}  # per tensor: (pair score, first-half mask, second-half mask), all of the half shape
        for k in keys:
            dim = _pair_dim(k)
            h = self._masks[k].shape[dim] // 2
            s, m = scores[k].detach().float().to(self._masks[k].device), self._masks[k]
            halves[k] = (s.narrow(dim, 0, h) + s.narrow(dim, h, h), m.narrow(dim, 0, h), m.narrow(dim, h, h))
        score = torch.cat([halves[k][0].flatten() for k in keys])
        first = torch.cat([halves[k][1].flatten() for k in keys])
        second = torch.cat([halves[k][2].flatten() for k in keys])
        count = first.long() + second.long()
        kept_now = int(count.sum())
        if not 0 < num_keep <= kept_now:
            raise ValueError(f"num_keep={num_keep} must be in (0, currently kept={kept_now}].")
        # Best pairs first; among equal scores the earlier pair first (deterministic). Pairs already pruned count 0.
        order = torch.argsort(torch.nan_to_num(score, nan=0.0), descending=True, stable=True)
        total = count[order].cumsum(0)
        whole = total <= num_keep
        new_count = torch.zeros_like(count)
        new_count[order[whole]] = count[order[whole]]
        short = num_keep - int(new_count.sum())
        if short:  # the next pair gives one of its two elements: that pair splits
            new_count[order[int(whole.sum())]] = short
        keep_first = (new_count == 2) | ((new_count == 1) & first)
        keep_second = (new_count == 2) | ((new_count == 1) & ~first & second)
        masks, offset = {}, 0
        for k in keys:
            dim, half_shape = _pair_dim(k), halves[k][0].shape
            size = halves[k][0].numel()
            a = keep_first[offset : offset + size].view(half_shape)
            b = keep_second[offset : offset + size].view(half_shape)
            masks[k] = torch.cat([a, b], dim=dim)
            offset += size
        self.set_masks(masks)
        self._split_pairs = self._zero_split_pairs()

    @torch.no_grad()
    def _zero_split_pairs(self) -> int:
        """Set the kept half of every split pair (one half kept, its partner pruned) to 0.0 so that the pair still
        cancels (`B·A = 0`). Returns the number of split pairs."""
        split = 0
        for k, p in self._params.items():
            dim, m = _pair_dim(k), self._masks[k]
            h = m.shape[dim] // 2
            m1, m2 = m.narrow(dim, 0, h), m.narrow(dim, h, h)
            lone = m1 ^ m2
            split += int(lone.sum())
            p.data.narrow(dim, 0, h).masked_fill_(lone & m1, 0.0)
            p.data.narrow(dim, h, h).masked_fill_(lone & m2, 0.0)
        return split

    def split_pair_count(self) -> int:
        """Symmetric pairs (`A` rows `i`, `i + R/2` element-wise; `B` columns likewise) of which exactly one element
        is kept. 0 for an odd expanded rank (no pairs)."""
        total = 0
        for k, m in self._masks.items():
            dim = _pair_dim(k)
            if m.shape[dim] % 2:
                return 0
            h = m.shape[dim] // 2
            total += int((m.narrow(dim, 0, h) ^ m.narrow(dim, h, h)).sum())
        return total

    def before_optimizer_step(self) -> None:
        """Call after `backward()` (and gradient clipping), before `optimizer.step()`: accumulates importance during
        a `search_mode="train"` search and masks the gradients of pruned elements."""
        if not any(p.grad is not None for p in self._params.values()):
            raise RuntimeError(
                "no gradient reached the PerFIT LoRA parameters before the optimizer step. Call loss.backward() "
                "first, and put the model in training mode with model.train() (on a bitsandbytes 4-bit base, an "
                "eval-mode forward on CPU switches the layers to an inference kernel that has no backward)."
            )
        if self.is_searching and self.perfit_config.search_mode == "foresight":
            raise RuntimeError(
                "PerFIT's search_mode='foresight' prunes before training, but this model has not searched yet: call "
                "model.foresight_search(batches) before the first optimizer step (PerFITPruningCallback does it at "
                "on_train_begin), or build the config with search_mode='train' to prune while training."
            )
        if self.is_searching:
            self._tracker.update(self._params)
        self.mask_gradients()

    def after_optimizer_step(self) -> bool:
        """Call right after `optimizer.step()`: advances the search schedule, prunes when a pruning iteration is
        due, and re-zeroes pruned weights. Returns True when it pruned."""
        pruned = False
        if self.is_searching and self.perfit_config.search_mode == "train":
            self._search_step += 1
            if self._search_step >= self._schedule_steps[self._iterations_done]:
                self.prune_to(self._schedule_keep[self._iterations_done])
                self._iterations_done += 1
                self._tracker.reset()
                pruned = True
        self.apply_masks()
        return pruned

    def search_state(self) -> dict[str, Any]:
        """Where the search stands: steps (or foresight batches) taken, pruning iterations done, kept count, budget
        and split symmetric pairs."""
        return {
            "search_mode": self.perfit_config.search_mode,
            "split_pairs": self.split_pair_count(),
            "search_step": self._search_step,
            "prune_iterations_done": self._iterations_done,
            "searching": self.is_searching,
            "num_kept": self.num_kept(),
            "budget": self._budget,
            "expanded_size": self.expanded_size(),
        }

    def train(self, mode: bool = True) -> PerFITModel:
        """As `nn.Module.train`; entering training mode also undoes bitsandbytes' CPU inference packing of 4-bit
        weights (made by any eval-mode forward), whose kernel has no backward and would silently stop gradients."""
        if mode:
            _unpack_cpu_4bit_weights(self)
        return super().train(mode)

    # ------------------------------------------------------------------ whole client state (federated swapping)

    def get_adapter_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        """Everything that makes this adapter *this client's*: LoRA tensors (CPU float32 copies), masks and search
        progress with the budget multiplier. The inverse of [`set_adapter_state`]; used to swap clients in and out of
        one shared base model."""
        tensors = {k: p.detach().float().cpu().clone() for k, p in self._params.items()}
        masks = {k: m.cpu().clone() for k, m in self._masks.items()}
        meta = {
            "search_step": self._search_step,
            "prune_iterations_done": self._iterations_done,
            "budget_multiplier": self.perfit_config.budget_multiplier,
        }
        return tensors, masks, meta

    @torch.no_grad()
    def set_adapter_state(
        self,
        tensors: dict[str, torch.Tensor],
        masks: dict[str, torch.Tensor] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Load LoRA tensors (all keys of [`lora_parameters`]), and optionally masks and search progress. Without
        `masks` every element is kept (a client that has not searched yet); without `meta` the search restarts."""
        missing = sorted(set(self._params) - set(tensors))
        if missing:
            raise ValueError(f"adapter state lacks {len(missing)} tensors (first: {missing[0]}).")
        for k, p in self._params.items():
            if tuple(tensors[k].shape) != tuple(p.shape):
                raise ValueError(f"{k} has shape {tuple(tensors[k].shape)}, expected {tuple(p.shape)}.")
            p.copy_(tensors[k].to(device=p.device, dtype=p.dtype))
        meta = meta or {}
        self._iterations_done = 0  # allows changing the budget below
        self.set_budget_multiplier(float(meta.get("budget_multiplier", self.perfit_config.budget_multiplier)))
        self.set_masks(masks if masks is not None else {k: torch.ones_like(m) for k, m in self._masks.items()})
        self._search_step = int(meta.get("search_step", 0))
        self._iterations_done = int(meta.get("prune_iterations_done", 0))
        self._tracker.reset()

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def _symmetric_init(self) -> None:
        std = self.perfit_config.symmetric_init_std
        for layer in self._layers.values():
            a = layer.lora_A[self._adapter].weight  # (R, d_in)
            b = layer.lora_B[self._adapter].weight  # (d_out, R)
            half = a.shape[0] // 2
            a0 = torch.empty(half, a.shape[1], dtype=torch.float32)
            nn.init.kaiming_uniform_(a0, a=math.sqrt(5))  # as PEFT's LoRA init for A
            b0 = torch.randn(b.shape[0], half, dtype=torch.float32) * std
            a.copy_(torch.cat([a0, a0], dim=0).to(a))
            b.copy_(torch.cat([b0, -b0], dim=1).to(b))

    # ------------------------------------------------------------------ save / load

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write the adapter atomically: PEFT's `adapter_config.json` + `adapter_model.safetensors` (a plain rank-R
        LoRA that `peft.PeftModel.from_pretrained` loads without hf_perfit), plus `perfit_config.json` and
        `perfit_masks.safetensors` that [`PerFITModel.from_pretrained`] uses to continue training.
        """
        if not kwargs.get("is_main_process", True):
            return
        if kwargs.get("safe_serialization") is False:
            raise ValueError("PerFIT adapters are written as safetensors only; drop safe_serialization=False.")
        self.apply_masks()
        kwargs.pop("selected_adapters", None)
        with atomic_directory(save_directory) as tmp:
            super().save_pretrained(str(tmp), selected_adapters=[self._adapter], **kwargs)
            out = tmp if self._adapter == "default" else tmp / self._adapter
            _sort_adapter_config(out / ADAPTER_CONFIG_NAME)
            # One metadata entry only: safetensors writes the metadata map in Rust hash order, which changes from
            # process to process once it holds two keys; the format version lives in perfit_config.json.
            save_file(
                {k: m.to(torch.uint8).contiguous().cpu() for k, m in self._masks.items()},
                str(out / PERFIT_MASKS_NAME),
                metadata={"format": "pt"},
            )
            atomic_write_json(
                out / PERFIT_CONFIG_NAME,
                {
                    "format_version": FORMAT_VERSION,
                    "config": self.perfit_config.perfit_dict(),
                    "state": {
                        "search_step": self._search_step,
                        "prune_iterations_done": self._iterations_done,
                    },
                    "num_kept": self.num_kept(),
                    "budget": self._budget,
                    "expanded_size": self.expanded_size(),
                    "kept_per_module": self.kept_per_module(),
                },
            )

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        **kwargs: Any,
    ) -> PerFITModel:
        """Load a PerFIT adapter written by [`save_pretrained`]: config (every PerFIT field), weights, masks and
        search progress. With `is_trainable=True` training continues with the masks held.

        Args:
            model: the base model the adapter was trained on.
            model_id: a local folder or a Hub repo id (`revision=`, `token=` are passed to `huggingface_hub`).
            adapter_name: name given to the adapter.
            is_trainable: keep the LoRA parameters trainable (otherwise the model is put in eval mode).
        """
        folder = _resolve_adapter_folder(model_id, **kwargs)
        meta = _read_perfit_meta(folder)
        cfg = PerFITLoraConfig.from_perfit_dict(meta["config"])
        _check_adapter_config(folder / ADAPTER_CONFIG_NAME, cfg)
        cfg.inference_mode = not is_trainable
        cfg.init_lora_weights = True  # weights come from the file; skip the random symmetric init
        peft_model = cls(model, cfg, adapter_name)
        peft_model.perfit_config.init_lora_weights = meta["config"].get("init_lora_weights", "symmetric")
        weights = _load_safetensors(folder / ADAPTER_WEIGHTS_NAME, "adapter weights")
        expected = {k for k in peft_model._params}
        missing = sorted(expected - set(weights))
        if missing:
            raise ValueError(
                f"{folder / ADAPTER_WEIGHTS_NAME} lacks {len(missing)} LoRA tensors this base model needs (first: "
                f"{missing[0]}); the adapter was saved for another model or target_modules, or the file is damaged."
            )
        try:
            set_peft_model_state_dict(peft_model, weights, adapter_name=adapter_name)
        except RuntimeError as err:
            raise ValueError(f"adapter at {folder} does not fit this base model: {err}") from err
        masks = _load_safetensors(folder / PERFIT_MASKS_NAME, "PerFIT masks")
        state = meta.get("state", {})
        peft_model._check_loaded_masks(folder / PERFIT_MASKS_NAME, masks, meta)
        peft_model.set_masks({k: v.bool() for k, v in masks.items()})
        peft_model._search_step = int(state.get("search_step", 0))
        peft_model._iterations_done = int(state.get("prune_iterations_done", 0))
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def _check_loaded_masks(self, path: Path, masks: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Refuse a masks file that is not exactly what [`save_pretrained`] writes for this adapter: a 0/1 (uint8 or
        bool) tensor per LoRA matrix with its shape, keeping the count `perfit_config.json` records and, once the
        search is over, exactly the budget. A tampered file (say, every value 7) would otherwise read as all-kept and
        train `expansion_factor` times the budget."""
        missing, extra = sorted(set(self._masks) - set(masks)), sorted(set(masks) - set(self._masks))
        if missing or extra:
            raise ValueError(
                f"{path} does not fit this adapter: missing masks {missing[:3]}, unexpected {extra[:3]}; the file "
                "was saved for another model or target_modules, or is damaged: save the adapter again."
            )
        for key, mask in masks.items():
            if mask.dtype not in (torch.uint8, torch.bool):
                raise ValueError(f"{path}: mask {key} has dtype {mask.dtype}; masks are uint8 or bool 0/1 values.")
            if tuple(mask.shape) != tuple(self._masks[key].shape):
                raise ValueError(
                    f"{path}: mask {key} has shape {tuple(mask.shape)}, expected {tuple(self._masks[key].shape)}."
                )
            if mask.dtype == torch.uint8 and bool((mask > 1).any()):
                raise ValueError(
                    f"{path}: mask {key} holds values other than 0 and 1 (e.g. {int(mask.max())}); a mask is boolean. "
                    "The file is damaged or was edited: save the adapter again."
                )
        kept = sum(int(m.bool().sum()) for m in masks.values())
        recorded = meta.get("num_kept")
        if recorded is not None and kept != recorded:
            raise ValueError(
                f"{path} keeps {kept} elements but {PERFIT_CONFIG_NAME} records num_kept={recorded}; the files do not "
                "belong together: save the adapter again."
            )
        done = int(meta.get("state", {}).get("prune_iterations_done", 0))
        if done >= len(self._schedule_steps) and self._budget < self.expanded_size() and kept != self._budget:
            raise ValueError(
                f"{path} keeps {kept} elements but the finished search keeps exactly the budget of {self._budget} "
                f"(budget_multiplier={self.perfit_config.budget_multiplier}); the file is damaged or was edited: "
                "save the adapter again."
            )


def get_perfit_model(model: nn.Module, config: PerFITLoraConfig, adapter_name: str = "default") -> PerFITModel:
    """Wrap `model` with a PerFIT adapter: the analogue of `peft.get_peft_model` for [`PerFITLoraConfig`]."""
    return PerFITModel(model, config, adapter_name=adapter_name)


# ---------------------------------------------------------------------- helpers


def _pair_dim(key: str) -> int:
    """The rank dimension of a LoRA tensor: rows of `lora_A` `(R, d_in)`, columns of `lora_B` `(d_out, R)`."""
    return 0 if ".lora_A." in key else 1


def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The causal-LM loss of a dict batch with `labels` (`-100` masks the prompt), on the model's device."""
    if not isinstance(batch, dict) and not hasattr(batch, "keys"):
        raise ValueError(
            f"foresight_search's default loss needs dict batches with input_ids and labels, got {type(batch).__name__}"
            "; pass loss_fn=lambda model, batch: ... returning the batch's loss."
        )
    if "labels" not in batch:
        raise ValueError(
            "foresight_search's default loss needs `labels` in the batch (the tokens to score, -100 elsewhere); add "
            "them or pass loss_fn=."
        )
    device = next(p for p in model.parameters()).device
    names = ("input_ids", "attention_mask", "labels", "position_ids")
    inputs = {k: batch[k].to(device) for k in names if k in batch and batch[k] is not None}
    return model(**inputs).loss


def _average_gradients_across_processes(params: list[nn.Parameter]) -> None:
    """Under several processes (DDP / accelerate) every process scores its share of the batch: average the
    gradients so that all processes prune to the same mask."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def _refuse_unsupported_base(model: nn.Module) -> None:
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    if quant is None:
        return
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    method = getattr(method, "value", method)
    load_8bit = quant.get("load_in_8bit") if isinstance(quant, dict) else getattr(quant, "load_in_8bit", False)
    if method == "bitsandbytes" and load_8bit:
        raise ValueError(
            "PerFIT supports full-precision and bitsandbytes 4-bit (QLoRA) base models; this one is 8-bit. Load it "
            "with BitsAndBytesConfig(load_in_4bit=True) or without quantization."
        )
    if method not in (None, "bitsandbytes"):
        raise ValueError(
            f"PerFIT is tested on full-precision and bitsandbytes 4-bit base models; quant_method={method!r} is not "
            "supported. Load the base model without it or with BitsAndBytesConfig(load_in_4bit=True)."
        )


def _unpack_cpu_4bit_weights(model: nn.Module) -> None:
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is None or not getattr(state, "packing_format_for_cpu", False):
            continue
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)


def _show_targets(targets: Any) -> Any:
    return sorted(targets) if isinstance(targets, set) else targets


def _linear_names(model: nn.Module) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear | Conv1D)}
    return sorted(names)


def _resolve_adapter_folder(model_id: str | os.PathLike, **kwargs: Any) -> Path:
    path = Path(model_id)
    if path.is_dir():
        return path
    if path.exists() or str(model_id).startswith((".", "/")) or str(model_id).count("/") > 1:
        raise FileNotFoundError(f"no adapter folder at {model_id}; pass the folder that save_pretrained wrote.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        local = snapshot_download(
            str(model_id),
            revision=kwargs.get("revision"),
            token=kwargs.get("token"),
            allow_patterns=["*.json", "*.safetensors"],
        )
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise OSError(
            f"could not fetch adapter {model_id!r} from the Hub ({type(err).__name__}: {err}); check the repo id, "
            "your token and network, or pass a local folder."
        ) from err
    return Path(local)


def _sort_adapter_config(path: Path) -> None:
    """Rewrite PEFT's `adapter_config.json` with its set-valued entries (`target_modules`, ...) sorted: PEFT writes
    `list(set)`, whose order follows the process's hash seed, so two identical runs would differ in bytes."""
    config = json.loads(path.read_text(encoding="utf-8"))
    for key, value in config.items():
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            if key in ("target_modules", "exclude_modules", "modules_to_save", "trainable_token_indices"):
                config[key] = sorted(value)
    path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")  # PEFT's own layout


def _check_adapter_config(path: Path, cfg: PerFITLoraConfig) -> None:
    """`adapter_config.json` is what plain PEFT loads the exported adapter from; it must agree with
    `perfit_config.json` (a LoRA of rank `R = γ·r`, `lora_alpha = (lora_alpha / r)·R`, the same targets), or the two
    loaders would build different adapters from one folder."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; the adapter folder is incomplete (plain PEFT cannot load it): save it again."
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the adapter is damaged: save it again.") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a {type(config).__name__}, not a PEFT config object; save the adapter again.")
    expected = cfg.to_lora_config()
    targets = expected.target_modules
    found_targets = config.get("target_modules")
    if isinstance(found_targets, list):
        found_targets = set(found_targets)
    problems = []
    if str(config.get("peft_type")) != "LORA":
        problems.append(f"peft_type={config.get('peft_type')!r} (expected 'LORA')")
    if config.get("r") != expected.r:
        problems.append(f"r={config.get('r')!r} (expected {expected.r} = expansion_factor · r)")
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isclose(alpha, expected.lora_alpha):
        problems.append(f"lora_alpha={alpha!r} (expected {expected.lora_alpha})")
    if found_targets != targets:
        problems.append(f"target_modules={config.get('target_modules')!r} (expected {_show_targets(targets)})")
    if problems:
        raise ValueError(
            f"{path} disagrees with {PERFIT_CONFIG_NAME}: {', '.join(problems)}; plain PEFT would build another "
            "adapter from this folder. The file is damaged or was edited: save the adapter again."
        )


def _read_perfit_meta(folder: Path) -> dict[str, Any]:
    path = folder / PERFIT_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no {PERFIT_CONFIG_NAME}, so it is not a PerFIT adapter. A plain LoRA loads with "
            "peft.PeftModel.from_pretrained(base_model, folder)."
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the adapter is damaged: save it again.") from err
    if not isinstance(meta, dict) or "config" not in meta:
        raise ValueError(f"{path} has no 'config' entry; the adapter is damaged: save it again.")
    if meta.get("format_version", 1) > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version={meta['format_version']}, newer than this hf_perfit understands "
            f"({FORMAT_VERSION}); upgrade hf_perfit."
        )
    return meta


def _load_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} is missing; the adapter folder is incomplete: save it again.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{what} file {path} is damaged ({err}); save the adapter again.") from err
