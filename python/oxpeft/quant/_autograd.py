"""The autograd function shared by Linear4bit and Linear8bit: a matmul with a frozen quantised weight."""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable


class FrozenQuantizedLinear(torch.autograd.Function):
    """`layer.quantized_matmul(x, bias)` (x @ W^T + bias in the layer's compute dtype) whose backward
    dequantises W again for grad_input instead of keeping it from the forward pass.

    With a plain `F.linear(x, layer.dequantize())` autograd would save the full-precision W of every
    layer until backward, which is QLoRA's whole memory saving lost. Here nothing but a reference to
    the layer is kept; the weight is frozen, so there is no weight gradient. Backward is not itself
    differentiable (no double backward).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: Optional[torch.Tensor], layer: torch.nn.Module) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return layer.quantized_matmul(x, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(ctx.layer.dequantize().to(grad_out.dtype))
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None


def quantized_linear(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward of a quantised Linear layer: `x` and the bias cast to the layer's compute dtype, the
    product through `FrozenQuantizedLinear`, the result cast back to `x`'s dtype."""
    if x.dim() == 0 or x.shape[-1] != layer.in_features:
        raise ValueError(
            f"{type(layer).__name__}(in_features={layer.in_features}, out_features={layer.out_features}): "
            f"input of shape {list(x.shape)} does not end in {layer.in_features} features"
        )
    bias = None if layer.bias is None else layer.bias.to(layer.compute_dtype)
    return FrozenQuantizedLinear.apply(x.to(layer.compute_dtype), bias, layer).to(x.dtype)
