"""DoRA (weight-decomposed LoRA): the learned magnitude vector and the norms it divides by.

The magnitude has one entry per output channel of the adapted weight: the rows of a Linear weight (out,), the
columns of an Embedding table (embedding_dim,), the output channels of a convolution, kept in PEFT's
broadcastable shape (1, out, 1, ...) so that files match.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DoraMagnitude", "dora_weight_norm", "channel_norm", "channel_view"]


class DoraMagnitude(nn.Module):
    """DoRA's learned magnitude m. A module so its state-dict key is PEFT's `...<adapter>.weight`."""

    def __init__(self, shape: int | tuple[int, ...]):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape))


def dora_weight_norm(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """||W + scaling * B @ A|| per output row, in fp32 (W is the dense (out, in) base weight)."""
    combined = weight.float() + scaling * (lora_b.float() @ lora_a.float())
    return torch.linalg.norm(combined, dim=1)


def channel_norm(weight: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """The L2 norm of `weight` over every dimension but `channel_dim`: one entry per channel, in fp32."""
    dims = [d for d in range(weight.dim()) if d != channel_dim]
    return torch.linalg.vector_norm(weight.float(), dim=dims)


def channel_view(vector: torch.Tensor, ndim: int, channel_dim: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast along `channel_dim` of an `ndim`-dimensional tensor."""
    shape = [1] * ndim
    shape[channel_dim] = -1
    return vector.reshape(shape)
