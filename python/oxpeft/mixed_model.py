"""`PeftMixedModel`: a model with adapters of several methods (LoRA, LoHa, LoKr) side by side.

It is a `PeftModel` whose tuner is `MixedModel`, so it has every PeftModel method: `add_adapter` of any compatible
method, `set_adapter` with a list (several active adapters, of different methods, all run in forward),
`disable_adapter`, `delete_adapter`, `merge_and_unload` / `unload`, `load_adapter` / `from_pretrained` (each
adapter folder holds one method's config, as PEFT writes it) and `save_pretrained`, which PEFT's mixed model
lacks (it writes each adapter in PEFT's format, so PEFT's `PeftMixedModel.load_adapter` reads them back).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from oxpeft.config import PeftConfig
from oxpeft.peft_model import PeftModel
from oxpeft.tuners.mixed import MixedModel
from oxpeft.tuners.mixed.model import check_mixed_compatible
from oxpeft.tuners.tuners_utils import BaseTuner

__all__ = ["PeftMixedModel"]


class PeftMixedModel(PeftModel):
    """Adapters of LoRA, LoHa and LoKr in one model. Create it with `get_peft_model(model, config, mixed=True)`.

    When two methods adapt the same module, the layer of the method added later wraps the earlier one's, and the
    forward of each active adapter adds its part; which adapters run is set by `set_adapter(names)`, the order
    they are applied in by the order they were added (as in PEFT).
    """

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        **kwargs: Any,
    ) -> None:
        check_mixed_compatible(peft_config)
        super().__init__(model, peft_config, adapter_name, autocast_adapter_dtype, **kwargs)

    def _tuner_class(self, config: PeftConfig) -> type[BaseTuner]:
        return MixedModel

    def _check_adapter_type(self, config: PeftConfig) -> None:
        check_mixed_compatible(config)
