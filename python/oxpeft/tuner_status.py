"""`get_layer_status` / `get_model_status`: what each adapter layer holds and does, and the same over the model.

HF PEFT's dataclasses and rules: a value that differs between layers is reported as "irregular".
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
from torch import nn

from oxpeft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from oxpeft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper, count_parameters

__all__ = ["TunerLayerStatus", "TunerModelStatus", "get_layer_status", "get_model_status"]

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None = None


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular = None


def _one_or_irregular(values: list) -> bool | Irregular:
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _adapter_modules(module: nn.Module) -> Iterator[tuple[str, nn.Module | nn.Parameter]]:
    """(adapter name, its module or parameter) for every per-adapter container of an adapter layer or wrapper."""
    containers = ("modules_to_save",) if isinstance(module, ModulesToSaveWrapper) else module.adapter_layer_names
    for attr in containers:
        for name, item in getattr(module, attr).items():
            yield name, item


def _parameters(item: nn.Module | torch.Tensor) -> list[nn.Parameter]:
    if isinstance(item, torch.Tensor):
        return [item] if isinstance(item, nn.Parameter) else []  # a buffer (VeLoRA's projection) is not trained
    return list(item.parameters())


def _tuner_of(model: nn.Module) -> nn.Module:
    """The module to walk: a PeftModel's tuner, else `model` (a tuner, or a model with injected layers)."""
    if isinstance(model, BaseTuner):
        return model
    base = getattr(model, "base_model", None)
    if isinstance(base, BaseTuner):
        return base
    if getattr(model, "_is_prompt_learning", False):
        raise TypeError("get_layer_status / get_model_status: prompt-learning models have no adapter layers")
    return model


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One `TunerLayerStatus` per adapter layer and modules_to_save wrapper of `model` (a PeftModel, a tuner or a
    model with injected adapters). A ValueError if there is none."""
    out = []
    for name, module in _tuner_of(model).named_modules():
        if not isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            continue
        grads: dict[str, list[bool]] = collections.defaultdict(list)
        devices: dict[str, set[str]] = collections.defaultdict(set)
        for adapter, item in _adapter_modules(module):
            for param in _parameters(item):
                grads[adapter].append(param.requires_grad)
                devices[adapter].add(param.device.type)
        available = sorted(grads) if isinstance(module, AuxiliaryTrainingWrapper) else sorted(module.adapter_names())
        out.append(
            TunerLayerStatus(
                name=name,
                module_type=repr(module).partition("(")[0],
                enabled=not module.disable_adapters,
                active_adapters=module.active_adapters,
                merged_adapters=list(getattr(module, "merged_adapters", [])),
                requires_grad={k: _one_or_irregular(v) for k, v in grads.items()},
                available_adapters=available,
                devices={k: sorted(v) for k, v in devices.items()},
            )
        )
    if not out:
        raise ValueError("no adapter layers found in the model: is it a PeftModel, or a model with injected adapters?")
    return out


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The adapters' state over the whole model; fields that differ between layers are "irregular"."""
    tuner = _tuner_of(model)
    if tuner is not model and hasattr(model, "get_base_model"):
        base_model_type = type(model.get_base_model()).__name__
        adapter_model_type = type(tuner).__name__
        peft_types = {name: str(config.peft_type) for name, config in tuner.peft_config.items()}
    else:
        base_model_type = type(model).__name__ if hasattr(model, "config") else "other"
        adapter_model_type, peft_types = "None", {}
    trainable, total = count_parameters(model)
    layers = get_layer_status(model)
    enabled = _one_or_irregular([s.enabled for s in layers])
    actives = {tuple(s.active_adapters) for s in layers}
    merged_all = sorted({a for s in layers for a in s.merged_adapters})
    merged: list[str] | Irregular = merged_all
    if any(set(s.available_adapters) - set(s.merged_adapters) & set(merged_all) for s in layers):
        merged = "irregular"
    grads: dict[str, list] = collections.defaultdict(list)
    devices: dict[str, set[str]] = collections.defaultdict(set)
    for status in layers:
        for adapter, value in status.requires_grad.items():
            grads[adapter].append(value)
        for adapter, kinds in status.devices.items():
            devices[adapter].update(kinds)
    return TunerModelStatus(
        base_model_type=base_model_type,
        adapter_model_type=adapter_model_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled,
        active_adapters=list(actives.pop()) if len(actives) == 1 else ("irregular" if actives else []),
        merged_adapters=merged,
        requires_grad={k: _one_or_irregular(v) for k, v in grads.items()},
        available_adapters=sorted({a for s in layers for a in s.available_adapters}),
        devices={k: sorted(v) for k, v in devices.items()},
    )
