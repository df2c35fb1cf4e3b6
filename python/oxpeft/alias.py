"""`oxpeft alias`: the opt-in that makes `import peft` answer with oxpeft.

Libraries that support PEFT (transformers, TRL, accelerate, ...) look for an installed distribution named `peft`
and import PEFT's module paths. `install` writes one, by the standard means only, into site-packages (or into
`--target DIR`, a folder to put first on `PYTHONPATH`):

- `peft/__init__.py`: a small package whose names are oxpeft's (`peft.PeftModel is oxpeft.PeftModel`), with
  `peft.__version__` the alias version and `peft.__oxpeft__` oxpeft's own. It puts a finder at the front of
  `sys.meta_path` that answers `import peft.<path>` with the module object `oxpeft.<path>`, so every class is
  the same object under both names.
- `peft-<ALIAS_VERSION>.dist-info/`: METADATA, INSTALLER and a RECORD of every file written, so that
  `importlib.metadata.version("peft")`, `pip show peft` and `pip list` see it and `pip uninstall peft` removes it.

It never shadows a real PEFT: when the target already holds a `peft` distribution that oxpeft did not write,
`install` refuses and changes nothing. No other library's files are touched.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from oxpeft._native import version as _oxpeft_version

# The PEFT release whose API oxpeft stands in for: the lowest that transformers' adapter API accepts
# (transformers 5.25 requires peft >= 0.22.0). The local label tells that oxpeft answers, and PEP 440 orders
# `0.22.0+oxpeft.X` after `0.22.0`, so `>= 0.22.0` checks pass.
PEFT_API_VERSION = "0.22.0"
ALIAS_VERSION = f"{PEFT_API_VERSION}+oxpeft.{_oxpeft_version()}"
INSTALLER = "oxpeft-alias"

_PACKAGE_INIT = '''"""`peft`, answered by oxpeft: written by `oxpeft alias install`, removed by `oxpeft alias remove` or
`pip uninstall peft`."""

from oxpeft.alias import answer_as_peft

answer_as_peft(globals())
'''


# --------------------------------------------------------------------------------------------------------------
# What runs on `import peft`
# --------------------------------------------------------------------------------------------------------------
class PeftAliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers `import peft.<path>` with the module `oxpeft.<path>` (the same object, not a copy)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith("peft."):
            return None
        real = "oxpeft." + fullname[len("peft.") :]
        try:
            if importlib.util.find_spec(real) is None:
                return None
        except ModuleNotFoundError:  # a parent of `real` is missing: `peft.<path>` is not there either
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        # The import system hands back whatever sys.modules holds under the name once this returns.
        sys.modules[module.__name__] = importlib.import_module("oxpeft." + module.__name__[len("peft.") :])


def answer_as_peft(namespace: dict[str, Any]) -> None:
    """Turn the `peft` package whose globals are `namespace` into oxpeft's face."""
    import oxpeft

    if not any(isinstance(finder, PeftAliasFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, PeftAliasFinder())
    namespace["__version__"] = ALIAS_VERSION
    namespace["__oxpeft__"] = oxpeft.__version__
    namespace["__all__"] = list(oxpeft.__all__)
    namespace["__getattr__"] = lambda name: getattr(oxpeft, name)
    namespace["__dir__"] = lambda: sorted(set(oxpeft.__all__) | {"__version__", "__oxpeft__"})


# --------------------------------------------------------------------------------------------------------------
# install / remove / status
# --------------------------------------------------------------------------------------------------------------
@dataclass
class AliasStatus:
    """What a folder holds under the name `peft`."""

    target: Path
    #: "alias" (oxpeft's), "peft" (a real PEFT distribution), or None (nothing named peft).
    kind: str | None
    version: str | None = None
    dist_info: Path | None = None

    def describe(self) -> str:
        if self.kind == "alias":
            return f"installed in {self.target}: peft {self.version}, answered by oxpeft"
        if self.kind == "peft":
            return f"not installed: {self.target} holds the real peft {self.version}"
        return f"not installed in {self.target}"


def default_target() -> Path:
    """The running interpreter's site-packages, where `pip install` would put a package."""
    return Path(sysconfig.get_paths()["purelib"])


def _dist_infos(target: Path) -> list[Path]:
    if not target.is_dir():
        return []
    return sorted(p for p in target.iterdir() if p.is_dir() and p.name.lower().startswith("peft-") and p.name.endswith(".dist-info"))


def status(target: str | os.PathLike | None = None) -> AliasStatus:
    folder = Path(target) if target is not None else default_target()
    for dist in _dist_infos(folder):
        installer = dist / "INSTALLER"
        version = _metadata_version(dist / "METADATA")
        ours = installer.is_file() and installer.read_text(encoding="utf-8").strip() == INSTALLER
        return AliasStatus(folder, "alias" if ours else "peft", version, dist)
    if (folder / "peft").exists():
        return AliasStatus(folder, "peft", None, None)
    return AliasStatus(folder, None)


def _metadata_version(path: Path) -> str | None:
    if not path.is_file():
        return None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    return None


def install(target: str | os.PathLike | None = None) -> AliasStatus:
    """Write the `peft` alias into `target` (default: site-packages); a previous alias is replaced.

    Raises:
        FileExistsError: `target` holds a real `peft` (nothing is changed).
    """
    folder = Path(target) if target is not None else default_target()
    current = status(folder)
    if current.kind == "peft":
        where = f" ({current.dist_info.name})" if current.dist_info else ""
        raise FileExistsError(
            f"{folder} already holds the real peft {current.version or ''}{where}; the alias never shadows it. "
            "Uninstall it first (pip uninstall peft), or install the alias into a folder of its own with "
            "--target DIR and put DIR first on PYTHONPATH"
        )
    folder.mkdir(parents=True, exist_ok=True)
    if current.kind == "alias":
        remove(folder)
    files = {
        "peft/__init__.py": _PACKAGE_INIT,
        f"peft-{ALIAS_VERSION}.dist-info/METADATA": _metadata(),
        f"peft-{ALIAS_VERSION}.dist-info/INSTALLER": INSTALLER + "\n",
        f"peft-{ALIAS_VERSION}.dist-info/top_level.txt": "peft\n",
    }
    record = f"peft-{ALIAS_VERSION}.dist-info/RECORD"
    lines = [f"{name},{_hash(text)},{len(text.encode())}" for name, text in files.items()] + [f"{record},,"]
    files[record] = "\n".join(lines) + "\n"
    # Built in a scratch folder beside the target and moved in, so an interrupted install leaves nothing half written.
    with tempfile.TemporaryDirectory(prefix=".oxpeft-alias-", dir=folder) as scratch:
        for name, text in files.items():
            path = Path(scratch, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        moved: list[Path] = []
        try:
            for top in ("peft", f"peft-{ALIAS_VERSION}.dist-info"):  # the metadata last: it is what claims the name
                os.replace(Path(scratch, top), folder / top)
                moved.append(folder / top)
        except BaseException:
            for path in moved:
                shutil.rmtree(path, ignore_errors=True)
            raise
    importlib.invalidate_caches()
    return status(folder)


def remove(target: str | os.PathLike | None = None) -> AliasStatus:
    """Remove the alias from `target` (every file its RECORD lists, then the emptied folders).

    Raises:
        FileExistsError: `target` holds a real `peft`, which this never removes.
        FileNotFoundError: there is no alias in `target`.
    """
    folder = Path(target) if target is not None else default_target()
    current = status(folder)
    if current.kind == "peft":
        raise FileExistsError(f"{folder} holds the real peft {current.version or ''}, not oxpeft's alias; not removing it")
    if current.kind is None or current.dist_info is None:
        raise FileNotFoundError(f"no oxpeft alias in {folder}")
    record = current.dist_info / "RECORD"
    listed = [line.split(",", 1)[0] for line in record.read_text(encoding="utf-8").splitlines() if line.strip()]
    for name in listed:
        path = (folder / name).resolve()
        if folder.resolve() not in path.parents:
            raise ValueError(f"{record}: lists {name}, outside {folder}; not removing anything")
    for name in listed:
        (folder / name).unlink(missing_ok=True)
    for top in ("peft", current.dist_info.name):
        shutil.rmtree(folder / top / "__pycache__", ignore_errors=True)
        if (folder / top).is_dir() and not any((folder / top).iterdir()):
            (folder / top).rmdir()
    importlib.invalidate_caches()
    return status(folder)


def _metadata() -> str:
    return (
        "Metadata-Version: 2.1\n"
        "Name: peft\n"
        f"Version: {ALIAS_VERSION}\n"
        f"Summary: HF PEFT's import name, answered by oxpeft {_oxpeft_version()} (oxpeft alias install)\n"
        "Requires-Dist: oxpeft\n"
    )


def _hash(text: str) -> str:
    digest = hashlib.sha256(text.encode()).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


__all__: Sequence[str] = ["ALIAS_VERSION", "AliasStatus", "PeftAliasFinder", "install", "remove", "status"]
