"""LoKr: Kronecker-product adapters (LyCORIS)."""

from oxpeft.tuners.lokr.config import LoKrConfig
from oxpeft.tuners.lokr.layer import LoKrLayer, factorization
from oxpeft.tuners.lokr.model import LoKrModel

__all__ = ["LoKrConfig", "LoKrModel", "LoKrLayer", "factorization"]
