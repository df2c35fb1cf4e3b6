"""Lazy exports for a package's `__init__`: each public name is imported from its module on first use (PEP 562),
so importing the package stays cheap (no torch for the merge CLI and the config tools)."""

from __future__ import annotations

import importlib
from typing import Any


def lazy_exports(namespace: dict[str, Any], exports: dict[str, str]) -> None:
    """Give the module whose globals are `namespace` a `__getattr__` and `__dir__` serving `exports`
    (public name -> the module that defines it); a name is cached in the namespace once imported."""
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(namespace["__all__"])

    namespace["__getattr__"] = __getattr__
    namespace["__dir__"] = __dir__
