"""Helpers with HF PEFT's names in `peft.utils.other`: the `modules_to_save` wrapper (and its base,
`AuxiliaryTrainingWrapper`), submodule lookup, device."""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import nn

__all__ = [
    "AuxiliaryTrainingWrapper",
    "ModulesToSaveWrapper",
    "_get_submodules",
    "cast_mixed_precision_params",
    "count_parameters",
    "fsdp_auto_wrap_policy",
    "infer_device",
]


class AuxiliaryTrainingWrapper(nn.Module):
    """Base of the wrappers that train something beside the adapter layers, per adapter (PEFT's name).

    It wraps `original_module`, keeps which adapters are active, and hands attribute reads it does not have itself
    (`.weight`, `.bias`, `.in_features`, ...) to the module the forward currently uses, so code that reads a wrapped
    layer's attributes keeps working.
    """

    #: The attributes holding per-adapter state, as on adapter layers (PEFT's names).
    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()

    def __init__(self, module_to_save: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module_to_save
        self._active_adapter: list[str] = []
        self._disable_adapters = False
        self.init_modules()
        self.update(adapter_name)
        self.set_adapter(adapter_name)

    # --- what a subclass provides --------------------------------------------------------------------------------
    def init_modules(self) -> None:
        """Create the (empty) per-adapter containers."""

    def update(self, adapter_name: str) -> None:
        """Create what adapter `adapter_name` trains."""
        raise NotImplementedError

    def _available_adapters(self) -> set[str]:
        raise NotImplementedError

    def _current(self) -> nn.Module:
        """The module the forward runs now."""
        raise NotImplementedError

    # --- shared --------------------------------------------------------------------------------------------------
    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapter[0] if len(self._active_adapter) == 1 else list(self._active_adapter)

    @property
    def _adapters(self) -> set[str]:
        """The adapters this wrapper holds something for (PEFT's attribute)."""
        return self._available_adapters()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules of the wrapper itself
        except AttributeError:
            # Half-built (during __init__, copy or unpickling) there is no module to hand the read to.
            if name.startswith("__") or "original_module" not in self.__dict__.get("_modules", {}):
                raise
        return getattr(self._current(), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._current()(*args, **kwargs)

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled

    def check_set_adapter(self, adapter_names: str | list[str]) -> None:
        """Raise if `adapter_names` cannot be active together here (called before anything is changed)."""

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Make `adapter_names` the active ones (trainable unless `inference_mode`); others are frozen."""
        self.check_set_adapter(adapter_names)
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._active_adapter = [n for n in names if n in self._available_adapters()]
        self.set_requires_grad(self._available_adapters(), False)
        self.set_requires_grad(self._active_adapter, not inference_mode)

    def set_requires_grad(self, adapter_names: str | Iterable[str], requires_grad: bool = True) -> None:
        raise NotImplementedError

    def delete_adapter(self, adapter_name: str, new_active_adapters: list[str] | None = None) -> None:
        raise NotImplementedError

    def adapter_state_dict_load_map(self, adapter_name: str) -> dict[str, str]:
        """File key (relative to this wrapper) -> this wrapper's state-dict key, for every tensor adapter
        `adapter_name` loads here (empty if it has nothing here). transformers' adapter loading renames by it."""
        raise NotImplementedError

    def adapter_state_dict(self, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This wrapper's tensors of `adapter_name`, keyed as in the file, from its own `state_dict`."""
        return {file_key: state_dict[key] for file_key, key in self.adapter_state_dict_load_map(adapter_name).items()}

    def unload_and_optionally_merge_module(
        self, merge: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """The module that replaces this wrapper when the adapters are unloaded."""
        return self._current()

    def unwrapped(self) -> nn.Module:
        return self.unload_and_optionally_merge_module()


class ModulesToSaveWrapper(AuxiliaryTrainingWrapper):
    """Keeps the original module and one trainable copy per adapter (`modules_to_save`); the forward runs the
    active adapter's copy."""

    adapter_layer_names = ("modules_to_save",)

    def init_modules(self) -> None:
        self.modules_to_save = nn.ModuleDict()

    def update(self, adapter_name: str) -> None:
        if adapter_name not in self.modules_to_save:
            copy_ = copy.deepcopy(self.original_module)
            copy_.requires_grad_(True)
            self.modules_to_save[adapter_name] = copy_

    def _available_adapters(self) -> set[str]:
        return set(self.modules_to_save)

    def adapter_state_dict_load_map(self, adapter_name: str) -> dict[str, str]:
        if adapter_name not in self.modules_to_save:
            return {}
        return {k: f"modules_to_save.{adapter_name}.{k}" for k in self.modules_to_save[adapter_name].state_dict()}

    def check_set_adapter(self, adapter_names: str | list[str]) -> None:
        # A trained copy replaces the module; two copies cannot both run (unlike adapters, they do not add up).
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        held = [n for n in names if n in self.modules_to_save]
        if len(held) > 1:
            raise ValueError(
                f"Only one adapter can be set at a time for ModulesToSaveWrapper: adapters {held} each hold a trained "
                "copy of this module, and only one copy can run"
            )

    def _current(self) -> nn.Module:
        if self._disable_adapters:
            return self.original_module
        for name in self._active_adapter:
            if name in self.modules_to_save:
                return self.modules_to_save[name]
        return self.original_module

    def set_requires_grad(self, adapter_names: str | Iterable[str], requires_grad: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.original_module.requires_grad_(False)
        for name in names:
            if name in self.modules_to_save:
                self.modules_to_save[name].requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str, new_active_adapters: list[str] | None = None) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        remaining = [n for n in self._active_adapter if n != adapter_name]
        self._active_adapter = [n for n in (new_active_adapters or remaining) if n in self.modules_to_save]


def _get_submodules(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    """(parent, module, attribute name) of the module called `key` in `model`."""
    parent_name, _, target_name = key.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, model.get_submodule(key), target_name


def infer_device() -> str:
    """The accelerator torch sees ("cuda", "xpu", "mps", ...), else "cpu"."""
    if torch.cuda.is_available():
        return "cuda"
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        current = accelerator.current_accelerator()
        if current is not None:
            return current.type
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters) of `model`, each shared parameter once; a quantised weight (of a
    layer with `dequantize()`) counts as its unpacked size."""
    trainable = total = 0
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            count = param.numel()
            if name == "weight" and hasattr(module, "dequantize") and hasattr(module, "in_features"):
                count = module.in_features * module.out_features
            total += count
            if param.requires_grad:
                trainable += count
    return trainable, total


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the frozen parameters to `dtype` (float16 / bfloat16, for mixed-precision training) and the trainable
    ones to float32, in place: half the memory for the base, full precision where the optimizer steps."""
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"cast_mixed_precision_params: dtype must be torch.float16 or torch.bfloat16, got {dtype}")
    for param in model.parameters():
        param.data = param.data.to(dtype if not param.requires_grad else torch.float32)


# The prompt-learning methods, whose encoders FSDP wraps as units of their own.
_PROMPT_METHODS = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")


def _no_split_module_names(model: nn.Module) -> set[str]:
    """The class names transformers' models list in `_no_split_modules` (their decoder layers), over all submodules."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return names


def fsdp_auto_wrap_policy(model: nn.Module):
    """An FSDP auto-wrap policy for a PEFT model (PEFT's; transformers' FSDP setup asks for it): each decoder layer
    (the model's `_no_split_modules`, or the class names in $FSDP_TRANSFORMER_CLS_TO_WRAP), each prompt encoder,
    and each leaf module with a trainable weight (the adapter factors) become units of their own, so that the
    trainable and frozen parameters are not flattened together."""
    import functools
    import os

    from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy, transformer_auto_wrap_policy

    from oxpeft.utils.peft_types import PEFT_TYPE_TO_TUNER_MAPPING, registered_peft_type

    encoders = {PEFT_TYPE_TO_TUNER_MAPPING[registered_peft_type(name)] for name in _PROMPT_METHODS}
    wanted = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", ",".join(sorted(_no_split_module_names(model))))
    classes_by_name = {type(m).__name__: type(m) for m in model.modules()}
    layer_classes = set(encoders)
    for name in filter(None, (n.strip() for n in wanted.split(","))):
        if name not in classes_by_name:
            raise TypeError(f"fsdp_auto_wrap_policy: the model has no layer class named {name!r} to wrap")
        layer_classes.add(classes_by_name[name])

    def trainable_leaf(module: nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        return not module._modules and isinstance(weight, torch.Tensor) and weight.requires_grad

    return functools.partial(
        _or_policy,
        policies=[
            functools.partial(lambda_auto_wrap_policy, lambda_fn=trainable_leaf),
            functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layer_classes),
        ],
    )
