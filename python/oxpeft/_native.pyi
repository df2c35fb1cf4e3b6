"""Type stubs for the Rust core (`rust/src/python/`)."""

def version() -> str: ...

# checkpoint merge / unmerge (rust/src/python/checkpoint.rs)
from typing import Callable, Sequence

SIDECAR_DIR: str

def checkpoint_size(path: str) -> tuple[int, int]: ...
def merge_checkpoint(
    base: str,
    adapters: Sequence[tuple[str, str, float]],
    out: str,
    exact_unmerge: bool = True,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, int]: ...
def unmerge_checkpoint(
    merged: str,
    adapters: Sequence[tuple[str, str, float]],
    out: str,
    sidecar: str | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, int]: ...
