"""P-tuning: virtual-token embeddings produced by a prompt encoder (MLP or LSTM)."""

from oxpeft.tuners.p_tuning.config import PromptEncoderConfig, PromptEncoderReparameterizationType
from oxpeft.tuners.p_tuning.model import PromptEncoder
from oxpeft.utils.peft_types import register_peft_method

__all__ = ["PromptEncoder", "PromptEncoderConfig", "PromptEncoderReparameterizationType"]

register_peft_method(name="p_tuning", config_cls=PromptEncoderConfig, model_cls=PromptEncoder)
