"""Availability probes with HF PEFT's names (`peft.import_utils`), for code that asks them before using an
integration.

Each `is_<package>_available()` says whether that package can be imported here, nothing more: which layers oxpeft
itself adapts is said in the README (nn.Linear / Conv / Embedding, transformers' Conv1D, oxpeft's quantised layers
and bitsandbytes' layers). The `is_transformers_*` flags compare the installed transformers' version.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from functools import lru_cache

import torch
import transformers
from packaging.version import Version

__all__ = [
    "is_aqlm_available",
    "is_bnb_4bit_available",
    "is_bnb_available",
    "is_diffusers_available",
    "is_eetq_available",
    "is_gptqmodel_available",
    "is_hqq_available",
    "is_inc_available",
    "is_optimum_available",
    "is_te_available",
    "is_te_pytorch_available",
    "is_torch_tpu_available",
    "is_torchao_available",
    "is_transformers_ge_v5",
    "is_xpu_available",
]

def _installed_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


_TRANSFORMERS = Version(transformers.__version__)
is_transformers_ge_v5 = _TRANSFORMERS >= Version("5.0.0.dev0")
is_transformers_ge_v5_1_0 = _TRANSFORMERS >= Version("5.1.0")
is_transformers_ge_v5_4_0 = _TRANSFORMERS >= Version("5.4.0")
is_transformers_ge_v5_6_0 = _TRANSFORMERS >= Version("5.6.0.dev0")
is_transformers_ge_v5_13_0 = _TRANSFORMERS >= Version("5.13.0.dev0")
is_transformers_ge_v5_17_0 = _TRANSFORMERS >= Version("5.17.0")
is_transformers_le_4_53 = _TRANSFORMERS < Version("4.54.0.dev0")
# transformers' DTensor tensor parallelism (whose sharded adapter tensors need gathering before a save).
is_transformers_dtensor_tp = _installed_module("transformers.distributed.tensor_parallel")


_installed = lru_cache(_installed_module)


def is_bnb_available() -> bool:
    return _installed("bitsandbytes")


@lru_cache
def is_bnb_4bit_available() -> bool:
    if not is_bnb_available():
        return False
    import bitsandbytes as bnb

    return hasattr(bnb.nn, "Linear4bit")


def is_gptqmodel_available() -> bool:
    return _installed("gptqmodel")


def is_optimum_available() -> bool:
    return _installed("optimum")


def is_aqlm_available() -> bool:
    return _installed("aqlm")


def is_eetq_available() -> bool:
    return _installed("eetq")


def is_hqq_available() -> bool:
    return _installed("hqq")


def is_inc_available() -> bool:
    return _installed("neural_compressor")


def is_torchao_available() -> bool:
    return _installed("torchao")


def is_torchao_ge_v0_18_0() -> bool:
    if not is_torchao_available():
        return False
    return Version(importlib.metadata.version("torchao")) >= Version("0.18.0")


def is_diffusers_available() -> bool:
    return _installed("diffusers")


def is_te_available() -> bool:
    return _installed("transformer_engine")


def is_te_pytorch_available() -> bool:
    return _installed("transformer_engine") and _installed("transformer_engine.pytorch")


def is_torch_tpu_available(check_device: bool = True) -> bool:
    if not _installed("torch_xla"):
        return False
    if not check_device:
        return True
    try:
        import torch_xla.core.xla_model as xm

        xm.xla_device()
        return True
    except RuntimeError:
        return False


def is_xpu_available(check_device: bool = False) -> bool:
    xpu = getattr(torch, "xpu", None)
    if xpu is None:
        return False
    if check_device:
        try:
            return xpu.device_count() > 0
        except RuntimeError:
            return False
    return bool(xpu.is_available())
