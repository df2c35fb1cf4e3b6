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
