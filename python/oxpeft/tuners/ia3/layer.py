"""(IA)³ layers: a learned vector per adapter rescales the layer's output, or its input for feed-forward layers.

- attention-type target: ``y = base(x) * l`` with ``l`` of shape (out, 1) (convolutions: (1, out, 1, ...));
- feed-forward target: ``y = base(x * l)`` with ``l`` of shape (1, in) (convolutions: (1, in, 1, ...)).
Several active adapters multiply. Merging multiplies the weight (and, for output scaling, the bias) by ``l``,
computed in fp32 and rounded once; unmerging divides by it again.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from oxpeft.tuners.tuners_utils import BaseTunerLayer, check_merged_weight


class IA3Layer(nn.Module, BaseTunerLayer):
    """The (IA)³ adapter state and behaviour; an nn.Module so its `forward` precedes nn.Module's in subclasses."""

    adapter_layer_names = ("ia3_l",)

    is_feedforward: bool

    def _init_ia3(self, base_layer: nn.Module, is_feedforward: bool, in_features: int, out_features: int) -> None:
        self._init_tuner_layer(base_layer)
        self.is_feedforward = is_feedforward
        self.in_features = in_features
        self.out_features = out_features
        self.ia3_l = nn.ParameterDict()

    def _vector_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def update_layer(self, adapter_name: str, init_ia3_weights: bool, adapter_dtype: torch.dtype | None) -> None:
        # Random unless initialised, so init_ia3_weights=False gives an adapter that changes the output.
        vector = torch.ones(self._vector_shape()) if init_ia3_weights else torch.randn(self._vector_shape())
        self.ia3_l[adapter_name] = nn.Parameter(vector)
        self._move_adapter_to_base(adapter_name, adapter_dtype)

    def _scaling(self) -> torch.Tensor | None:
        """The product of the active adapters' vectors, or None when no active adapter lives in this layer."""
        scaling = None
        for name in self._active_adapter:
            if name in self.ia3_l:
                vector = self.ia3_l[name]
                scaling = vector if scaling is None else scaling * vector
        return scaling

    def _weight_factor(self, vector: torch.Tensor) -> torch.Tensor:
        """An adapter vector shaped to broadcast against the base weight as stored."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        scaling = None if self.disable_adapters or self.merged else self._scaling()
        if scaling is None:
            return self.base_layer(x, *args, **kwargs)
        if self.is_feedforward:
            scaled = (x.to(scaling.dtype) * self._activation_factor(scaling)).to(x.dtype)
            return self.base_layer(scaled, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result.to(scaling.dtype) * self._activation_factor(scaling)).to(result.dtype)

    def _activation_factor(self, scaling: torch.Tensor) -> torch.Tensor:
        """The vector shaped to broadcast against the input (feed-forward) or output activations."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        base = self.get_base_layer()
        for name in self._adapters_to_merge(adapter_names):
            weight = self._stored_weight().float() * self._weight_factor(self.ia3_l[name].float())
            bias = None
            if not self.is_feedforward and base.bias is not None:
                bias = base.bias.float() * self.ia3_l[name].float().reshape(-1)
            if safe_merge:
                check_merged_weight(weight, name)
                if bias is not None:
                    check_merged_weight(bias, name)
            self._store_weight(weight)
            if bias is not None:
                base.bias.data = bias.to(base.bias.dtype)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            vector = self.ia3_l[name].float()
            if bool((vector == 0).any()):
                # Scaling by 0 destroyed those rows/columns; dividing cannot bring them back.
                warnings.warn(
                    f"adapter '{name}' has zero (IA)³ entries; unmerging cannot restore the weights they scaled",
                    stacklevel=2,
                )
            safe = torch.where(vector == 0, torch.ones_like(vector), vector)
            self._store_weight(self._stored_weight().float() / self._weight_factor(safe))
            if not self.is_feedforward and base.bias is not None:
                base.bias.data = (base.bias.float() / safe.reshape(-1)).to(base.bias.dtype)

    def __repr__(self) -> str:
        return "ia3." + super().__repr__()


class Linear(IA3Layer):
    """(IA)³ on nn.Linear, transformers' Conv1D (`fan_in_fan_out=True`, weight stored as (in, out)) and oxpeft's
    quantised Linear4bit / Linear8bit."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        is_feedforward: bool = False,
        fan_in_fan_out: bool = False,
        init_ia3_weights: bool = True,
        adapter_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        if isinstance(base_layer, Conv1D):
            in_features, out_features = base_layer.weight.shape
        else:
            in_features, out_features = base_layer.in_features, base_layer.out_features
        self._init_ia3(base_layer, is_feedforward, in_features, out_features)
        self.fan_in_fan_out = fan_in_fan_out
        self.update_layer(adapter_name, init_ia3_weights, adapter_dtype)
        self.set_adapter(adapter_name)

    def _vector_shape(self) -> tuple[int, ...]:
        return (1, self.in_features) if self.is_feedforward else (self.out_features, 1)

    def _weight_factor(self, vector: torch.Tensor) -> torch.Tensor:
        return vector.T if self.fan_in_fan_out else vector

    def _activation_factor(self, scaling: torch.Tensor) -> torch.Tensor:
        return scaling.reshape(-1)


class _ConvNd(IA3Layer):
    """(IA)³ on a convolution: the vector (1, channels, 1, ...) scales output channels, or input channels for
    feed-forward layers (in a grouped convolution, each group's kernel slice by its own input channels).
    (`fan_in_fan_out` is accepted for a uniform constructor and has no meaning for convolutions.)"""

    _conv_dims: int = 2

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        is_feedforward: bool = False,
        fan_in_fan_out: bool = False,
        init_ia3_weights: bool = True,
        adapter_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if base_layer.weight.dim() != self._conv_dims + 2:
            raise ValueError(
                f"{type(self).__name__} needs a {self._conv_dims + 2}-D kernel, got {base_layer.weight.dim()}-D"
            )
        self._init_ia3(base_layer, is_feedforward, base_layer.in_channels, base_layer.out_channels)
        self.update_layer(adapter_name, init_ia3_weights, adapter_dtype)
        self.set_adapter(adapter_name)

    def _vector_shape(self) -> tuple[int, ...]:
        return (1, self.in_features if self.is_feedforward else self.out_features) + (1,) * self._conv_dims

    def _weight_factor(self, vector: torch.Tensor) -> torch.Tensor:
        # Conv weights are (out, in / groups, *k): output scaling runs along dim 0, input scaling along dim 1,
        # where group g's slice holds input channels g * in_per_group ... (g + 1) * in_per_group - 1.
        if not self.is_feedforward:
            return vector.transpose(0, 1)
        groups = self.get_base_layer().groups
        if groups == 1:
            return vector
        in_per_group = self.in_features // groups
        per_group = vector.reshape(groups, 1, in_per_group, *vector.shape[2:])
        expanded = per_group.expand(groups, self.out_features // groups, in_per_group, *vector.shape[2:])
        return expanded.reshape(self.out_features, in_per_group, *vector.shape[2:])

    def _activation_factor(self, scaling: torch.Tensor) -> torch.Tensor:
        return scaling


class Conv1d(_ConvNd):
    """(IA)³ on nn.Conv1d."""

    _conv_dims = 1


class Conv2d(_ConvNd):
    """(IA)³ on nn.Conv2d."""

    _conv_dims = 2


class Conv3d(_ConvNd):
    """(IA)³ on nn.Conv3d."""

    _conv_dims = 3
