"""`local`: no federation at all; every client trains its own adapter alone (the lower bound on sharing)."""

from __future__ import annotations

from torch import Tensor

from ..messages import ClientInstruction, ClientUpdate
from .base import Strategy, register_strategy


@register_strategy
class LocalStrategy(Strategy):
    """Each client keeps and trains its own adapter; the server aggregates nothing.

    [`configure_client`] sends `tensors=None` ("keep your own local state"), so nothing is downloaded;
    [`aggregate`] only checks the updates and returns no metrics. `global_tensors` stays the initial adapter.
    """

    name = "local"

    def personalized_tensors(self, client_id: str, local_tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """A local client keeps exactly what it trained."""
        return {k: t.clone() for k, t in local_tensors.items()}

    def configure_client(self, client_id: str, round_idx: int) -> ClientInstruction:
        """Tell the client to continue from its own adapter (`tensors=None`)."""
        return ClientInstruction(tensors=None)

    def _aggregate(self, round_idx: int, updates: list[ClientUpdate]) -> dict[str, float]:
        return {}
