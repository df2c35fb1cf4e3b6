"""DoRA (weight-decomposed LoRA): the learned magnitude vector and the row norm it divides by."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DoraMagnitude", "dora_weight_norm"]


class DoraMagnitude(nn.Module):
    """DoRA's learned magnitude vector m (out,). A module so its state-dict key is PEFT's `...<adapter>.weight`."""

    def __init__(self, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features))


def dora_weight_norm(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """||W + scaling * B @ A|| per output row, in fp32 (W is the dense (out, in) base weight)."""
    combined = weight.float() + scaling * (lora_b.float() @ lora_a.float())
    return torch.linalg.norm(combined, dim=1)
