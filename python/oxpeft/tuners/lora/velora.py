"""VeLoRA (`LoraConfig(velora_config=VeloraConfig(...))`, https://arxiv.org/abs/2405.17991): LoRA whose training
keeps a compressed copy of lora_A's input for the backward pass instead of the input itself.

The input's features are cut into `num_groups` groups of `ceil(in / num_groups)` (zero-padded); each group is
stored as one number, its projection on a unit vector (the adapter's `lora_velora_embed`, saved with it). The
backward rebuilds the input as those numbers times the vector (times `scale`) to form lora_A's gradient; the input
gradient and the forward are exact. The vector is the normalised mean of the groups of the batch, taken at every
training step (`batch_average`), at the first one (`batch_average_once`), or random once (`random`). Outside
training the adapter is plain LoRA, and it merges as LoRA does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_INIT_TYPES = ("batch_average", "batch_average_once", "random")


@dataclass
class VeloraConfig:
    num_groups: int = 64
    scale: float = 1.0
    init_type: str = "batch_average"

    def __post_init__(self) -> None:
        if isinstance(self.num_groups, bool) or not isinstance(self.num_groups, int) or self.num_groups <= 0:
            raise ValueError(f"`num_groups` should be positive, got {self.num_groups}.")
        if not self.scale > 0:
            raise ValueError(f"`scale` should be positive, got {self.scale}.")
        if self.init_type not in _INIT_TYPES:
            raise ValueError(
                f"Unsupported `init_type` {self.init_type!r}. Supported values are 'batch_average_once', "
                "'batch_average' and 'random'."
            )


def group_size(in_features: int, num_groups: int) -> int:
    return -(-in_features // num_groups)


def _groups(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """x (..., in) as (tokens, num_groups, group size), zero-padded at the end of the features."""
    size = group_size(x.shape[-1], num_groups)
    padded = F.pad(x, (0, num_groups * size - x.shape[-1]))
    return padded.reshape(-1, num_groups, size)


def unit(vector: torch.Tensor) -> torch.Tensor:
    """`vector` scaled to length 1 (in fp32); a zero vector becomes the normalised all-ones vector."""
    vector = vector.float()
    norm = torch.linalg.vector_norm(vector)
    if norm == 0:
        vector, norm = torch.ones_like(vector), torch.linalg.vector_norm(torch.ones_like(vector))
    return vector / norm


class _CompressedLinear(torch.autograd.Function):
    """F.linear(x, weight, bias) that saves x compressed (one number per group) for the weight's gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, embed, num_groups, scale):  # type: ignore[override]
        ctx.x_shape, ctx.x_dtype, ctx.scale = tuple(x.shape), x.dtype, scale
        ctx.bias_dtype = None if bias is None else bias.dtype
        compressed = torch.einsum("tgd,d->tg", _groups(x, num_groups), embed.to(x.dtype))
        ctx.save_for_backward(compressed, weight, embed)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        compressed, weight, embed = ctx.saved_tensors
        dtype = grad_out.dtype
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.to(dtype)).reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            in_features = ctx.x_shape[-1]
            rebuilt = (compressed.to(dtype).unsqueeze(-1) * embed.to(dtype).view(1, 1, -1)).reshape(compressed.shape[0], -1)
            grad_w = (grad.t() @ (rebuilt[:, :in_features] * ctx.scale)).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum(dim=0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None


class VeloraState:
    """A layer's VeLoRA settings per adapter; the projection vectors live in the layer's `lora_velora_embed`."""

    def __init__(self) -> None:
        self.num_groups: dict[str, int] = {}
        self.scale: dict[str, float] = {}
        self.init_type: dict[str, str] = {}
        self.initialized: dict[str, bool] = {}

    def add(self, layer: nn.Module, adapter_name: str, config: VeloraConfig) -> None:
        weight = layer.get_base_layer().weight
        size = group_size(layer.in_features, config.num_groups)
        if config.init_type == "random":
            embed = unit(torch.randn(size, device=weight.device)).to(weight.dtype)
        else:
            embed = torch.zeros(size, device=weight.device, dtype=weight.dtype)
        layer.lora_velora_embed[adapter_name] = embed
        self.num_groups[adapter_name] = config.num_groups
        self.scale[adapter_name] = config.scale
        self.init_type[adapter_name] = config.init_type
        self.initialized[adapter_name] = config.init_type == "random"

    def remove(self, adapter_name: str) -> None:
        for table in (self.num_groups, self.scale, self.init_type, self.initialized):
            table.pop(adapter_name, None)

    def after_a(self, layer: nn.Module, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """lora_A(x); while training, with the input kept compressed for the backward."""
        lora_a = layer.lora_A[adapter_name]
        if not (layer.training and torch.is_grad_enabled()):
            return lora_a(x)
        groups = self.num_groups[adapter_name]
        if self.init_type[adapter_name] == "batch_average" or not self.initialized[adapter_name]:
            with torch.no_grad():
                mean = _groups(x.detach(), groups).reshape(-1, group_size(x.shape[-1], groups)).mean(dim=0)
                stored = layer.lora_velora_embed[adapter_name]
                layer.lora_velora_embed[adapter_name] = unit(mean).to(device=stored.device, dtype=stored.dtype)
            self.initialized[adapter_name] = True
        embed = layer.lora_velora_embed[adapter_name]
        return _CompressedLinear.apply(x, lora_a.weight, lora_a.bias, embed, groups, self.scale[adapter_name])
