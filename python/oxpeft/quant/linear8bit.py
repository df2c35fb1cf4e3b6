"""`Linear8bit`: a Linear layer whose weight is stored row-wise as int8 (LLM.int8() format)."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from oxpeft.quant._autograd import quantized_linear
from oxpeft.quant._linear_init import copy_bias, init_like_linear
from oxpeft.quant.functional import dequantize_int8, quantize_int8

__all__ = ["Linear8bit"]

# torch's CPU int8 GEMM is fast only with AVX-512 (elsewhere a scalar loop, slower than the fp32 fallback).
_CPU_INT_MM = hasattr(torch, "_int_mm") and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
# Columns per fp32 product in the fallback: 1024 * 127 * 127 < 2**24, so every partial sum is exact in fp32.
_EXACT_FP32_COLUMNS = 1024


def _int8_matmul_fallback(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a (m, k) int8 @ b (n, k)^T` as exact int32, through fp32 products of at most 1024 columns."""
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.int32, device=a.device)
    for start in range(0, a.shape[1], _EXACT_FP32_COLUMNS):
        end = start + _EXACT_FP32_COLUMNS
        out += (a[:, start:end].float() @ b[:, start:end].float().t()).to(torch.int32)
    return out


def _int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a (m, k) int8 @ b (n, k)^T` as int32: torch's int8 GEMM where the device has one, else exact fp32 products."""
    if hasattr(torch, "_int_mm") and (a.device.type != "cpu" or _CPU_INT_MM):
        try:
            return torch._int_mm(a, b.t())
        except (RuntimeError, NotImplementedError):
            # CUDA's kernel needs m > 16 and k, n multiples of 8; other devices may lack it entirely.
            pass
    return _int8_matmul_fallback(a, b)


def _mixed_int8_linear(
    x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: Optional[torch.Tensor], threshold: float
) -> torch.Tensor:
    """LLM.int8() for a 2-D `x` (tokens, in): input columns holding any |x| >= threshold go through a
    matmul in x's dtype with the dequantised weight columns, the rest through int8 x int8 -> int32
    with row-wise absmax-quantised activations, as bitsandbytes' `int8_vectorwise_quant` and
    `int8_mixed_scaled_mm` do (activations rounded to float16 first, scales and rescaling in fp32)."""
    a = x.to(torch.float16)
    outliers = a.abs() >= threshold
    cols = outliers.any(dim=0).nonzero().view(-1)
    if cols.numel():
        a = a.masked_fill(outliers, 0)
    row_max = a.abs().amax(dim=1).float()
    scale = torch.where(row_max > 0, 127.0 / row_max, torch.zeros_like(row_max))
    ca = torch.round(a * scale.unsqueeze(1)).to(torch.int8)
    if cols.numel():
        ca[:, cols] = 0
    out = _int8_matmul(ca, cb) * (row_max.unsqueeze(1) * scb.unsqueeze(0)) * 6.200124e-05  # 1 / 127**2
    if bias is not None:
        out += bias
    out = out.to(x.dtype)
    if cols.numel():
        weight_cols = dequantize_int8(cb[:, cols].contiguous(), scb, x.dtype)
        out = out.addmm(x[:, cols], weight_cols.t())
    return out


class Linear8bit(nn.Module):
    """A Linear layer with an int8 weight (`weight`, frozen, (out, in)) and per-row scales `SCB`.

    With `threshold` 0.0 `forward` dequantises `CB * SCB / 127` to `compute_dtype` and runs `F.linear`
    in that dtype. With `threshold` > 0 it runs LLM.int8() as bitsandbytes' `Linear8bitLt` does:
    input columns with any |x| >= threshold in float against the dequantised weight columns, the rest
    as an int8 x int8 -> int32 matmul of row-wise quantised activations (torch's int8 GEMM where the
    device has one). Gradients flow to the input (and bias) through the dequantised weight, which is
    dequantised again in backward rather than kept. The state dict holds `weight` (int8), `SCB` (fp32)
    and `weight_format` (uint8 0, "row"), the keys bitsandbytes' `Linear8bitLt` and transformers use.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        device: Optional[torch.device | str] = None,
        threshold: float = 0.0,
    ) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"Linear8bit: features must be positive, got in={in_features}, out={out_features}")
        if isinstance(threshold, bool) or not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0):
            raise ValueError(f"Linear8bit: threshold must be a finite number >= 0 (0 turns LLM.int8() off), got {threshold!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.threshold = float(threshold)
        # The int8 format does not record the dtype the weight had; `set_weight` does, for merging back.
        self.original_dtype = compute_dtype
        init_like_linear(self, bias, compute_dtype, device)

    def set_weight(self, weight: torch.Tensor, name: str = "weight") -> None:
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"{name}: shape {list(weight.shape)} does not match Linear8bit({self.in_features}, {self.out_features})"
            )
        if weight.device.type == "meta":
            cb = torch.empty(weight.shape, dtype=torch.int8, device="meta")
            scb = torch.empty(self.out_features, dtype=torch.float32, device="meta")
        else:
            cb, scb = quantize_int8(weight, name=name)
        self.weight = nn.Parameter(cb, requires_grad=False)
        self.SCB = scb
        self.original_dtype = weight.dtype

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        compute_dtype: Optional[torch.dtype] = None,
        name: str = "weight",
        threshold: float = 0.0,
    ) -> "Linear8bit":
        """Quantises an `nn.Linear` (on its device); `compute_dtype` defaults to its weight dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name}: from_linear needs an nn.Linear, got {type(linear).__name__}")
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=False,
            compute_dtype=compute_dtype or linear.weight.dtype,
            device="meta",
            threshold=threshold,
        )
        module.set_weight(linear.weight.detach(), name=name)
        copy_bias(module, linear)
        return module

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The full (out, in) weight in `dtype` (default `compute_dtype`)."""
        return dequantize_int8(self.weight, self.SCB, dtype or self.compute_dtype)

    def quantized_matmul(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """`x @ W^T + bias` with `x` and `bias` already in `compute_dtype` (no autograd through W)."""
        if self.threshold == 0.0 or x.numel() == 0:
            return F.linear(x, self.dequantize(), bias)
        flat = _mixed_int8_linear(x.reshape(-1, self.in_features), self.weight, self.SCB, bias, self.threshold)
        return flat.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(self, x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"compute_dtype={self.compute_dtype}, threshold={self.threshold}"
        )

    def _apply(self, fn: Any, recurse: bool = True) -> "Linear8bit":
        super()._apply(fn, recurse)
        # SCB follows device moves only, never dtype casts.
        device = fn(torch.empty(0, device=self.weight.device)).device
        if self.SCB.device != device:
            self.SCB = self.SCB.to(device)
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        destination[prefix + "SCB"] = self.SCB
        destination[prefix + "weight_format"] = torch.tensor(0, dtype=torch.uint8)

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
        where = prefix.rstrip(".") or "Linear8bit"
        mine = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        for key in ("weight", "SCB"):
            if key not in mine:
                missing_keys.append(prefix + key)
        if "weight" not in mine or "SCB" not in mine:
            return
        cb, scb, bias = mine["weight"], mine["SCB"], mine.get("bias")
        fmt = mine.get("weight_format", torch.tensor(0))
        fmt = int(fmt.item()) if isinstance(fmt, torch.Tensor) else fmt
        problems = []
        if fmt not in (0, "row"):
            problems.append(f"weight_format {fmt!r} is not 0 ('row'), the only layout oxpeft reads")
        if cb.dtype != torch.int8 or tuple(cb.shape) != (self.out_features, self.in_features):
            problems.append(
                f"weight must be int8 of shape {[self.out_features, self.in_features]}, got {cb.dtype} {list(cb.shape)}"
            )
        if scb.numel() != self.out_features:
            problems.append(f"SCB must have {self.out_features} values, got {scb.numel()}")
        elif not scb.is_meta and not bool((torch.isfinite(scb) & (scb >= 0)).all()):
            problems.append("SCB holds a negative, NaN or Inf row scale")
        if bias is not None and (self.bias is None or bias.shape != self.bias.shape):
            problems.append(f"bias of shape {list(bias.shape)} does not fit this layer")
        if problems:
            error_msgs.append(f"{where}: " + "; ".join(problems))
            return
        if self.bias is not None and bias is None:
            missing_keys.append(prefix + "bias")
        device = self.weight.device if self.weight.device.type != "meta" else cb.device
        self.weight = nn.Parameter(cb.detach().to(device).clone(), requires_grad=False)
        self.SCB = scb.detach().to(device, torch.float32).reshape(-1).clone()
        if bias is not None:
            target = self.bias.device if self.bias.device.type != "meta" else bias.device
            self.bias = nn.Parameter(bias.detach().to(target, self.bias.dtype).clone(), requires_grad=self.bias.requires_grad)
        unexpected_keys.extend(prefix + k for k in mine if k not in ("weight", "SCB", "weight_format", "bias"))
