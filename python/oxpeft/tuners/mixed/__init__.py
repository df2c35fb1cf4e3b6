"""Mixed models: adapters of several methods (LoRA, LoHa, LoKr) side by side in one model."""

from oxpeft.tuners.mixed.model import COMPATIBLE_TUNER_TYPES, MixedModel

__all__ = ["COMPATIBLE_TUNER_TYPES", "MixedModel"]
