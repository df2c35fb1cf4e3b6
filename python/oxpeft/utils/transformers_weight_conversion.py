"""Key renaming for transformers' adapter loading (`model.load_adapter`, `from_pretrained(adapter_dir)`).

transformers 5 loads every checkpoint through a list of weight conversions (`WeightRenaming` /
`WeightConverter`) and asks `build_peft_weight_mapping` for the list that turns an adapter file's keys
(`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`) into the keys of the model the adapter was
injected into (`model.layers.0.self_attn.q_proj.lora_A.<adapter>.weight`).
"""

from __future__ import annotations

import re
from typing import Any

from oxpeft.utils.peft_types import PEFT_TYPE_TO_PREFIX_MAPPING, registered_peft_type

__all__ = ["build_peft_weight_mapping"]


def build_peft_weight_mapping(weight_conversions: list[Any] | None, adapter_name: str, peft_config: Any = None) -> list[Any]:
    """The conversions that load adapter `adapter_name`'s file into a model with injected adapter layers.

    `weight_conversions` are the model's own (transformers' `get_model_conversion_mapping`): its renamings are
    kept, so an adapter saved for a model's older layout loads as the model's weights do. Its `WeightConverter`s
    merge or split base weights (fused MoE experts); they are not carried over yet, so an adapter saved by
    transformers for per-expert Linear layers (not one made with `target_parameters` on the fused experts, whose
    keys need no conversion) does not load through this path. As in PEFT, an empty list means the model has no
    conversions, and nothing is renamed.
    """
    if not weight_conversions:
        return []
    from transformers.core_model_loading import WeightRenaming

    renamings = [WeightRenaming("base_model.model.model.", "model."), WeightRenaming("base_model.model.", "")]
    peft_type = getattr(peft_config, "peft_type", None)
    if peft_type is not None:
        prefixes = {PEFT_TYPE_TO_PREFIX_MAPPING[registered_peft_type(peft_type)]}
    else:
        registered_peft_type("LORA")  # fills the registries
        prefixes = set(PEFT_TYPE_TO_PREFIX_MAPPING.values())
    for prefix in sorted(prefixes):
        # `...lora_A.weight` -> `...lora_A.<adapter>.weight`: the adapter name follows the container's name.
        renamings.append(WeightRenaming(source_patterns=rf"({re.escape(prefix)}[^\.]*)", target_patterns=rf"\1.{adapter_name}"))
    renamings.extend(c for c in weight_conversions if isinstance(c, WeightRenaming))
    return renamings
