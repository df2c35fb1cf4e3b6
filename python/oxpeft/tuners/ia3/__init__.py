"""(IA)³: learned vectors that rescale the outputs (attention) or inputs (feed-forward) of target layers."""

from oxpeft.tuners.ia3.config import IA3Config
from oxpeft.tuners.ia3.layer import Conv1d, Conv2d, Conv3d, IA3Layer, Linear
from oxpeft.tuners.ia3.model import IA3Model
from oxpeft.utils.peft_types import register_peft_method

__all__ = ["IA3Config", "IA3Model", "IA3Layer", "Linear", "Conv1d", "Conv2d", "Conv3d"]

register_peft_method(name="ia3", config_cls=IA3Config, model_cls=IA3Model, prefix="ia3_")
