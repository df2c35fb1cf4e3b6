"""`IA3Model`: injects (IA)³ layers into the target modules of a model."""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from oxpeft.tuners.tuners_utils import (
    BaseTuner,
    check_adapters_to_combine,
    is_linear_like,
    matches_list_entry,
    user_regex_match,
    union_module_names,
)
from oxpeft.tuners.ia3.config import IA3Config
from oxpeft.tuners.ia3.layer import Conv1d, Conv2d, Conv3d, IA3Layer, Linear
from oxpeft.utils.constants import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
)




def is_feedforward(config: IA3Config, key: str) -> bool:
    """Whether target `key` scales its input. A list entry matches a name that ENDS with it (HF PEFT's rule, kept
    so that the same config gives the same vector shapes in both libraries)."""
    ff = config.feedforward_modules
    if isinstance(ff, str):
        return user_regex_match(ff, key, field="feedforward_modules")
    return any(key.endswith(entry) for entry in ff or ())


class IA3Model(BaseTuner):
    """The (IA)³ tuner. Usually created through `get_peft_model`."""

    prefix = "ia3_"
    layer_cls = IA3Layer

    # Whether the adapter being injected named its feedforward_modules (a default is not checked against targets).
    _feedforward_given: bool = True

    def _default_target_modules(self, model_type: str | None) -> list[str] | None:
        return TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(model_type or "")

    def inject_adapter(
        self, adapter_name: str, config: IA3Config, *, strict_targets: bool = True, low_cpu_mem_usage: bool = False
    ) -> None:
        self._feedforward_given = config.feedforward_modules is not None
        super().inject_adapter(adapter_name, config, strict_targets=strict_targets, low_cpu_mem_usage=low_cpu_mem_usage)

    def _resolve_target_modules(self, config: IA3Config) -> None:
        super()._resolve_target_modules(config)
        if config.feedforward_modules is None:
            model_type = getattr(getattr(self.model, "config", None), "model_type", None)
            default = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type or "")
            if default is None:
                raise ValueError(
                    f"feedforward_modules is not set and oxpeft has no default for model_type {model_type!r}; "
                    "set feedforward_modules (the targets whose input is scaled; [] for none)"
                )
            config.feedforward_modules = set(default)

    def _check_targets_matched(self, config: IA3Config, names: list[str], targets: list[str], strict: bool) -> None:
        super()._check_targets_matched(config, names, targets, strict)
        if not self._feedforward_given:
            return
        ff = config.feedforward_modules
        if isinstance(ff, str):
            unmatched = [] if any(is_feedforward(config, k) for k in targets) else [ff]
        else:
            unmatched = sorted(e for e in ff or () if not any(matches_list_entry(k, e) for k in targets))
        if unmatched:
            message = f"feedforward_modules {unmatched} match no targeted module (targets: {sorted(targets)[:6]})"
            if strict:
                raise ValueError(message)
            warnings.warn(message, stacklevel=4)

    def _create_and_replace(
        self,
        config: IA3Config,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
    ) -> None:
        if isinstance(target, IA3Layer):
            # One layer scales either its input or its output, for all of its adapters.
            if is_feedforward(config, current_key) != target.is_feedforward:
                kind = "a feed-forward" if target.is_feedforward else "an attention"
                raise ValueError(
                    f"'{current_key}' is {kind} (IA)³ layer for the existing adapters; adapter '{adapter_name}' "
                    "must list it in feedforward_modules the same way"
                )
            target.update_layer(adapter_name, config.init_ia3_weights, self._adapter_dtype(target.get_base_layer()))
            return
        layer_cls, fan_in_fan_out = _layer_for(target, current_key, config.fan_in_fan_out)
        new_module = layer_cls(
            target,
            adapter_name,
            is_feedforward=is_feedforward(config, current_key),
            fan_in_fan_out=fan_in_fan_out,
            init_ia3_weights=config.init_ia3_weights,
            adapter_dtype=self._adapter_dtype(target),
        )
        setattr(parent, target_name, new_module)

    @torch.no_grad()
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """Create `adapter_name` whose vector in each layer is ``sum(weight_i * l_i)`` over the adapters there.

        Its targets and feed-forward modules are the unions of theirs. The new adapter is inactive and frozen;
        call `set_adapter(adapter_name)` to use it.
        """
        check_adapters_to_combine(self, adapters, weights)
        configs = [self.peft_config[a] for a in adapters]
        config = dataclasses.replace(
            configs[0],
            target_modules=union_module_names([c.target_modules for c in configs], "target_modules"),
            feedforward_modules=union_module_names([c.feedforward_modules for c in configs], "feedforward_modules"),
            init_ia3_weights=True,
        )
        self.inject_adapter(adapter_name, config)
        self._freeze_adapter(adapter_name)
        for module in self.model.modules():
            if isinstance(module, IA3Layer) and adapter_name in module.ia3_l:
                combined = module.ia3_l[adapter_name]
                combined.zero_()
                for adapter, weight in zip(adapters, weights):
                    if adapter in module.ia3_l:
                        combined.add_(module.ia3_l[adapter], alpha=weight)


def _layer_for(target: nn.Module, key: str, fan_in_fan_out: bool) -> tuple[type[IA3Layer], bool]:
    """The (IA)³ class for a base layer and the fan_in_fan_out its weight layout requires."""
    from transformers.pytorch_utils import Conv1D

    for conv_type, layer_cls in ((nn.Conv1d, Conv1d), (nn.Conv2d, Conv2d), (nn.Conv3d, Conv3d)):
        if isinstance(target, conv_type):
            return layer_cls, False
    if is_linear_like(target):
        required = isinstance(target, Conv1D)
        if required != fan_in_fan_out:
            warnings.warn(
                f"'{key}': fan_in_fan_out={fan_in_fan_out} does not fit its layer type; using {required}", stacklevel=5
            )
        return Linear, required
    raise ValueError(
        f"(IA)³ does not support '{key}' of type {type(target).__name__}; supported: nn.Linear, transformers Conv1D, "
        "oxpeft's quantised Linear layers and nn.Conv1d / Conv2d / Conv3d"
    )
