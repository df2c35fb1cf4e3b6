"""`TrainableTokensConfig`: HF PEFT's field names and defaults, so its adapter_config.json files move both ways."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from oxpeft.config import PeftConfig
from oxpeft.utils.peft_types import PeftType


@dataclass
class TrainableTokensConfig(PeftConfig):
    """Train the embedding rows of a few tokens (new ones added to a tokenizer, or existing ones) and nothing else.

    - `token_indices`: the rows (token ids) to train.
    - `target_modules`: the embedding layer(s) to adapt; None takes the model's input embedding layer.
    - `init_weights`: start from the current rows (the adapter then changes nothing until trained); False starts
      from random rows (for tests).

    An output layer tied to the input embedding (`tie_word_embeddings`) follows the same trained rows.
    """

    PEFT_TYPE: ClassVar[PeftType] = PeftType.TRAINABLE_TOKENS

    token_indices: list[int] = field(default_factory=list)
    target_modules: list[str] | str | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        # Empty is allowed here, as PEFT allows it (a config may be built before its indices are known); adding an
        # adapter without rows is refused.
        check_token_indices(self.token_indices, "token_indices", allow_empty=True)
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"init_weights must be True or False, got {self.init_weights!r}")


def check_token_indices(indices: object, field_name: str, allow_empty: bool = False) -> None:
    """Token indices must be a list of distinct non-negative ints, non-empty unless `allow_empty` (a bad entry is
    named)."""
    if not isinstance(indices, (list, tuple)) or not (indices or allow_empty):
        raise ValueError(f"{field_name} must be a non-empty list of token ids, got {indices!r}"[:200])
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"{field_name}: {index!r} is not a token id (a non-negative integer)")
    if len(set(indices)) != len(indices):
        raise ValueError(f"{field_name} lists a token id more than once")
