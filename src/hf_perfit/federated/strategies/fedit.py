"""`fedit`: FedAvg of the LoRA tensors weighted by example count (FedIT / Shepherd)."""

from __future__ import annotations

import torch

from ..messages import ClientInstruction, ClientUpdate
from .base import Strategy, register_strategy


@register_strategy
class FedITStrategy(Strategy):
    """FedAvg over the LoRA adapter: `θ_g = Σ_k n_k θ_k / Σ_k n_k` over this round's clients.

    Every sampled client starts its round from a copy of `θ_g` (dense). The sum runs in float64 and is stored as
    float32.

    Round metrics: `num_clients`, `num_examples` and `update_norm` (`‖θ_g^new − θ_g^old‖₂` over all tensors).
    """

    name = "fedit"

    def configure_client(self, client_id: str, round_idx: int) -> ClientInstruction:
        """Send client `client_id` a copy of the global adapter `θ_g`, plus [`client_options`] as config."""
        return ClientInstruction(tensors=self.global_tensors, config=self.client_options())

    def _aggregate(self, round_idx: int, updates: list[ClientUpdate]) -> dict[str, float]:
        glob = self._require_global()
        client_tensors = [self._check_update_tensors(u) for u in updates]
        weights = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
        total = weights.sum()
        new: dict[str, torch.Tensor] = {}
        sq_change = 0.0
        for key, old in glob.items():
            stacked = torch.stack([t[key] for t in client_tensors]).to(torch.float64)
            w = weights.view(-1, *([1] * old.dim()))
            avg = ((stacked * w).sum(0) / total).to(torch.float32)
            sq_change += float((avg.double() - old.double()).square().sum())
            new[key] = avg
        self._global = new
        return {
            "num_clients": float(len(updates)),
            "num_examples": float(total),
            "update_norm": sq_change**0.5,
        }
