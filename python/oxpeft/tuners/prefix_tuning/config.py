"""`PrefixTuningConfig`: learned keys and values prepended in every attention layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from oxpeft.config import PromptLearningConfig, check_positive_int
from oxpeft.utils.peft_types import PeftType


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: learned keys and values prepended in every attention layer.

    With `prefix_projection`, the prefix is `num_virtual_tokens` embeddings of size `token_dim` mapped by a two-layer
    MLP (hidden size `encoder_hidden_size`); without it the prefix itself is learned. `init_weights="zero"` starts
    from an all-zero prefix.
    """

    PEFT_TYPE: ClassVar[PeftType] = PeftType.PREFIX_TUNING

    init_weights: Literal["zero"] | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"PrefixTuningConfig: init_weights must be None or 'zero', got {self.init_weights!r}")
        check_positive_int(self, "encoder_hidden_size")

    def _fill_method_fields(self, model_config: dict[str, Any]) -> None:
        # Grouped-query attention: the prefix holds one key/value per KV head, not per query head.
        if model_config.get("num_key_value_heads") is not None:
            head_dim = model_config.get("head_dim") or self.token_dim // self.num_attention_heads
            self.num_attention_heads = model_config["num_key_value_heads"]
            self.token_dim = head_dim * self.num_attention_heads
        if self.token_dim % self.num_attention_heads:
            raise ValueError(
                f"PrefixTuningConfig: token_dim={self.token_dim} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.encoder_hidden_size is None:
            self.encoder_hidden_size = self.token_dim
