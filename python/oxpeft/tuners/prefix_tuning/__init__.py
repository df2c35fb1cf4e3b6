"""Prefix tuning: learned keys and values prepended in every attention layer."""

from oxpeft.tuners.prefix_tuning.config import PrefixTuningConfig
from oxpeft.tuners.prefix_tuning.model import PrefixEncoder
from oxpeft.utils.peft_types import register_peft_method

__all__ = ["PrefixEncoder", "PrefixTuningConfig"]

register_peft_method(name="prefix_tuning", config_cls=PrefixTuningConfig, model_cls=PrefixEncoder)
