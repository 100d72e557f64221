"""hf_perfit: personalized federated instruction tuning (PerFIT and friends) on the Hugging Face stack."""

import logging

# bitsandbytes' CPU backend warns at import ("Failed to load CPU gemm_4bit_forward from kernels-community") on every
# AVX512-BF16 machine without the optional `kernels` package, which would fetch code from the Hub anyway; its own
# fallback kernel is used. Silence that one logger before peft imports bitsandbytes.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from .callbacks import PerFITPruningCallback  # noqa: E402
from .config import PerFITLoraConfig  # noqa: E402
from .model import PerFITModel, get_perfit_model  # noqa: E402
from .mole import MoLEConfig, MoLEModel  # noqa: E402  (registers the "MOLE" PEFT type)

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
