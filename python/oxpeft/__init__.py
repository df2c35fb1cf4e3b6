"""oxpeft: parameter-efficient fine-tuning with HF PEFT's API and files and a Rust core."""

from oxpeft._native import version as _native_version

__version__: str = _native_version()

__all__ = ["__version__"]
