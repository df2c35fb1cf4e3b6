"""LoRA on an `nn.Parameter` (`LoraConfig.target_parameters`): the path for MoE expert stacks (Qwen3-MoE,
gpt-oss, Llama 4, Mixtral in transformers 5) whose experts are one 3-D parameter rather than Linear layers.

A `ParamWrapper` adapts one parameter of its base module. For a 2-D parameter (out, in) it is LoRA on a weight;
for a 3-D stack of E experts it holds `lora_A` (r*E, in) and `lora_B` (out, r*E), PEFT's layout: expert e uses rows
e*r..(e+1)*r of A and the columns e, e+E, e+2E, ... of B. A stack is (E, out, in) unless its module says
`is_transposed = True`, which means (E, in, out). Several parameters of one module are wrapped by nested wrappers.

The forward runs the base module with the parameter replaced by W + the active adapters' deltas
(`torch.func.functional_call`, so nothing is written into the module and gradients reach the adapters); merging
adds the delta to the parameter in fp32 and rounds once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from oxpeft.tuners.lora.layer import LoraLayer

# Options whose effect cannot be expressed as a weight delta on a parameter (PEFT refuses the same).
_REFUSED = {
    "lora_dropout": "lora_dropout != 0",
    "use_dora": "use_dora=True",
    "lora_bias": "lora_bias=True",
    "fan_in_fan_out": "fan_in_fan_out=True",
}


class ParamWrapper(nn.Module, LoraLayer):
    """LoRA on the parameter `parameter_name` of `base_layer` (a module, or another ParamWrapper)."""

    file_keys_keep_nesting = True

    def __init__(self, base_layer: nn.Module, adapter_name: str, parameter_name: str, **kwargs: Any) -> None:
        super().__init__()
        self.parameter_name = parameter_name
        self._init_tuner_layer(base_layer)  # get_param reads the innermost base
        shape = tuple(self.get_param().shape)
        if len(shape) == 2:
            experts, out_features, in_features = 1, shape[0], shape[1]
            self._swapped = False
        elif len(shape) == 3:
            experts = shape[0]
            # PEFT's rule: a stack is (experts, out, in) unless the module says it is transposed.
            self._swapped = not getattr(self.get_base_layer(), "is_transposed", False)
            out_features, in_features = (shape[1], shape[2]) if self._swapped else (shape[2], shape[1])
        else:
            raise ValueError(
                f"target_parameters: '{parameter_name}' has shape {list(shape)}; only 2-D weights and 3-D expert "
                "stacks can be adapted"
            )
        self.num_experts = experts
        self._init_lora(base_layer, in_features, out_features)
        self.update_layer(adapter_name, **kwargs)

    # --- the parameter -------------------------------------------------------------------------------------------
    def get_param(self) -> nn.Parameter:
        return getattr(self.get_base_layer(), self.parameter_name)

    def _base_weight_ref(self) -> torch.Tensor | None:
        return self.get_param()

    def _stored_weight(self) -> torch.Tensor:
        return self.get_param().data

    def _store_weight(self, weight: torch.Tensor) -> None:
        param = self.get_param()
        param.data = weight.to(param.dtype)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.get_param()

    # --- adapters ------------------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float, **kwargs: Any) -> None:
        options = {"lora_dropout": lora_dropout, **kwargs}
        for option, shown in _REFUSED.items():
            if options.get(option):
                raise ValueError(f"lora.ParamWrapper ('{self.parameter_name}') does not work with {shown}")
        if isinstance(kwargs.get("init_lora_weights"), str) and kwargs["init_lora_weights"] not in ("gaussian",):
            raise ValueError(
                f"lora.ParamWrapper ('{self.parameter_name}') supports init_lora_weights True, False or 'gaussian', "
                f"not {kwargs['init_lora_weights']!r}"
            )
        kwargs.pop("fan_in_fan_out", None)
        super().update_layer(adapter_name, r, lora_alpha, lora_dropout, **kwargs)

    def _create_adapter_weights(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r * self.num_experts, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r * self.num_experts, self.out_features, bias=False)

    def _delta_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(lhs, rhs) whose product, times the scaling, is the adapter's delta in the parameter's layout (one pair
        per expert for a stack)."""
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        if self.num_experts == 1 and self.get_param().dim() == 2:
            return b, a
        r = self.r[adapter_name]
        a = a.reshape(self.num_experts, r, self.in_features)  # (E, r, in)
        b = b.reshape(self.out_features, r, self.num_experts).permute(2, 0, 1)  # (E, out, r)
        return (b, a) if self._swapped else (a.transpose(1, 2), b.transpose(1, 2))

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """scaling * B @ A per expert, in fp32 and in the parameter's layout."""
        lhs, rhs = self._delta_factors(adapter_name)
        return (lhs.float() @ rhs.float()) * self.scaling[adapter_name]

    # --- forward -------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x)
        if self._batch_adapter_names is not None:
            raise ValueError(f"lora.ParamWrapper ('{self.parameter_name}') does not support per-sample adapter_names")
        active = [a for a in self.active_adapters if a in self.lora_A]
        if self.disable_adapters or self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        param = replaced = self.get_param()
        for adapter in active:
            # W + s * lhs @ rhs in one fused op per adapter: no separate delta the size of the expert stack.
            lhs, rhs = self._delta_factors(adapter)
            fused = torch.baddbmm if lhs.dim() == 3 else torch.addmm
            replaced = fused(replaced, lhs.to(param.dtype), rhs.to(param.dtype), alpha=self.scaling[adapter])
        # The path from base_layer down to the parameter's module (nested wrappers hold the module deeper).
        path, module = [], self.base_layer
        while isinstance(module, ParamWrapper):
            path.append("base_layer")
            module = module.base_layer
        name = ".".join([*path, self.parameter_name])
        return torch.func.functional_call(self.base_layer, {name: replaced}, (x, *args), kwargs, strict=False)

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}"

    def __repr__(self) -> str:
        return "lora." + super().__repr__()
