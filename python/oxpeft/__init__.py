"""oxpeft: parameter-efficient fine-tuning with HF PEFT's API and files and a Rust core."""

from oxpeft._native import version as _native_version
from oxpeft.checkpoint import MergeReport, merge_checkpoint, unmerge_checkpoint

__version__: str = _native_version()

__all__ = ["__version__"]
__all__ += ["MergeReport", "merge_checkpoint", "unmerge_checkpoint"]
