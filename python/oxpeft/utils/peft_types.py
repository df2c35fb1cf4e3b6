"""The `PeftType` and `TaskType` enums, the method registries and `register_peft_method`, which fills them.

The registries are exported from `oxpeft.mapping` (HF PEFT's path); they live here, in the lowest layer, so that
registering a method needs no import upward.
"""

from __future__ import annotations

import enum
import importlib
from typing import Any

__all__ = [
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_PREFIX_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "PeftType",
    "TaskType",
    "register_peft_method",
    "registered_peft_type",
]


class PeftType(str, enum.Enum):
    LORA = "LORA"
    ADALORA = "ADALORA"
    IA3 = "IA3"
    LOHA = "LOHA"
    LOKR = "LOKR"
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    TRAINABLE_TOKENS = "TRAINABLE_TOKENS"

    def __str__(self) -> str:
        return self.value


class TaskType(str, enum.Enum):
    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


# peft_type -> config class; -> tuner class (for prompt learning, the encoder class); -> parameter-name prefix.
PEFT_TYPE_TO_CONFIG_MAPPING: dict[PeftType, type[Any]] = {}
PEFT_TYPE_TO_TUNER_MAPPING: dict[PeftType, type[Any]] = {}
PEFT_TYPE_TO_PREFIX_MAPPING: dict[PeftType, str] = {}


def register_peft_method(*, name: str, config_cls: type, model_cls: type | None, prefix: str | None = None) -> None:
    """Make a method known by its lower-case `name` (a `PeftType` member in upper case): its config class, its
    tuner (or, for prompt learning, its encoder) class, and the prefix of its parameter names. Each tuner
    package calls this when it is imported."""
    if not name.islower() or name.endswith("_"):
        raise ValueError(f"register_peft_method: name must be lower case without a trailing '_', got {name!r}")
    try:
        peft_type = PeftType(name.upper())
    except ValueError:
        raise ValueError(f"register_peft_method: {name.upper()!r} is not a PeftType") from None
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type, config_cls) is not config_cls:
        raise KeyError(f"register_peft_method: {peft_type.value} is already registered")
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    if model_cls is not None:
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix or f"{name}_"


def registered_peft_type(peft_type: Any) -> PeftType:
    """`peft_type` (a PeftType or its value) as a PeftType whose method is registered; the first lookup imports
    `oxpeft.tuners`, whose packages register themselves. A ValueError names the supported types otherwise."""
    try:
        member = PeftType(peft_type.value if isinstance(peft_type, enum.Enum) else peft_type)
    except ValueError:
        known = ", ".join(t.value for t in PeftType)
        raise ValueError(f"unsupported peft_type {peft_type!r}; oxpeft supports {known}") from None
    if member not in PEFT_TYPE_TO_CONFIG_MAPPING:
        importlib.import_module("oxpeft.tuners")
    return member
