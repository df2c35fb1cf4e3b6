"""`Linear4bit`: a Linear layer whose weight is stored as packed NF4 / FP4 codes."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from oxpeft.quant._autograd import quantized_linear
from oxpeft.quant._linear_init import copy_bias, init_like_linear
from oxpeft.quant.functional import BLOCKSIZES, QuantState, dequantize_4bit, quantize_4bit

__all__ = ["Linear4bit"]

_STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


class Linear4bit(nn.Module):
    """A Linear layer with a 4-bit weight in bitsandbytes' format.

    The packed weight is a frozen uint8 parameter `weight` of shape `(ceil(out * in / 2), 1)`; its
    quantisation state (`quant_state`) moves with `.to(device)` but never changes dtype, so
    `model.half()` or `model.to(torch.bfloat16)` keeps it exact. `forward` dequantises the weight
    to `compute_dtype` and runs `F.linear` in that dtype; gradients flow to the input (and bias),
    never to the frozen weight, and backward dequantises the weight again rather than keeping the
    full-precision copy alive between forward and backward (on CPU a dequantised weight of 1 MiB or
    more reuses a pooled buffer, so the repeat costs about a millisecond per 16 M parameters). The state dict uses bitsandbytes' / transformers' keys
    (`weight`, `weight.absmax`, `weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map`,
    `weight.quant_state.bitsandbytes__nf4`), so checkpoints move both ways with bitsandbytes.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        quant_type: str = "nf4",
        compress_statistics: bool = True,
        blocksize: int = 64,
        device: Optional[torch.device | str] = None,
    ) -> None:
        super().__init__()
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"Linear4bit: quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
        if blocksize not in BLOCKSIZES:
            raise ValueError(f"Linear4bit: blocksize must be one of {BLOCKSIZES}, got {blocksize}")
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"Linear4bit: features must be positive, got in={in_features}, out={out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.quant_type = quant_type
        self.compress_statistics = compress_statistics
        self.blocksize = blocksize
        init_like_linear(self, bias, compute_dtype, device)

    def set_weight(self, weight: torch.Tensor, name: str = "weight") -> None:
        """Quantises a full-precision (out, in) weight into this module."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"{name}: shape {list(weight.shape)} does not match Linear4bit({self.in_features}, {self.out_features})"
            )
        if weight.device.type == "meta":
            n = weight.numel()
            packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device="meta")
            blocks = -(-n // self.blocksize)
            state = QuantState(
                absmax=torch.empty(blocks, dtype=torch.uint8 if self.compress_statistics else torch.float32, device="meta"),
                shape=weight.shape,
                dtype=weight.dtype,
                blocksize=self.blocksize,
                quant_type=self.quant_type,
                quant_map=torch.empty(16, device="meta"),
            )
            if self.compress_statistics:
                state.nested_absmax = torch.empty(-(-blocks // 256), device="meta")
                state.nested_quant_map = torch.empty(256, device="meta")
                state.nested_offset = 0.0
        else:
            packed, state = quantize_4bit(
                weight, self.blocksize, self.quant_type, self.compress_statistics, name=name
            )
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.quant_state = state

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        compute_dtype: Optional[torch.dtype] = None,
        quant_type: str = "nf4",
        compress_statistics: bool = True,
        blocksize: int = 64,
        name: str = "weight",
    ) -> "Linear4bit":
        """Quantises an `nn.Linear` (on its device). `compute_dtype` defaults to the linear's
        weight dtype; the bias is kept as it is."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name}: from_linear needs an nn.Linear, got {type(linear).__name__}")
        dtype = compute_dtype or linear.weight.dtype
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=False,
            compute_dtype=dtype,
            quant_type=quant_type,
            compress_statistics=compress_statistics,
            blocksize=blocksize,
            device="meta",
        )
        module.set_weight(linear.weight.detach(), name=name)
        copy_bias(module, linear)
        return module

    @property
    def original_dtype(self) -> torch.dtype:
        """The dtype the weight had when it was quantised (recorded in the quant state, as bitsandbytes does)."""
        return self.quant_state.dtype

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The full (out, in) weight in `dtype` (default `compute_dtype`)."""
        return dequantize_4bit(self.weight, self.quant_state, dtype or self.compute_dtype)

    def quantized_matmul(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """`x @ W^T + bias` with `x` and `bias` already in `compute_dtype` (no autograd through W)."""
        return F.linear(x, self.dequantize(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(self, x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, "
            f"compress_statistics={self.compress_statistics}, compute_dtype={self.compute_dtype}"
        )

    def _apply(self, fn: Any, recurse: bool = True) -> "Linear4bit":
        super()._apply(fn, recurse)
        # The quant state follows device moves only: casting fp32 scales to 16 bits would change the weight.
        device = fn(torch.empty(0, device=self.weight.device)).device
        if self.quant_state.absmax.device != device:
            self.quant_state = self.quant_state.to(device)
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        destination.update(self.quant_state.state_dict_items(prefix))

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        where = prefix.rstrip(".") or "Linear4bit"
        mine = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if "weight" not in mine:
            missing_keys.append(prefix + "weight")
            return
        state_items = {k[len("weight."):]: v for k, v in mine.items() if k.startswith("weight.")}
        try:
            state = QuantState.from_state_dict_items(state_items, where)
            if tuple(state.shape) != (self.out_features, self.in_features):
                raise ValueError(
                    f"{where}: quantised shape {list(state.shape)} does not match Linear4bit(in={self.in_features}, out={self.out_features})"
                )
            packed = mine["weight"]
            if packed.dtype != torch.uint8 and packed.dtype.itemsize > 1:
                # bitsandbytes' `quant_storage` may hold the same bytes in a wider dtype (for FSDP).
                packed = packed.contiguous().view(-1).view(torch.uint8)
            if packed.dtype != torch.uint8 or packed.numel() != (state.numel + 1) // 2:
                raise ValueError(
                    f"{where}: weight must be uint8 with {(state.numel + 1) // 2} bytes, got {packed.dtype} with {packed.numel()}"
                )
            bias = mine.get("bias")
            if self.bias is not None and bias is None:
                missing_keys.append(prefix + "bias")
            if bias is not None and (self.bias is None or bias.shape != self.bias.shape):
                raise ValueError(f"{where}: bias of shape {list(bias.shape)} does not fit this layer")
        except ValueError as exc:
            error_msgs.append(str(exc))
            return
        device = self.weight.device if self.weight.device.type != "meta" else packed.device
        self.weight = nn.Parameter(packed.detach().to(device).reshape(-1, 1).clone(), requires_grad=False)
        self.quant_state = state.to(device)
        self.quant_type = state.quant_type
        self.blocksize = state.blocksize
        self.compress_statistics = state.nested
        if bias is not None:
            target = self.bias.device if self.bias.device.type != "meta" else bias.device
            self.bias = nn.Parameter(bias.detach().to(target, self.bias.dtype).clone(), requires_grad=self.bias.requires_grad)
        known = {"weight", "bias", f"weight.quant_state.bitsandbytes__{state.quant_type}"}
        known |= {f"weight.{k}" for k in _STATE_SUFFIXES}
        unexpected_keys.extend(prefix + k for k in mine if k not in known)
