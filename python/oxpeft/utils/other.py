"""Helpers with HF PEFT's names in `peft.utils.other`: the `modules_to_save` wrapper, submodule lookup, device."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["ModulesToSaveWrapper", "_get_submodules", "infer_device"]


class ModulesToSaveWrapper(nn.Module):
    """Keeps the original module and one trainable copy per adapter; forward uses the active adapter's copy."""

    def __init__(self, module_to_save: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict()
        self._active_adapter: list[str] = []
        self._disable_adapters = False
        self.update(adapter_name)
        self.set_adapter(adapter_name)

    def update(self, adapter_name: str) -> None:
        if adapter_name not in self.modules_to_save:
            copy_ = copy.deepcopy(self.original_module)
            copy_.requires_grad_(True)
            self.modules_to_save[adapter_name] = copy_

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def weight(self) -> torch.Tensor:
        return self._current().weight

    def _current(self) -> nn.Module:
        if self._disable_adapters:
            return self.original_module
        for name in self._active_adapter:
            if name in self.modules_to_save:
                return self.modules_to_save[name]
        return self.original_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._current()(*args, **kwargs)

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.original_module.requires_grad_(False)
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name in names)
        self._active_adapter = [n for n in names if n in self.modules_to_save]

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        self._active_adapter = [n for n in self._active_adapter if n != adapter_name]

    def unwrapped(self) -> nn.Module:
        """The module that replaces this wrapper on unload: the active adapter's copy, else the original."""
        return self._current()


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
