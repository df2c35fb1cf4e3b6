"""`QuantizationConfig`: which layers to quantise and how, in transformers' BitsAndBytesConfig terms."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

import torch

from oxpeft.quant.functional import BLOCKSIZES

__all__ = ["QuantizationConfig"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# BitsAndBytesConfig fields that describe bitsandbytes' own kernels; they have no effect here.
_IGNORED_BNB_FIELDS = {
    "quant_method",
    "llm_int8_has_fp16_weight",
    "llm_int8_enable_fp32_cpu_offload",
    "bnb_4bit_quant_storage",
    "_load_in_4bit",
    "_load_in_8bit",
}


@dataclass
class QuantizationConfig:
    """How `quantize_model` / `load_quantized` quantise a model's Linear layers.

    The field names are transformers' `BitsAndBytesConfig` names (plus `blocksize` and
    `skip_modules`, whose transformers name `llm_int8_skip_modules` is accepted too). Unlike
    transformers, the 4-bit defaults are the QLoRA recipe: NF4, double quantisation, bfloat16 compute.
    `llm_int8_threshold` (8-bit layers) is LLM.int8()'s outlier threshold: input columns with any
    |x| >= it are multiplied in float, the rest in int8 (bit-identical to bitsandbytes' `Linear8bitLt`).
    The default is transformers' 6.0, the LLM.int8() recipe; 0.0 instead multiplies every column in float
    against the dequantised weight (no activation rounding, but slower on CPU).
    `skip_modules` lists module names (or name suffixes) to keep in full precision; the output
    embedding (`lm_head`) is always kept.
    """

    load_in_4bit: Optional[bool] = None
    load_in_8bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Union[torch.dtype, str] = torch.bfloat16
    blocksize: int = 64
    llm_int8_threshold: float = 6.0
    skip_modules: Optional[list[str]] = field(default=None)
    llm_int8_skip_modules: Optional[list[str]] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.load_in_4bit is None:
            # 4-bit unless 8-bit was asked for.
            self.load_in_4bit = not self.load_in_8bit
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("QuantizationConfig: load_in_4bit and load_in_8bit cannot both be True")
        if not (self.load_in_4bit or self.load_in_8bit):
            raise ValueError("QuantizationConfig: set load_in_4bit=True or load_in_8bit=True")
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise ValueError(f"QuantizationConfig: bnb_4bit_quant_type must be 'nf4' or 'fp4', got {self.bnb_4bit_quant_type!r}")
        if isinstance(self.bnb_4bit_compute_dtype, str):
            name = self.bnb_4bit_compute_dtype.removeprefix("torch.")
            if name not in _DTYPES:
                raise ValueError(f"QuantizationConfig: bnb_4bit_compute_dtype must be one of {sorted(_DTYPES)}, got {self.bnb_4bit_compute_dtype!r}")
            self.bnb_4bit_compute_dtype = _DTYPES[name]
        elif self.bnb_4bit_compute_dtype not in _DTYPES.values():
            raise ValueError(f"QuantizationConfig: bnb_4bit_compute_dtype must be a float dtype, got {self.bnb_4bit_compute_dtype!r}")
        if isinstance(self.llm_int8_threshold, bool) or not isinstance(self.llm_int8_threshold, (int, float)) or not (
            math.isfinite(self.llm_int8_threshold) and self.llm_int8_threshold >= 0
        ):
            raise ValueError(f"QuantizationConfig: llm_int8_threshold must be a finite number >= 0, got {self.llm_int8_threshold!r}")
        self.llm_int8_threshold = float(self.llm_int8_threshold)
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"QuantizationConfig: blocksize must be one of {BLOCKSIZES}, got {self.blocksize}")
        if self.llm_int8_skip_modules is not None:
            if self.skip_modules is not None and list(self.skip_modules) != list(self.llm_int8_skip_modules):
                raise ValueError("QuantizationConfig: skip_modules and llm_int8_skip_modules disagree; give one")
            self.skip_modules = list(self.llm_int8_skip_modules)
        self.llm_int8_skip_modules = None
        if isinstance(self.skip_modules, str):
            self.skip_modules = [self.skip_modules]
        self.skip_modules = list(self.skip_modules or [])

    @property
    def compute_dtype(self) -> torch.dtype:
        """`bnb_4bit_compute_dtype` as a torch dtype (used by 8-bit layers too)."""
        return self.bnb_4bit_compute_dtype  # type: ignore[return-value]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "QuantizationConfig":
        """Builds a config from a dict of BitsAndBytesConfig / QuantizationConfig fields.
        Fields that only tune bitsandbytes' kernels are ignored; any other unknown field is an error."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known - _IGNORED_BNB_FIELDS)
        if unknown:
            raise ValueError(f"QuantizationConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        kwargs = {k: v for k, v in values.items() if k in known}
        return cls(**kwargs)

    @classmethod
    def from_bitsandbytes_config(cls, config: Any) -> "QuantizationConfig":
        """Converts a transformers `BitsAndBytesConfig` (or anything with `to_dict()`)."""
        values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        if values.get("bnb_4bit_compute_dtype") is None:
            values.pop("bnb_4bit_compute_dtype", None)
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (dtype as its name)."""
        values = asdict(self)
        values.pop("llm_int8_skip_modules")
        values["bnb_4bit_compute_dtype"] = str(self.bnb_4bit_compute_dtype).removeprefix("torch.")
        return values

