"""What LoHa and LoKr share (HF PEFT calls them "LyCORIS" adapters): config fields, the layer skeleton and the tuner.

A LyCORIS adapter builds a full weight delta from its factors (`get_delta_weight`, in the base weight's shape,
already multiplied by ``scaling = alpha / r``) and adds ``F.linear(x, delta)`` (or ``F.conv2d``) to the base
output. Training-time extras: `rank_dropout` zeroes random output rows of the delta, `module_dropout` skips the
whole adapter for a forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from oxpeft.config import PeftConfig
from oxpeft.tuners.tuners_utils import BaseTuner, DeltaTunerLayer, innermost_base, pattern_key
from oxpeft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING


@dataclass
class LycorisConfig(PeftConfig):
    """Fields shared by `LoHaConfig` and `LoKrConfig` (HF PEFT's names and defaults).

    `target_modules` is a list of module names (a name matches a module whose full name equals it or ends with
    ``"." + name``), a regex that must match the whole module name, ``"all-linear"``, or None for the
    architecture's default. Every list entry that matches no module is an error. `rank_pattern` / `alpha_pattern`
    map a regex matched against the END of a module name to that module's r / alpha.
    """

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    init_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        for name in ("rank_dropout", "module_dropout"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), (list, tuple)):
                setattr(self, name, set(getattr(self, name)))
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                raise ValueError("modules_to_save must be a list of module names, not a string")
            self.modules_to_save = list(self.modules_to_save)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern only applies together with layers_to_transform")
        for key, r in (self.rank_pattern or {}).items():
            if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
                raise ValueError(f"rank_pattern[{key!r}] must be a positive integer, got {r!r}")


def kaiming_init(tensor: torch.Tensor) -> None:
    """The default init of nn.Linear weights (LyCORIS' choice for its factors)."""
    nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


def rebuild_cp(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """A conv kernel (out, in, kh, kw) from its Tucker/CP form: core (r, r, kh, kw), out_factor (r, out),
    in_factor (r, in) ("effective conv2d", FedPara proposition 3)."""
    return torch.einsum("ijhw,ip,jq->pqhw", core, out_factor, in_factor)


class LycorisLayer(DeltaTunerLayer):
    """A LyCORIS adapter on nn.Linear, nn.Conv1d or nn.Conv2d. Subclasses name their factor containers in
    `adapter_layer_names` and implement `_create_factors` and `_full_delta`."""

    other_param_names = ("r", "alpha", "scaling", "rank_dropout", "rank_dropout_scale", "module_dropout")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int,
        alpha: float,
        config: LycorisConfig,
        adapter_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        # In a mixed model the base may be another method's layer; what counts is the layer it adapts.
        inner = innermost_base(base_layer)
        if not isinstance(inner, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            raise ValueError(
                f"{type(self).__name__} supports nn.Linear, nn.Conv1d and nn.Conv2d, not {type(inner).__name__}"
            )
        self._init_tuner_layer(base_layer)
        if isinstance(inner, nn.Linear):
            self.in_features, self.out_features = inner.in_features, inner.out_features
        else:
            self.in_features, self.out_features = inner.in_channels, inner.out_channels
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}
        self.module_dropout: dict[str, float] = {}
        for attr in self.adapter_layer_names:
            setattr(self, attr, nn.ParameterDict())
        self.update_layer(adapter_name, r, alpha, config, adapter_dtype)
        self.set_adapter(adapter_name)

    def update_layer(
        self, adapter_name: str, r: int, alpha: float, config: LycorisConfig, adapter_dtype: torch.dtype | None
    ) -> None:
        if r <= 0:
            raise ValueError(f"r must be a positive integer, got {r}")
        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / r
        self.rank_dropout[adapter_name] = config.rank_dropout
        # LoHa always rescales the kept rows; LoKr only when asked to (rank_dropout_scale).
        self.rank_dropout_scale[adapter_name] = getattr(config, "rank_dropout_scale", True)
        self.module_dropout[adapter_name] = config.module_dropout
        self._create_factors(adapter_name, r, config)
        self._move_adapter_to_base(adapter_name, adapter_dtype)

    # --- what subclasses provide ---------------------------------------------------------------------------------
    def _create_factors(self, adapter_name: str, r: int, config: LycorisConfig) -> None:
        """Create (and initialise per `config.init_weights`) the adapter's factor parameters."""
        raise NotImplementedError

    def _full_delta(self, adapter_name: str) -> torch.Tensor:
        """The unscaled delta, in any shape with the base weight's number of elements and row-major order."""
        raise NotImplementedError

    # --- shared behaviour ----------------------------------------------------------------------------------------
    @property
    def is_conv(self) -> bool:
        return isinstance(self.get_base_layer(), (nn.Conv1d, nn.Conv2d))

    def _cp_kernel(self) -> tuple[int, int]:
        """The kernel shape of a CP core: (kh, kw), or (k, 1) for Conv1d (HF PEFT's layout)."""
        kernel = tuple(self.get_base_layer().kernel_size)
        return (kernel[0], 1) if len(kernel) == 1 else kernel

    def _param(self, attr: str, shape: tuple[int, ...], adapter_name: str) -> nn.Parameter:
        param = nn.Parameter(torch.empty(shape))
        getattr(self, attr)[adapter_name] = param
        return param

    def _flat_weight_shape(self) -> tuple[int, int]:
        """The base weight as a matrix (out, in * kh * kw): the shape of the non-CP factors' product."""
        base = self.get_base_layer()
        return base.weight.shape[0], base.weight[0].numel()

    def _uses_cp(self, config: LycorisConfig) -> bool:
        # A 1x1 convolution is a matrix product, so the CP form would only add work.
        return config.use_effective_conv2d and self.is_conv and math.prod(self.get_base_layer().kernel_size) > 1

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        base = self.get_base_layer()
        return self._full_delta(adapter_name).reshape(base.weight.shape) * self.scaling[adapter_name]

    def _drop_rows(self, adapter_name: str, delta: torch.Tensor) -> torch.Tensor:
        keep = (torch.rand(delta.shape[0], device=delta.device) > self.rank_dropout[adapter_name]).to(delta.dtype)
        if self.rank_dropout_scale[adapter_name]:
            keep = keep / keep.mean().clamp(min=torch.finfo(keep.dtype).tiny)
        return delta * keep.view(-1, *([1] * (delta.dim() - 1)))

    def _adapter_output(self, adapter_name: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        if self.training and self.module_dropout[adapter_name] > 0:
            if torch.rand(1).item() <= self.module_dropout[adapter_name]:
                return None
        delta = self.get_delta_weight(adapter_name)
        if self.training and self.rank_dropout[adapter_name] > 0:
            delta = self._drop_rows(adapter_name, delta)
        x = x.to(delta.dtype)
        base = self.get_base_layer()
        if self.is_conv:
            # The bias is already in the base output.
            conv = F.conv1d if isinstance(base, nn.Conv1d) else F.conv2d
            return conv(x, delta, stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups)
        return F.linear(x, delta)


class LycorisTuner(BaseTuner):
    """Injects one LyCORIS layer class (`layer_cls`) with per-module r / alpha from the patterns."""

    layer_cls: ClassVar[type[LycorisLayer]]

    def _default_target_modules(self, model_type: str | None) -> list[str] | None:
        return TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type or "")

    def _create_and_replace(
        self,
        config: LycorisConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
    ) -> None:
        rank_key = pattern_key(config.rank_pattern or {}, current_key)
        alpha_key = pattern_key(config.alpha_pattern or {}, current_key, field="alpha_pattern")
        r = config.rank_pattern[rank_key] if rank_key is not None else config.r
        alpha = config.alpha_pattern[alpha_key] if alpha_key is not None else config.alpha
        layer_cls = self._layer_cls_for(config)
        if isinstance(target, layer_cls):
            target.update_layer(adapter_name, r, alpha, config, self._adapter_dtype(target.get_base_layer()))
            return
        try:
            new_module = layer_cls(target, adapter_name, r, alpha, config, self._adapter_dtype(target))
        except ValueError as exc:
            raise ValueError(f"'{current_key}': {exc}") from None
        setattr(parent, target_name, new_module)
