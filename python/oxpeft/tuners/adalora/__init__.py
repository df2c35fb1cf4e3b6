"""AdaLoRA: SVD-form LoRA whose ranks are pruned to a budget during training."""

from oxpeft.tuners.adalora.allocator import RankAllocator
from oxpeft.tuners.adalora.config import AdaLoraConfig
from oxpeft.tuners.adalora.layer import AdaLoraLayer
from oxpeft.tuners.adalora.model import AdaLoraModel

__all__ = ["AdaLoraConfig", "AdaLoraModel", "AdaLoraLayer", "RankAllocator"]
