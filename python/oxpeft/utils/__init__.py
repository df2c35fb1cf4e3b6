"""Utilities at HF PEFT's paths (`peft.utils.*`): method and task types, constants, the `modules_to_save`
wrapper, adapter state dicts.

The names are imported on first use, so that `oxpeft.utils.peft_types` or `oxpeft.utils.constants` can be
imported by the lowest layers without pulling in the tuners that `save_and_load` works on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from oxpeft._lazy import lazy_exports

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "CONFIG_NAME": "oxpeft.utils.constants",
    "EMBEDDING_LAYER_NAMES": "oxpeft.utils.constants",
    "INCLUDE_LINEAR_LAYERS_SHORTHAND": "oxpeft.utils.constants",
    "SAFETENSORS_WEIGHTS_NAME": "oxpeft.utils.constants",
    "TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING": "oxpeft.utils.constants",
    "TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING": "oxpeft.utils.constants",
    "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING": "oxpeft.utils.constants",
    "TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING": "oxpeft.utils.constants",
    "TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING": "oxpeft.utils.constants",
    "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING": "oxpeft.utils.constants",
    "WEIGHTS_NAME": "oxpeft.utils.constants",
    "AuxiliaryTrainingWrapper": "oxpeft.utils.other",
    "ModulesToSaveWrapper": "oxpeft.utils.other",
    "TrainableTokensWrapper": "oxpeft.tuners.trainable_tokens.layer",
    "_get_submodules": "oxpeft.utils.other",
    "cast_mixed_precision_params": "oxpeft.utils.other",
    "infer_device": "oxpeft.utils.other",
    "PeftType": "oxpeft.utils.peft_types",
    "TaskType": "oxpeft.utils.peft_types",
    "register_peft_method": "oxpeft.utils.peft_types",
    "get_base_model_state_dict": "oxpeft.utils.save_and_load",
    "get_peft_model_state_dict": "oxpeft.utils.save_and_load",
    "set_base_model_state_dict": "oxpeft.utils.save_and_load",
    "load_peft_weights": "oxpeft.utils.save_and_load",
    "set_peft_model_state_dict": "oxpeft.utils.save_and_load",
    "PeftWarning": "oxpeft.utils.warning",
    "NoMatchingPeftModuleError": "oxpeft.utils.error",
    "PeftError": "oxpeft.utils.error",
    "prepare_model_for_kbit_training": "oxpeft.quant.model",
}

__all__ = list(_EXPORTS)


lazy_exports(globals(), _EXPORTS)


if TYPE_CHECKING:
    from oxpeft.quant.model import prepare_model_for_kbit_training
    from oxpeft.utils.constants import (
        CONFIG_NAME,
        EMBEDDING_LAYER_NAMES,
        INCLUDE_LINEAR_LAYERS_SHORTHAND,
        SAFETENSORS_WEIGHTS_NAME,
        TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING,
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
        TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING,
        TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING,
        TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
        WEIGHTS_NAME,
    )
    from oxpeft.utils.other import (
        AuxiliaryTrainingWrapper,
        ModulesToSaveWrapper,
        _get_submodules,
        cast_mixed_precision_params,
        infer_device,
    )
    from oxpeft.tuners.trainable_tokens.layer import TrainableTokensWrapper
    from oxpeft.utils.peft_types import PeftType, TaskType, register_peft_method
    from oxpeft.utils.save_and_load import (
        get_base_model_state_dict,
        get_peft_model_state_dict,
        load_peft_weights,
        set_base_model_state_dict,
        set_peft_model_state_dict,
    )
    from oxpeft.utils.error import NoMatchingPeftModuleError, PeftError
    from oxpeft.utils.warning import PeftWarning
