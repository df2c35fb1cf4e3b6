"""Type stubs for the Rust core (`rust/src/python/`)."""

import numpy as np
import numpy.typing as npt

def version() -> str: ...

# LoftQ (rust/src/python/loftq.rs)

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

def loftq_fit_fixed_base(
    weight: npt.NDArray[np.float32],
    dequantized: npt.NDArray[np.float32],
    rank: int,
    scaling: float,
    exact_svd: bool = False,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], float]:
    """LoRA factors fitted to weight - dequantized for a base already quantised: (lora_A, lora_B, relative error)."""
