"""The PEFT tuner of MoLE adapters and its registration with PEFT.

[`MoLETuner`] is a `peft.tuners.tuners_utils.BaseTuner`: PEFT's own machinery finds the target modules, wraps them
in [`MoLELinear`], marks only the adapter trainable, and saves/loads the adapter state. [`register`] puts the
`"MOLE"` type into PEFT's registries, after which `peft.PeftModel.from_pretrained(base, folder)` rebuilds a saved
MoLE adapter (importing `hf_perfit` registers it).
"""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from .config import MOLE_PEFT_TYPE, MoLEConfig
from .layer import MoLELayer, MoLELinear

__all__ = ["MoLETuner", "register"]


class MoLETuner(BaseTuner):
    """Wraps a model's target Linear layers in [`MoLELinear`] (built by `PeftModel` from a [`MoLEConfig`])."""

    prefix: str = "mole_"
    tuner_layer_cls = MoLELayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(
        self, peft_config, adapter_name, target, target_name, parent, current_key, **optional_kwargs
    ) -> None:
        if current_key is None:
            raise ValueError("current_key must not be None.")
        experts = peft_config.experts_of(current_key)
        if isinstance(target, MoLELinear):
            target.update_layer(adapter_name, peft_config, experts)
        else:
            if isinstance(target, BaseTunerLayer):
                raise TypeError(
                    f"{current_key} already carries a {type(target).__name__} adapter; MoLE cannot stack on it."
                )
            new_module = MoLELinear(target, adapter_name, peft_config, experts)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)  # an added, inactive adapter is not trainable
            self._replace_module(parent, target_name, new_module, target)


_REGISTERED = False


def register() -> None:
    """Register the `"MOLE"` PEFT type (config, tuner and state-dict prefix) with PEFT. Idempotent.

    PEFT's public `peft.utils.register_peft_method` only accepts members of its closed `PeftType` enum, so the three
    registries are filled directly, keyed by the plain string `"MOLE"` that `adapter_config.json` carries.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )

    for registry, value in (
        (PEFT_TYPE_TO_CONFIG_MAPPING, MoLEConfig),
        (PEFT_TYPE_TO_TUNER_MAPPING, MoLETuner),
        (PEFT_TYPE_TO_PREFIX_MAPPING, MoLETuner.prefix),
    ):
        existing = registry.get(MOLE_PEFT_TYPE)
        if existing is not None and existing is not value:
            raise RuntimeError(f"PEFT already has a method registered as {MOLE_PEFT_TYPE!r}: {existing!r}.")
        registry[MOLE_PEFT_TYPE] = value
    _REGISTERED = True
