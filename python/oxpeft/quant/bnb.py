"""bitsandbytes layers inside models that transformers loaded with a `BitsAndBytesConfig`.

Adapters wrap those layers as they are (`bnb.nn.Linear4bit` / `Linear8bitLt` subclass `nn.Linear`, and their
forward is bitsandbytes'), but their `weight` is not a dense matrix: a packed uint8 `Params4bit` with a
`quant_state`, or an int8 `Int8Params` with per-row scales `SCB`. Merging needs the dense weight and a way to
put a merged one back. oxpeft reads both formats itself (the bytes are the ones `oxpeft.quant` reads from
checkpoints); writing a merged weight back quantises it with bitsandbytes' own parameter classes, as HF PEFT
does, so the layer stays a bitsandbytes layer that transformers can save and reload.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from oxpeft.quant.functional import QuantState, dequantize_4bit, dequantize_int8

__all__ = ["bnb_bits", "dequantize_bnb", "requantize_bnb"]


def bnb_bits(module: nn.Module) -> Optional[int]:
    """4 or 8 for a bitsandbytes quantised Linear, None for anything else (no import of bitsandbytes)."""
    weight = getattr(module, "weight", None)
    kind = type(weight).__name__
    if not type(weight).__module__.startswith("bitsandbytes"):
        return None
    if kind == "Params4bit":
        return 4
    if kind == "Int8Params":
        return 8
    return None


def _row_scales(module: nn.Module) -> torch.Tensor:
    # Before the first forward the scales sit on the parameter; bitsandbytes then moves them to `module.state`.
    scb = getattr(module.weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    if scb is None:
        raise ValueError(f"{type(module).__name__}: the int8 weight has no row scales (SCB); it was never quantised")
    return scb


def dequantize_bnb(module: nn.Module, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The dense (out, in) weight of a bitsandbytes Linear, in `dtype` (default: the dtype it had before
    quantisation for 4 bits, float32 for 8 bits, whose format does not record it)."""
    bits = bnb_bits(module)
    weight = module.weight
    if bits == 4:
        if weight.quant_state is None:
            raise ValueError(f"{type(module).__name__}: the 4-bit weight has no quant_state; it was never quantised")
        # The state dict, not the live tensors: on CPUs with AVX-512 BF16 bitsandbytes repacks the weight into
        # a kernel layout at the first inference forward, and turns it back into its file format on save.
        saved = {k.removeprefix("weight."): v for k, v in module.state_dict().items() if k.startswith("weight")}
        if saved["absmax"].is_floating_point():
            # After that round trip a layer without double quantisation keeps the kernel's bf16 scales.
            saved["absmax"] = saved["absmax"].float()
        ours = QuantState.from_state_dict_items(
            {k: v for k, v in saved.items() if k != "weight"}, type(module).__name__
        ).to(weight.device)
        packed = saved["weight"].contiguous().view(-1).view(torch.uint8)
        return dequantize_4bit(packed, ours, dtype or ours.dtype)
    if bits == 8:
        if getattr(weight, "has_fp16_weights", False) and weight.dtype != torch.int8:
            return weight.data.to(dtype or weight.dtype)
        return dequantize_int8(weight.data, _row_scales(module).float(), dtype or torch.float32)
    raise TypeError(f"{type(module).__name__} is not a bitsandbytes quantised Linear")


def requantize_bnb(module: nn.Module, dense: torch.Tensor) -> None:
    """Quantise the dense (out, in) `dense` into the bitsandbytes Linear `module`, in its own format and settings."""
    import bitsandbytes as bnb

    bits = bnb_bits(module)
    old = module.weight
    device = old.device
    if bits == 4:
        state = old.quant_state
        new = bnb.nn.Params4bit(
            dense.detach().to("cpu", state.dtype),
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=getattr(old, "module", None),
        )
        module.weight = new.to(device)
        return
    if bits == 8:
        half = dense.detach().to("cpu", torch.float16)
        module.weight = bnb.nn.Int8Params(half, requires_grad=False, has_fp16_weights=old.has_fp16_weights).to(device)
        state = getattr(module, "state", None)
        if state is not None:
            state.reset_grads()
        return
    raise TypeError(f"{type(module).__name__} is not a bitsandbytes quantised Linear")
