"""Prompt learning: prompt tuning, P-tuning (prompt encoder) and prefix tuning."""

from oxpeft.tuners.prompt.config import (
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
)
from oxpeft.tuners.prompt.encoders import PrefixEncoder, PromptEmbedding, PromptEncoder

__all__ = [
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PrefixTuningConfig",
    "PromptEmbedding",
    "PromptEncoder",
    "PrefixEncoder",
]
