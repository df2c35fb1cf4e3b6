"""(IA)³: learned vectors that rescale the outputs (attention) or inputs (feed-forward) of target layers."""

from oxpeft.tuners.ia3.config import IA3Config
from oxpeft.tuners.ia3.layer import Conv2d, IA3Layer, Linear
from oxpeft.tuners.ia3.model import IA3Model

__all__ = ["IA3Config", "IA3Model", "IA3Layer", "Linear", "Conv2d"]
