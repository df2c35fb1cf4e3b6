"""LoRA: low-rank adapters (with rsLoRA, DoRA, rank/alpha patterns, PiSSA/OLoRA init)."""

from oxpeft.tuners.lora.bdlora import BdLoraConfig
from oxpeft.tuners.lora.config import LoraConfig, LoraRuntimeConfig
from oxpeft.tuners.lora.kasa import KasaConfig
from oxpeft.tuners.lora.monteclora import MontecloraConfig
from oxpeft.tuners.lora.layer import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoraLayer
from oxpeft.tuners.lora.mha import MultiheadAttention
from oxpeft.tuners.lora.model import LoraModel
from oxpeft.tuners.lora.velora import VeloraConfig
from oxpeft.utils.peft_types import register_peft_method

__all__ = ["BdLoraConfig", "KasaConfig", "LoraConfig", "MontecloraConfig", "LoraRuntimeConfig", "LoraModel", "LoraLayer", "Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "MultiheadAttention", "VeloraConfig"]

register_peft_method(name="lora", config_cls=LoraConfig, model_cls=LoraModel, prefix="lora_")
