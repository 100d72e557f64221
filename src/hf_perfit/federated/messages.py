"""The messages exchanged between the server and a client in one federated round.

Pure data: the same objects travel through the in-process simulation and (converted to Flower records) through the
Flower apps. Adapter tensors are `dict[str, torch.Tensor]` keyed like `peft.get_peft_model_state_dict`
(e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`); masks are boolean tensors with the same keys
and shapes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

PERSONAL = "personal"
"""`ClientInstruction.config` key: the names of the adapter matrices the client keeps from its own state instead of
taking them from the server (PerFIT's `personal_b` option sends `["lora_B"]`). The instruction's `tensors` then hold
the other keys only, and the client's upload leaves the personal ones out (they never leave the client)."""

SELECT_B = "select_b"
"""`ClientInstruction.config` key: PerFIT's `select_b_rows` variant (`perfit_bsel`, docs/perfit.md). Its value `n > 0`
is the number of the client's training rows it holds out (never trained on); each round the client starts from
whichever LoRA B, the server's (`tensors`) or its own from its last round, has the lower loss on them, and reports the
choice in its upload's metrics under [`OWN_B`]."""
OWN_B = "own_b"
"""`ClientUpdate.metrics` key of a `select_b` client: 1.0 when it trained from its own B this round, else 0.0."""
SELECTION_METRICS = (OWN_B, "select_loss_server", "select_loss_own")
"""The metrics of a `select_b` client's upload that its round record carries: its choice and the held-out losses of
the server's B and of its own ([`selection_metrics`])."""
SELECTED_PARTS = ["lora_B"]
"""The matrices a `select_b` client chooses between its own and the server's values of."""


@dataclass
class ClientUpdate:
    """What a client uploads after its local training in a round.

    Args:
        client_id (`str`): the client's stable identifier.
        num_examples (`int`): number of local training examples (the aggregation weight `n_k`); must be > 0.
        tensors (`dict[str, Tensor]`): the client's adapter state after training, dense. For PerFIT the elements
            outside `masks` are zeros (a real deployment sends only the kept values, see
            [`~hf_perfit.federated.comm.kept_values`]).
        masks (`dict[str, Tensor]`, *optional*): PerFIT only: the client's current boolean keep-mask. The server caches
            it, so a client whose mask did not change may leave it `None`.
        mask_changed (`bool`, defaults to `False`): PerFIT only: the mask is part of this upload (the first round after
            the architecture search, or after a re-search). Only affects the byte accounting and marks the upload as
            carrying a new mask; the server uses `masks` whenever it is given.
        metrics (`dict[str, float]`, *optional*): client-side metrics (training loss, ...).
        extra_tensors (`dict[str, Tensor]`, *optional*): anything else a strategy needs from the client that is not
            part of the adapter state (e.g. FedAMoLE's mean token embeddings). Counted as dense in the uplink.
    """

    client_id: str
    num_examples: int
    tensors: dict[str, Tensor]
    masks: dict[str, Tensor] | None = None
    mask_changed: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    extra_tensors: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class ClientInstruction:
    """What the server sends a sampled client at the start of a round.

    Args:
        tensors (`dict[str, Tensor]` or `None`): the adapter state to start this round from, dense. `None` means "keep
            your own local state" (the `local` strategy). For PerFIT it is `θ_g ⊙ m_k`: exactly 0.0 outside `mask`.
        mask (`dict[str, Tensor]`, *optional*): PerFIT only: the mask `tensors` are restricted to (the client's own,
            cached by the server). `None` when the client has not searched yet or must search again.
        config (`dict[str, Any]`, *optional*): per-round settings for the client update, JSON-able, e.g.
            `{"proximal_mu": 0.01}` (FedProx) or `{"research": True}` (PerFIT: run the architecture search again).
    """

    tensors: dict[str, Tensor] | None
    mask: dict[str, Tensor] | None = None
    config: dict[str, Any] = field(default_factory=dict)


def selection_metrics(update: ClientUpdate) -> dict[str, float]:
    """The [`SELECTION_METRICS`] of `update` (none unless its client made a `select_b` choice): what both transports
    copy into the client's round record."""
    return {k: update.metrics[k] for k in SELECTION_METRICS if k in update.metrics}


def is_personal_key(key: str, parts: Sequence[str]) -> bool:
    """Whether adapter key `key` names one of the matrices `parts` (e.g. `"lora_B"`): `key` has `.<part>.` as a
    dotted component, as in `base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight`."""
    dotted = f".{key}."
    return any(f".{part}." in dotted for part in parts)


def personal_keys(keys: Iterable[str], parts: Sequence[str]) -> list[str]:
    """The keys among `keys` that [`is_personal_key`] selects, in their order."""
    return [k for k in keys if is_personal_key(k, parts)]
