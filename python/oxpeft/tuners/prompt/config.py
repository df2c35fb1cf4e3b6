"""Configs of the prompt-learning methods, with HF PEFT's field names and defaults.

- `PromptTuningConfig`: a learned embedding per virtual token (RANDOM, SAMPLE_VOCAB or TEXT initialisation).
- `PromptEncoderConfig` (P-tuning): virtual-token embeddings reparametrised by an MLP or a bidirectional LSTM.
- `PrefixTuningConfig`: learned key/value prefixes for every attention layer, optionally through a projection.

The model-shape fields (`token_dim`, `num_layers`, `num_attention_heads`, `num_transformer_submodules`,
`encoder_hidden_size`) may be left unset: `fill_from_model` takes them from the model's config when the adapter
is created, exactly as PEFT does, and the filled values are what adapter_config.json records.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from oxpeft.config import PeftConfig, PeftType, TaskType

# Tasks whose forward and generate know how to feed virtual tokens to the model.
PROMPT_LEARNING_TASKS = (TaskType.CAUSAL_LM, TaskType.SEQ_CLS, TaskType.SEQ_2_SEQ_LM)


class PromptTuningInit(str, enum.Enum):
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"

    def __str__(self) -> str:
        return self.value


class PromptEncoderReparameterizationType(str, enum.Enum):
    MLP = "MLP"
    LSTM = "LSTM"

    def __str__(self) -> str:
        return self.value


def _check_positive(config: Any, name: str, *, required: bool = False) -> None:
    value = getattr(config, name)
    if value is None and not required:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        need = "is required and must be" if value is None else "must be"
        raise ValueError(f"{type(config).__name__}: {name} {need} a positive integer, got {value!r}")


def _enum_field(config: Any, name: str, enum_cls: type[enum.Enum]) -> None:
    value = getattr(config, name)
    raw = value.value if isinstance(value, enum.Enum) else value
    try:
        setattr(config, name, enum_cls(raw))
    except ValueError:
        allowed = ", ".join(e.value for e in enum_cls)
        raise ValueError(f"{type(config).__name__}: {name}={value!r} is not one of {allowed}") from None


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields shared by the prompt-learning methods (PEFT's `PromptLearningConfig`)."""

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(self, "num_virtual_tokens", required=True)
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            _check_positive(self, name)
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ValueError(
                f"{type(self).__name__}: num_transformer_submodules must be 1 (decoder-only / encoder-only) or 2 "
                f"(encoder-decoder), got {self.num_transformer_submodules!r}"
            )
        if isinstance(self.modules_to_save, str):
            raise ValueError(f"{type(self).__name__}: modules_to_save must be a list of module names, not a string")

    @property
    def is_prompt_learning(self) -> bool:
        return True

    @property
    def total_virtual_tokens(self) -> int:
        """Rows of the prompt embedding: one block of virtual tokens per transformer submodule."""
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1)

    def fill_from_model(self, model_config: Any) -> None:
        """Set the unset model-shape fields from a transformers config, as PEFT does when wrapping a model."""
        if model_config is None:
            model_config = {}
        data = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
        if isinstance(data.get("text_config"), dict):
            data = data["text_config"]  # a vision-language model: the prompt goes to the language model

        def first(*keys: str, field: str) -> int:
            for key in keys:
                if data.get(key) is not None:
                    return data[key]
            raise ValueError(
                f"{type(self).__name__}: cannot infer {field} from the model config (none of {', '.join(keys)} is "
                f"set); set {field} in the config"
            )

        if self.num_transformer_submodules is None:
            self.num_transformer_submodules = 2 if self.task_type == TaskType.SEQ_2_SEQ_LM else 1
        if self.num_layers is None:
            layers = getattr(model_config, "num_hidden_layers", None)
            self.num_layers = layers if layers is not None else first(
                "num_hidden_layers", "num_layers", "n_layer", field="num_layers"
            )
        if self.token_dim is None:
            self.token_dim = first("hidden_size", "n_embd", "d_model", field="token_dim")
        if self.num_attention_heads is None:
            self.num_attention_heads = first(
                "num_attention_heads", "n_head", "num_heads", "encoder_attention_heads", field="num_attention_heads"
            )
        self._fill_method_fields(data)

    def _fill_method_fields(self, model_config: dict[str, Any]) -> None:
        """Method-specific fields derived from the model config (after the shared ones are set)."""


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
        _enum_field(self, "prompt_tuning_init", PromptTuningInit)
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
        _enum_field(self, "encoder_reparameterization_type", PromptEncoderReparameterizationType)
        _check_positive(self, "encoder_hidden_size")
        _check_positive(self, "encoder_num_layers", required=True)
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"PromptEncoderConfig: encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")

    def _fill_method_fields(self, model_config: dict[str, Any]) -> None:
        if self.encoder_hidden_size is None:
            self.encoder_hidden_size = self.token_dim


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
        _check_positive(self, "encoder_hidden_size")

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
