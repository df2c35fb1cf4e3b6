"""LoKr: Kronecker-product adapters (LyCORIS)."""

from oxpeft.tuners.lokr.config import LoKrConfig
from oxpeft.tuners.lokr.layer import LoKrLayer, factorization
from oxpeft.tuners.lokr.model import LoKrModel
from oxpeft.utils.peft_types import register_peft_method

__all__ = ["LoKrConfig", "LoKrModel", "LoKrLayer", "factorization"]

register_peft_method(name="lokr", config_cls=LoKrConfig, model_cls=LoKrModel, prefix="lokr_")
