"""hf_perfit: personalized federated instruction tuning (PerFIT and friends) on the Hugging Face stack."""

from .callbacks import PerFITPruningCallback
from .config import PerFITLoraConfig
from .model import PerFITModel, get_perfit_model
from .mole import MoLEConfig, MoLEModel  # registers the "MOLE" PEFT type

__version__ = "0.1.0"

__all__ = [
    "MoLEConfig",
    "MoLEModel",
    "PerFITLoraConfig",
    "PerFITModel",
    "PerFITPruningCallback",
    "get_perfit_model",
    "__version__",
]
