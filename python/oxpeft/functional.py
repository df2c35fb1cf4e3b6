"""Functions for libraries that put adapters into their own models without a `PeftModel` around them
(transformers' adapter API, diffusers): PEFT's `peft.functional`, with the same names and signatures."""

from oxpeft.mapping import inject_adapter_in_model
from oxpeft.tuners.tuners_utils import cast_adapter_dtype, delete_adapter, set_adapter, set_requires_grad
from oxpeft.utils.save_and_load import get_peft_model_state_dict, set_peft_model_state_dict

__all__ = [
    "cast_adapter_dtype",
    "delete_adapter",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "set_adapter",
    "set_peft_model_state_dict",
    "set_requires_grad",
]
