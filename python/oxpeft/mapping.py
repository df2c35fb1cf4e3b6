"""Registries (peft_type -> config and tuner classes, task type -> PeftModel class) and `get_peft_model`."""

from __future__ import annotations

from torch import nn

from oxpeft.config import PeftConfig, PeftType, TaskType
from oxpeft.peft_model import TASK_MODEL_CLASSES, PeftModel
from oxpeft.tuners.adalora.config import AdaLoraConfig
from oxpeft.tuners.adalora.model import AdaLoraModel
from oxpeft.tuners.base import BaseTuner
from oxpeft.tuners.ia3.config import IA3Config
from oxpeft.tuners.ia3.model import IA3Model
from oxpeft.tuners.loha.config import LoHaConfig
from oxpeft.tuners.loha.model import LoHaModel
from oxpeft.tuners.lokr.config import LoKrConfig
from oxpeft.tuners.lokr.model import LoKrModel
from oxpeft.tuners.lora.config import LoraConfig
from oxpeft.tuners.lora.model import LoraModel
from oxpeft.tuners.prompt.config import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

PEFT_TYPE_TO_CONFIG_MAPPING: dict[PeftType, type[PeftConfig]] = {
    PeftType.LORA: LoraConfig,
    PeftType.IA3: IA3Config,
    PeftType.LOHA: LoHaConfig,
    PeftType.LOKR: LoKrConfig,
    PeftType.ADALORA: AdaLoraConfig,
    PeftType.PROMPT_TUNING: PromptTuningConfig,
    PeftType.P_TUNING: PromptEncoderConfig,
    PeftType.PREFIX_TUNING: PrefixTuningConfig,
}

PEFT_TYPE_TO_TUNER_MAPPING: dict[PeftType, type[BaseTuner]] = {
    PeftType.LORA: LoraModel,
    PeftType.IA3: IA3Model,
    PeftType.LOHA: LoHaModel,
    PeftType.LOKR: LoKrModel,
    PeftType.ADALORA: AdaLoraModel,
}

MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[TaskType, type[PeftModel]] = TASK_MODEL_CLASSES


def tuner_class_for(config: PeftConfig) -> type[BaseTuner]:
    try:
        return PEFT_TYPE_TO_TUNER_MAPPING[PeftType(config.peft_type)]
    except (KeyError, ValueError):
        raise ValueError(f"oxpeft has no tuner for peft_type {config.peft_type!r}") from None


def peft_model_class_for(config: PeftConfig) -> type[PeftModel]:
    if config.task_type is None:
        return PeftModel
    return MODEL_TYPE_TO_PEFT_MODEL_MAPPING[TaskType(config.task_type)]


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
    closest module names). Returns the `PeftModel` subclass of `peft_config.task_type`.
    """
    if mixed:
        raise ValueError("mixed adapter types (mixed=True) are not supported; use one method per model")
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
    cls = peft_model_class_for(peft_config)
    return cls(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
