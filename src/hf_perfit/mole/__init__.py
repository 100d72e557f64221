"""MoLE: a mixture of LoRA experts as a PEFT method, the adapter of FedAMoLE (docs/fedamole.md).

Importing this package registers the `"MOLE"` PEFT type, so `peft.PeftModel.from_pretrained(base, folder)` loads a
saved MoLE adapter.
"""

from .assignment import assignment_error, expert_client_scores, selection_probabilities, solve_assignment
from .config import MOLE_PEFT_TYPE, MoLEConfig
from .layer import MoLELayer, MoLELinear, balance_loss, route
from .model import MoLEModel, get_mole_model
from .summary import architecture_markdown, architecture_summary
from .tuner import MoLETuner, register

register()

__all__ = [
    "MOLE_PEFT_TYPE",
    "MoLEConfig",
    "MoLELayer",
    "MoLELinear",
    "MoLEModel",
    "MoLETuner",
    "architecture_markdown",
    "architecture_summary",
    "assignment_error",
    "balance_loss",
    "expert_client_scores",
    "get_mole_model",
    "register",
    "route",
    "selection_probabilities",
    "solve_assignment",
]
