"""`Linear8bit`: a Linear layer whose weight is stored row-wise as int8 (LLM.int8() format)."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from oxpeft.quant._linear_init import copy_bias, init_like_linear
from oxpeft.quant.functional import dequantize_int8, quantize_int8

__all__ = ["Linear8bit"]


class Linear8bit(nn.Module):
    """A Linear layer with an int8 weight (`weight`, frozen, (out, in)) and per-row scales `SCB`.

    `forward` dequantises `CB * SCB / 127` to `compute_dtype` and runs `F.linear` in that dtype
    (no int8 matmul and hence no activation-outlier threshold: every column is computed in
    16-bit). The state dict holds `weight` (int8), `SCB` (fp32) and `weight_format` (uint8 0,
    "row"), the keys bitsandbytes' `Linear8bitLt` and transformers use.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        device: Optional[torch.device | str] = None,
    ) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"Linear8bit: features must be positive, got in={in_features}, out={out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
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

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: Optional[torch.dtype] = None, name: str = "weight") -> "Linear8bit":
        """Quantises an `nn.Linear` (on its device); `compute_dtype` defaults to its weight dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name}: from_linear needs an nn.Linear, got {type(linear).__name__}")
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=False,
            compute_dtype=compute_dtype or linear.weight.dtype,
            device="meta",
        )
        module.set_weight(linear.weight.detach(), name=name)
        copy_bias(module, linear)
        return module

    def dequantize(self) -> torch.Tensor:
        """The full (out, in) weight in `compute_dtype`."""
        return dequantize_int8(self.weight, self.SCB, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(x.to(self.compute_dtype), self.dequantize(), bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"compute_dtype={self.compute_dtype}"
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
