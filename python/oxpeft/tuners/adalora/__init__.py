"""AdaLoRA: SVD-form LoRA whose ranks are pruned to a budget during training."""

from oxpeft.tuners.adalora.allocator import RankAllocator
from oxpeft.tuners.adalora.config import AdaLoraConfig
from oxpeft.tuners.adalora.layer import AdaLoraLayer
from oxpeft.tuners.adalora.model import AdaLoraModel
from oxpeft.utils.peft_types import register_peft_method

__all__ = ["AdaLoraConfig", "AdaLoraModel", "AdaLoraLayer", "RankAllocator"]

register_peft_method(name="adalora", config_cls=AdaLoraConfig, model_cls=AdaLoraModel, prefix="lora_")
