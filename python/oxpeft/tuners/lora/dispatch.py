"""Which LoRA layer class adapts a given base layer."""

from __future__ import annotations

from torch import nn

from oxpeft.tuners.lora.layer import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoraLayer
from oxpeft.tuners.lora.mha import MultiheadAttention
from oxpeft.tuners.tuners_utils import innermost_base


def lora_layer_for(base_layer: nn.Module) -> tuple[type[LoraLayer], bool | None]:
    """The LoRA class for a base layer (or for the layer another method's layer adapts, in a mixed model), and the
    fan_in_fan_out it requires (None: as configured)."""
    from transformers.pytorch_utils import Conv1D

    base_layer = innermost_base(base_layer)
    if isinstance(base_layer, nn.MultiheadAttention):
        return MultiheadAttention, None
    if isinstance(base_layer, nn.Embedding):
        return Embedding, None
    if isinstance(base_layer, nn.Conv1d):
        return Conv1d, None
    if isinstance(base_layer, nn.Conv2d):
        return Conv2d, None
    if isinstance(base_layer, nn.Conv3d):
        return Conv3d, None
    if isinstance(base_layer, Conv1D):
        return Linear, True
    if isinstance(base_layer, nn.Linear):
        return Linear, False
    if hasattr(base_layer, "dequantize") and hasattr(base_layer, "in_features"):
        return Linear, False
    raise ValueError(
        f"LoRA does not support target modules of type {type(base_layer).__name__}; supported: nn.Linear, "
        "transformers Conv1D, nn.Embedding, nn.Conv1d / Conv2d / Conv3d, nn.MultiheadAttention and oxpeft's "
        "quantised Linear layers"
    )
