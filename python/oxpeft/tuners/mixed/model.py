"""`MixedModel`: a tuner that holds adapters of several methods in one model (PEFT's `mixed=True`).

Each adapter is injected by its own method's `_create_and_replace`. Where two methods target the same module,
the second method's layer wraps the first one's (a LoHa layer around a LoRA layer around the nn.Linear), so a
forward runs every active adapter, each adding its own part, and merging writes each one into the one base
weight. Adapters of one method on one module share that method's layer, as in a plain model.
"""

from __future__ import annotations

from torch import nn

from oxpeft.config import PeftConfig
from oxpeft.mapping import tuner_class_for
from oxpeft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from oxpeft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from oxpeft.utils.peft_types import PeftType, registered_peft_type

__all__ = ["COMPATIBLE_TUNER_TYPES", "MixedModel", "check_mixed_compatible"]

# The methods whose layers can wrap one another (AdaLoRA's rank allocation needs a model of its own).
COMPATIBLE_TUNER_TYPES = (PeftType.LORA, PeftType.LOHA, PeftType.LOKR)


def check_mixed_compatible(config: PeftConfig) -> None:
    """Refuse a config a mixed model cannot hold, naming the methods it can."""
    if not isinstance(config, PeftConfig):
        raise TypeError(f"peft_config must be a PeftConfig, got {type(config).__name__}")
    peft_type = registered_peft_type(config.peft_type)
    if peft_type not in COMPATIBLE_TUNER_TYPES:
        names = ", ".join(t.value for t in COMPATIBLE_TUNER_TYPES)
        raise ValueError(
            f"The provided `peft_type` '{peft_type.value}' is not compatible with the `PeftMixedModel`: a mixed model "
            f"holds {names} adapters"
        )


class MixedModel(BaseTuner):
    """The tuner of a `PeftMixedModel`. Usually created through `get_peft_model(..., mixed=True)`."""

    def _default_target_modules(self, model_type: str | None) -> list[str] | None:
        return TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type or "")

    def _check_new_adapter_config(self, config: PeftConfig) -> None:
        check_mixed_compatible(config)
        super()._check_new_adapter_config(config)

    def _layer_cls_for(self, config: PeftConfig) -> type[BaseTunerLayer]:
        return tuner_class_for(config).layer_cls

    def _create_and_replace(
        self,
        config: PeftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
    ) -> None:
        # The method's own injection, run on this tuner (it asks `_layer_cls_for` for its layer class).
        method = tuner_class_for(config)
        method._create_and_replace(self, config, adapter_name, target, target_name, parent, current_key)

    def _adapter_prefixes(self) -> set[str]:
        return {tuner_class_for(config).prefix for config in self.peft_config.values()}
