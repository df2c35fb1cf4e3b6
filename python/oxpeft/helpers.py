"""Helpers around PEFT models (PEFT's `peft.helpers`): signatures for introspection, a check for adapter folders,
temporary LoRA rescaling, turning off the adapters' input dtype casting, and a Trainer mixin for MonteCLoRA."""

from __future__ import annotations

import functools
import inspect
import types
from contextlib import contextmanager
from typing import Any, Iterator

from torch import nn

from oxpeft.config import PeftConfig
from oxpeft.tuners.lora.layer import LoraLayer
from oxpeft.tuners.tuners_utils import BaseTunerLayer

__all__ = [
    "MontecloraTrainerMixin",
    "check_if_peft_model",
    "disable_input_dtype_casting",
    "rescale_adapter_scale",
    "update_forward_signature",
    "update_generate_signature",
    "update_signature",
]


def _takes_anything(method) -> bool:
    """Whether `method`'s signature is only `(*args, **kwargs)` (or `(**kwargs)`, each maybe with oxpeft's
    keyword-only `adapter_names`), which says nothing to tools."""
    params = inspect.signature(method).parameters.values()
    variadic = {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}
    return any(p.kind in variadic for p in params) and all(p.kind in variadic or p.name == "adapter_names" for p in params)


def _borrow_signature(model: nn.Module, method: str) -> None:
    """Give `model.<method>` (a PeftModel method taking anything) the signature and docs of the base model's."""
    current = getattr(model, method)
    if not _takes_anything(current):
        return
    source = getattr(type(model.get_base_model()), method)
    bound = current.__func__

    def forwarding(self, *args, **kwargs):
        return bound(self, *args, **kwargs)

    functools.update_wrapper(forwarding, source, assigned=("__doc__", "__name__", "__annotations__"))
    forwarding.__wrapped__ = source  # inspect.signature reads the base model's parameters through this
    setattr(model, method, types.MethodType(forwarding, model))


def update_forward_signature(model: nn.Module) -> None:
    """Let `inspect.signature(model.forward)` show the base model's parameters (for tools that read them)."""
    _borrow_signature(model, "forward")


def update_generate_signature(model: nn.Module) -> None:
    """Let `inspect.signature(model.generate)` show the base model's parameters."""
    if hasattr(model, "generate") and hasattr(type(model.get_base_model()), "generate"):
        _borrow_signature(model, "generate")


def update_signature(model: nn.Module, method: str = "all") -> None:
    """`update_forward_signature` and / or `update_generate_signature`: method is "forward", "generate" or "all"."""
    if method not in ("forward", "generate", "all"):
        raise ValueError(f"method {method} is not supported please choose one of ['forward', 'generate', 'all']")
    if method in ("forward", "all"):
        update_forward_signature(model)
    if method in ("generate", "all"):
        update_generate_signature(model)


def check_if_peft_model(model_name_or_path: str) -> bool:
    """Whether `model_name_or_path` (a folder or a hub repo id) holds an adapter config that loads."""
    try:
        PeftConfig.from_pretrained(model_name_or_path)
    except Exception:  # any reason it does not load (missing, not JSON, unknown method, offline) means "no"
        return False
    return True


@contextmanager
def rescale_adapter_scale(model: nn.Module, multiplier: float | int) -> Iterator[None]:
    """Within the block, every LoRA adapter's scaling is multiplied by `multiplier` (wise-ft for multipliers in
    [0, 1]); the scalings are restored afterwards. Merged adapters are in the weights and are not rescaled."""
    if isinstance(multiplier, bool) or not isinstance(multiplier, (float, int)):
        raise TypeError(f"Argument multiplier should be of type float, got {type(multiplier)}")
    original = {}
    for module in model.modules():
        if isinstance(module, LoraLayer):
            original[module] = dict(module.scaling)
            module.scaling = {k: v * multiplier for k, v in module.scaling.items()}
    if not original:
        raise ValueError("scaling is only supported for models with `LoraLayer`s")
    try:
        yield
    finally:
        for module, scaling in original.items():
            module.scaling = scaling


@contextmanager
def disable_input_dtype_casting(model: nn.Module, active: bool = True) -> Iterator[None]:
    """Within the block (if `active`), adapter layers do not cast their input to the adapter weights' dtype."""
    if not active:
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = [(m, m.cast_input_dtype_enabled) for m in layers]
    for m in layers:
        m.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for m, enabled in before:
            m.cast_input_dtype_enabled = enabled


class MontecloraTrainerMixin:
    """Put before a Trainer class (`class MyTrainer(MontecloraTrainerMixin, Trainer)`, SFTTrainer too) to add
    MonteCLoRA's variational loss to the task loss; nothing changes for other adapters. With several LoRA tuners in
    the model, their losses are averaged."""

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any):
        from oxpeft.tuners.lora.model import LoraModel

        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)  # type: ignore[misc]
        loss, outputs = result if return_outputs else (result, None)
        tuners = [m for m in model.modules() if isinstance(m, LoraModel)]
        extra = sum((t._get_monteclora_loss() for t in tuners), 0.0)
        loss = loss + (extra / len(tuners) if len(tuners) > 1 else extra)
        return (loss, outputs) if return_outputs else loss
