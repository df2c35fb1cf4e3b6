"""Quantised layers and model loading: NF4 / FP4 / int8 in bitsandbytes' format, no bitsandbytes needed.

`Linear4bit` / `Linear8bit` hold the quantised weight; `quantize_model` swaps them into a model;
`load_quantized` streams a safetensors checkpoint into a quantised model; and
`prepare_model_for_kbit_training` readies one for adapter training. `functional` has the
tensor-level quantise / dequantise functions.
"""

from oxpeft.quant.config import QuantizationConfig
from oxpeft.quant.functional import (
    QuantState,
    dequantize_4bit,
    dequantize_int8,
    quantize_4bit,
    quantize_int8,
)
from oxpeft.quant.linear4bit import Linear4bit
from oxpeft.quant.linear8bit import Linear8bit
from oxpeft.quant.loading import load_quantized
from oxpeft.quant.model import prepare_model_for_kbit_training, quantize_model

__all__ = [
    "Linear4bit",
    "Linear8bit",
    "QuantState",
    "QuantizationConfig",
    "dequantize_4bit",
    "dequantize_int8",
    "load_quantized",
    "prepare_model_for_kbit_training",
    "quantize_4bit",
    "quantize_int8",
    "quantize_model",
]
