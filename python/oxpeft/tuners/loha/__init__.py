"""LoHa: low-rank Hadamard-product adapters (LyCORIS)."""

from oxpeft.tuners.loha.config import LoHaConfig
from oxpeft.tuners.loha.layer import LoHaLayer
from oxpeft.tuners.loha.model import LoHaModel
from oxpeft.utils.peft_types import register_peft_method

__all__ = ["LoHaConfig", "LoHaModel", "LoHaLayer"]

register_peft_method(name="loha", config_cls=LoHaConfig, model_cls=LoHaModel, prefix="hada_")
