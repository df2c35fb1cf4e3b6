"""LoRA: low-rank adapters (with rsLoRA, DoRA, rank/alpha patterns, PiSSA/OLoRA init)."""

from oxpeft.tuners.lora.config import LoraConfig
from oxpeft.tuners.lora.layer import Conv2d, Embedding, Linear, LoraLayer
from oxpeft.tuners.lora.model import LoraModel

__all__ = ["LoraConfig", "LoraModel", "LoraLayer", "Linear", "Embedding", "Conv2d"]
