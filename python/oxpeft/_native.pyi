"""Type stubs for the Rust core (`rust/src/python/`)."""

def version() -> str: ...

# Adapter configs across PEFT releases (rust/src/python/config.rs). All take and return JSON text.
def config_upgrade(config_json: str, strict: bool = True) -> tuple[str, list[str]]:
    """Read a config written by any PEFT release into the current schema; returns (JSON, notes)."""
    ...
def config_downgrade(config_json: str, target_version: str) -> str:
    """Rewrite a config so that PEFT `target_version` loads it and computes the same thing."""
    ...
def config_inspect(config_json: str) -> str:
    """Who wrote a config, which PEFT releases load it as is, and what it uses (a JSON object)."""
    ...
def config_version_stamp(release: str) -> str:
    """The `peft_version` oxpeft writes for a config in PEFT `release`'s format, e.g. `0.21.2+oxpeft.0.1.0`."""
    ...
# --- quantisation (rust/src/python/quant.rs); 16-bit floats travel as uint16 bit patterns ---
import numpy as np
import numpy.typing as npt

def quantize_4bit(
    input: npt.NDArray[np.float32] | npt.NDArray[np.uint16], blocksize: int, quant_type: str, dtype: str
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]: ...
def dequantize_4bit(
    packed: npt.NDArray[np.uint8],
    absmax: npt.NDArray[np.float32],
    n: int,
    blocksize: int,
    quant_type: str,
    dtype: str,
    out: npt.NDArray[np.float32] | npt.NDArray[np.uint16] | None = None,
) -> npt.NDArray[np.float32] | npt.NDArray[np.uint16]: ...
def double_quantize_absmax(
    absmax: npt.NDArray[np.float32], offset: float | None = None
) -> tuple[tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]], float]: ...
def dequantize_nested_absmax(
    codes: npt.NDArray[np.uint8], absmax2: npt.NDArray[np.float32], offset: float
) -> npt.NDArray[np.float32]: ...
def quantize_int8_rows(
    input: npt.NDArray[np.float32] | npt.NDArray[np.uint16], dtype: str
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]: ...
def dequantize_int8_rows(
    cb: npt.NDArray[np.int8], scb: npt.NDArray[np.float32], dtype: str
) -> npt.NDArray[np.float32] | npt.NDArray[np.uint16]: ...
def four_bit_code(quant_type: str) -> npt.NDArray[np.float32]: ...
def dynamic_map() -> npt.NDArray[np.float32]: ...
def set_output_pool_limit(bytes: int) -> int: ...
def output_pool_bytes() -> int: ...

# --- LoftQ (rust/src/python/loftq.rs) ---
def loftq_init(
    weight: npt.NDArray[np.float32],
    rank: int,
    iters: int,
    scaling: float,
    bits: int = 4,
    quant_type: str = "nf4",
    blocksize: int = 64,
    exact_svd: bool = False,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32], float]:
    """LoftQ on one (out, in) weight: (dequantized (out, in), lora_A (rank, in), lora_B (out, rank),
    relative error), with dequantized + scaling * lora_B @ lora_A ~ weight."""
    ...
def loftq_fit_fixed_base(
    weight: npt.NDArray[np.float32],
    dequantized: npt.NDArray[np.float32],
    rank: int,
    scaling: float,
    exact_svd: bool = False,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], float]:
    """LoRA factors fitted to weight - dequantized for a base already quantised: (lora_A, lora_B, relative error)."""
    ...
# checkpoint merge / unmerge (rust/src/python/checkpoint.rs)
from typing import Any, Callable, Sequence

SIDECAR_DIR: str

def checkpoint_size(path: str) -> tuple[int, int]: ...
def checkpoint_tensors(path: str) -> dict[str, tuple[list[int], str]]: ...
def merge_checkpoint(
    base: str,
    adapters: Sequence[tuple[str, str, float]],
    out: str,
    exact_unmerge: bool = True,
    progress: Callable[[str, int], None] | None = None,
    allow_nonfinite: bool = False,
) -> dict[str, Any]: ...
def unmerge_checkpoint(
    merged: str,
    adapters: Sequence[tuple[str, str, float]],
    out: str,
    sidecar: str | None = None,
    progress: Callable[[str, int], None] | None = None,
    digests: str | None = None,
    manifest: str | None = None,
) -> dict[str, int]: ...
