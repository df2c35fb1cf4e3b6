"""`PromptEncoderConfig` (P-tuning): virtual-token embeddings reparametrised by an MLP or an LSTM."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar

from oxpeft.config import PromptLearningConfig, check_positive_int, enum_field
from oxpeft.utils.peft_types import PeftType


class PromptEncoderReparameterizationType(str, enum.Enum):
    MLP = "MLP"
    LSTM = "LSTM"

    def __str__(self) -> str:
        return self.value


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: virtual-token embeddings passed through an MLP (3 layers) or a bidirectional LSTM + MLP head."""

    PEFT_TYPE: ClassVar[PeftType] = PeftType.P_TUNING

    encoder_reparameterization_type: PromptEncoderReparameterizationType | str = PromptEncoderReparameterizationType.MLP
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        enum_field(self, "encoder_reparameterization_type", PromptEncoderReparameterizationType)
        check_positive_int(self, "encoder_hidden_size")
        check_positive_int(self, "encoder_num_layers", required=True)
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"PromptEncoderConfig: encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")

    def _fill_method_fields(self, model_config: dict[str, Any]) -> None:
        if self.encoder_hidden_size is None:
            self.encoder_hidden_size = self.token_dim
