"""`LoraModel`: injects LoRA layers into the target modules of a model."""

from __future__ import annotations

from torch import nn

from oxpeft.tuners.tuners_utils import BaseTuner, pattern_key
from oxpeft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from oxpeft.tuners.lora.config import LoraConfig
from oxpeft.tuners.lora.layer import LoraLayer, lora_layer_for, warn_fan_in_fan_out
from oxpeft.tuners.lora.weighted import add_weighted_adapter


class LoraModel(BaseTuner):
    """The LoRA tuner. Usually created through `get_peft_model`."""

    prefix = "lora_"
    layer_cls = LoraLayer

    def _default_target_modules(self, model_type: str | None) -> list[str] | None:
        return TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type or "")

    def _create_and_replace(
        self,
        config: LoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
    ) -> None:
        rank_key = pattern_key(config.rank_pattern, current_key)
        alpha_key = pattern_key(config.alpha_pattern, current_key, field="alpha_pattern")
        r = config.rank_pattern[rank_key] if rank_key is not None else config.r
        alpha = config.alpha_pattern[alpha_key] if alpha_key is not None else config.lora_alpha
        options = dict(
            r=r,
            lora_alpha=alpha,
            lora_dropout=config.lora_dropout,
            init_lora_weights=config.init_lora_weights,
            use_rslora=config.use_rslora,
            use_dora=config.use_dora,
            lora_bias=config.lora_bias,
            ephemeral_gpu_offload=config.runtime_config.ephemeral_gpu_offload,
        )
        loftq = config.init_lora_weights == "loftq"
        if loftq:
            options["init_lora_weights"] = True  # the LoftQ fit below replaces both factors
        if isinstance(target, LoraLayer):
            if loftq:
                raise ValueError(f"'{current_key}' already has an adapter; LoftQ initialises a layer's first adapter only")
            target.update_layer(adapter_name, adapter_dtype=self._adapter_dtype(target.get_base_layer()), **options)
            return
        layer_cls, required_fifo = lora_layer_for(target)
        kwargs = dict(options, adapter_dtype=self._adapter_dtype(target))
        if layer_cls.__name__ == "Linear":
            fifo = config.fan_in_fan_out if required_fifo is None else required_fifo
            warn_fan_in_fan_out(current_key, fifo, config.fan_in_fan_out)
            kwargs["fan_in_fan_out"] = fifo
        new_module = layer_cls(target, adapter_name, **kwargs)
        if loftq:
            new_module.loftq_init(adapter_name, config.loftq_config)
        setattr(parent, target_name, new_module)

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> None:
        """Create `adapter_name` from a weighted combination of existing adapters (see `tuners.lora.weighted`).

        The new adapter is inactive and frozen; call `set_adapter(adapter_name)` to use it.
        """
        add_weighted_adapter(
            self,
            adapters,
            weights,
            adapter_name,
            combination_type=combination_type,
            svd_rank=svd_rank,
            svd_clamp=svd_clamp,
            svd_full_matrices=svd_full_matrices,
            density=density,
            majority_sign_method=majority_sign_method,  # type: ignore[arg-type]
        )
