"""`fedprox`: FedAvg on the server; the client adds the proximal term `(μ/2)·‖θ − θ_g‖²` to its loss."""

from __future__ import annotations

from typing import Any

from .base import check_nonnegative_float, register_strategy
from .fedit import FedITStrategy


@register_strategy
class FedProxStrategy(FedITStrategy):
    """FedProx: the server side is [`FedITStrategy`]; `proximal_mu` travels to the client in [`client_options`] and in
    every [`~hf_perfit.federated.messages.ClientInstruction`]'s `config`.

    Args:
        proximal_mu (`float`, *optional*, defaults to 0.01): the proximal coefficient `μ` (>= 0; 0 is plain FedIT).
    """

    name = "fedprox"
    default_options = {**FedITStrategy.default_options, "proximal_mu": 0.01}

    def _check_options(self) -> None:
        super()._check_options()
        self._options["proximal_mu"] = check_nonnegative_float("proximal_mu", self._options["proximal_mu"])

    @property
    def proximal_mu(self) -> float:
        """The proximal coefficient `μ`."""
        return self._options["proximal_mu"]

    def client_options(self) -> dict[str, Any]:
        """`{"proximal_mu": μ}`."""
        return {"proximal_mu": self.proximal_mu}
