"""The method registries (peft_type -> config class, tuner class, parameter prefix), `get_peft_config` and
`inject_adapter_in_model`.

It imports no tuner. Each tuner package fills the registries (defined in `oxpeft.utils.peft_types`) through
`register_peft_method` when it is imported, and `oxpeft.tuners` imports them all; a lookup of a method not yet
registered imports `oxpeft.tuners` first. So configs and tuners never import upward to find each other.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from torch import nn

from oxpeft.utils.peft_types import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
    PeftType,
    registered_peft_type,
)

if TYPE_CHECKING:
    from oxpeft.config import PeftConfig
    from oxpeft.tuners.tuners_utils import BaseTuner

__all__ = [
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_PREFIX_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "get_peft_config",
    "inject_adapter_in_model",
]

def get_peft_config(config_dict: dict[str, Any]) -> "PeftConfig":
    """The config object of the method named by `config_dict["peft_type"]`, built from the dict's fields."""
    if "peft_type" not in config_dict:
        raise ValueError("get_peft_config: the dict has no 'peft_type'")
    return PEFT_TYPE_TO_CONFIG_MAPPING[registered_peft_type(config_dict["peft_type"])](**config_dict)


def tuner_class_for(config: "PeftConfig") -> type["BaseTuner"]:
    """The tuner class of an injected method's config."""
    peft_type = registered_peft_type(config.peft_type)
    if config.is_prompt_learning or peft_type not in PEFT_TYPE_TO_TUNER_MAPPING:
        raise ValueError(f"oxpeft has no tuner that injects layers for peft_type {peft_type.value!r}")
    return PEFT_TYPE_TO_TUNER_MAPPING[peft_type]  # type: ignore[return-value]


def inject_adapter_in_model(
    peft_config: "PeftConfig",
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, Any] | None = None,
) -> nn.Module:
    """Inject the adapter layers of `peft_config` into `model` in place and return `model` (no PeftModel wrapper).

    Prompt-learning methods inject nothing and are refused. With `state_dict` (an adapter state dict, e.g. read
    from a file without its config) the targets are the modules its keys name, not the config's
    `target_modules`; its values are not loaded. With `low_cpu_mem_usage` the adapter weights are created on the
    meta device, for `set_peft_model_state_dict(..., low_cpu_mem_usage=True)` to assign.
    """
    if peft_config.is_prompt_learning:
        raise ValueError(
            f"inject_adapter_in_model: {peft_config.peft_type} is a prompt-learning method, which injects no layers; "
            "use get_peft_model"
        )
    tuner_cls = tuner_class_for(peft_config)
    if state_dict is not None:
        peft_config = copy.copy(peft_config)
        peft_config.target_modules = _targets_in(state_dict, PEFT_TYPE_TO_PREFIX_MAPPING[registered_peft_type(peft_config.peft_type)])
    # As PEFT: the adapter weights take the base layer's dtype; `functional.cast_adapter_dtype` upcasts them.
    tuner = tuner_cls(
        model, {adapter_name: peft_config}, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, autocast_adapter_dtype=False
    )
    return tuner.model


def _targets_in(state_dict: dict[str, Any], prefix: str) -> list[str]:
    """The module names an adapter state dict's keys point at (`<module>.<prefix>...`), without PEFT's
    `base_model.model.` key prefix."""
    names = {key.split(f".{prefix}", 1)[0].removeprefix("base_model.model.") for key in state_dict if f".{prefix}" in key}
    if not names:
        raise ValueError(f"inject_adapter_in_model: no key of the state dict holds '.{prefix}', so it names no target module")
    return sorted(names)
