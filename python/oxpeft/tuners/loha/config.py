"""`LoHaConfig`: HF PEFT's field names and defaults, so LoHa adapter_config.json files move both ways."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from oxpeft.utils.peft_types import PeftType
from oxpeft.tuners.lycoris_utils import LycorisConfig


@dataclass
class LoHaConfig(LycorisConfig):
    """Configuration of a LoHa adapter (low-rank Hadamard product, https://arxiv.org/abs/2108.06098).

    The delta is ``(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r``: rank up to r² from 4 rank-r factors.
    `use_effective_conv2d` stores k x k convolution deltas in CP form (cores `hada_t1`, `hada_t2`).
    `init_weights=True` zeroes `hada_w2_b` so a new adapter starts as the identity; False leaves all random.
    See `LycorisConfig` for the shared fields.
    """

    PEFT_TYPE: ClassVar[PeftType] = PeftType.LOHA

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"init_weights must be True or False for LoHa, got {self.init_weights!r}")
