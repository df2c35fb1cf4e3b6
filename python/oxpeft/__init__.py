"""oxpeft: parameter-efficient fine-tuning with HF PEFT's API and files and a Rust core."""

from oxpeft._native import version as _native_version

__version__: str = _native_version()

from oxpeft.quant import (  # noqa: E402
    Linear4bit,
    Linear8bit,
    QuantizationConfig,
    load_quantized,
    prepare_model_for_kbit_training,
    quantize_model,
)

__all__ = ["__version__"]
__all__ += [
    "Linear4bit",
    "Linear8bit",
    "QuantizationConfig",
    "load_quantized",
    "prepare_model_for_kbit_training",
    "quantize_model",
]
