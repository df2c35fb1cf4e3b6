"""KaSA (`LoraConfig(kasa_config=KasaConfig(...))`, https://arxiv.org/abs/2412.06071): knowledge-aware
singular-value adaptation.

Adding a KaSA adapter to an nn.Linear drops the `r` smallest singular components of the frozen base weight, once
and for good (W becomes its rank min(in, out) - r reconstruction, rounded to its dtype), and the update is learnt in
SVD form: ``delta = scaling * B @ diag(lora_diag) @ A`` with a learnable r-vector `lora_diag` (saved as
`<layer>.lora_diag`, as PEFT does). The paper's two regularisers, ``beta * sum(lora_diag ** 2)`` and
``gamma * (||B^T B - I|| + ||A A^T - I||)``, are returned by `LoraModel._get_kasa_loss()` for the training loop to
add. Because the base weight changes, KaSA and non-KaSA adapters are not mixed on one model.

Where the base weight is still on the meta device when the adapter is added (a model built empty), the truncation
waits for the first forward or merge, once the weight is real.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class KasaConfig:
    """`beta` weighs the singular-value penalty and `gamma` the orthogonality penalty of `_get_kasa_loss`."""

    beta: float = 1e-4
    gamma: float = 1e-3

    def __post_init__(self) -> None:
        if self.beta < 0:
            raise ValueError(f"`beta` must be non-negative, got {self.beta}.")
        if self.gamma < 0:
            raise ValueError(f"`gamma` must be non-negative, got {self.gamma}.")


def add_kasa(layer: nn.Module, adapter_name: str, key: str) -> None:
    """Give the new adapter `adapter_name` of `layer` its diagonal; the base is truncated by `truncate_base`."""
    if type(layer).__name__ != "Linear" or not isinstance(layer.get_base_layer(), nn.Linear):
        raise ValueError(
            f"KaSA applies to LoRA on full-precision nn.Linear layers; '{key}' is a "
            f"{type(layer.get_base_layer()).__name__}"
        )
    if layer.fan_in_fan_out:
        raise ValueError(f"KaSA does not support fan_in_fan_out layers (transformers' Conv1D such as '{key}')")
    r, k = layer.r[adapter_name], min(layer.in_features, layer.out_features)
    if r >= k:
        raise ValueError(
            f"KaSA needs r < min(in_features, out_features) = {k} so that a singular component of '{key}' is kept, "
            f"got r={r}"
        )
    a = layer.lora_A[adapter_name].weight
    # B starts at zero (vanilla init), so the random diagonal leaves the update zero at init, as in PEFT.
    values = torch.empty(r, device=a.device, dtype=a.dtype)
    if a.device.type != "meta":
        values.normal_()
    layer.lora_diag[adapter_name] = nn.Parameter(values)


@torch.no_grad()
def truncate_base(layer: nn.Module, adapter_name: str) -> None:
    """Drop the `r` smallest singular components of `layer`'s base weight for `adapter_name` (later, if the
    weight is not materialised yet)."""
    weight = layer.get_base_layer().weight
    if weight.device.type == "meta":
        layer._kasa_pending.add(adapter_name)
        return
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    keep = s.shape[0] - layer.r[adapter_name]
    weight.data = ((u[:, :keep] * s[:keep]) @ vh[:keep]).to(weight.dtype)
    layer._kasa_pending.discard(adapter_name)


def apply_pending(layer: nn.Module, adapter_names: list[str]) -> None:
    """Run the truncations that waited for a real base weight, before a forward or a merge reads it."""
    for name in [n for n in adapter_names if n in layer._kasa_pending]:
        if layer.get_base_layer().weight.device.type == "meta":
            raise RuntimeError(
                f"KaSA adapter '{name}' must truncate the base weight, which is still on the meta device: load the "
                "base model's weights before running or merging it"
            )
        diag = layer.lora_diag[name]
        if diag.device.type == "meta":  # not loaded from a file: initialise it as a new adapter's
            layer.lora_diag[name] = nn.Parameter(torch.randn(diag.shape, device=layer.weight.device, dtype=diag.dtype))
        truncate_base(layer, name)


def kasa_loss(layer: nn.Module, adapter_name: str, beta: float, gamma: float) -> torch.Tensor:
    """``beta * sum(diag ** 2) + gamma * (||B^T B - I||_F + ||A A^T - I||_F)`` for one layer, in fp32."""
    diag = layer.lora_diag[adapter_name].float()
    a = layer.lora_A[adapter_name].weight.float()
    b = layer.lora_B[adapter_name].weight.float()
    eye = torch.eye(diag.shape[0], device=diag.device)
    orthogonality = torch.linalg.norm(b.T @ b - eye) + torch.linalg.norm(a @ a.T - eye)
    return beta * (diag**2).sum() + gamma * orthogonality
