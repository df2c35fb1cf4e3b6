"""AdaLoRA layers: an SVD-form adapter ``delta = B @ (A * E) * scaling / (ranknum + 1e-5)``.

A (r, in) holds right singular vectors, E (r, 1) the singular values, B (out, r) left singular vectors; on
nn.Conv2d, A is (r, in / groups * kh * kw) and the delta is reshaped to the kernel.
Pruning a rank zeroes its entry of E (the RankAllocator does that during training); the saved file keeps only
the unpruned triplets. `ranknum` is the rank the adapter was created with (init_r): it stays fixed, so the
scale of an adapter does not jump when ranks are pruned, and it is not saved (it follows from the config).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from oxpeft.tuners.tuners_utils import DeltaTunerLayer, is_linear_like

# Added to ranknum before dividing (HF PEFT does the same, so that a rank-0 adapter stays finite).
RANKNUM_EPS = 1e-5


class AdaLoraLayer(DeltaTunerLayer):
    """AdaLoRA on nn.Linear, transformers' Conv1D (`fan_in_fan_out=True`, weight stored as (in, out)), oxpeft's
    quantised Linear4bit / Linear8bit and nn.Conv2d."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_E")
    other_param_names = ("r", "lora_alpha", "scaling", "ranknum", "lora_dropout")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: bool = True,
        fan_in_fan_out: bool = False,
        ranknum: int | None = None,
        adapter_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        if isinstance(base_layer, Conv1D):
            in_features, out_features = base_layer.weight.shape
        elif isinstance(base_layer, nn.Conv2d):
            in_features, out_features = base_layer.in_channels, base_layer.out_channels
        elif is_linear_like(base_layer):
            in_features, out_features = base_layer.in_features, base_layer.out_features
        else:
            raise ValueError(
                f"AdaLoRA supports nn.Linear, transformers Conv1D, oxpeft's quantised Linear layers and nn.Conv2d, "
                f"not {type(base_layer).__name__}"
            )
        self._init_tuner_layer(base_layer)
        self.in_features, self.out_features = in_features, out_features
        self.is_conv = isinstance(base_layer, nn.Conv2d)
        # Columns of A: the input size, or for a convolution the size of one output channel's kernel.
        self._a_columns = base_layer.weight[0].numel() if self.is_conv else in_features
        self.fan_in_fan_out = fan_in_fan_out
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.ranknum: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, ranknum, adapter_dtype)
        self.set_adapter(adapter_name)

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        init_lora_weights: bool,
        ranknum: int | None,
        adapter_dtype: torch.dtype | None,
    ) -> None:
        """Add adapter `adapter_name` of rank `r` (0 is allowed: every triplet was pruned)."""
        if r < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha if lora_alpha > 0 else float(r)
        self.ranknum[adapter_name] = float(r if ranknum is None else ranknum)
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        # Random unless initialised, so init_lora_weights=False gives an adapter that changes the output.
        self.lora_A[adapter_name] = nn.Parameter(torch.randn(r, self._a_columns))
        self.lora_E[adapter_name] = nn.Parameter(torch.randn(r, 1))
        self.lora_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, r))
        if init_lora_weights:
            with torch.no_grad():
                # E = 0 makes the new adapter the identity; small A and B keep the orthogonality penalty finite.
                nn.init.zeros_(self.lora_E[adapter_name])
                nn.init.normal_(self.lora_A[adapter_name], mean=0.0, std=0.02)
                nn.init.normal_(self.lora_B[adapter_name], mean=0.0, std=0.02)
        self._move_adapter_to_base(adapter_name, adapter_dtype)

    def _factor(self, adapter_name: str) -> float:
        return self.scaling[adapter_name] / (self.ranknum[adapter_name] + RANKNUM_EPS)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, e, b = self.lora_A[adapter_name], self.lora_E[adapter_name], self.lora_B[adapter_name]
        delta = (b @ (a * e)) * self._factor(adapter_name)
        if self.is_conv:
            return delta.reshape(self.get_base_layer().weight.shape)
        return delta.T if self.fan_in_fan_out else delta

    def _adapter_output(self, adapter_name: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        a, e, b = self.lora_A[adapter_name], self.lora_E[adapter_name], self.lora_B[adapter_name]
        x = self.lora_dropout[adapter_name](x.to(a.dtype))
        if self.is_conv:
            base = self.get_base_layer()
            delta = self.get_delta_weight(adapter_name)
            return F.conv2d(
                x, delta, stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups
            )
        return (x @ (a * e).T @ b.T) * self._factor(adapter_name)

    def orthogonality_penalty(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``||A A^T - I||_F`` and ``||B^T B - I||_F``: how far the singular vectors are from orthonormal."""
        a, b = self.lora_A[adapter_name], self.lora_B[adapter_name]
        eye = torch.eye(a.shape[0], device=a.device, dtype=a.dtype)
        return torch.linalg.matrix_norm(a @ a.T - eye), torch.linalg.matrix_norm(b.T @ b - eye)

    def __repr__(self) -> str:
        return "adalora." + super().__repr__()
