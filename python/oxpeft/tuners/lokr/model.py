"""`LoKrModel`: injects LoKr layers into the target modules of a model."""

from __future__ import annotations

from oxpeft.tuners.lokr.layer import LoKrLayer
from oxpeft.tuners.lycoris_utils import LycorisTuner


class LoKrModel(LycorisTuner):
    """The LoKr tuner. Usually created through `get_peft_model`."""

    prefix = "lokr_"
    layer_cls = LoKrLayer
