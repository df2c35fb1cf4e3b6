"""`PromptTuningConfig`: learned input embeddings prepended to every sequence."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

from oxpeft.config import PromptLearningConfig, enum_field
from oxpeft.utils.peft_types import PeftType


class PromptTuningInit(str, enum.Enum):
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"

    def __str__(self) -> str:
        return self.value


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: `num_virtual_tokens` learned input embeddings prepended to every sequence.

    `prompt_tuning_init`: RANDOM (normal), SAMPLE_VOCAB (embeddings of random vocabulary tokens) or TEXT (embeddings
    of `prompt_tuning_init_text` tokenised by the tokenizer at `tokenizer_name_or_path`, repeated or cut to length).
    """

    PEFT_TYPE: ClassVar[PeftType] = PeftType.PROMPT_TUNING

    prompt_tuning_init: PromptTuningInit | str = PromptTuningInit.RANDOM
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        enum_field(self, "prompt_tuning_init", PromptTuningInit)
        if self.prompt_tuning_init is PromptTuningInit.TEXT:
            if not self.tokenizer_name_or_path:
                raise ValueError(
                    "PromptTuningConfig: prompt_tuning_init='TEXT' needs tokenizer_name_or_path (the tokenizer that "
                    "turns prompt_tuning_init_text into token ids)"
                )
            if not self.prompt_tuning_init_text:
                raise ValueError(
                    "PromptTuningConfig: prompt_tuning_init='TEXT' needs a non-empty prompt_tuning_init_text"
                )
        elif self.tokenizer_kwargs:
            raise ValueError("PromptTuningConfig: tokenizer_kwargs is only used with prompt_tuning_init='TEXT'")
