"""Prompt tuning: learned virtual-token embeddings prepended to the input."""

from oxpeft.tuners.prompt_tuning.config import PromptTuningConfig, PromptTuningInit
from oxpeft.tuners.prompt_tuning.model import PromptEmbedding
from oxpeft.utils.peft_types import register_peft_method

__all__ = ["PromptEmbedding", "PromptTuningConfig", "PromptTuningInit"]

register_peft_method(name="prompt_tuning", config_cls=PromptTuningConfig, model_cls=PromptEmbedding)
