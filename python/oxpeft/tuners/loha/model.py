"""`LoHaModel`: injects LoHa layers into the target modules of a model."""

from __future__ import annotations

from oxpeft.tuners.loha.layer import LoHaLayer
from oxpeft.tuners.lycoris_utils import LycorisTuner


class LoHaModel(LycorisTuner):
    """The LoHa tuner. Usually created through `get_peft_model`."""

    prefix = "hada_"
    layer_cls = LoHaLayer
