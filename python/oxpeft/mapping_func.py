"""`get_peft_model`: wrap a model with a new adapter."""

from __future__ import annotations

from torch import nn

from oxpeft.config import PeftConfig
from oxpeft.mixed_model import PeftMixedModel
from oxpeft.peft_model import PeftModel, peft_model_class_for

__all__ = ["get_peft_model"]


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap `model` with a new adapter described by `peft_config`; only adapter parameters stay trainable.

    Every `target_modules` entry must match a module (HF PEFT ignores a typo silently; oxpeft names it and the
    closest module names). Returns the `PeftModel` subclass of `peft_config.task_type`, or with `mixed=True` a
    `PeftMixedModel`, to which adapters of other methods (LoRA, LoHa, LoKr) can be added.
    """
    if isinstance(model, PeftModel):
        raise ValueError("the model already has adapters; use model.add_adapter(name, config) instead")
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a PeftConfig, got {type(peft_config).__name__}")
    # transformers models built from a config have name_or_path == "", which is no model id.
    name_or_path = model.__dict__.get("name_or_path", None) or None
    if peft_config.base_model_name_or_path is None:
        peft_config.base_model_name_or_path = name_or_path
    if revision is not None:
        peft_config.revision = revision
    if mixed:
        return PeftMixedModel(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
    cls = peft_model_class_for(peft_config)
    return cls(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
