"""pytest plugin for `peft_suite.py`'s oxpeft run: lets PEFT's test modules import where oxpeft lacks a name.

PEFT's test files import, at module level, the names of every PEFT method (`from peft import BOFTConfig, ...`), so
without help not one case of them is even collected when `peft` is oxpeft. For each `from peft... import NAME`
in the files named by `OXPEFT_SUITE_FILES` whose NAME (or module) oxpeft does not have, this puts a placeholder
in its place: a class of that name (so test ids stay the same as on the real peft) that fails any case that
reads an attribute of it or uses an instance of it, with `OxpeftLacks` naming the missing `peft.<module>.<name>`.
Calling it gives an inert instance (test tables build configs at import time), and `isinstance` / `issubclass`
against it answer False: no object oxpeft makes is of a class oxpeft lacks. Nothing of the real peft runs in this process, and no case of a
supported method can pass through a placeholder.
"""

from __future__ import annotations

import ast
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path


class OxpeftLacks(ImportError):
    """A case used a PEFT name that oxpeft does not implement."""


class _MissingMeta(type):
    def _fail(cls, *_args, **_kwargs):
        raise OxpeftLacks(f"oxpeft does not implement {cls.__module__}.{cls.__qualname__}")

    # Nothing oxpeft makes is an instance of a class it lacks: the truthful answer, and what lets the many cases
    # that ask `isinstance(config, OSFConfig)` on their way go on to test what oxpeft has.
    def __instancecheck__(cls, _obj):
        return False

    def __subclasscheck__(cls, _sub):
        return False

    def __call__(cls, *_args, **_kwargs):
        # Test tables build configs at import time (`KasaConfig()` inside a case's kwargs): the call gives an inert
        # instance, and the case fails when it reaches oxpeft, or when anything reads the instance.
        return object.__new__(cls)

    def __getattr__(cls, name):
        if name.startswith("__"):  # protocol probes (pytest's ids, copy, pickle) see an ordinary object
            raise AttributeError(name)
        cls._fail()


def _placeholder(module: str, name: str) -> type:
    def fail(self, *_args, **_kwargs):
        type(self)._fail()

    def attribute(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        type(self)._fail()

    body = {"__module__": module, "__qualname__": name, "__getattr__": attribute, "__iter__": fail}
    body["__repr__"] = lambda self: f"<{module}.{name}, which oxpeft does not implement>"
    return _MissingMeta(name, (), body)


class _MissingModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers any `peft.<path>` module that oxpeft lacks (imported by the test files, or by a library they import,
    such as diffusers' `peft.helpers`) with a module whose every name is a placeholder. It sits after the alias's
    finder, so it only sees what oxpeft does not have."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith("peft."):
            return importlib.util.spec_from_loader(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__getattr__ = lambda name: _placeholder(module.__name__, name) if not name.startswith("__") else None


def _imports_from_peft(path: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "peft" or node.module.startswith("peft."):
                found.setdefault(node.module, set()).update(alias.name for alias in node.names)
    return found


def _has_module(name: str) -> bool:
    """Whether oxpeft has the module `peft.<path>` (asked of oxpeft itself, so no placeholder answers)."""
    try:
        return importlib.util.find_spec("oxpeft" + name[len("peft"):]) is not None
    except ImportError:
        return False


def _install() -> None:
    files = [Path(p) for p in os.environ.get("OXPEFT_SUITE_FILES", "").split(os.pathsep) if p]
    wanted: dict[str, set[str]] = {}
    for path in files:
        for module, names in _imports_from_peft(path).items():
            wanted.setdefault(module, set()).update(names)
    import peft  # the alias: puts its finder first on sys.meta_path

    sys.meta_path.append(_MissingModules())
    lacked = [f"{m} (module)" for m in sorted(wanted) if m != "peft" and not _has_module(m)]
    for module, names in sorted(wanted.items()):
        target = importlib.import_module(module)
        if not _has_module(module) and module != "peft":
            continue  # a placeholder module: every name is already a placeholder
        for name in sorted(names):
            if name == "*" or hasattr(target, name):
                continue
            setattr(target, name, _placeholder(module, name))
            lacked.append(f"{module}.{name}")
    os.environ["OXPEFT_SUITE_LACKED"] = ",".join(lacked)


_install()
