"""`LoKrConfig`: HF PEFT's field names and defaults, so LoKr adapter_config.json files move both ways."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from oxpeft.utils.peft_types import PeftType
from oxpeft.tuners.lycoris_utils import LycorisConfig


@dataclass
class LoKrConfig(LycorisConfig):
    """Configuration of a LoKr adapter (Kronecker-product adapters, https://arxiv.org/abs/2309.14859).

    The delta is ``kron(w1, w2) * alpha / r``, each dimension split into two factors (`decompose_factor`: -1 picks
    factors near the square root; a positive value is used as the first factor when it divides the dimension).
    w2 is stored as a rank-r product ``lokr_w2_a @ lokr_w2_b`` when r is below half its larger side, and w1 too
    when `decompose_both`. `rank_dropout_scale` rescales the rows kept by rank dropout.
    `init_weights`: True zeroes w1 (identity start), "lycoris" zeroes w2 instead, False leaves all random.
    See `LycorisConfig` for the shared fields.
    """

    PEFT_TYPE: ClassVar[PeftType] = PeftType.LOKR

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (True, False, "lycoris"):
            raise ValueError(f"init_weights must be True, False or 'lycoris', got {self.init_weights!r}")
        factor = self.decompose_factor
        if isinstance(factor, bool) or not isinstance(factor, int) or (factor != -1 and factor <= 0):
            raise ValueError(f"decompose_factor must be -1 or a positive integer, got {factor!r}")
