"""LoHa: low-rank Hadamard-product adapters (LyCORIS)."""

from oxpeft.tuners.loha.config import LoHaConfig
from oxpeft.tuners.loha.layer import LoHaLayer
from oxpeft.tuners.loha.model import LoHaModel

__all__ = ["LoHaConfig", "LoHaModel", "LoHaLayer"]
